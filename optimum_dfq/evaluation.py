"""Accuracy of (quantized) image classifiers on labelled image datasets, computed through `evaluate`.

Top-k accuracy is computed from the logits' ranking against the integer labels (string-label evaluators mis-score
datasets whose class names repeat, such as ImageNet's two "crane" classes). The metric is an `evaluate` module
shipped inside this package, so it loads without the Hub.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .calibration.data import (
    IMAGE_DECODE_ERRORS,
    check_image_processor,
    class_label_columns,
    expected_image_shape,
    first_undecodable_image,
    image_mode,
    is_streaming_dataset,
    resolve_image_column,
    resolve_label_column,
)
from .errors import DFQError, ImageSizeError
from .models.state import eval_mode

METRIC_PATH = Path(__file__).parent / "metrics" / "top_k_accuracy"
WORDNET_ID = re.compile(r"n\d{8}")


def load_top_k_metric():
    """The packaged `evaluate` top-k accuracy metric (works offline)."""
    import evaluate

    return evaluate.load(str(METRIC_PATH))


def _normalised(name: object) -> str:
    return " ".join(str(name).casefold().replace("_", " ").split())


def _wordnet_ids(names) -> bool:
    names = list(names)
    return bool(names) and all(WORDNET_ID.fullmatch(str(name)) for name in names)


def verify_class_names(dataset, column: str, config) -> None:
    """Refuses a `ClassLabel` column whose class names are not the model's `id2label` names for the same ids.

    Ids that fit the model's range are not enough: another dataset with as many classes, or the right dataset with
    its classes in another order, would be scored as if its classes were the model's. Names are compared after
    case folding and with `_` read as a space. Not checked: models with transformers' placeholder names (`LABEL_0`,
    ...), label columns without names (including `ClassLabel(num_classes=n)`'s `"0"`, `"1"`, ...), and class names
    given as WordNet ids (`n01440764`, ImageNet's folder names) on one side only, which human-readable names on the
    other cannot be compared with (WordNet ids on both sides are compared).

    Args:
        dataset (`datasets.Dataset`): the evaluation dataset.
        column (`str`): its `ClassLabel` column.
        config (`PretrainedConfig`): the model's config (`id2label`).

    Raises:
        `DFQError`: a class id whose dataset name differs from the model's, or, when the names cannot be compared,
            a number of classes other than the model's (with comparable names, a dataset of some of the model's
            classes under their ids is accepted).

    Example:
        >>> from datasets import ClassLabel, Dataset, Features
        >>> from transformers import PretrainedConfig
        >>> data = Dataset.from_dict({"label": [0, 1]}, features=Features({"label": ClassLabel(names=["cat", "dog"])}))
        >>> verify_class_names(data, "label", PretrainedConfig(id2label={0: "Cat", 1: "dog"}))  # same names
        >>> verify_class_names(data, "label", PretrainedConfig(id2label={0: "dog", 1: "cat"}))
        Traceback (most recent call last):
        ...
        optimum_dfq.errors.DFQError: The dataset's class names are not the model's for 2 of 2 class ids ...
    """
    names = list(dataset.features[column].names)
    id2label = {int(i): name for i, name in (getattr(config, "id2label", None) or {}).items()}
    comparable = (
        bool(names)
        and names != [str(i) for i in range(len(names))]  # `ClassLabel(num_classes=n)`: a column without names
        and not all(_normalised(name) == f"label {i}" for i, name in id2label.items())  # placeholder names
        and _wordnet_ids(names) == _wordnet_ids(id2label.values())  # WordNet ids on one side only: not comparable
    )
    if not comparable:
        num_labels = getattr(config, "num_labels", None)
        if names and num_labels is not None and len(names) != num_labels:  # the count is all there is to compare
            raise DFQError(
                f"The dataset's ClassLabel column {column!r} has {len(names)} classes, but the model has "
                f"{num_labels}, and their class names cannot be compared: it is another dataset (labels that happen "
                "to be in range would be scored as the model's classes). Evaluate on the dataset the model was "
                "trained for, or pass check_class_names=False (--no-class-name-check) if its labels really are the "
                "model's class ids."
            )
        return
    differ = [(i, name, id2label[i]) for i, name in enumerate(names)
              if i in id2label and _normalised(name) != _normalised(id2label[i])]
    if differ:
        shown = ", ".join(f"{i}: {ours!r} in the dataset vs {theirs!r} in the model" for i, ours, theirs in differ[:5])
        raise DFQError(
            f"The dataset's class names are not the model's for {len(differ)} of {len(names)} class ids ({shown}"
            f"{', ...' if len(differ) > 5 else ''}): it is another dataset, or its classes are in another order. "
            "Evaluate on the dataset the model was trained for (remap its labels with `dataset.align_labels_with_"
            "mapping(model.config.label2id, column)` if only the order differs), or pass check_class_names=False "
            "if the names only differ in spelling."
        )


def _class_label_column(dataset, config) -> str | None:
    """The `ClassLabel` column to score: the only one, or of several the one whose names are the model's `id2label`
    (CIFAR-100 has `fine_label` and `coarse_label`), or, when none has them (placeholder or WordNet-id names), the one
    with the model's number of classes; several without exactly one such column are refused."""
    columns = class_label_columns(dataset)
    if len(columns) < 2:
        return resolve_label_column(dataset)
    id2label = {int(i): _normalised(name) for i, name in (getattr(config, "id2label", None) or {}).items()}
    matching = [column for column in columns
                if [_normalised(name) for name in dataset.features[column].names]
                == [id2label.get(i) for i in range(len(dataset.features[column].names))]]
    if not matching:  # names not comparable: the number of classes is all there is, as in verify_class_names
        matching = [column for column in columns
                    if len(dataset.features[column].names) == getattr(config, "num_labels", None)]
    if len(matching) == 1:
        return matching[0]
    raise DFQError(
        f"The dataset has several ClassLabel columns {columns}, and {'none' if not matching else 'more than one'} "
        "has the model's class names (config.id2label) or, failing that, its number of classes, so the labels to "
        f"score are not known. Choose the column the model was trained on with label_column={columns[0]!r} "
        f"(command line: --label-column {columns[0]}), or drop the others: `dataset.remove_columns([...])` (e.g. "
        f"{columns[1:]})."
    )


def _label_column_to_score(dataset, config, check_names: bool, chosen: str | None) -> str:
    """The column of class ids to score: `chosen`, else the `ClassLabel` one (see [`_class_label_column`]), else
    `label` or `labels`; a `ClassLabel` column's names are checked against the model's when `check_names`."""
    from datasets import ClassLabel

    column = resolve_label_column(dataset, chosen) if chosen is not None else _class_label_column(dataset, config)
    if column is not None and check_names and isinstance(dataset.features[column], ClassLabel):
        verify_class_names(dataset, column, config)
    if column is None:
        column = next((name for name in ("label", "labels") if name in dataset.column_names), None)
    if column is None:
        raise DFQError(
            f"The dataset has no label column (columns: {dataset.column_names}). Choose the integer class-id column "
            "with label_column=<name> (command line: --label-column NAME), name it 'label' "
            "(`dataset.rename_column(<name>, 'label')`) or cast it to a ClassLabel."
        )
    return column


def _labels(dataset, config, check_names: bool = True, chosen: str | None = None) -> list[int]:
    """The labels of `dataset` (from the column `chosen`, if given), checked to be class ids of the model (and, in a
    `ClassLabel`, its classes)."""
    num_labels = config.num_labels
    column = _label_column_to_score(dataset, config, check_names, chosen)
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


def _check_dataset(dataset) -> None:
    """Refuses anything but a map-style `datasets.Dataset` (a streaming split, a `DatasetDict`, a list...)."""
    import datasets

    if is_streaming_dataset(dataset):
        raise DFQError(
            "The evaluation dataset is a streaming datasets.IterableDataset; load the split without streaming=True "
            "(or materialise it: `Dataset.from_list(list(dataset.take(n)), features=dataset.features)`)."
        )
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        raise DFQError(
            f"The evaluation dataset is a DatasetDict with splits {splits}; pass one split, e.g. "
            f"dataset[{splits[0]!r}] (or load_dataset(..., split={splits[0]!r}))."
        )
    if not isinstance(dataset, datasets.Dataset):
        raise DFQError(
            f"The evaluation dataset must be a datasets.Dataset with an Image column and a label column, got "
            f"{type(dataset).__name__}; build one with `datasets.Dataset.from_list(...)` or `load_dataset(...)`."
        )


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DFQError(f"batch_size={batch_size!r} must be a positive integer, e.g. 64.")


@torch.no_grad()
def predict_top_k(
    model, dataset, image_processor, k: int = 5, batch_size: int = 64, progress: bool = True,
    check_class_names: bool = True, *, image_column: str | None = None, label_column: str | None = None,
) -> tuple[list[list[int]], list[int]]:
    """Runs `model` over a labelled image dataset.

    The model runs in eval mode; its training mode is restored afterwards.

    Args:
        model (`PreTrainedModel`): float or quantized image classifier.
        dataset (`datasets.Dataset`): map-style, with an `Image` column and integer class ids in a `ClassLabel`
            column (of several, the one whose names are the model's `id2label`, else the one with its number of
            classes) or in a column named `label` or `labels`.
        image_processor: the model's image processor.
        k (`int`): how many of the best classes to return per example (at most the number of classes).
        batch_size (`int`): evaluation batch size.
        progress (`bool`): show a progress bar.
        check_class_names (`bool`, defaults to `True`): refuse a `ClassLabel` column whose names are not the model's
            `id2label` names (see [`verify_class_names`]).
        image_column (`str`, *optional*): the `Image` column to read; needed when the dataset has several.
        label_column (`str`, *optional*): the `ClassLabel` or integer column of class ids, instead of the one found
            as above.

    Returns:
        `tuple[list[list[int]], list[int]]`: the top-`k` class ids per example (best first) and the labels.

    Raises:
        `DFQError`: when the image processor is missing (or a path was given instead), the dataset is not a
            map-style `datasets.Dataset` (a streaming split, a `DatasetDict`) or has no integer label column (or
            several `ClassLabel` columns, none or more than one of them with the model's class names or, failing
            that, number of classes), a label is not a class id of the model, the dataset's class names are not the
            model's, an example has no image or one that does not decode, or `batch_size` is not positive.
        `CalibrationError` (a `DFQError`): when the dataset has no `Image` column, or several and no
            `image_column`, or a chosen column is missing or of another type.
        `ImageSizeError`: when the processed images do not have the size and channels the model expects.
    """
    if image_processor is None:
        raise DFQError("Evaluation needs the model's image processor (AutoImageProcessor.from_pretrained(...)).")
    check_image_processor(image_processor)
    _check_dataset(dataset)
    _check_batch_size(batch_size)
    images_col = resolve_image_column(dataset, image_column)
    labels = _labels(dataset, model.config, check_class_names, label_column)
    expected = expected_image_shape(model)
    mode = image_mode(expected[0])
    k = min(k, model.config.num_labels)
    predictions: list[list[int]] = []
    with eval_mode(model):
        for start in tqdm(range(0, len(dataset), batch_size), desc="evaluate", disable=not progress, leave=False):
            try:
                batch = dataset[start : start + batch_size]
                missing = [start + i for i, image in enumerate(batch[images_col]) if image is None]
                if missing:
                    raise DFQError(
                        f"Evaluation example {missing[0]} has no image (None in column {images_col!r}); drop such "
                        f"rows first, e.g. `dataset.filter(lambda x: x[{images_col!r}] is not None)`."
                    )
                images = [im.convert(mode) for im in batch[images_col]]
            except IMAGE_DECODE_ERRORS as err:
                stop = min(start + batch_size, len(dataset))
                row, cause = first_undecodable_image(dataset.select(range(start, stop)), images_col) or (0, err)
                raise DFQError(
                    f"Evaluation example {start + row} (column {images_col!r}) cannot be decoded ({cause}): a corrupt "
                    "or truncated image file. Replace the file, or drop the example, e.g. "
                    f"`dataset.select([i for i in range(len(dataset)) if i != {start + row}])`."
                ) from err
            pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
            if tuple(pixels.shape[1:]) != expected:
                raise ImageSizeError(
                    f"The image processor produces images of shape {tuple(pixels.shape[1:])} (C, H, W) but the model "
                    f"expects {expected}; evaluate with the model's own image processor "
                    "(AutoImageProcessor.from_pretrained(<model>))."
                )
            logits = model(pixel_values=pixels.to(model.device, model.dtype)).logits
            predictions.extend(logits.float().topk(k, dim=-1).indices.tolist())
    return predictions, list(labels)


def evaluate_accuracy(
    model, dataset, image_processor, batch_size: int = 64, top_k: tuple[int, ...] = (1, 5), progress: bool = True,
    check_class_names: bool = True, *, image_column: str | None = None, label_column: str | None = None,
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
        check_class_names (`bool`, defaults to `True`): refuse a `ClassLabel` column whose names are not the model's
            `id2label` names (another dataset, or classes in another order).
        image_column (`str`, *optional*): the `Image` column to read; needed when the dataset has several.
        label_column (`str`, *optional*): the `ClassLabel` or integer column of class ids (see [`predict_top_k`]).

    Returns:
        `dict`: e.g. `{"top1": 0.91, "top5": 0.99, "num_examples": 10000}`.

    Raises:
        `DFQError`: when the dataset is empty or unlabelled, its image or label column is ambiguous or a chosen one
            is not usable (see [`predict_top_k`]), or no k of `top_k` is left.

    Example:
        >>> evaluate_accuracy(model, load_dataset("cifar10", split="test"), processor)  # doctest: +SKIP
        {'top1': 0.7512, 'top5': 0.9801, 'num_examples': 10000}
    """
    _check_dataset(dataset)
    _check_batch_size(batch_size)
    if len(dataset) == 0:
        raise DFQError("The evaluation dataset is empty.")
    if not len(top_k):
        raise DFQError("top_k=() is empty: ask for at least one accuracy, e.g. top_k=(1, 5).")
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in top_k):
        raise DFQError(f"top_k={tuple(top_k)!r} must hold positive integers, e.g. (1, 5).")
    num_labels = model.config.num_labels
    ks = tuple(k for k in top_k if k == 1 or k < num_labels)
    if not ks:
        raise DFQError(
            f"top_k={tuple(top_k)!r} leaves no accuracy to report: the model has {num_labels} classes, so every "
            f"k >= {num_labels} is always 1. Ask for smaller k, e.g. top_k=(1,)."
        )
    predictions, references = predict_top_k(model, dataset, image_processor, max(ks), batch_size, progress,
                                            check_class_names, image_column=image_column, label_column=label_column)
    results = load_top_k_metric().compute(predictions=predictions, references=references, k=list(ks))
    results["num_examples"] = len(references)
    return results

