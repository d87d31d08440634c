"""MSR region layouts and crops (optimum_dfq/synthesis/regions.py)."""

from __future__ import annotations

from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from optimum_dfq.errors import SynthesisError
from optimum_dfq.synthesis import regions, stream_generator
from optimum_dfq.synthesis.regions import (
    RegionCrops,
    grid_layout,
    msr_grid,
    quadrant_layout,
    random_layout,
)

INDICES = list(range(64))


def _first_release_quadrants(indices, seed, num_labels, max_regions):
    """The quadrant draws as the first release made them (quadrant ids 0 TL, 1 TR, 2 BL, 3 BR)."""
    image_labels, crops = [], []
    for position, index in enumerate(indices):
        generator = stream_generator(seed, index, "regions")
        count = min(int(torch.randint(1, max_regions + 1, (1,), generator=generator)), num_labels - 1, 4)
        quadrants = torch.randperm(4, generator=generator)[:count].tolist()
        classes = torch.randperm(num_labels, generator=generator)[: count + 1].tolist()
        image_labels.append(classes[0])
        crops.extend((quadrant, position, label) for quadrant, label in zip(quadrants, classes[1:]))
    return image_labels, sorted(crops)


def _mask(box, size) -> torch.Tensor:
    top, bottom, left, right = box
    mask = torch.zeros(size, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def _boxes_of(layout, position):
    return [box for owner, box in zip(layout.owners, layout.boxes) if owner == position]


@pytest.mark.parametrize("max_regions, num_labels", [(4, 10), (2, 10), (4, 3)])
def test_quadrants_keep_the_draws_of_the_first_release(max_regions, num_labels):
    labels, layout = quadrant_layout(INDICES, 7, num_labels, max_regions, (32, 32))
    expected_labels, crops = _first_release_quadrants(INDICES, 7, num_labels, max_regions)
    quadrant_boxes = [(0, 16, 0, 16), (0, 16, 16, 32), (16, 32, 0, 16), (16, 32, 16, 32)]
    assert labels.tolist() == expected_labels
    assert layout.owners == [position for _, position, _ in crops]
    assert layout.boxes == [quadrant_boxes[quadrant] for quadrant, _, _ in crops]
    assert layout.labels == [label for _, _, label in crops]
    other_grid = grid_layout(INDICES, 7, num_labels, max_regions, (32, 32), (2, 2))
    assert other_grid[0].tolist() == expected_labels and other_grid[1] == layout


def test_grid_cells_are_distinct_and_tile_the_image():
    rows, cols, size = 3, 2, (32, 30)
    labels, layout = grid_layout(INDICES, 0, 10, rows * cols, size, (rows, cols))
    assert layout.image_size == size
    cells = set(layout.boxes)
    assert len(cells) == rows * cols  # 64 images with up to 6 crops each use every cell
    coverage = sum(_mask(box, size).int() for box in cells)
    assert torch.equal(coverage, torch.ones(size, dtype=torch.int))  # the cells tile the image exactly once
    heights = {bottom - top for top, bottom, _, _ in cells}
    widths = {right - left for _, _, left, right in cells}
    assert heights <= {10, 11} and widths == {15}
    for position in range(len(INDICES)):
        boxes = _boxes_of(layout, position)
        assert 1 <= len(boxes) <= rows * cols and len(set(boxes)) == len(boxes)
        classes = [label for owner, label in zip(layout.owners, layout.labels) if owner == position]
        assert len(set(classes + [int(labels[position])])) == len(classes) + 1
    assert layout.boxes == sorted(layout.boxes, key=lambda box: (box[0], box[2]))  # grouped by cell (row-major)


@pytest.mark.parametrize("size", [(32, 32), (48, 32)])
def test_random_boxes_do_not_overlap_and_stay_inside_within_the_size_range(size):
    height, width = size
    _, layout = random_layout(INDICES, 0, 10, 4, size, (0.3, 0.6))
    counts = [len(_boxes_of(layout, position)) for position in range(len(INDICES))]
    assert min(counts) == 1 and max(counts) == 4
    sides = set()
    for position in range(len(INDICES)):
        boxes = _boxes_of(layout, position)
        coverage = sum(_mask(box, size).int() for box in boxes)
        assert int(coverage.max()) == 1  # no pixel in two boxes of an image
        for top, bottom, left, right in boxes:
            assert 0 <= top < bottom <= height and 0 <= left < right <= width
            assert 0.3 * height <= bottom - top <= 0.6 * height and 0.3 * width <= right - left <= 0.6 * width
            assert abs((right - left) / width - (bottom - top) / height) <= 1 / min(size)  # the image's aspect ratio
            sides.add(bottom - top)
    assert len(sides) > 3  # sizes vary
    pairs = [(a, b) for position in range(len(INDICES)) for a, b in combinations(_boxes_of(layout, position), 2)]
    assert any(a[0] < b[1] and b[0] < a[1] for a, b in pairs)  # boxes side by side (rows shared) are allowed
    assert any(a[2] < b[3] and b[2] < a[3] for a, b in pairs)  # and boxes one above the other
    assert len({box[0] for box in layout.boxes}) > 3 and len({box[2] for box in layout.boxes}) > 3  # positions vary


def test_random_boxes_depend_only_on_seed_and_image_index():
    label, alone = random_layout([5], 3, 10, 4, (32, 32))
    labels, batch = random_layout([9, 5, 2], 3, 10, 4, (32, 32))
    assert int(labels[1]) == int(label[0])
    assert _boxes_of(batch, 1) == alone.boxes
    assert [label for owner, label in zip(batch.owners, batch.labels) if owner == 1] == alone.labels
    assert random_layout([9, 5, 2], 3, 10, 4, (32, 32))[1] == batch
    assert random_layout([9, 5, 2], 4, 10, 4, (32, 32))[1].boxes != batch.boxes


def test_random_boxes_fall_back_to_grid_cells_when_rejection_sampling_gives_up(monkeypatch):
    monkeypatch.setattr(regions, "MAX_LAYOUT_TRIES", 0)  # every image falls back at once
    _, layout = random_layout(INDICES, 0, 10, 4, (32, 32), (0.3, 0.5))
    for position in range(len(INDICES)):
        boxes = _boxes_of(layout, position)
        grid = 1 if len(boxes) == 1 else 2
        cells = [(top * grid // 32, left * grid // 32) for top, _, left, _ in boxes]
        assert len(set(cells)) == len(boxes)  # one box per cell of a grid x grid grid
        for (row, col), (top, bottom, left, right) in zip(cells, boxes):
            cell = 32 // grid
            assert row * cell <= top and bottom <= (row + 1) * cell and col * cell <= left and right <= (col + 1) * cell
            assert 10 <= bottom - top <= 16
    pairs = [box for position in range(len(INDICES)) if len(_boxes_of(layout, position)) == 2
             for box in _boxes_of(layout, position)]
    assert {(top // 16, left // 16) for top, _, left, _ in pairs} == {(0, 0), (0, 1), (1, 0), (1, 1)}  # any 2 cells
    assert {(top % 16, left % 16) for top, _, left, _ in pairs} != {(0, 0)}  # anywhere in its cell


def test_fallback_boxes_keep_to_cells_narrower_than_the_scale_allows(monkeypatch):
    # 10x7 images: the 2x2 fallback grid has cells 3 and 4 pixels wide; a 5-pixel-high box would be 4 wide (5 x 0.7,
    # rounded), within the scale (0.3, 0.6) of 7 pixels, so in a 3-pixel-wide cell it must be made narrower
    monkeypatch.setattr(regions, "MAX_LAYOUT_TRIES", 0)
    _, layout = random_layout(INDICES, 0, 10, 4, (10, 7), (0.3, 0.6))
    cells = [regions._cell_box(cell, (2, 2), (10, 7)) for cell in range(4)]
    gridded = [box for position in range(len(INDICES)) if len(_boxes_of(layout, position)) > 1  # one box: no grid
               for box in _boxes_of(layout, position)]
    for top, bottom, left, right in gridded:
        assert any(c[0] <= top and bottom <= c[1] and c[2] <= left and right <= c[3] for c in cells)
        assert bottom - top >= 3 and right - left >= 3
    assert (5, 3) in {(bottom - top, right - left) for top, bottom, left, right in gridded}


def test_random_boxes_rarely_need_the_fallback_at_the_default_scale(monkeypatch):
    fallbacks = []
    monkeypatch.setattr(regions, "_boxes_in_cells", lambda *args: fallbacks.append(args) or [])
    _, layout = random_layout(list(range(200)), 0, 1000, 4, (224, 224))
    assert not fallbacks and len(layout.owners) > 400  # whole-image redraws keep every image off the fallback


def test_random_boxes_that_only_fit_as_quadrants_end_as_quadrants():
    _, layout = random_layout(INDICES, 0, 10, 4, (32, 32), (0.5, 0.5))
    quadrants = {(0, 16, 0, 16), (0, 16, 16, 32), (16, 32, 0, 16), (16, 32, 16, 32)}
    for position in range(len(INDICES)):
        boxes = _boxes_of(layout, position)
        if len(boxes) == 4:
            assert set(boxes) == quadrants
        assert int(sum(_mask(box, (32, 32)).int() for box in boxes).max()) == 1


@pytest.mark.parametrize("call, match", [
    (lambda: grid_layout([0], 0, 10, 5, (32, 32), (2, 2)), "msr_regions=5 .* 2x2 grid has 4"),
    (lambda: grid_layout([0], 0, 10, 4, (32, 32), (20, 2)), "cells under 2 pixels"),
    (lambda: random_layout([0], 0, 10, 4, (32, 32), (0.01, 0.03)), "no whole-pixel side"),
    (lambda: random_layout([0], 0, 10, 4, (32, 32), (0.52, 0.6)), "fit in the cells of a 2x2 grid"),
    (lambda: msr_grid("grid:0x3"), "'grid:RxC'"),
    (lambda: msr_grid("hexagons"), "'grid:RxC'"),
    (lambda: msr_grid("grid:3x3 rows"), "'grid:RxC'"),
    (lambda: grid_layout([0], 0, 10, 4, (32, 32), (2, 20)), "cells under 2 pixels"),  # 1-pixel-wide cells
    # 2 boxes need the 2x2 fallback grid (one cell is not enough); boxes of 20+ pixels do not fit its 16-pixel cells
    (lambda: random_layout([0], 0, 10, 2, (32, 32), (0.6, 0.7)), r"at least 20x20 pixels .* 2x2 grid"),
    (lambda: random_layout([0], 0, 10, 4, (32, 33), (0.5, 0.6)), r"at least 16x17 pixels .* 2x2 grid"),  # too wide
])
def test_impossible_layouts_are_refused(call, match):
    with pytest.raises(SynthesisError, match=match):
        call()


@pytest.mark.parametrize("layout_of", [
    lambda: quadrant_layout([0, 1, 2], 0, 10, 4, (32, 32)),
    lambda: grid_layout([0, 1, 2], 0, 10, 9, (32, 32), (3, 3)),
    lambda: random_layout([0, 1, 2], 0, 10, 4, (32, 32)),
], ids=["quadrants", "grid", "random"])
def test_each_crop_is_its_box_resized_and_its_gradient_reaches_only_that_box(layout_of):
    _, layout = layout_of()
    images = torch.randn(3, 3, 32, 32, requires_grad=True)
    inputs = RegionCrops(layout)(images)
    assert inputs.shape == (3 + len(layout.owners), 3, 32, 32)
    assert torch.equal(inputs[:3], images)
    for k, (owner, box) in enumerate(zip(layout.owners, layout.boxes)):
        top, bottom, left, right = box
        expected = F.interpolate(images[owner:owner + 1, :, top:bottom, left:right], size=(32, 32), mode="bilinear",
                                 align_corners=False)
        torch.testing.assert_close(inputs[3 + k:4 + k], expected)
        (grad,) = torch.autograd.grad(inputs[3 + k].sum(), images, retain_graph=True)
        touched = grad.abs().sum(1) > 0
        assert torch.equal(touched[owner], _mask(box, (32, 32)))
        assert not bool(touched[[p for p in range(3) if p != owner]].any())


def test_crops_refuse_images_of_another_size():
    _, layout = random_layout([0], 0, 10, 4, (32, 32))
    with pytest.raises(SynthesisError, match=r"drawn for \(32, 32\) images, but the images are 16x16"):
        RegionCrops(layout)(torch.zeros(1, 3, 16, 16))
    with pytest.raises(SynthesisError, match="Unknown resize mode"):
        RegionCrops(layout, "sideways")


def test_cells_of_the_smallest_allowed_side_are_accepted():
    _, layout = grid_layout([0, 1], 0, 10, 4, (32, 32), (16, 16))  # cells of MIN_REGION_SIDE = 2 pixels
    assert layout.boxes and all((bottom - top, right - left) == (2, 2) for top, bottom, left, right in layout.boxes)


def test_crops_of_non_square_images_have_the_images_size():
    _, layout = grid_layout([0, 1], 0, 10, 4, (32, 24), (2, 2))
    images = torch.randn(2, 3, 32, 24)
    inputs = RegionCrops(layout)(images)
    assert inputs.shape == (2 + len(layout.owners), 3, 32, 24)
    for k, (owner, (top, bottom, left, right)) in enumerate(zip(layout.owners, layout.boxes)):
        expected = F.interpolate(images[owner:owner + 1, :, top:bottom, left:right], size=(32, 24), mode="bilinear",
                                 align_corners=False)
        torch.testing.assert_close(inputs[2 + k:3 + k], expected)


@pytest.mark.parametrize("max_regions, num_labels, scale", [(4, 3, (0.3, 0.5)), (4, 10, (0.5, 0.5))],
                         ids=["few-classes", "crowded"])
def test_random_crops_each_have_a_box_and_a_class_other_than_their_images(max_regions, num_labels, scale):
    labels, layout = random_layout(INDICES, 0, num_labels, max_regions, (32, 32), scale)
    assert len(layout.owners) == len(layout.boxes) == len(layout.labels)
    for position in range(len(INDICES)):
        classes = [label for owner, label in zip(layout.owners, layout.labels) if owner == position]
        assert 1 <= len(classes) <= min(max_regions, num_labels - 1)
        assert len(set(classes + [int(labels[position])])) == len(classes) + 1  # image and crop classes all differ


def test_random_boxes_draw_their_classes_after_their_boxes():
    # the documented order of an image's draws from its "regions" stream: crop count, boxes, then the classes
    labels, layout = random_layout([3, 8], 5, 10, 4, (32, 32))
    sides = regions._side_range(32, (0.25, 0.5))
    for position, index in enumerate([3, 8]):
        generator = stream_generator(5, index, "regions")
        count = int(torch.randint(1, 5, (1,), generator=generator))
        boxes = regions._random_boxes(generator, count, (32, 32), (sides, sides))
        classes = torch.randperm(10, generator=generator)[: count + 1].tolist()
        assert _boxes_of(layout, position) == boxes and int(labels[position]) == classes[0]
        assert [label for owner, label in zip(layout.owners, layout.labels) if owner == position] == classes[1:]


def test_random_boxes_may_share_an_edge(monkeypatch):
    # bottom and right are exclusive: a box that starts where another ends does not overlap it
    def no_fallback(*args):
        raise AssertionError("the grid fallback would place touching boxes itself")

    monkeypatch.setattr(regions, "_boxes_in_cells", no_fallback)
    _, layout = random_layout(INDICES, 0, 10, 2, (32, 32), (0.25, 0.5))
    pairs = [pair for position in range(len(INDICES)) for pair in combinations(_boxes_of(layout, position), 2)]
    def share_an_edge(a, b):
        rows, cols = a[0] < b[1] and b[0] < a[1], a[2] < b[3] and b[2] < a[3]
        return (cols and (b[0] == a[1] or b[1] == a[0])) or (rows and (b[2] == a[3] or b[3] == a[2]))

    assert any(share_an_edge(a, b) for a, b in pairs)


def test_random_box_positions_reach_every_edge_of_the_image():
    _, layout = random_layout(INDICES, 0, 10, 1, (32, 32), (0.3, 0.6))  # one box per image: always placed at once
    top, bottom, left, right = zip(*layout.boxes)
    assert (min(top), max(bottom), min(left), max(right)) == (0, 32, 0, 32)


def test_random_box_sides_span_the_scale_and_keep_to_it_after_rounding():
    # 10x7 images, scale (0.3, 0.5): heights 3..5; widths height x 0.7 rounded (2 for 3, 4 for 5), kept in 2.1..3.5
    _, layout = random_layout(INDICES, 0, 10, 1, (10, 7), (0.3, 0.5))
    assert {bottom - top for top, bottom, _, _ in layout.boxes} == {3, 4, 5}  # both ends of the range are drawn
    assert {right - left for _, _, left, right in layout.boxes} == {3}


@pytest.mark.parametrize("scale, side", [((0.14, 0.14), 14), ((0.29, 0.29), 29), ((0.005, 0.02), 2)])
def test_random_box_sides_are_whole_pixels_of_the_scale_and_at_least_two(scale, side):
    # 0.14 x 100 and 0.29 x 100 are 14.000000000000002 and 28.999999999999996 in floating point; 0.02 x 100 is 2
    _, layout = random_layout(INDICES[:16], 0, 10, 1, (100, 100), scale)
    assert {(bottom - top, right - left) for top, bottom, left, right in layout.boxes} == {(side, side)}
