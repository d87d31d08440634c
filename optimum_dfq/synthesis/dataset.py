"""Calibration sets as `datasets.Dataset`s: save, load, share like any other data.

Columns: `pixel_values` (`Array3D` float32, the normalised images), `labels` (int64) and `soft_labels` (fixed-length
float32 lists) when present, and `metadata`: the calibration set's provenance as JSON. `DatasetInfo.description`
holds the same JSON for people browsing the dataset, but `push_to_hub` keeps only features and splits of the
`DatasetInfo`, so the column is what is read back; repeated strings cost next to nothing in Parquet.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibration.data import CalibrationSet, load_saved_dataset
from ..errors import CalibrationError

METADATA_COLUMN = "metadata"


def calibration_set_to_dataset(calibration_set: CalibrationSet):
    """Converts a calibration set to a `datasets.Dataset` (one row per image).

    Args:
        calibration_set (`CalibrationSet`): the set.

    Returns:
        `datasets.Dataset`

    Example:
        >>> ds = calibration_set_to_dataset(CalibrationSet(torch.zeros(2, 3, 4, 4), metadata={"seed": 0}))
        >>> ds.column_names
        ['pixel_values', 'metadata']
    """
    from datasets import Array3D, Dataset, DatasetInfo, Features, List, Value

    pixels = calibration_set.pixel_values.detach().cpu().float()
    count = pixels.shape[0]
    metadata = json.dumps(to_jsonable(calibration_set.metadata), sort_keys=True)
    data: dict[str, Any] = {"pixel_values": pixels.numpy()}
    features: dict[str, Any] = {"pixel_values": Array3D(shape=tuple(pixels.shape[1:]), dtype="float32")}
    if calibration_set.labels is not None:
        data["labels"] = calibration_set.labels.detach().cpu().long().numpy()
        features["labels"] = Value("int64")
    if calibration_set.soft_labels is not None:
        soft = calibration_set.soft_labels.detach().cpu().float()
        data["soft_labels"] = soft.numpy()
        features["soft_labels"] = List(Value("float32"), length=soft.shape[1])
    data[METADATA_COLUMN] = [metadata] * count
    features[METADATA_COLUMN] = Value("string")
    features = Features(features)
    return Dataset.from_dict(data, features=features, info=DatasetInfo(description=metadata, features=features))


def calibration_set_from_dataset_dict(dataset, split: str | None = None) -> CalibrationSet:
    """Converts a calibration-set dataset back to a [`CalibrationSet`] (inverse of [`calibration_set_to_dataset`]).

    Metadata is read from the first row's `metadata` column, or else from `DatasetInfo.description`; text that is
    not JSON is kept as `{"description": text}`.

    Args:
        dataset (`datasets.Dataset` or `datasets.DatasetDict`): as written by [`calibration_set_to_dataset`] (or
            loaded back from disk or the Hub).
        split (`str`, *optional*): split to use when `dataset` is a `DatasetDict` (required if it has several;
            ignored for a `Dataset`).

    Returns:
        `CalibrationSet`: float32 `pixel_values`, int64 `labels` and float32 `soft_labels` when those columns exist,
        and the metadata.

    Raises:
        `CalibrationError`: if a `DatasetDict` has several splits and `split` is `None`, if `split` is not one of
            them, if there is no `pixel_values` column, or if the dataset is empty.

    Example:

    ```python
    >>> import torch
    >>> from datasets import DatasetDict
    >>> from optimum_dfq import CalibrationSet
    >>> from optimum_dfq.synthesis import calibration_set_from_dataset_dict, calibration_set_to_dataset
    >>> calib = CalibrationSet(torch.zeros(2, 3, 4, 4), labels=torch.tensor([1, 2]), metadata={"seed": 0})
    >>> back = calibration_set_from_dataset_dict(DatasetDict(train=calibration_set_to_dataset(calib)))
    >>> back.pixel_values.shape, back.labels.tolist(), back.metadata
    (torch.Size([2, 3, 4, 4]), [1, 2], {'seed': 0})
    ```
    """
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        if split is None:
            if len(dataset) != 1:
                raise CalibrationError(f"The DatasetDict has splits {list(dataset)}; pass split=<name>.")
            split = next(iter(dataset))
        if split not in dataset:
            raise CalibrationError(f"The DatasetDict has no split {split!r}; its splits are {list(dataset)}.")
        dataset = dataset[split]
    if "pixel_values" not in dataset.column_names:
        raise CalibrationError(
            f"Not a calibration-set dataset: no 'pixel_values' column (columns: {dataset.column_names}). Pass a "
            "dataset written by calibration_set_to_dataset / save_calibration_set (a real image dataset goes to "
            "DataFreeViTQuantizer.quantize(calibration_dataset=...) as is)."
        )
    if len(dataset) == 0:
        raise CalibrationError("The calibration-set dataset has no rows; synthesize or save a non-empty set.")
    columns = dataset.with_format("numpy")[:]
    labels = columns.get("labels")
    soft_labels = columns.get("soft_labels")
    return CalibrationSet(
        pixel_values=torch.from_numpy(np.ascontiguousarray(columns["pixel_values"], dtype=np.float32)),
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)) if labels is not None else None,
        soft_labels=torch.from_numpy(np.asarray(soft_labels, dtype=np.float32)) if soft_labels is not None else None,
        metadata=_read_metadata(dataset),
    )


def save_calibration_set(calibration_set: CalibrationSet, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Writes a calibration set to the folder `path` with `datasets`' `save_to_disk`.

    The folder holds the dataset of [`calibration_set_to_dataset`]; read it back with [`load_calibration_set`] or
    `datasets.load_from_disk`. A folder that already holds files is refused unless `overwrite=True`: synthesized sets
    are expensive, and `save_to_disk` would replace an earlier one without a word.

    Args:
        calibration_set (`CalibrationSet`): the set to save.
        path (`str` or `os.PathLike`): the destination folder: a new or empty one, or any with `overwrite=True`.
        overwrite (`bool`, *optional*, defaults to `False`): write into a folder that already holds files.

    Raises:
        `CalibrationError`: `path` is a file, or a folder holding files while `overwrite` is `False`.

    Example:

    ```python
    >>> import os, tempfile, torch
    >>> from optimum_dfq import CalibrationSet
    >>> from optimum_dfq.synthesis import save_calibration_set
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     save_calibration_set(CalibrationSet(torch.zeros(2, 3, 4, 4)), os.path.join(tmp, "calib"))
    ...     os.path.isfile(os.path.join(tmp, "calib", "dataset_info.json"))
    True
    ```
    """
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise CalibrationError(f"{path} is a file; save the calibration set to a new or empty folder.")
    if not overwrite and target.is_dir() and any(target.iterdir()):
        raise CalibrationError(
            f"{path} already holds files ({', '.join(sorted(entry.name for entry in target.iterdir())[:3])}, ...); "
            "nothing was written. Save the calibration set to a new or empty folder, or pass overwrite=True to "
            "replace what is there."
        )
    calibration_set_to_dataset(calibration_set).save_to_disk(str(target))


