"""Worker of test_distributed.py: synthesizes under torchrun and saves what it got.

Run: python -m torch.distributed.run --nproc_per_node 2 tests/synthesis/_dist_worker.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from safetensors.torch import save_file
from synth_helpers import BUILDERS, FAST, NORM

from optimum_dfq.errors import ConfigError
from optimum_dfq.synthesis import get_synthesizer
from optimum_dfq.synthesis.distributed import resolve_state

#: Which tiny model each synthesizer runs on (Swin covers windowed attention, SARDFQ covers crops).
CASES = {"psaq": "vit", "sardfq": "swin", "dfq-vit": "deit"}


class Interrupted(RuntimeError):
    """Raised by rank 0 after its first cached batch, to simulate a run that dies half-way."""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-images", type=int, default=5)
    parser.add_argument("--names", default=",".join(CASES), help="synthesizers to run, comma-separated")
    parser.add_argument("--cache-dir", action="append", default=None,
                        help="cache_dir (given several times: synthesize with each in turn); 'default' stands for None")
    parser.add_argument("--rank-cwd", action="store_true",
                        help="each rank works in its own folder <out>/rank<r>, so that a relative cache folder is "
                             "another folder for each process, as node-local storage under the same path is")
    parser.add_argument("--rank-hostnames", action="store_true",
                        help="each rank reports the host name node<r>, as if on its own machine")
    parser.add_argument("--record-errors", action="store_true",
                        help="report a ConfigError raised by a synthesis instead of failing")
    parser.add_argument("--interrupt", action="store_true", help="rank 0 raises after its first finished batch")
    parser.add_argument("--repeat", action="store_true", help="synthesize twice (the second time from the cache)")
    args = parser.parse_args()
    args.out = os.path.abspath(args.out)
    logging.basicConfig(level=logging.INFO, format=f"[rank{os.environ.get('RANK', '-')}] %(message)s")
    state = resolve_state()  # PartialState(cpu=True) on this CPU-only test machine, as the synthesizer builds it
    if args.rank_cwd:
        os.makedirs(os.path.join(args.out, f"rank{state.process_index}"), exist_ok=True)
        os.chdir(os.path.join(args.out, f"rank{state.process_index}"))
    if args.rank_hostnames:
        socket.gethostname = lambda: f"node{state.process_index}"
    report = {name: run_case(name, state, args) for name in args.names.split(",")}
    with open(os.path.join(args.out, f"rank{state.process_index}.json"), "w") as file:
        json.dump(report, file)
    state.destroy_process_group()  # gloo threads left at exit can abort the process ("terminate called ...")


def run_case(name: str, state, args: argparse.Namespace) -> dict:
    batches, errors = [], []

    def on_batch_end(record):
        batches.append([record.start, record.stop])
        if args.interrupt and state.is_main_process:
            raise Interrupted(f"simulated interruption after images {record.start}-{record.stop}")

    for cache_dir in args.cache_dir or ["default"]:
        for _ in range(2 if args.repeat else 1):
            try:
                calib = get_synthesizer(name, **FAST).synthesize(
                    BUILDERS[CASES[name]](), args.num_images, seed=0, cache_dir=None if cache_dir == "default" else
                    cache_dir, on_batch_end=on_batch_end, **NORM,
                )
            except ConfigError as err:
                if not args.record_errors:
                    raise
                errors.append(str(err))
    if state.is_main_process and not errors:
        save_file({"pixel_values": calib.pixel_values.contiguous(), "labels": calib.labels.contiguous()},
                  os.path.join(args.out, f"{name}.safetensors"))
    return {"batches": batches, "num_processes": state.num_processes, "errors": errors}


if __name__ == "__main__":
    main()
