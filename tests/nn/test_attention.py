"""The `"optimum_dfq"` attention implementation refuses float models that did not ask for it."""

from __future__ import annotations

import copy

import pytest
import torch

from optimum_dfq import CheckpointError
from optimum_dfq.nn import capture_attention, register_attention_implementation, use_quantized_attention

from ..conftest import TINY_MODELS, tiny_vit

pytestmark = pytest.mark.usefixtures("single_thread")


def test_float_model_switched_by_transformers_alone_is_refused():
    register_attention_implementation()
    model = tiny_vit()
    model.set_attn_implementation("optimum_dfq")  # what loading a config.json without quantization_config does
    with pytest.raises(CheckpointError, match=r"ViTAttention runs the 'optimum_dfq' attention.*no "
                                              r"`quantization_config`.*Restore `quantization_config` in config\.json"):
        model(pixel_values=torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("family", ["vit", "deit_teacher", "swin"])
def test_float_model_that_opted_in_runs_like_eager_attention(family):
    model = TINY_MODELS[family]()  # DeiT has prefix tokens; Swin's shifted windows pass an attention mask
    pixels = torch.randn(2, 3, 32, 32)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(pixel_values=pixels).logits
    use_quantized_attention(model)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, eager, atol=1e-6, rtol=0)
        torch.testing.assert_close(copy.deepcopy(model)(pixel_values=pixels).logits, eager, atol=1e-6,
                                   rtol=0)  # copies keep it


def test_capture_runs_a_float_model_and_restores_its_attention():
    model = tiny_vit()
    previous = model.config._attn_implementation
    with capture_attention(model) as records, torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 32, 32))
    assert len(records) == 2 and model.config._attn_implementation == previous
