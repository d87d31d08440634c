"""Calibration sets: the images (real or synthetic) that calibration runs on, with their labels and provenance."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CalibrationError, ConfigError, ImageSizeError

logger = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    """Calibration images in the model's normalised input space.

    Args:
        pixel_values (`torch.Tensor`): `[N, C, H, W]` float tensor, already normalised by the model's image processor
            (or synthesized in that space).
        labels (`torch.Tensor`, *optional*): `[N]` hard labels (class ids), when known.
        soft_labels (`torch.Tensor`, *optional*): `[N, num_classes]` soft targets, when the synthesizer made them.
        metadata (`dict[str, Any]`, *optional*): provenance: source/method, hyper-parameters, seed, model, library
            version (empty by default).

    Raises:
        `CalibrationError`: when `pixel_values` is not a 4-D floating-point tensor, holds no image, or holds NaN/inf
            values.

    Example:

    ```python
    >>> import torch
    >>> from optimum_dfq.calibration import CalibrationSet
    >>> calibration = CalibrationSet(pixel_values=torch.randn(10, 3, 32, 32), metadata={"source": "gaussian"})
    >>> len(calibration), [batch.shape[0] for batch in calibration.batches(4)]
    (10, [4, 4, 2])
    ```
    """

    pixel_values: torch.Tensor
    labels: torch.Tensor | None = None
    soft_labels: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.pixel_values, torch.Tensor) or self.pixel_values.dim() != 4:
            shape = getattr(self.pixel_values, "shape", None)
            raise CalibrationError(
                f"Calibration pixel_values must be a [N, C, H, W] tensor, got {type(self.pixel_values).__name__} "
                f"with shape {shape}."
            )
        if self.pixel_values.shape[0] == 0:
            raise CalibrationError(
                "The calibration set is empty. Pass at least one image (num_images >= 1, or a non-empty dataset)."
            )
        if not self.pixel_values.is_floating_point():
            raise CalibrationError(
                f"Calibration pixel_values have dtype {self.pixel_values.dtype}; they must be float pixel values "
                "already normalised by the model's image processor (image_processor(images, "
                "return_tensors='pt').pixel_values). To calibrate on raw images, pass a datasets.Dataset of them."
            )
        if not torch.isfinite(self.pixel_values).all():
            raise CalibrationError(
                "The calibration images contain NaN or inf values; regenerate them or check the preprocessing."
            )

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    def check_image_size(self, model: torch.nn.Module) -> None:
        """Raises [`ImageSizeError`] if the images do not match the model's `image_size` and `num_channels`."""
        expected = expected_image_shape(model)
        if tuple(self.pixel_values.shape[1:]) != expected:
            raise ImageSizeError(
                f"Calibration images have shape {tuple(self.pixel_values.shape[1:])} (C, H, W) but the model expects "
                f"{expected}. Preprocess them with the model's own image processor (it resizes to "
                f"{expected[1]}x{expected[2]}), or synthesize them for this model."
            )

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        """Splits `pixel_values` into consecutive batches of `batch_size` images (the last one may be smaller).

        Args:
            batch_size (`int`): images per batch.

        Returns:
            `list[torch.Tensor]`: views of `pixel_values`, in order.
        """
        return list(torch.split(self.pixel_values, batch_size))


def expected_image_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """Returns the `(channels, height, width)` of the images a model accepts, read from its config.

    Args:
        model (`PreTrainedModel`): a model whose config has `image_size` (an `int` or a `(height, width)` pair) and
            `num_channels`.

    Returns:
        `tuple[int, int, int]`

    Example:

    ```python
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq.calibration import expected_image_shape
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> expected_image_shape(model)
    (3, 32, 32)
    ```
    """
    config = model.config
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return int(config.num_channels), int(height), int(width)


