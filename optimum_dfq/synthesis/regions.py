"""SARDFQ's Multi-Semantic Reinforcement (MSR) regions: where each image's crops lie and with what class
([`RegionLayout`], drawn from the image's own `"regions"` stream so that they depend only on `(seed, i)`), and how the
crops become extra model inputs ([`RegionCrops`]).

The paper pins `m ∈ {1..K_MSR}` non-overlapping regions per image, each cropped, resized to the input size and given
its own class; their sizes and sampling are not published. Three layouts, all **our interpretation**: `"quadrants"`
(`m` of the 4 cells of a 2×2 grid, the library spec's proposal and the default), `"grid:RxC"` (`m` of the cells of an
`R`×`C` grid) and `"random"` (`m` boxes of random position and size, see [`random_layout`]).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import SynthesisError
from .seeding import stream_generator

#: `(top, bottom, left, right)` of a region, in whole pixels, bottom and right exclusive.
Box = tuple[int, int, int, int]

#: The `msr_layout` names besides `"grid:RxC"`.
MSR_LAYOUTS = ("quadrants", "random")
#: Smallest side of a region, in pixels.
MIN_REGION_SIDE = 2
#: Draws of one box's position and size before [`random_layout`] draws the image's boxes again from the first.
MAX_BOX_TRIES = 20
#: Attempts at an image's boxes before [`random_layout`] falls back to a grid for the image.
MAX_LAYOUT_TRIES = 20
#: `torch.nn.functional.interpolate` modes a crop can be resized with (bilinear: the library spec's proposal).
RESIZE_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact", "area")

_GRID = re.compile(r"grid:([1-9][0-9]*)x([1-9][0-9]*)")


@dataclass
class RegionLayout:
    """The crops of one batch: which box of which image, with what class.

    Attributes:
        owners (`list[int]`): batch position of the image each crop comes from.
        boxes (`list[Box]`): `(top, bottom, left, right)` of each crop, in pixels of `image_size`.
        labels (`list[int]`): class of each crop.
        image_size (`tuple[int, int]`): `(height, width)` of the images the boxes are drawn for.
    """

    owners: list[int]
    boxes: list[Box]
    labels: list[int]
    image_size: tuple[int, int]


def msr_grid(layout: str) -> tuple[int, int] | None:
    """The `(rows, cols)` grid of an `msr_layout` (`"quadrants"` is `(2, 2)`), or `None` for `"random"`.

    Raises:
        `SynthesisError`: for any other value.

    Example:
        >>> msr_grid("quadrants"), msr_grid("grid:3x2"), msr_grid("random")
        ((2, 2), (3, 2), None)
    """
    if layout == "quadrants":
        return (2, 2)
    if layout == "random":
        return None
    match = _GRID.fullmatch(layout) if isinstance(layout, str) else None
    if match is None:
        raise SynthesisError(f"msr_layout={layout!r} must be one of {list(MSR_LAYOUTS)} or 'grid:RxC' with positive "
                             "integers R (rows) and C (columns), e.g. 'grid:3x3'.")
    return int(match[1]), int(match[2])


def grid_layout(
    indices: Sequence[int],
    seed: int,
    num_labels: int,
    max_regions: int,
    image_size: tuple[int, int],
    grid: tuple[int, int] = (2, 2),
) -> tuple[torch.Tensor, RegionLayout]:
    """Draws each image's class and its `m ~ U{1..max_regions}` distinct cells of a `rows × cols` grid with distinct
    classes.

    The image's class and its crops' classes are all different (at most `num_labels - 1` crops per image). Cell
    `(r, c)` spans rows `r·H // rows` to `(r+1)·H // rows` and columns `c·W // cols` to `(c+1)·W // cols`.

    Args:
        indices (`Sequence[int]`): the images' global indices.
        seed (`int`): the run's seed.
        num_labels (`int`): classes of the model.
        max_regions (`int`): `K_MSR`, at most `rows · cols`.
        image_size (`tuple[int, int]`): `(height, width)` of the images.
        grid (`tuple[int, int]`, defaults to `(2, 2)`): `(rows, cols)`.

    Returns:
        `tuple[torch.Tensor, RegionLayout]`: `[B]` image classes and the crop layout, ordered by cell (row-major), then
        by image (so crops of one cell are resized together).

    Raises:
        `SynthesisError`: if `max_regions` exceeds the cells, or a cell is smaller than `MIN_REGION_SIDE` pixels.

    Example:
        >>> labels, layout = grid_layout([0, 1], seed=0, num_labels=10, max_regions=3, image_size=(32, 32), grid=(3, 3))
        >>> labels.shape, all(box in {(r * 32 // 3, (r + 1) * 32 // 3, c * 32 // 3, (c + 1) * 32 // 3)
        ...                           for r in range(3) for c in range(3)} for box in layout.boxes)
        (torch.Size([2]), True)
    """
    rows, cols = grid
    height, width = image_size
    if max_regions > rows * cols:
        raise SynthesisError(f"msr_regions={max_regions} needs at least as many cells; a {rows}x{cols} grid has "
                             f"{rows * cols}. Lower msr_regions or use a larger grid.")
    if height // rows < MIN_REGION_SIDE or width // cols < MIN_REGION_SIDE:
        raise SynthesisError(f"A {rows}x{cols} grid on {height}x{width} images has cells under {MIN_REGION_SIDE} "
                             "pixels a side; use a smaller grid.")
    image_labels, crops = [], []
    for position, index in enumerate(indices):
        generator = stream_generator(seed, index, "regions")
        count = int(torch.randint(1, max_regions + 1, (1,), generator=generator))
        count = min(count, num_labels - 1, rows * cols)
        cells = torch.randperm(rows * cols, generator=generator)[:count].tolist()
        classes = torch.randperm(num_labels, generator=generator)[: count + 1].tolist()
        image_labels.append(classes[0])
        crops.extend((cell, position, label) for cell, label in zip(cells, classes[1:]))
    crops.sort(key=lambda crop: (crop[0], crop[1]))
    boxes = [_cell_box(cell, grid, image_size) for cell, _, _ in crops]
    layout = RegionLayout([c[1] for c in crops], boxes, [c[2] for c in crops], (height, width))
    return torch.tensor(image_labels, dtype=torch.long), layout


def quadrant_layout(
    indices: Sequence[int], seed: int, num_labels: int, max_regions: int, image_size: tuple[int, int]
) -> tuple[torch.Tensor, RegionLayout]:
    """[`grid_layout`] on a 2×2 grid (the default `msr_layout="quadrants"`): our interpretation of SARDFQ's
    "non-overlapping regions", as the library spec proposes for at most 4 regions.

    Example:
        >>> _, layout = quadrant_layout([0], seed=0, num_labels=10, max_regions=4, image_size=(32, 32))
        >>> set(layout.boxes) <= {(0, 16, 0, 16), (0, 16, 16, 32), (16, 32, 0, 16), (16, 32, 16, 32)}
        True
    """
    return grid_layout(indices, seed, num_labels, max_regions, image_size, (2, 2))


def random_layout(
    indices: Sequence[int],
    seed: int,
    num_labels: int,
    max_regions: int,
    image_size: tuple[int, int],
    scale: tuple[float, float] = (0.25, 0.5),
) -> tuple[torch.Tensor, RegionLayout]:
    """Draws each image's `m ~ U{1..max_regions}` non-overlapping boxes of random position and size, then its class
    and its crops' classes, all different (at most `num_labels - 1` crops per image).

    A box has the image's aspect ratio (so that the resize does not stretch it): its height is uniform over the whole
    pixels in `[scale[0]·H, scale[1]·H]` (at least `MIN_REGION_SIDE`), its width the height times `W / H`, rounded and
    kept in `[scale[0]·W, scale[1]·W]`, its position uniform over the image. A box that overlaps an earlier one is
    drawn again; after `MAX_BOX_TRIES` draws of one box, the image's boxes are all drawn again; after
    `MAX_LAYOUT_TRIES` such attempts, they are drawn instead in distinct cells of a `g × g` grid, `g = ceil(sqrt(m))`
    (one box of the same size range at a random position inside each cell), which cannot fail. With the default
    `scale` the fallback is rare (none for 200 images of 224 pixels with up to 4 boxes, checked by
    `tests/synthesis/test_regions.py`); wider boxes make it more frequent. All of this is our interpretation (SARDFQ
    does not publish region sizes or sampling).

    Args:
        indices (`Sequence[int]`): the images' global indices.
        seed (`int`): the run's seed.
        num_labels (`int`): classes of the model.
        max_regions (`int`): `K_MSR`.
        image_size (`tuple[int, int]`): `(height, width)` of the images.
        scale (`tuple[float, float]`, defaults to `(0.25, 0.5)`): the range of a box's side over the image's side
            (at most a quadrant's by default).

    Returns:
        `tuple[torch.Tensor, RegionLayout]`: `[B]` image classes and the crop layout, ordered by image.

    Raises:
        `SynthesisError`: if `scale` allows no whole-pixel side of at least `MIN_REGION_SIDE` pixels, or its lower
            end is too large for `max_regions` boxes to fit in the cells of the fallback grid.

    Example:
        >>> _, layout = random_layout([0, 1], seed=0, num_labels=10, max_regions=4, image_size=(32, 32))
        >>> all(8 <= bottom - top <= 16 and bottom <= 32 and right <= 32 for top, bottom, left, right in layout.boxes)
        True
    """
    height, width = image_size
    sides = _side_range(height, scale), _side_range(width, scale)
    cells = math.isqrt(max(max_regions, 1) - 1) + 1
    if sides[0][0] > height // cells or sides[1][0] > width // cells:
        raise SynthesisError(f"msr_region_scale={tuple(scale)} is too large for msr_regions={max_regions} boxes on "
                             f"{height}x{width} images: the boxes of at least {sides[0][0]}x{sides[1][0]} pixels must "
                             f"fit in the cells of a {cells}x{cells} grid. Lower the scale's lower end or msr_regions.")
    image_labels, owners, boxes, labels = [], [], [], []
    for position, index in enumerate(indices):
        generator = stream_generator(seed, index, "regions")
        count = int(torch.randint(1, max_regions + 1, (1,), generator=generator))
        count = min(count, num_labels - 1)
        image_boxes = _random_boxes(generator, count, image_size, sides)
        classes = torch.randperm(num_labels, generator=generator)[: count + 1].tolist()
        image_labels.append(classes[0])
        owners += [position] * count
        boxes += image_boxes
        labels += classes[1:]
    return torch.tensor(image_labels, dtype=torch.long), RegionLayout(owners, boxes, labels, (height, width))


def _cell_box(cell: int, grid: tuple[int, int], image_size: tuple[int, int]) -> Box:
    (rows, cols), (height, width) = grid, image_size
    row, col = divmod(cell, cols)
    return row * height // rows, (row + 1) * height // rows, col * width // cols, (col + 1) * width // cols


def _side_range(length: int, scale: tuple[float, float]) -> tuple[int, int]:
    """Whole-pixel sides in `[scale[0]·length, scale[1]·length]` and at least `MIN_REGION_SIDE` pixels."""
    low = max(math.ceil(scale[0] * length - 1e-6), MIN_REGION_SIDE)
    high = math.floor(scale[1] * length + 1e-6)
    if low > high:
        raise SynthesisError(f"msr_region_scale={tuple(scale)} leaves no whole-pixel side of at least "
                             f"{MIN_REGION_SIDE} pixels on a {length}-pixel side; widen the range.")
    return low, high


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform over `low..high` (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _box_shape(generator: torch.Generator, image_size, sides, max_height: int, max_width: int) -> tuple[int, int]:
    (height, width), ((low_h, high_h), (low_w, high_w)) = image_size, sides
    box_height = _randint(generator, low_h, min(high_h, max_height))
    box_width = min(max(round(box_height * width / height), low_w), high_w, max_width)
    return box_height, box_width


def _random_boxes(generator: torch.Generator, count: int, image_size, sides) -> list[Box]:
    for _ in range(MAX_LAYOUT_TRIES):
        boxes = _attempt_random_boxes(generator, count, image_size, sides)
        if boxes is not None:
            return boxes
    return _boxes_in_cells(generator, count, image_size, sides)


def _attempt_random_boxes(generator: torch.Generator, count: int, image_size, sides) -> list[Box] | None:
    height, width = image_size
    boxes: list[Box] = []
    for _ in range(count):
        for _ in range(MAX_BOX_TRIES):
            box_height, box_width = _box_shape(generator, image_size, sides, height, width)
            top, left = _randint(generator, 0, height - box_height), _randint(generator, 0, width - box_width)
            box = (top, top + box_height, left, left + box_width)
            if not any(_overlap(box, other) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _boxes_in_cells(generator: torch.Generator, count: int, image_size, sides) -> list[Box]:
    cells = math.isqrt(count - 1) + 1
    boxes = []
    for cell in torch.randperm(cells * cells, generator=generator)[:count].tolist():
        top, bottom, left, right = _cell_box(cell, (cells, cells), image_size)
        box_height, box_width = _box_shape(generator, image_size, sides, bottom - top, right - left)
        top += _randint(generator, 0, bottom - top - box_height)
        left += _randint(generator, 0, right - left - box_width)
        boxes.append((top, top + box_height, left, left + box_width))
    return boxes


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


class RegionCrops:
    """Model inputs of a batch with MSR crops: the images, then each crop resized to the input size.

    Crops with the same box next to each other in the layout are cut and resized together.

    Args:
        layout (`RegionLayout`): from [`grid_layout`], [`quadrant_layout`] or [`random_layout`].
        mode (`str`, *optional*, defaults to `"bilinear"`): the `interpolate` mode of the resize, one of
            `RESIZE_MODES` (SARDFQ's resize is not published; bilinear is our interpretation).

    Raises:
        `SynthesisError`: for an unknown `mode`; when called, for images of another size than the layout's.

    Example:
        >>> _, layout = quadrant_layout([0, 1], seed=0, num_labels=10, max_regions=4, image_size=(8, 8))
        >>> RegionCrops(layout)(torch.zeros(2, 3, 8, 8)).shape[0] == 2 + len(layout.owners)
        True
    """

    def __init__(self, layout: RegionLayout, mode: str = "bilinear") -> None:
        if mode not in RESIZE_MODES:
            raise SynthesisError(f"Unknown resize mode {mode!r}; expected one of {list(RESIZE_MODES)}.")
        self.layout = layout
        self.mode = mode
        self._runs: list[tuple[Box, list[int]]] = []
        for owner, box in zip(layout.owners, layout.boxes):
            if self._runs and self._runs[-1][0] == box:
                self._runs[-1][1].append(owner)
            else:
                self._runs.append((box, [owner]))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if (height, width) != tuple(self.layout.image_size):
            raise SynthesisError(f"The MSR regions were drawn for {tuple(self.layout.image_size)} images, but the "
                                 f"images are {height}x{width}.")
        align_corners = False if self.mode in ("bilinear", "bicubic") else None
        rows = [images]
        for (top, bottom, left, right), owners in self._runs:
            crop = images[torch.tensor(owners, device=images.device), :, top:bottom, left:right]
            rows.append(F.interpolate(crop, size=(height, width), mode=self.mode, align_corners=align_corners))
        return torch.cat(rows)

