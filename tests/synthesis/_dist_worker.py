"""Worker of test_distributed.py: synthesizes with every synthesizer under torchrun and saves what it got.

Run: python -m torch.distributed.run --nproc_per_node 2 tests/synthesis/_dist_worker.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from safetensors.torch import save_file
from synth_helpers import BUILDERS, FAST, NORM

from optimum_dfq.synthesis import get_synthesizer

#: Which tiny model each synthesizer runs on (Swin covers windowed attention, SARDFQ covers crops).
CASES = {"psaq": "vit", "sardfq": "swin", "dfq-vit": "deit"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-images", type=int, default=5)
    args = parser.parse_args()
    from accelerate import PartialState

    report = {}
    for name, family in CASES.items():
        batches = []
        calib = get_synthesizer(name, **FAST).synthesize(
            BUILDERS[family](), args.num_images, seed=0,
            on_batch_end=lambda r, batches=batches: batches.append([r.start, r.stop]), **NORM,
        )
        state = PartialState()
        report[name] = {"batches": batches, "num_processes": state.num_processes}
        if state.is_main_process:
            save_file({"pixel_values": calib.pixel_values.contiguous(), "labels": calib.labels.contiguous()},
                      os.path.join(args.out, f"{name}.safetensors"))
    with open(os.path.join(args.out, f"rank{PartialState().process_index}.json"), "w") as file:
        json.dump(report, file)


if __name__ == "__main__":
    main()
