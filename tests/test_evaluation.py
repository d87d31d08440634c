import pytest
import torch

from optimum_dfq.errors import DFQError
from optimum_dfq.evaluation import evaluate_accuracy, load_top_k_metric

from .conftest import tiny_vit


def test_metric_module_loads_offline_and_counts():
    metric = load_top_k_metric()
    result = metric.compute(predictions=[[0, 1], [2, 0], [1, 2], [3, 1]], references=[0, 0, 2, 0], k=[1, 2])
    assert result == {"top1": 0.25, "top2": 0.75}


def test_end_to_end_matches_hand_computed_accuracy(cifar_test, image_processor):
    model = tiny_vit()
    subset = cifar_test.select(range(40))
    pixels = image_processor(images=[im.convert("RGB") for im in subset["img"]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    labels = subset["label"]
    ranked = logits.argsort(dim=-1, descending=True).tolist()
    top1 = sum(r[0] == y for r, y in zip(ranked, labels)) / len(labels)
    top5 = sum(y in r[:5] for r, y in zip(ranked, labels)) / len(labels)
    result = evaluate_accuracy(model, subset, image_processor, batch_size=16, progress=False)
    assert result["num_examples"] == 40
    assert result["top1"] == pytest.approx(top1)
    assert result["top5"] == pytest.approx(top5)


def test_top5_dropped_for_five_or_fewer_classes(cifar_test, image_processor):
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=5)).eval()
    result = evaluate_accuracy(model, cifar_test.select(range(8)), image_processor, progress=False)
    assert set(result) == {"top1", "num_examples"}


def test_errors(cifar_test):
    with pytest.raises(DFQError, match="image processor"):
        evaluate_accuracy(tiny_vit(), cifar_test.select(range(4)), None)
    with pytest.raises(DFQError, match="empty"):
        evaluate_accuracy(tiny_vit(), cifar_test.select([]), None)
