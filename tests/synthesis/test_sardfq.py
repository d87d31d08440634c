"""SARDFQ synthesizer options (optimum_dfq/synthesis/sardfq.py)."""

from __future__ import annotations

import pytest
import torch
from synth_helpers import FAST, one_thread, plan_batch, tiny_vit  # noqa: F401

from optimum_dfq.errors import SynthesisError
from optimum_dfq.synthesis import SoftLabelTerm, get_synthesizer
from optimum_dfq.synthesis.engine import EngineConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _relevant(row: torch.Tensor) -> list[int]:
    """Classes given a logit in U(5, 10) (all others have logit 0, so probability at least e^5 times smaller)."""
    return sorted((row > row.min() * 10).nonzero().flatten().tolist())


@pytest.mark.parametrize("crop_classes", [True, False])
def test_image_soft_label_includes_its_crops_classes_only_when_asked(crop_classes):
    synth = get_synthesizer("sardfq", **FAST, image_label_includes_crops=crop_classes)
    plan = plan_batch(synth, tiny_vit(), list(range(4)))
    targets = next(term for term in plan.terms if isinstance(term, SoftLabelTerm)).targets
    for position in range(4):
        crop_rows = (plan.owners == position).nonzero().flatten()[1:]
        crop_classes_of_image = [_relevant(targets[row])[0] for row in crop_rows.tolist()]
        assert all(len(_relevant(targets[row])) == 1 for row in crop_rows.tolist())  # a crop: its own class only
        expected = [int(plan.labels[position])] + (crop_classes_of_image if crop_classes else [])
        assert _relevant(targets[position]) == sorted(expected)
        torch.testing.assert_close(plan.soft_labels[position], targets[position])


def test_image_label_option_enters_the_cache_key_only_off_its_default():
    def resolved(**options):
        return get_synthesizer("sardfq", **FAST, **options).resolved_hyperparameters(EngineConfig(**FAST))

    assert "image_label_includes_crops" not in resolved()  # runs from before the option keep their cache key
    assert resolved(image_label_includes_crops=True) == resolved()
    assert resolved(image_label_includes_crops=False)["image_label_includes_crops"] is False


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_msr_resize_mode_sets_how_each_quadrant_is_brought_to_the_input_size(mode):
    synth = get_synthesizer("sardfq", **FAST, msr_resize=mode)
    plan = plan_batch(synth, tiny_vit(), [0])
    inputs = plan.views(plan.init)
    first = plan.views.layout.quadrants[0]
    top, left = (first // 2) * 16, (first % 2) * 16
    quadrant = plan.init[:1, :, top:top + 16, left:left + 16]
    expected = torch.nn.functional.interpolate(quadrant, size=(32, 32), mode=mode,
                                               **({} if mode == "nearest" else {"align_corners": False}))
    torch.testing.assert_close(inputs[1:2], expected)
    if mode == "nearest":
        torch.testing.assert_close(inputs[1:2], quadrant.repeat_interleave(2, -1).repeat_interleave(2, -2))


def test_msr_resize_enters_the_cache_key_only_off_its_default():
    def resolved(**options):
        return get_synthesizer("sardfq", **FAST, **options).resolved_hyperparameters(EngineConfig(**FAST))

    assert "msr_resize" not in resolved() and resolved(msr_resize="bilinear") == resolved()
    assert resolved(msr_resize="bicubic")["msr_resize"] == "bicubic"
    with pytest.raises(SynthesisError, match="msr_resize"):
        get_synthesizer("sardfq", msr_resize="sideways")