def resolve_image_column(dataset, chosen: str | None = None) -> str:
    """The `datasets.Image` column to read images from: the one chosen, else the dataset's only one.

    Args:
        dataset (`datasets.Dataset`): an image dataset.
        chosen (`str`, *optional*): the column the caller named (`image_column=`, `--image-column`).

    Returns:
        `str`: the column name.

    Raises:
        `CalibrationError`: when the chosen column is missing or not an `Image` column, or, with none chosen, when
            the dataset has no `Image` column or several (which one holds the images is not guessed).

    Example:
        >>> from datasets import Dataset, Features, Image
        >>> from PIL import Image as PILImage
        >>> blank = PILImage.new("RGB", (4, 4))
        >>> features = Features({"left": Image(), "right": Image()})
        >>> pairs = Dataset.from_dict({"left": [blank], "right": [blank]}, features)
        >>> resolve_image_column(pairs, "right")
        'right'
        >>> resolve_image_column(pairs)
        Traceback (most recent call last):
        ...
        optimum_dfq.errors.CalibrationError: The dataset has several image columns ['left', 'right']...
    """
    from datasets import Image, Value

    if chosen is not None:
        return _chosen_column(dataset, chosen, "image_column", "an Image", lambda feature: isinstance(feature, Image))
    columns = [name for name, feature in dataset.features.items() if isinstance(feature, Image)]
    if not columns:
        texts = [name for name, feature in dataset.features.items()
                 if isinstance(feature, Value) and feature.dtype in ("string", "large_string")]
        cast = (f" If column {texts[0]!r} holds image file paths or URLs, make it one with "
                f"`dataset.cast_column({texts[0]!r}, datasets.Image())`.") if texts else ""
        raise CalibrationError(
            f"The dataset has no image column (features: {list(dataset.features)}); an image-classification "
            f"dataset with a `datasets.Image` feature is needed.{cast}"
        )
    if len(columns) > 1:
        raise CalibrationError(
            f"The dataset has several image columns {columns}, so which one holds the images to use is not known. "
            f"Choose one with image_column={columns[0]!r} (command line: --image-column {columns[0]}), or drop the "
            f"others (`dataset.remove_columns({columns[1:]})`)."
        )
    return columns[0]


def resolve_label_column(dataset, chosen: str | None = None) -> str | None:
    """The column to read class labels from: the one chosen, else the dataset's only `ClassLabel` column, if any.

    Args:
        dataset (`datasets.Dataset`): an image dataset.
        chosen (`str`, *optional*): the column the caller named (`label_column=`, `--label-column`): a `ClassLabel`
            or integer column.

    Returns:
        `str` or `None`: the column name; `None` when none is chosen and the dataset has no `ClassLabel` column.

    Raises:
        `CalibrationError`: when the chosen column is missing or neither a `ClassLabel` nor an integer column, or,
            with none chosen, when the dataset has several `ClassLabel` columns.

    Example:
        >>> from datasets import ClassLabel, Dataset, Features, Value
        >>> features = Features({"fine": ClassLabel(names=["a", "b"]), "coarse": ClassLabel(names=["x"]),
        ...                      "id": Value("int64")})
        >>> data = Dataset.from_dict({"fine": [1], "coarse": [0], "id": [7]}, features)
        >>> resolve_label_column(data, "fine"), resolve_label_column(data.remove_columns(["fine", "coarse"]))
        ('fine', None)
    """
    if chosen is not None:
        return _chosen_column(dataset, chosen, "label_column", "a ClassLabel or integer", _is_label_feature)
    columns = class_label_columns(dataset)
    if len(columns) > 1:
        raise CalibrationError(
            f"The dataset has several ClassLabel columns {columns}, so which one holds the labels is not known. "
            f"Choose one with label_column={columns[0]!r} (command line: --label-column {columns[0]}), or drop the "
            f"others (`dataset.remove_columns({columns[1:]})`)."
        )
    return columns[0] if columns else None


def class_label_columns(dataset) -> list[str]:
    """The names of a dataset's `ClassLabel` columns, in column order."""
    from datasets import ClassLabel

    return [name for name, feature in dataset.features.items() if isinstance(feature, ClassLabel)]


def _is_label_feature(feature: Any) -> bool:
    from datasets import ClassLabel, Value

    return isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")))


def _chosen_column(dataset, chosen: str, option: str, kind: str, accepts: Callable[[Any], bool]) -> str:
    """`chosen`, refused with the dataset's features when it is not a column of the kind `accepts` takes."""
    if not isinstance(chosen, str):
        raise CalibrationError(f"{option} must be a column name (str), got {type(chosen).__name__} {chosen!r}.")
    features = ", ".join(f"{name} ({_feature_kind(feature)})" for name, feature in dataset.features.items())
    feature = dataset.features.get(chosen)
    if feature is None:
        raise CalibrationError(
            f"{option}={chosen!r} is not a column of the dataset; its features are: {features}. Pass one of them."
        )
    if not accepts(feature):
        raise CalibrationError(
            f"{option}={chosen!r} is not {kind} column (it holds {_feature_kind(feature)}); the dataset's "
            f"features are: {features}. Pass {kind} column."
        )
    return chosen


