"""Per-image targets of the synthesizers (optimum_dfq/synthesis/targets.py), recomputed from their definition."""

from __future__ import annotations

import torch

from optimum_dfq.synthesis.seeding import stream_generator
from optimum_dfq.synthesis.targets import soft_target, uniform_per_image


def test_soft_target_is_the_softmax_of_logits_uniform_in_the_range_at_the_relevant_classes_and_zero_elsewhere():
    relevant = [4, 1, 7]
    target = soft_target(relevant, 10, torch.Generator().manual_seed(0), (5.0, 10.0)).double()
    draws = torch.rand(3, generator=torch.Generator().manual_seed(0)).double()
    # softmax is shift-invariant: the logits are log T up to a constant, fixed by the zero logits of the others
    logits = target.log() - target.log()[0]
    expected = torch.zeros(10, dtype=torch.float64)
    expected[relevant] = 5.0 + 5.0 * draws
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    assert abs(float(target.sum()) - 1.0) < 1e-6


def test_soft_target_logits_span_the_whole_range():
    generator = torch.Generator().manual_seed(1)
    logits = torch.stack([soft_target([0], 4, generator, (5.0, 10.0)).log() for _ in range(400)])
    relevant = (logits[:, 0] - logits[:, 1]).double()
    assert 5.0 <= float(relevant.min()) < 5.1 and 9.9 < float(relevant.max()) <= 10.0


def test_uniform_per_image_draws_each_images_value_from_its_own_stream():
    values = uniform_per_image([3, 0, 11], 7, "tv", 2500.0, 3000.0)
    expected = torch.cat([2500.0 + 500.0 * torch.rand(1, generator=stream_generator(7, i, "tv")) for i in (3, 0, 11)])
    torch.testing.assert_close(values, expected)
    spread = uniform_per_image(list(range(300)), 0, "tv", 2500.0, 3000.0)
    assert 2500.0 <= float(spread.min()) < 2520.0 and 2980.0 < float(spread.max()) <= 3000.0
