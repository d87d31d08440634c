"""Wall time of the RepQ-ViT backend (calibrate + re-parameterise) on a ViT-Base-sized random model.

Proves that range estimation never takes the `torch.quantile` size-limit path or NumPy's quantile fallback
(both are patched to raise during the run), and prints the wall time next to the time of one plain forward pass of
the same images (the median of `--repeats` passes after an untimed warm-up), measured in the same run on the same
threads (`--threads`, default: torch's).

    python benchmarks/calibration_speed.py            # ViT-Base, 224px, 32 images
    python benchmarks/calibration_speed.py --layers 2 # quicker
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import numpy as np
import torch
from _report import RESULTS, PrintedReport
from transformers import ViTConfig, ViTForImageClassification

from optimum_dfq import DataFreeViTQuantizer, DFQConfig


def _forbidden(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} was called: the quantile fallback must not be used")

    return fail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--bits", default="w4a4")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed FP forward passes (after one untimed)")
    parser.add_argument("--output", default=str(RESULTS / "calibration_speed.txt"), help="where the printed lines go")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    report = PrintedReport(args.output)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=args.layers,
                       num_attention_heads=12, intermediate_size=3072, num_labels=1000)
    model = ViTForImageClassification(config).eval()
    pixels = torch.randn(args.images, 3, 224, 224)
    largest = args.images * 197 * 3072
    report.print(f"ViT-Base-sized model ({args.layers} layers), {args.images} images at 224px, "
                 f"{torch.get_num_threads()} thread(s); "
                 f"largest calibrated tensor: {largest:,} elements (torch.quantile limit: {2**24:,})")

    forward_times = []
    with torch.no_grad():
        for _ in range(1 + args.repeats):  # the first pass is the warm-up
            start = time.perf_counter()
            model(pixel_values=pixels)
            forward_times.append(time.perf_counter() - start)
    forward_s = statistics.median(forward_times[1:])

    with mock.patch.object(torch, "quantile", _forbidden("torch.quantile")), \
            mock.patch.object(np, "quantile", _forbidden("numpy.quantile")), \
            mock.patch.object(np, "percentile", _forbidden("numpy.percentile")):
        start = time.perf_counter()
        DataFreeViTQuantizer().quantize(model, config=DFQConfig(bits=args.bits), calibration_dataset=pixels,
                                        num_images=args.images)
        calibrate_s = time.perf_counter() - start

    report.print(f"one FP forward pass (median of {args.repeats} after 1 warm-up): {forward_s:.1f} s")
    report.print(f"RepQ-ViT calibration + re-parameterisation: {calibrate_s:.1f} s "
                 f"({calibrate_s / forward_s:.1f}x one forward pass); no quantile fallback was used")
    report.save()


if __name__ == "__main__":
    main()
