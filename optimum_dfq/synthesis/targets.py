"""Per-image targets of the synthesizers (initial noise, labels, soft labels, crop layouts), drawn from the image's
own random streams so that the draws of image `i` depend only on `(seed, i)`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


@dataclass
class RegionLayout:
    """The crops of one batch (SARDFQ's Multi-Semantic Reinforcement): which quadrant of which image, with what class.

    Attributes:
        owners (`list[int]`): batch position of the image each crop comes from.
        quadrants (`list[int]`): quadrant of each crop (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right).
        labels (`list[int]`): class of each crop.
    """

    owners: list[int]
    quadrants: list[int]
    labels: list[int]


def quadrant_layout(
    indices: Sequence[int], seed: int, num_labels: int, max_regions: int
) -> tuple[torch.Tensor, RegionLayout]:
    """Draws each image's class and its `m ~ U{1..max_regions}` distinct quadrants with distinct classes.

    The image's class and its crops' classes are all different (at most `num_labels - 1` crops per image). Our
    interpretation of SARDFQ's "non-overlapping regions" (their sizes and sampling are not published): the cells of a
    2×2 grid, as the library spec proposes for at most 4 regions.

    Returns:
        `tuple[torch.Tensor, RegionLayout]`: `[B]` image classes and the crop layout, ordered by quadrant (so crops
        of one quadrant are resized together).
    """
    image_labels, crops = [], []
    for position, index in enumerate(indices):
        generator = stream_generator(seed, index, "regions")
        count = int(torch.randint(1, max_regions + 1, (1,), generator=generator))
        count = min(count, num_labels - 1, 4)
        quadrants = torch.randperm(4, generator=generator)[:count].tolist()
        classes = torch.randperm(num_labels, generator=generator)[: count + 1].tolist()
        image_labels.append(classes[0])
        crops.extend((quadrant, position, label) for quadrant, label in zip(quadrants, classes[1:]))
    crops.sort(key=lambda crop: (crop[0], crop[1]))
    layout = RegionLayout([c[1] for c in crops], [c[0] for c in crops], [c[2] for c in crops])
    return torch.tensor(image_labels, dtype=torch.long), layout


#: `torch.nn.functional.interpolate` modes a crop can be resized with (bilinear: the library spec's proposal).
RESIZE_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact", "area")


class QuadrantCrops:
    """Model inputs of a batch with MSR crops: the images, then each crop resized to the input size.

    Args:
        layout (`RegionLayout`): from [`quadrant_layout`].
        mode (`str`, *optional*, defaults to `"bilinear"`): the `interpolate` mode of the resize, one of
            `RESIZE_MODES` (SARDFQ's resize is not published; bilinear is our interpretation).

    Example:
        >>> _, layout = quadrant_layout([0, 1], seed=0, num_labels=10, max_regions=4)
        >>> QuadrantCrops(layout)(torch.zeros(2, 3, 8, 8)).shape[0] == 2 + len(layout.owners)
        True
    """

    def __init__(self, layout: RegionLayout, mode: str = "bilinear") -> None:
        if mode not in RESIZE_MODES:
            raise ValueError(f"Unknown resize mode {mode!r}; expected one of {list(RESIZE_MODES)}.")
        self.layout = layout
        self.mode = mode
        self._groups = {
            quadrant: torch.tensor([o for o, q in zip(layout.owners, layout.quadrants) if q == quadrant])
            for quadrant in range(4)
            if quadrant in layout.quadrants
        }

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        mid_h, mid_w = height // 2, width // 2
        bounds = {0: (0, mid_h, 0, mid_w), 1: (0, mid_h, mid_w, width), 2: (mid_h, height, 0, mid_w),
                  3: (mid_h, height, mid_w, width)}
        rows = [images]
        for quadrant, owners in self._groups.items():
            top, bottom, left, right = bounds[quadrant]
            crop = images[owners.to(images.device), :, top:bottom, left:right]
            align_corners = False if self.mode in ("bilinear", "bicubic") else None
            rows.append(F.interpolate(crop, size=(height, width), mode=self.mode, align_corners=align_corners))
        return torch.cat(rows)