def _feature_kind(feature: Any) -> str:
    """`Image`, `ClassLabel`, `int64`, `string`...: what a `datasets` feature holds, in a word."""
    from datasets import Value

    return feature.dtype if isinstance(feature, Value) else type(feature).__name__


def is_streaming_dataset(dataset: Any) -> bool:
    """Whether `dataset` is a streaming `datasets.IterableDataset` (no length, no seeded sampling)."""
    import datasets

    return isinstance(dataset, datasets.IterableDataset)


def image_mode(num_channels: int) -> str:
    """The PIL mode images are converted to before preprocessing for a model with `num_channels` input channels.

    Args:
        num_channels (`int`): the model's `config.num_channels`.

    Returns:
        `str`: `"L"` for 1 channel, `"RGB"` for 3.

    Raises:
        `ImageSizeError`: for any other channel count (no PIL mode maps onto it unambiguously).

    Example:
        >>> image_mode(3), image_mode(1)
        ('RGB', 'L')
    """
    modes = {1: "L", 3: "RGB"}
    if num_channels not in modes:
        raise ImageSizeError(
            f"The model takes {num_channels}-channel images; only 1-channel (grayscale) and 3-channel (RGB) models can "
            "read images from a dataset. Pass preprocessed pixel values as a [N, C, H, W] tensor instead."
        )
    return modes[num_channels]


#: What PIL raises for an image file it cannot decode: `UnidentifiedImageError` and "image file is truncated" are
#: `OSError`s, a broken PNG chunk a `SyntaxError`.
IMAGE_DECODE_ERRORS = (OSError, SyntaxError)


def first_undecodable_image(dataset, column: str) -> tuple[int, BaseException] | None:
    """The first row of `dataset` whose image in `column` does not decode, with PIL's error (`None` if all do).

    Args:
        dataset (`datasets.Dataset`): the rows to check, one by one.
        column (`str`): their `datasets.Image` column.

    Returns:
        `tuple[int, BaseException]` or `None`
    """
    for index in range(len(dataset)):
        try:
            image = dataset[index][column]
            if image is not None:
                image.load()
        except IMAGE_DECODE_ERRORS as err:
            return index, err
    return None


def check_image_processor(image_processor: Any) -> None:
    """Refuses a path or Hub id given where the image processor object belongs.

    Args:
        image_processor: what was given as the image processor.

    Raises:
        `ConfigError`: when it is a `str` or `os.PathLike` (it failed later as "'str' object is not callable").

    Example:
        >>> check_image_processor(None)  # none given: the paths that need one say so
        >>> check_image_processor("google/vit-base-patch16-224")
        Traceback (most recent call last):
        ...
        optimum_dfq.errors.ConfigError: image_processor must be an image processor, got str ...
    """
    if isinstance(image_processor, (str, os.PathLike)):
        raise ConfigError(
            f"image_processor must be an image processor, got {type(image_processor).__name__} "
            f"{os.fspath(image_processor)!r}; load it first: "
            f"AutoImageProcessor.from_pretrained({os.fspath(image_processor)!r})."
        )


