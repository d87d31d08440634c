"""DFQ-ViT synthesis: option checks and the hard-label class loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from synth_helpers import FAST, NORM, one_thread, tiny_vit  # noqa: F401

from optimum_dfq.errors import SynthesisError
from optimum_dfq.synthesis import get_synthesizer


@pytest.mark.parametrize("option,message", [
    ({"class_loss": "kl"}, r"class_loss='kl' must be one of \['soft', 'hard'\]"),
    ({"order": "random"}, r"order='random' must be one of \['easy_to_hard', 'index'\]"),
])
def test_unknown_options_are_refused(option, message):
    with pytest.raises(SynthesisError, match=message):
        get_synthesizer("dfq-vit", **FAST, **option)


@pytest.mark.usefixtures("one_thread")
def test_hard_class_loss_uses_cross_entropy_and_records_its_difficulty():
    model = tiny_vit()
    calib = get_synthesizer("dfq-vit", class_loss="hard", **FAST).synthesize(model, 3, seed=0, **NORM)
    assert calib.soft_labels is None and calib.labels.shape == (3,)
    history = calib.metadata["loss_history"]
    assert "ce" in history and "sl" not in history  # the hard cross-entropy term, not the soft-label one
    with torch.no_grad():
        expected = F.cross_entropy(model(pixel_values=calib.pixel_values).logits, calib.labels, reduction="none")
    difficulty = calib.metadata["per_image"]["difficulty"]
    torch.testing.assert_close(torch.tensor(difficulty), expected, rtol=1e-4, atol=1e-5)
    assert difficulty == sorted(difficulty)  # easy to hard, labels reordered with their images
