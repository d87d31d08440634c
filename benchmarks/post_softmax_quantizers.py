"""Attention-output error of post-softmax quantizers: TanQ vs log2, log-√2 and uniform.

Captures the attention probabilities `A` and values `V` of every attention layer of a model run on real CIFAR-10
images, calibrates each quantizer per layer on CIFAR-10 *train* images (half of `--images`; TanQ searches its shape
on `A·V`, the others use their own percentile-MSE calibration) and reports, on as many *test* images, the error of
the attention output `‖(A − Â)·V‖²` (V kept in float to isolate the probabilities' quantizer): its mean per element
and its size relative to `‖A·V‖²`, averaged over layers.

    python benchmarks/post_softmax_quantizers.py                                   # reference model if present
    python benchmarks/post_softmax_quantizers.py --model examples/models/swin-cifar10 --images 128
    python benchmarks/post_softmax_quantizers.py --images 1024 \\
        --calibration-data ../shared/data/cifar10/plain_text/train-00000-of-00001.parquet \\
        --data ../shared/data/cifar10/plain_text/test-00000-of-00001.parquet      # more images than the fixtures'
    python benchmarks/post_softmax_quantizers.py --model random                    # tiny random ViT
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

try:  # the PIL backend by name: importing ViTImageProcessor without torchvision prints a fallback notice
    from transformers import ViTImageProcessorPil as ViTImageProcessor
except ImportError:  # transformers before the backend split, where ViTImageProcessor is the PIL one
    from transformers import ViTImageProcessor

from optimum_dfq.models import get_adapter
from optimum_dfq.nn import AttentionQuantizers, use_quantized_attention
from optimum_dfq.nn.attention import ATTENTION_QUANTIZERS_ATTR
from optimum_dfq.quantizers import Quantizer, TanQuantizer, build_quantizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "examples" / "models" / "vit-cifar10"
DEFAULT_DATA = ROOT / "tests" / "fixtures" / "cifar10_tiny_test.parquet"
DEFAULT_CALIBRATION_DATA = ROOT / "tests" / "fixtures" / "cifar10_tiny_train.parquet"
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def load_model(path: str):
    if path == "random":
        torch.manual_seed(0)
        config = ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=128, num_labels=10)
        return ViTForImageClassification(config).eval(), None
    model = AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32).eval()
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(path)
    except OSError:
        processor = None
    return model, processor


def load_pixels(data: str, processor, num_images: int, image_size: int) -> torch.Tensor:
    from datasets import load_dataset

    dataset = load_dataset("parquet", data_files={"test": data}, split="test")
    if len(dataset) < num_images:
        raise SystemExit(f"{data} holds {len(dataset)} images, fewer than the {num_images} needed (half of --images).")
    dataset = dataset.select(range(num_images))
    column = next(name for name, feature in dataset.features.items() if type(feature).__name__ == "Image")
    processor = processor or ViTImageProcessor(size={"height": image_size, "width": image_size},
                                               image_mean=CIFAR_MEAN, image_std=CIFAR_STD)
    images = [image.convert("RGB") for image in dataset[column]]
    return processor(images=images, return_tensors="pt")["pixel_values"].float()


def _recorder(bits: int = 8) -> Quantizer:
    quantizer = build_quantizer("uniform", bits=bits)
    quantizer.set_mode("observe")
    return quantizer


@torch.no_grad()
def capture_probs_and_values(model, pixels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(A, V)` of every attention layer: `[images·windows, heads, queries, keys]`, `[..., keys, head_dim]`."""
    use_quantized_attention(model)
    recorders = []
    for name, attention in get_adapter(model).attention_modules(model):
        quantizers = AttentionQuantizers(_recorder(), _recorder(), _recorder(), _recorder(), site=name)
        quantizers.query.set_mode("off")
        quantizers.key.set_mode("off")
        setattr(attention, ATTENTION_QUANTIZERS_ATTR, quantizers)
        recorders.append((attention, quantizers))
    model(pixel_values=pixels)
    layers = []
    for attention, quantizers in recorders:
        layers.append((torch.cat(quantizers.probs._observed), torch.cat(quantizers.value._observed)))
        delattr(attention, ATTENTION_QUANTIZERS_ATTR)
    return layers


def make_quantizer(kind: str, bits: int) -> Quantizer:
    if kind == "tanq (symmetric)":
        return TanQuantizer(bits, centres=(0.5,))
    if kind == "tanq (spec grid, c <= 0.5)":
        return TanQuantizer(bits, centres=(0.1, 0.2, 0.3, 0.4, 0.5))
    return build_quantizer(kind, bits=bits)


def evaluate(kind: str, bits: int, calibration_layers, test_layers) -> tuple[float, float]:
    """Mean over layers of the A·V MSE and of the relative A·V error on the test images."""
    mse, relative = [], []
    for (calib_probs, calib_value), (test_probs, test_value) in zip(calibration_layers, test_layers):
        quantizer = make_quantizer(kind, bits)
        quantizer.set_mode("observe")
        if isinstance(quantizer, TanQuantizer):
            quantizer.observe_value(calib_value)
        quantizer(calib_probs)
        quantizer.calibrate()
        quantizer.set_mode("quantize")
        reference = test_probs @ test_value
        error = (quantizer(test_probs) - test_probs) @ test_value
        mse.append(float(error.pow(2).mean()))
        relative.append(float(error.pow(2).sum() / reference.pow(2).sum()))
    return sum(mse) / len(mse), sum(relative) / len(relative)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL) if (DEFAULT_MODEL / "config.json").exists() else "random",
                        help="model folder or Hub id, or 'random' for a tiny random ViT")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="parquet file of CIFAR-10 test images (evaluation)")
    parser.add_argument("--calibration-data", default=str(DEFAULT_CALIBRATION_DATA),
                        help="parquet file of CIFAR-10 train images (calibration)")
    parser.add_argument("--images", type=int, default=128,
                        help="images used: half from --calibration-data calibrate, half from --data evaluate")
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    args = parser.parse_args()

    torch.manual_seed(0)
    model, processor = load_model(args.model)
    size = model.config.image_size
    size = size if isinstance(size, int) else size[0]
    half = args.images // 2
    # separate runs: a Swin layer's rows are windows, fewer per image in later stages, so no row index splits images
    calibration_layers = capture_probs_and_values(model, load_pixels(args.calibration_data, processor, half, size))
    test_layers = capture_probs_and_values(model, load_pixels(args.data, processor, half, size))
    print(f"model: {args.model} ({type(model).__name__}, {len(test_layers)} attention layers); "
          f"{half} CIFAR-10 train images for calibration, {half} test images for evaluation")
    kinds = ["tanq", "tanq (symmetric)", "tanq (spec grid, c <= 0.5)", "log2", "log_sqrt2", "uniform"]
    header = " | ".join(f"{b}-bit A·V MSE | {b}-bit rel. err" for b in args.bits)
    print(f"\n| quantizer | {header} |\n|---|" + "---|" * (2 * len(args.bits)))
    for kind in kinds:
        cells = []
        for bits in args.bits:
            mse, relative = evaluate(kind, bits, calibration_layers, test_layers)
            cells += [f"{mse:.3e}", f"{relative:.3e}"]
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