def check_processor_output_size(image_processor: Any, expected: tuple[int, int, int]) -> None:
    """Refuses an image processor that resizes every image to another size than the model takes.

    The processor is run on two blank images of different sizes: if both come out at one fixed size, that size must be
    the model's. A processor that keeps each image's own size (`do_resize=False`) cannot be judged this way and passes;
    so do objects that are not `transformers` image processors (only `image_mean` / `image_std` are read from them),
    processors of models with other than 1 or 3 channels (no PIL image to probe them with) and processors that fail
    on the blank probe images (e.g. a 3-channel mean for a 1-channel model; the paths that use them report it).

    Args:
        image_processor: the image processor given with the model.
        expected (`tuple[int, int, int]`): the model's `(C, H, W)` (see [`expected_image_shape`]).

    Raises:
        `ImageSizeError`: when the processor resizes every image to another height and width than the model's.

    Example:
        >>> from transformers import ViTImageProcessor
        >>> check_processor_output_size(ViTImageProcessor(size={"height": 32, "width": 32}), (3, 32, 32))
        >>> try:
        ...     check_processor_output_size(ViTImageProcessor(size={"height": 64, "width": 64}), (3, 32, 32))
        ... except ImageSizeError as err:
        ...     print(str(err).split(";")[0])
        The image processor resizes every image to 64x64 (H x W) but the model takes 32x32 images
    """
    from PIL import Image
    from transformers.image_processing_base import ImageProcessingMixin

    if not isinstance(image_processor, ImageProcessingMixin) or expected[0] not in (1, 3):
        return  # no PIL image of another channel count to probe it with
    mode = image_mode(expected[0])
    try:
        sizes = {tuple(image_processor(images=[Image.new(mode, (width, height))], return_tensors="pt")["pixel_values"]
                       .shape[-2:]) for width, height in ((37, 41), (53, 29))}
    except Exception as err:  # noqa: BLE001 - a courtesy probe; a failing processor is judged where it is used
        logger.debug("Could not probe the image processor's output size (%s: %s)", type(err).__name__, err)
        return
    if len(sizes) == 1 and (fixed := next(iter(sizes))) != tuple(expected[1:]):
        raise ImageSizeError(
            f"The image processor resizes every image to {fixed[0]}x{fixed[1]} (H x W) but the model takes "
            f"{expected[1]}x{expected[2]} images; pass the model's own image processor "
            f"(AutoImageProcessor.from_pretrained(<model>)) or one with size={{'height': {expected[1]}, "
            f"'width': {expected[2]}}}."
        )


def _calibration_label_column(dataset, chosen: str | None) -> str | None:
    """[`resolve_label_column`] for calibration, which does not use labels: several `ClassLabel` columns and none
    chosen mean no labels are read (logged), not an error."""
    columns = class_label_columns(dataset)
    if chosen is None and len(columns) > 1:
        logger.info("The calibration dataset has several ClassLabel columns %s and none was chosen; calibration does "
                    "not use labels, so none are read (pass label_column= / --label-column to keep them).", columns)
        return None
    return resolve_label_column(dataset, chosen)


def calibration_set_from_dataset(
    dataset, image_processor, num_images: int | None = None, seed: int = 0, shuffle: bool = True,
    num_channels: int = 3, image_column: str | None = None, label_column: str | None = None,
) -> CalibrationSet:
    """Takes real images from a `datasets` image dataset and runs them through the model's image processor.

    Images are converted to RGB first (grayscale for a 1-channel model). Labels come from the `ClassLabel` column,
    if there is one (or from `label_column`); calibration itself does not use them, so with several `ClassLabel`
    columns and none chosen the set has no labels (logged) rather than an error.

    Args:
        dataset (`datasets.Dataset`): a map-style dataset with a `datasets.Image` column and optionally a
            `ClassLabel` column.
        image_processor (`BaseImageProcessor`): the model's image processor
            (`AutoImageProcessor.from_pretrained(model_id)`).
        num_images (`int`, *optional*): how many images to take (all if `None`).
        seed (`int`, *optional*, defaults to 0): seed of the shuffle that picks them.
        shuffle (`bool`, *optional*, defaults to `True`): pick a random subset (RepQ-ViT takes one shuffled batch of
            training images); otherwise the first `num_images`.
        num_channels (`int`, *optional*, defaults to 3): the model's input channels (see [`image_mode`]).
        image_column (`str`, *optional*): the `Image` column to read; needed when the dataset has several.
        label_column (`str`, *optional*): the `ClassLabel` or integer column to read labels from; needed to keep
            labels when the dataset has several `ClassLabel` columns (without it, they are not read).

    Returns:
        `CalibrationSet`: the processed images, their labels (or `None`) and `metadata` with `source="real"`,
        `num_images` and `seed`.

    Raises:
        `CalibrationError`: when `image_processor` is `None`, the dataset is empty, has no image column, or several
            image columns and none chosen, a chosen column is missing or of another type (see
            [`resolve_image_column`], [`resolve_label_column`]), an image taken does not decode, or `num_images`
            exceeds its length.

    Example:

    ```python
    >>> from datasets import ClassLabel, Dataset, Features, Image
    >>> from PIL import Image as PILImage
    >>> from transformers import ViTImageProcessor
    >>> from optimum_dfq.calibration import calibration_set_from_dataset
    >>> features = Features({"image": Image(), "label": ClassLabel(names=["cat", "dog"])})
    >>> dataset = Dataset.from_dict({"image": [PILImage.new("RGB", (40, 40))] * 6, "label": [0, 1] * 3}, features)
    >>> calibration = calibration_set_from_dataset(dataset, ViTImageProcessor(size={"height": 32, "width": 32}), 4)
    >>> calibration.pixel_values.shape, calibration.labels.shape
    (torch.Size([4, 3, 32, 32]), torch.Size([4]))
    ```
    """
    if image_processor is None:
        raise CalibrationError(
            "A real calibration dataset needs the model's image processor to preprocess it; pass "
            "`image_processor=AutoImageProcessor.from_pretrained(...)` or use DataFreeViTQuantizer.from_pretrained."
        )
    if len(dataset) == 0:
        raise CalibrationError("The calibration dataset is empty; pass a dataset with at least one image.")
    images_col = resolve_image_column(dataset, image_column)
    labels_col = _calibration_label_column(dataset, label_column)
    if num_images is not None and num_images > len(dataset):
        raise CalibrationError(
            f"Asked for {num_images} calibration images but the dataset has only {len(dataset)}; lower num_images."
        )
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if num_images is not None:
        dataset = dataset.select(range(num_images))
    mode = image_mode(num_channels)
    try:
        images = [image.convert(mode) for image in dataset[images_col]]
    except IMAGE_DECODE_ERRORS as err:
        cause = (first_undecodable_image(dataset, images_col) or (0, err))[1]
        raise CalibrationError(
            f"An image of the dataset (column {images_col!r}) cannot be decoded ({cause}): a corrupt or truncated "
            "image file. Replace the file, or drop such rows from the calibration dataset."
        ) from err
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"].float()
    labels = torch.tensor(dataset[labels_col]) if labels_col is not None else None
    return CalibrationSet(
        pixel_values=pixel_values,
        labels=labels,
        metadata={"source": "real", "num_images": len(images), "seed": seed},
    )


