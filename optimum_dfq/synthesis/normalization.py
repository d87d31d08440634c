"""The valid pixel range of a model's normalised input space, from its own image processor."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import SynthesisError


def normalization_stats(
    image_processor=None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    num_channels: int = 3,
) -> tuple[list[float], list[float]]:
    """The per-channel `(mean, std)` that the model's inputs were normalised with.

    Explicit `image_mean`/`image_std` win; otherwise they are read from the image processor (an image processor with
    `do_normalize=False` means mean 0, std 1). No default statistics are assumed.

    Args:
        image_processor (*optional*): the model's image processor (e.g. `AutoImageProcessor.from_pretrained(...)`).
        image_mean (`Sequence[float]`, *optional*), image_std (`Sequence[float]`, *optional*): explicit statistics.
        num_channels (`int`): the model's number of input channels (a single value is broadcast to all of them).

    Returns:
        `tuple[list[float], list[float]]`

    Example:
        >>> normalization_stats(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    """
    if (image_mean is None) != (image_std is None):
        raise SynthesisError(
            "Pass both image_mean and image_std, or neither (then they come from the image processor)."
        )
    if image_mean is None:
        if image_processor is None:
            raise SynthesisError(
                "This synthesizer clamps images to the model's valid pixel range, which depends on the model's "
                "normalisation. Pass `image_processor=AutoImageProcessor.from_pretrained(<model id>)`, or explicit "
                "`image_mean=[...]` and `image_std=[...]`."
            )
        if getattr(image_processor, "do_normalize", True) is False:
            image_mean, image_std = [0.0], [1.0]
        else:
            image_mean = getattr(image_processor, "image_mean", None)
            image_std = getattr(image_processor, "image_std", None)
            if image_mean is None or image_std is None:
                raise SynthesisError(
                    f"The image processor {type(image_processor).__name__} has no image_mean/image_std; pass explicit "
                    "`image_mean=[...]` and `image_std=[...]`."
                )
    mean, std = _per_channel(image_mean, num_channels, "image_mean"), _per_channel(image_std, num_channels, "image_std")
    if any(s <= 0 for s in std):
        raise SynthesisError(f"image_std must be positive, got {std}.")
    return mean, std


def valid_pixel_range(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds `[-mean/std, (1 - mean)/std]` of images whose raw pixels lie in `[0, 1]`.

    Args:
        mean (`Sequence[float]`), std (`Sequence[float]`): the normalisation statistics.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `low` and `high`, each of shape `[1, C, 1, 1]`.

    Example:
        >>> low, high = valid_pixel_range([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
        >>> low.flatten().tolist(), high.flatten().tolist()
        ([-1.0, -1.0, -1.0], [1.0, 1.0, 1.0])
    """
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    return -mean_t / std_t, (1 - mean_t) / std_t


def _per_channel(values, num_channels: int, name: str) -> list[float]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if len(values) == 1:
        values = values * num_channels
    if len(values) != num_channels:
        raise SynthesisError(
            f"{name} has {len(values)} values but the model has {num_channels} input channels; pass one value per "
            "channel, or a single value for all of them."
        )
    return values
