"""The ImageNet evaluation example's code path, on the local one-image-per-class sample with a tiny model."""

import importlib.util
import json
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


def test_output_in_a_new_folder_is_written_and_a_folder_is_refused(tmp_path, capsys):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=10)).eval()
    model.save_pretrained(tmp_path / "model")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "model")
    data = ROOT / "tests" / "fixtures" / "cifar10_tiny_test.parquet"
    argv = [str(tmp_path / "model"), "--dataset", str(data), "--split", "test", "--limit", "4"]

    output = tmp_path / "results" / "imagenet.json"
    results = load_example().main(argv + ["--output", str(output)])
    assert json.loads(output.read_text()) == results

    with pytest.raises(SystemExit) as exit_info:  # before the model and the dataset are loaded
        load_example().main(argv + ["--output", str(tmp_path)])
    assert exit_info.value.code == 2 and f"--output {tmp_path} is a folder" in capsys.readouterr().err