def load_image_dataset(path: str, split: str | None = None, name: str | None = None):
    """Loads a labelled image dataset from a parquet file, a `save_to_disk` folder, a dataset folder or a Hub id.

    Args:
        path (`str`): `*.parquet` file, folder, or Hub dataset id (e.g. `"ILSVRC/imagenet-1k"`, gated: needs a token).
        split (`str`, *optional*): split to load; `None` means `"train"`, except for a `save_to_disk` folder of one
            split (a `Dataset`, or a `DatasetDict` of one split), where it means the split that was saved (a slice of
            a split, saved as e.g. `"test[:500]"`, counts as that split: `"test"` takes it). A single parquet file is
            one split: it is labelled `split` (or `"train"`).
        name (`str`, *optional*): dataset configuration name.

    Returns:
        `datasets.Dataset`

    Raises:
        `CalibrationError`: when the parquet file does not exist, or nothing is at a path that can only be local
            (see [`~optimum_dfq.hub.looks_like_local_path`]), a `save_to_disk` folder of one split was saved as
            another split than `split`, a folder of several splits has no split `split`, a saved data file is
            corrupt, or the dataset cannot be loaded.

    Example:

    ```python
    >>> import tempfile
    >>> from datasets import Dataset
    >>> from optimum_dfq.calibration.data import load_image_dataset
    >>> folder = tempfile.mkdtemp()
    >>> Dataset.from_dict({"label": [0, 1]}, split="test").save_to_disk(folder)
    >>> str(load_image_dataset(folder).split), len(load_image_dataset(folder, split="test"))
    ('test', 2)
    >>> load_image_dataset(folder, split="train")
    Traceback (most recent call last):
    ...
    optimum_dfq.errors.CalibrationError: The dataset at '...' was saved as split 'test', not 'train'...
    ```
    """
    from pathlib import Path

    import datasets

    local = Path(path)
    chosen = "train" if split is None else split
    if local.suffix == ".parquet":
        if not local.exists():
            raise CalibrationError(f"Dataset file {path!r} does not exist; check the path.")
        return datasets.load_dataset("parquet", data_files={chosen: str(local)}, split=chosen)
    if local.is_dir() and (local / "state.json").exists():
        return _check_saved_split(load_saved_dataset(str(local)), path, split)
    if local.is_dir() and (local / "dataset_dict.json").exists():
        splits = load_saved_dataset(str(local))
        if split is None and len(splits) == 1:  # a folder of one split: the split that was saved
            return next(iter(splits.values()))
        if chosen not in splits:
            raise CalibrationError(f"The dataset at {path!r} has no split {chosen!r}; its splits are {list(splits)}.")
        return splits[chosen]
    from ..hub import looks_like_local_path

    if looks_like_local_path(path) and not local.expanduser().exists():  # the Hub's error would hide a typo
        raise CalibrationError(f"No dataset at {local.expanduser().absolute()}: check the path, or pass a Hub "
                               "dataset id (a path starting with '/', '.' or '~', ending with '/' or that is no valid "
                               "Hub id is always read as a local one).")
    try:
        return datasets.load_dataset(path, name, split=chosen)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise CalibrationError(
            f"Could not load dataset {path!r} (split {chosen!r}): {err}. Pass a *.parquet file, a folder written by "
            "save_to_disk, a folder of data files, or a Hub dataset id (gated ones need a token)."
        ) from err


