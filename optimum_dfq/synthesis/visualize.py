"""A PNG contact sheet of calibration images, for looking at what a synthesizer made."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from ..calibration.data import CalibrationSet
from ..errors import CalibrationError


def save_image_grid(
    calibration_set_or_dataset,
    path: str | os.PathLike,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    columns: int | None = None,
    max_images: int = 64,
    padding: int = 2,
) -> None:
    """Writes the images, de-normalised (`x · std + mean`, clipped to [0, 1]), as one PNG grid.

    Synthetic images live in the model's normalised space and look like noise unless de-normalised.

    Args:
        calibration_set_or_dataset (`CalibrationSet`, `datasets.Dataset` or `torch.Tensor`): the images.
        path (`str` or `PathLike`): the PNG file to write.
        mean (`Sequence[float]`, *optional*), std (`Sequence[float]`, *optional*): the model's normalisation; read
            from the set's metadata (`image_mean`/`image_std`) when omitted.
        columns (`int`, *optional*): images per row (about a square grid by default).
        max_images (`int`, defaults to 64): at most this many images (the first ones).
        padding (`int`, defaults to 2): pixels between images.

    Example:
        >>> save_image_grid(calib, "calib.png", processor.image_mean, processor.image_std)  # doctest: +SKIP
    """
    from PIL import Image

    calibration_set = _as_calibration_set(calibration_set_or_dataset)
    if mean is None or std is None:
        mean = calibration_set.metadata.get("image_mean") if mean is None else mean
        std = calibration_set.metadata.get("image_std") if std is None else std
        if mean is None or std is None:
            raise CalibrationError(
                "save_image_grid needs the model's normalisation: pass mean=processor.image_mean, "
                "std=processor.image_std."
            )
    pixels = calibration_set.pixel_values[:max_images].detach().cpu().float()
    count, channels, height, width = pixels.shape
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    images = (pixels * std_t + mean_t).clamp(0, 1)
    images = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, channels), 255,
                   dtype=np.uint8)
    for i, image in enumerate(images):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        grid[top : top + height, left : left + width] = image
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
    if mode is None:
        raise CalibrationError(f"Cannot write {channels}-channel images as PNG.")
    Image.fromarray(grid[..., 0] if channels == 1 else grid, mode=mode).save(os.fspath(path), format="PNG")


def _as_calibration_set(value) -> CalibrationSet:
    if isinstance(value, CalibrationSet):
        return value
    if isinstance(value, torch.Tensor):
        return CalibrationSet(pixel_values=value)
    if hasattr(value, "features"):
        from .dataset import calibration_set_from_dataset_dict

        return calibration_set_from_dataset_dict(value)
    raise CalibrationError(
        f"save_image_grid takes a CalibrationSet, a calibration datasets.Dataset or a pixel tensor, got "
        f"{type(value).__name__}."
    )
