"""Per-image jitter and flip: the draws, their resumable state, and the permutation with its gradient."""

from __future__ import annotations

import pytest
import torch

from optimum_dfq.synthesis.augment import JitterFlip


def _generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def _reference(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Roll each image by its offset on both axes, then flip it horizontally where asked, with torch's own ops."""
    moved = [torch.roll(image, (int(offset),) * 2, dims=(1, 2)) for image, offset in zip(images, offsets)]
    return torch.stack([image.flip(-1) if flip else image for image, flip in zip(moved, flips)])


def test_offsets_cover_the_whole_symmetric_range_and_nothing_outside_it():
    augment = JitterFlip(_generators(0, 1, 2, 3))
    offsets = torch.cat([augment.draw(max_offset=2)[0] for _ in range(100)])
    assert sorted(offsets.unique().tolist()) == [-2, -1, 0, 1, 2]


@pytest.mark.parametrize("flip_prob", [0.0, 0.25, 1.0])
def test_flip_prob_is_the_share_of_flipped_draws(flip_prob):
    augment = JitterFlip(_generators(0, 1, 2, 3), flip_prob=flip_prob)
    flips = torch.cat([augment.draw(max_offset=1)[1] for _ in range(500)])
    assert flips.dtype == torch.bool
    assert abs(flips.float().mean().item() - flip_prob) < 0.05  # 2000 draws: a standard error of 0.01 at most


def test_each_image_draws_its_offset_then_its_flip_from_its_own_generator():
    # the draw sequence decides the synthesized images, which the cache stores under an unchanged key
    augment = JitterFlip(_generators(11, 12), flip_prob=0.3)
    replay = _generators(11, 12)
    for max_offset in (3, 3, 7):
        offsets, flips = augment.draw(max_offset)
        for b, generator in enumerate(replay):
            assert int(offsets[b]) == int(torch.randint(-max_offset, max_offset + 1, (1,), generator=generator))
            assert bool(flips[b]) == bool(torch.rand(1, generator=generator) < 0.3)


def test_restored_states_replay_each_images_draws():
    augment = JitterFlip(_generators(5, 6, 7))
    augment.draw(4)
    states = augment.get_states()
    first = [augment.draw(4) for _ in range(3)]
    augment.draw(4)
    augment.set_states(states)
    again = [augment.draw(4) for _ in range(3)]
    for (offsets, flips), (offsets_again, flips_again) in zip(first, again, strict=True):
        assert torch.equal(offsets, offsets_again) and torch.equal(flips, flips_again)
    # restored into fresh generators too, image by image
    fresh = JitterFlip(_generators(0, 0, 0))
    fresh.set_states(states)
    assert torch.equal(fresh.draw(4)[0], first[0][0])
    assert len({tuple(state.tolist()) for state in states}) == 3  # one state per image, not one shared


@pytest.mark.parametrize("states", [torch.zeros(2, 5056, dtype=torch.uint8), torch.zeros(3, 5056, dtype=torch.int64),
                                    torch.zeros(3 * 5056, dtype=torch.uint8)], ids=["count", "dtype", "dim"])
def test_states_that_do_not_fit_the_generators_are_refused(states):
    augment = JitterFlip(_generators(5, 6, 7))
    with pytest.raises(ValueError, match=r"one uint8 generator state per image \(3\)"):
        augment.set_states(states)


@pytest.mark.parametrize(("offsets", "flips"), [([2, -3, 0], [True, False, True]), ([1, 0, -2], [False] * 3),
                                                ([0, 0, 0], [False, True, False]), ([0, 0, 0], [False] * 3)],
                         ids=["both", "rolls-only", "flips-only", "neither"])
def test_apply_rolls_then_flips_non_square_images(offsets, flips):
    images = torch.randn(3, 2, 5, 7)
    offsets, flips = torch.tensor(offsets), torch.tensor(flips)
    assert torch.equal(JitterFlip.apply(images, offsets, flips), _reference(images, offsets, flips))


@pytest.mark.parametrize("flips", [[True, False, True], [False, True, False]])
def test_the_gradient_is_that_of_the_roll_and_flip(flips):
    images = torch.randn(3, 2, 5, 7)
    offsets, flips = torch.tensor([2, -3, 4]), torch.tensor(flips)
    weights = torch.randn(3, 2, 5, 7)  # a loss that tells every output pixel apart
    ours, reference = images.clone().requires_grad_(), images.clone().requires_grad_()
    (JitterFlip.apply(ours, offsets, flips) * weights).sum().backward()
    (_reference(reference, offsets, flips) * weights).sum().backward()
    assert torch.equal(ours.grad, reference.grad)