def split_to_load(path: str, split: str | None, default: str) -> str:
    """The split a command reads from `path`: `split` when given, else the split a `save_to_disk` folder of one split
    was saved as (read from its metadata, without loading it), else `default`.

    Args:
        path (`str`): what [`load_image_dataset`] takes.
        split (`str`, *optional*): the split asked for (`--split`, `--calibration-split`).
        default (`str`): the split of a dataset that holds several, or of a file (`"train"` for calibration,
            `"test"` for evaluation).

    Returns:
        `str`

    Example:
        >>> import tempfile
        >>> from datasets import Dataset
        >>> folder = tempfile.mkdtemp()
        >>> Dataset.from_dict({"label": [0]}, split="validation").save_to_disk(folder)  # doctest: +SKIP
        >>> split_to_load(folder, None, "test"), split_to_load(folder, "train", "test")  # doctest: +SKIP
        ('validation', 'train')
    """
    if split is not None:
        return split
    import json
    from pathlib import Path

    folder = Path(path)
    try:
        if (folder / "state.json").is_file():
            saved = json.loads((folder / "state.json").read_text(encoding="utf-8")).get("_split")
            return str(saved) if saved else default
        if (folder / "dataset_dict.json").is_file():
            splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8")).get("splits")
            return str(splits[0]) if isinstance(splits, list) and len(splits) == 1 else default
    except (OSError, ValueError, AttributeError):  # an unreadable folder is reported by load_image_dataset
        return default
    return default


def _check_saved_split(dataset, path: str, split: str | None):
    """`dataset` (one split loaded from `path`), refused when it was saved as another split than the one asked for.

    A slice of one split (`load_dataset(..., split="test[:500]")` saves as `"test[:500]"`) is that split: asking for
    `"test"` takes it."""
    saved = None if dataset.split is None else str(dataset.split)
    sliced = re.fullmatch(r"([^\[\]+]+)\[[^\]]*\]", saved or "")
    if split is not None and saved is not None and split != saved and not (sliced and split == sliced.group(1)):
        raise CalibrationError(
            f"The dataset at {path!r} was saved as split {saved!r}, not {split!r}, and holds no other split. Ask for "
            f"split {saved!r} (command line: --split / --calibration-split {saved}) to use it, or save the "
            f"{split!r} split there."
        )
    return dataset


def load_saved_dataset(path: str | os.PathLike):
    """`datasets.load_from_disk`, with a corrupt or truncated data file reported as such.

    Args:
        path (`str` or `os.PathLike`): a folder written by `save_to_disk`.

    Returns:
        `datasets.Dataset` or `datasets.DatasetDict`

    Raises:
        `FileNotFoundError`: `datasets`' own, when the folder holds no saved dataset or lacks a data file.
        `PermissionError`: a file this user may not read (not reported as damage).
        `CalibrationError`: a data file that pyarrow cannot read (pyarrow says only e.g. "Expected to be able to read
            50848 bytes for message body, got 24884").
    """
    import datasets
    import pyarrow

    try:
        return datasets.load_from_disk(str(path))
    except (FileNotFoundError, PermissionError):  # not damage: the file is missing or not readable by this user
        raise
    except (OSError, pyarrow.ArrowException) as err:
        raise CalibrationError(
            f"{str(path)!r} holds a saved dataset whose data file is corrupt or truncated ({err}); save it again (a "
            "synthesized calibration set: synthesize it again), or copy it again from where it was written."
        ) from err
