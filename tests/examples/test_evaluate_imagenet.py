"""The ImageNet evaluation example's code path, on the local one-image-per-class sample with a tiny model."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT.parent / "shared" / "data" / "imagenet-1k-sample"


def load_example():
    spec = importlib.util.spec_from_file_location("evaluate_imagenet", ROOT / "examples" / "evaluate_imagenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not SAMPLE.exists(), reason=f"the shared ImageNet sample is not at {SAMPLE}")
def test_imagenet_sample_with_tiny_1000_class_model(tmp_path):
    from datasets import load_dataset
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=1000)).eval()
    model.save_pretrained(tmp_path)
    processor = ViTImageProcessor(size={"height": 64, "width": 64})
    processor.save_pretrained(tmp_path)

    results = load_example().main([str(tmp_path), "--dataset", str(SAMPLE), "--limit", "24", "--batch-size", "8"])

    data = load_dataset(str(SAMPLE), split="validation").select(range(24))
    pixels = processor(images=[im.convert("RGB") for im in data["image"]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ranked = model(pixel_values=pixels).logits.argsort(-1, descending=True)
    labels = torch.tensor(data["label"])
    assert results["num_examples"] == 24
    assert results["top1"] == pytest.approx((ranked[:, 0] == labels).float().mean().item())
    assert results["top5"] == pytest.approx((ranked[:, :5] == labels[:, None]).any(-1).float().mean().item())
