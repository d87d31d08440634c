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

from .calibration.data import expected_image_shape, image_column, image_mode, is_streaming_dataset, label_column
from .errors import DFQError, ImageSizeError

METRIC_PATH = Path(__file__).parent / "metrics" / "top_k_accuracy"


def load_top_k_metric():
    """The packaged `evaluate` top-k accuracy metric (works offline)."""
    import evaluate

    return evaluate.load(str(METRIC_PATH))


def _labels(dataset, num_labels: int) -> list[int]:
    """The labels of `dataset`, checked to be class ids of the model."""
    column = label_column(dataset)
    if column is None:
        column = next((name for name in ("label", "labels") if name in dataset.column_names), None)
    if column is None:
        raise DFQError(
            f"The dataset has no label column (columns: {dataset.column_names}). Name the integer class-id column "
            "'label' (`dataset.rename_column(<name>, 'label')`) or cast it to a ClassLabel."
        )
    labels = dataset[column]
    if not all(isinstance(label, int) and not isinstance(label, bool) for label in labels):
        kinds = sorted({type(label).__name__ for label in labels})
        raise DFQError(
            f"Labels in column {column!r} must be integer class ids, got {kinds}. Map class names to ids first, e.g. "
            f"`dataset.map(lambda x: {{'{column}': model.config.label2id[x['{column}']]}})`."
        )
    outside = sorted({label for label in labels if not 0 <= label < num_labels})
    if outside:
        hint = " (-1 marks an unlabelled split, e.g. a test split without public labels)" if -1 in outside else ""
        raise DFQError(
            f"Labels {outside[:10]} in column {column!r} are not class ids of this model, which has {num_labels} "
            f"classes{hint}. Evaluate on a labelled split of the dataset the model was trained for."
        )
    return labels


def _refuse_streaming(dataset) -> None:
    if is_streaming_dataset(dataset):
        raise DFQError(
            "The evaluation dataset is a streaming datasets.IterableDataset; load the split without streaming=True "
            "(or materialise it: `Dataset.from_list(list(dataset.take(n)), features=dataset.features)`)."
        )


@torch.no_grad()
def predict_top_k(
    model, dataset, image_processor, k: int = 5, batch_size: int = 64, progress: bool = True
) -> tuple[list[list[int]], list[int]]:
    """Runs `model` over a labelled image dataset.

    The model runs in eval mode; its training mode is restored afterwards.

    Args:
        model (`PreTrainedModel`): float or quantized image classifier.
        dataset (`datasets.Dataset`): map-style, with an `Image` column and integer class ids in a `ClassLabel`
            column or in a column named `label` or `labels`.
        image_processor: the model's image processor.
        k (`int`): how many of the best classes to return per example (at most the number of classes).
        batch_size (`int`): evaluation batch size.
        progress (`bool`): show a progress bar.

    Returns:
        `tuple[list[list[int]], list[int]]`: the top-`k` class ids per example (best first) and the labels.

    Raises:
        `DFQError`: when the image processor is missing, the dataset is streaming or has no integer label column,
            or a label is not a class id of the model.
        `ImageSizeError`: when the processed images do not have the size and channels the model expects.
    """
    if image_processor is None:
        raise DFQError("Evaluation needs the model's image processor (AutoImageProcessor.from_pretrained(...)).")
    _refuse_streaming(dataset)
    images_col = image_column(dataset)
    labels = _labels(dataset, model.config.num_labels)
    expected = expected_image_shape(model)
    mode = image_mode(expected[0])
    was_training = model.training
    model.eval()
    k = min(k, model.config.num_labels)
    predictions: list[list[int]] = []
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc="evaluate", disable=not progress, leave=False):
            batch = dataset[start : start + batch_size]
            pixels = image_processor(images=[im.convert(mode) for im in batch[images_col]], return_tensors="pt")
            pixels = pixels["pixel_values"]
            if tuple(pixels.shape[1:]) != expected:
                raise ImageSizeError(
                    f"The image processor produces images of shape {tuple(pixels.shape[1:])} (C, H, W) but the model "
                    f"expects {expected}; evaluate with the model's own image processor "
                    "(AutoImageProcessor.from_pretrained(<model>))."
                )
            logits = model(pixel_values=pixels.to(model.device, model.dtype)).logits
            predictions.extend(logits.float().topk(k, dim=-1).indices.tolist())
    finally:
        model.train(was_training)
    return predictions, list(labels)


def evaluate_accuracy(
    model, dataset, image_processor, batch_size: int = 64, top_k: tuple[int, ...] = (1, 5), progress: bool = True
) -> dict[str, Any]:
    """Top-1 (and top-5 when the model has more than 5 classes) accuracy of `model` on `dataset`.

    Args:
        model (`PreTrainedModel`): float or quantized image classifier.
        dataset (`datasets.Dataset`): map-style, with an `Image` column and integer class ids in a `ClassLabel`
            column or in a column named `label` or `labels`.
        image_processor: the model's image processor.
        batch_size (`int`): evaluation batch size.
        top_k (`tuple[int, ...]`): accuracies to report. A k > 1 that is not smaller than the number of classes is
            dropped (its accuracy is always 1); top-1 is always kept.
        progress (`bool`): show a progress bar.

    Returns:
        `dict`: e.g. `{"top1": 0.91, "top5": 0.99, "num_examples": 10000}`.

    Raises:
        `DFQError`: when the dataset is empty or unlabelled (see [`predict_top_k`]), or no k of `top_k` is left.

    Example:
        >>> evaluate_accuracy(model, load_dataset("cifar10", split="test"), processor)  # doctest: +SKIP
        {'top1': 0.7512, 'top5': 0.9801, 'num_examples': 10000}
    """
    _refuse_streaming(dataset)
    if len(dataset) == 0:
        raise DFQError("The evaluation dataset is empty.")
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in top_k):
        raise DFQError(f"top_k={tuple(top_k)!r} must hold positive integers, e.g. (1, 5).")
    num_labels = model.config.num_labels
    ks = tuple(k for k in top_k if k == 1 or k < num_labels)
    if not ks:
        raise DFQError(
            f"top_k={tuple(top_k)!r} leaves no accuracy to report: the model has {num_labels} classes, so every "
            f"k >= {num_labels} is always 1. Ask for smaller k, e.g. top_k=(1,)."
        )
    predictions, references = predict_top_k(model, dataset, image_processor, max(ks), batch_size, progress)
    results = load_top_k_metric().compute(predictions=predictions, references=references, k=list(ks))
    results["num_examples"] = len(references)
    return results

