"""Per-image targets of the synthesizers (initial noise, labels, soft labels), drawn from the image's own random
streams so that the draws of image `i` depend only on `(seed, i)`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .gaussian import image_generator
from .seeding import stream_generator


def initial_noise(indices: Sequence[int], seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """`[B, C, H, W]` standard-normal images; image `i` equals the `"gaussian"` synthesizer's image `i`."""
    return torch.stack([torch.randn(shape, generator=image_generator(seed, i)) for i in indices])


def random_labels(indices: Sequence[int], seed: int, num_labels: int) -> torch.Tensor:
    """`[B]` class ids, uniform over `num_labels` (PSAQ-ViT's pseudo labels)."""
    return torch.cat([torch.randint(num_labels, (1,), generator=stream_generator(seed, i, "labels")) for i in indices])


def uniform_per_image(indices: Sequence[int], seed: int, stream: str, low: float, high: float) -> torch.Tensor:
    """`[B]` values uniform in `[low, high]`, one per image from its `stream`."""
    values = [torch.rand(1, generator=stream_generator(seed, i, stream)) for i in indices]
    return low + (high - low) * torch.cat(values)


def soft_target(
    relevant: Sequence[int], num_labels: int, generator: torch.Generator, logit_range: tuple[float, float]
) -> torch.Tensor:
    """SARDFQ's soft label `softmax(Z)`: `Z` is 0 except at the `relevant` classes, whose logits are `U(low, high)`.

    Returns:
        `torch.Tensor`: `[num_labels]`.
    """
    logits = torch.zeros(num_labels)
    low, high = logit_range
    values = low + (high - low) * torch.rand(len(relevant), generator=generator)
    logits[torch.as_tensor(list(relevant), dtype=torch.long)] = values
    return logits.softmax(-1)
