"""Accuracy of (quantized) image classifiers on labelled image datasets, computed through `evaluate`.

Top-k accuracy is computed from the logits' ranking against the integer labels (string-label evaluators mis-score
datasets whose class names repeat, such as ImageNet's two "crane" classes). The metric is an `evaluate` module
shipped inside this package, so it loads without the Hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .calibration.data import image_column, label_column
from .errors import DFQError

METRIC_PATH = Path(__file__).parent / "metrics" / "top_k_accuracy"


def load_top_k_metric():
    """The packaged `evaluate` top-k accuracy metric (works offline)."""
    import evaluate

    return evaluate.load(str(METRIC_PATH))


@torch.no_grad()
def predict_top_k(
    model, dataset, image_processor, k: int = 5, batch_size: int = 64, progress: bool = True
) -> tuple[list[list[int]], list[int]]:
    """Runs `model` over a labelled image dataset.

    Returns:
        `tuple[list[list[int]], list[int]]`: the top-`k` class ids per example (best first) and the labels.
    """
    if image_processor is None:
        raise DFQError("Evaluation needs the model's image processor (AutoImageProcessor.from_pretrained(...)).")
    images_col, labels_col = image_column(dataset), label_column(dataset)
    if labels_col is None:
        labels_col = "label" if "label" in dataset.column_names else None
    if labels_col is None:
        raise DFQError(f"The dataset has no label column (columns: {dataset.column_names}).")
    model.eval()
    k = min(k, model.config.num_labels)
    predictions: list[list[int]] = []
    references: list[int] = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="evaluate", disable=not progress, leave=False):
        batch = dataset[start : start + batch_size]
        pixels = image_processor(images=[im.convert("RGB") for im in batch[images_col]], return_tensors="pt")
        logits = model(pixel_values=pixels["pixel_values"].to(model.device, model.dtype)).logits
        predictions.extend(logits.float().topk(k, dim=-1).indices.tolist())
        references.extend(int(label) for label in batch[labels_col])
    return predictions, references


def evaluate_accuracy(
    model, dataset, image_processor, batch_size: int = 64, top_k: tuple[int, ...] = (1, 5), progress: bool = True
) -> dict[str, Any]:
    """Top-1 (and top-5 when the model has more than 5 classes) accuracy of `model` on `dataset`.

    Args:
        model (`PreTrainedModel`): float or quantized image classifier.
        dataset (`datasets.Dataset`): map-style, with an `Image` column and integer labels.
        image_processor: the model's image processor.
        batch_size (`int`): evaluation batch size.
        top_k (`tuple[int, ...]`): accuracies to report (k larger than the number of classes is dropped).
        progress (`bool`): show a progress bar.

    Returns:
        `dict`: e.g. `{"top1": 0.91, "top5": 0.99, "num_examples": 10000}`.

    Example:
        >>> evaluate_accuracy(model, load_dataset("cifar10", split="test"), processor)  # doctest: +SKIP
        {'top1': 0.7512, 'top5': 0.9801, 'num_examples': 10000}
    """
    if len(dataset) == 0:
        raise DFQError("The evaluation dataset is empty.")
    ks = tuple(k for k in top_k if k == 1 or k < model.config.num_labels)
    predictions, references = predict_top_k(model, dataset, image_processor, max(ks), batch_size, progress)
    results = load_top_k_metric().compute(predictions=predictions, references=references, k=list(ks))
    results["num_examples"] = len(references)
    return results
