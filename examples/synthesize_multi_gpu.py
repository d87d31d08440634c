"""Synthesize a data-free calibration set on several GPUs (or CPU processes) and save it as a dataset.

The images are cut into batches of `--batch-size` (default `min(32, ceil(num_images / processes))`, a batch for
every process) on a fixed grid and whole batches are split over the processes (image `i` depends on the seed, `i` and
its batch, so the set is the same on one GPU or eight for the same `--batch-size`: fix it for images that do not
depend on the number of processes), gathered, and written by the main process with `save_calibration_set` (a
`datasets` folder; load it with `optimum_dfq.synthesis.load_calibration_set` or `datasets.load_from_disk`). A process
gets no work when there are fewer batches than processes.

    # 8 GPUs, one batch of 32 PSAQ-ViT images each:
    accelerate launch --multi_gpu --num_processes 8 examples/synthesize_multi_gpu.py \\
        --model facebook/deit-tiny-patch16-224 --synthesizer psaq --num-images 256 --output calib/deit-tiny-psaq
    # CPU-only machine, 2 processes (torchrun; the script builds PartialState(cpu=True) itself):
    torchrun --nproc_per_node 2 examples/synthesize_multi_gpu.py --model examples/models/vit-cifar10 \\
        --num-images 8 --batch-size 4 --hyperparameters '{"iterations": [2, 2], "warmup": 1}' --output /tmp/calib
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from accelerate import PartialState

from optimum_dfq import DataFreeViTQuantizer
from optimum_dfq.synthesis import get_synthesizer, save_calibration_set, save_image_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id or folder of a ViT/DeiT/Swin classifier")
    parser.add_argument("--synthesizer", default="psaq", help="psaq, sardfq, dfq-vit or gaussian")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per optimisation batch (default min(32, ceil(num_images / processes))); "
                             "another value changes the images slightly")
    parser.add_argument("--hyperparameters", default="{}", help="JSON overrides of the synthesizer's defaults")
    parser.add_argument("--cache-dir", default=None, help="cache/resume directory shared by all processes (default: "
                        "the library's synthesis cache, $HF_HOME/optimum_dfq/synthesis, if every process is on one "
                        "machine)")
    parser.add_argument("--output", required=True, help="folder to save the calibration set to")
    parser.add_argument("--grid", default=None, help="also write a PNG grid of the first images here")
    args = parser.parse_args()
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):  # checked before hours of synthesis
        parser.error(f"--output {args.output} exists and is not an empty folder; pass a new or empty folder.")

    state = PartialState(cpu=not torch.cuda.is_available())
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING)
    # float32 whatever the checkpoint's dtype (transformers would keep a float16 one in float16)
    quantizer = DataFreeViTQuantizer.from_pretrained(args.model)
    model, processor = quantizer.model.to(state.device), quantizer.image_processor
    synthesizer = get_synthesizer(args.synthesizer, **json.loads(args.hyperparameters))
    kwargs = {"image_processor": processor}
    if args.synthesizer != "gaussian":
        kwargs.update(batch_size=args.batch_size, state=state, cache_dir=args.cache_dir)
    calibration = synthesizer.synthesize(model, args.num_images, seed=args.seed, **kwargs)
    if state.is_main_process:
        save_calibration_set(calibration, args.output)
        if args.grid:
            save_image_grid(calibration, args.grid, processor.image_mean, processor.image_std)
        print(f"{len(calibration)} images from {state.num_processes} process(es) saved to {args.output}")
    state.wait_for_everyone()
    state.destroy_process_group()  # gloo threads left at exit can abort a finished run ("terminate called ...")


if __name__ == "__main__":
    main()
