"""Size of a packed quantized checkpoint against the FP32 checkpoint of the same ViT-Small-sized model.

Builds a random ViT-Small-sized classifier (hidden 384, 12 layers, 6 heads, MLP 1536, 224px, patch 16, 1000 labels),
quantizes it data-free (Gaussian calibration images, few of them: sizes do not depend on the calibration), saves
both with `save_pretrained` (safetensors) and prints the size ratio, then reloads the quantized checkpoint and checks
that it predicts exactly like the in-memory quantized model.

    python benchmarks/checkpoint_size.py               # w4a4, target ratio <= 0.16
    python benchmarks/checkpoint_size.py --bits w3a4   # any preset
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from _report import RESULTS, PrintedReport
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from optimum_dfq import DataFreeViTQuantizer

TARGET_RATIO = 0.16


def _size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="w4a4")
    parser.add_argument("--images", type=int, default=4, help="Gaussian calibration images (sizes do not depend on it)")
    parser.add_argument("--output", default=str(RESULTS / "checkpoint_size.txt"), help="where the printed lines go")
    args = parser.parse_args()
    report = PrintedReport(args.output)

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                       intermediate_size=1536, num_labels=1000)
    model = ViTForImageClassification(config).eval()
    start = time.perf_counter()
    qmodel = DataFreeViTQuantizer().quantize(model, bits=args.bits, synthesizer="gaussian", num_images=args.images)
    quantize_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as fp_dir, tempfile.TemporaryDirectory() as q_dir:
        model.save_pretrained(fp_dir)
        qmodel.save_pretrained(q_dir)
        fp_bytes, q_bytes = _size(fp_dir), _size(q_dir)
        pixels = torch.randn(2, 3, 224, 224)
        reloaded = AutoModelForImageClassification.from_pretrained(q_dir)
        with torch.no_grad():
            diff = (reloaded(pixel_values=pixels).logits - qmodel(pixel_values=pixels).logits).abs().max().item()

    ratio = q_bytes / fp_bytes
    report.print(f"ViT-Small-sized model, {args.bits}, quantized in {quantize_s:.1f} s ({args.images} Gaussian images)")
    report.print(f"FP32 checkpoint:      {fp_bytes / 2**20:8.2f} MiB")
    report.print(f"quantized checkpoint: {q_bytes / 2**20:8.2f} MiB")
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    report.print(f"size ratio: {ratio:.4f} (target <= {TARGET_RATIO} for w4a4: {verdict})")
    report.print(f"reloaded vs in-memory quantized model, max |logit diff|: {diff}")
    report.save()


if __name__ == "__main__":
    main()
