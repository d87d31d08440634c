"""Wall time of the RepQ-ViT backend (calibrate + re-parameterise) on a ViT-Base-sized random model.

Proves that range estimation never takes the `torch.quantile` size-limit path or NumPy's quantile fallback
(both are patched to raise during the run), and prints the wall time next to the time of one plain forward pass of
the same images, measured in the same run.

    python benchmarks/calibration_speed.py            # ViT-Base, 224px, 32 images
    python benchmarks/calibration_speed.py --layers 2 # quicker
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--output", default=str(RESULTS / "calibration_speed.txt"), help="where the printed lines go")
    args = parser.parse_args()
    report = PrintedReport(args.output)

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=args.layers,
                       num_attention_heads=12, intermediate_size=3072, num_labels=1000)
    model = ViTForImageClassification(config).eval()
    pixels = torch.randn(args.images, 3, 224, 224)
    largest = args.images * 197 * 3072
    report.print(f"ViT-Base-sized model ({args.layers} layers), {args.images} images at 224px; "
          f"largest calibrated tensor: {largest:,} elements (torch.quantile limit: {2**24:,})")

    with torch.no_grad():
        start = time.perf_counter()
        model(pixel_values=pixels)
        forward_s = time.perf_counter() - start

    with mock.patch.object(torch, "quantile", _forbidden("torch.quantile")), \
            mock.patch.object(np, "quantile", _forbidden("numpy.quantile")), \
            mock.patch.object(np, "percentile", _forbidden("numpy.percentile")):
        start = time.perf_counter()
        DataFreeViTQuantizer().quantize(model, config=DFQConfig(bits=args.bits), calibration_dataset=pixels,
                                        num_images=args.images)
        calibrate_s = time.perf_counter() - start

    report.print(f"one FP forward pass: {forward_s:.1f} s")
    report.print(f"RepQ-ViT calibration + re-parameterisation: {calibrate_s:.1f} s "
                 f"({calibrate_s / forward_s:.1f}x one forward pass); no quantile fallback was used")
    report.save()


if __name__ == "__main__":
    main()