def load_calibration_set(path: str | os.PathLike) -> CalibrationSet:
    """Reads a calibration set written by [`save_calibration_set`].

    Args:
        path (`str` or `os.PathLike`): the folder written by [`save_calibration_set`] (or by `save_to_disk` of a
            single-split `DatasetDict` in the same format).

    Returns:
        `CalibrationSet`

    Raises:
        `CalibrationError`: if `path` is not a folder, holds no dataset saved by `save_to_disk` or one with a corrupt
            or truncated data file, or holds one that is not a calibration set (see
            [`calibration_set_from_dataset_dict`]).

    Example:

    ```python
    >>> import os, tempfile, torch
    >>> from optimum_dfq import CalibrationSet
    >>> from optimum_dfq.synthesis import load_calibration_set, save_calibration_set
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     save_calibration_set(CalibrationSet(torch.zeros(2, 3, 4, 4), metadata={"seed": 0}), tmp)
    ...     calib = load_calibration_set(tmp)
    >>> len(calib), calib.metadata
    (2, {'seed': 0})
    ```
    """
    if not os.path.isdir(path):
        raise CalibrationError(
            f"No saved calibration set at {str(path)!r} (no such folder); check the path, or write one first with "
            "save_calibration_set(calibration_set, path)."
        )
    try:
        dataset = load_saved_dataset(str(path))
    except FileNotFoundError as err:
        raise CalibrationError(
            f"{str(path)!r} holds no saved dataset ({err}); pass a folder written by save_calibration_set."
        ) from err
    return calibration_set_from_dataset_dict(dataset)


def _read_metadata(dataset) -> dict[str, Any]:
    if METADATA_COLUMN in dataset.column_names and len(dataset) > 0:
        text = dataset[0][METADATA_COLUMN]
    else:
        text = dataset.info.description
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {"description": text}


def to_jsonable(value: Any) -> Any:
    """Converts tuples, tensors and numpy values inside metadata to plain JSON types."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    return value
