"""The `"optimum_dfq"` attention implementation refuses float models that did not ask for it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from optimum_dfq import CheckpointError
from optimum_dfq.nn import (
    ATTENTION_IMPLEMENTATION,
    SAVED_ATTENTION_IMPLEMENTATION,
    AttentionQuantizers,
    capture_attention,
    dfq_attention_forward,
    register_attention_implementation,
    use_quantized_attention,
)
from optimum_dfq.quantizers import LogSqrt2Quantizer, Quantizer, UniformQuantizer

from ..conftest import TINY_MODELS, tiny_vit

pytestmark = pytest.mark.usefixtures("single_thread")


def test_float_model_switched_by_transformers_alone_is_refused():
    register_attention_implementation()
    model = tiny_vit()
    model.set_attn_implementation("optimum_dfq")  # what loading a config.json without quantization_config does
    with pytest.raises(CheckpointError, match=r"ViTAttention runs the 'optimum_dfq' attention.*no "
                                              r"`quantization_config`.*Restore `quantization_config` in config\.json"):
        model(pixel_values=torch.randn(1, 3, 32, 32))


def test_both_registered_names_run_the_quantized_attention():
    register_attention_implementation()
    for name in (ATTENTION_IMPLEMENTATION, SAVED_ATTENTION_IMPLEMENTATION):
        assert ALL_ATTENTION_FUNCTIONS[name] is dfq_attention_forward


def test_a_model_whose_config_has_a_quantization_config_needs_no_opt_in():
    register_attention_implementation()
    model = tiny_vit()  # stands for a weight-only checkpoint: no attention quantizers, but a quantization_config
    pixels = torch.randn(1, 3, 32, 32)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(pixel_values=pixels).logits
    model.config.quantization_config = {"quant_method": "optimum_dfq"}
    model.set_attn_implementation(SAVED_ATTENTION_IMPLEMENTATION)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, eager, atol=1e-6, rtol=0)


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


class _Attention(nn.Module):
    """A stand-in attention module without a config (so it needs no opt-in), optionally quantized."""

    def __init__(self, quantizers: AttentionQuantizers | None = None) -> None:
        super().__init__()
        if quantizers is not None:
            self.dfq_attention = quantizers


def _operands(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return tuple(torch.randn(2, 3, 5, 4, dtype=dtype) for _ in range(3))  # [batch, heads, tokens=5, head_dim=4]


def _calibrated(quantizer: Quantizer, sample: torch.Tensor) -> Quantizer:
    quantizer.observe(sample)
    quantizer.calibrate()
    return quantizer


def test_attention_quantizers_of_a_module_without_a_path_are_named_by_their_role():
    quantizers = AttentionQuantizers(*(UniformQuantizer(bits=4) for _ in range(4)))
    assert [q.site for q in quantizers.quantizers()] == ["query", "key", "probs", "value"]


def test_float_attention_is_softmax_of_scaled_scores_times_values():
    query, key, value = _operands()
    probs = torch.softmax(query @ key.transpose(-1, -2) / 2.0, dim=-1)  # head_dim 4: scaling 1/sqrt(4)
    output, returned = dfq_attention_forward(_Attention(), query, key, value, attention_mask=None)
    torch.testing.assert_close(returned, probs)
    torch.testing.assert_close(output, (probs @ value).transpose(1, 2))


def test_bfloat16_attention_returns_bfloat16_probabilities():
    output, probs = dfq_attention_forward(_Attention(), *_operands(torch.bfloat16), attention_mask=None)
    assert probs.dtype == output.dtype == torch.bfloat16


def test_attention_dropout_applies_in_training_only():
    query, key, value = _operands()
    module = _Attention()
    _, expected = dfq_attention_forward(module, query, key, value, attention_mask=None)
    _, evaluated = dfq_attention_forward(module.eval(), query, key, value, attention_mask=None, dropout=0.5)
    torch.testing.assert_close(evaluated, expected)
    _, trained = dfq_attention_forward(module.train(), query, key, value, attention_mask=None, dropout=0.5)
    kept = trained != 0
    assert 0 < int(kept.sum()) < kept.numel()
    torch.testing.assert_close(trained[kept], 2.0 * expected[kept])  # inverted dropout scales what it keeps


def test_quantized_attention_quantizes_both_operands_of_both_matmuls():
    query, key, value = _operands()
    scores = query @ key.transpose(-1, -2) / 2.0
    quantizers = AttentionQuantizers(
        _calibrated(UniformQuantizer(bits=2, observer="minmax"), query),
        _calibrated(UniformQuantizer(bits=3, observer="minmax"), key * 3.0),
        _calibrated(LogSqrt2Quantizer(bits=3), torch.softmax(scores, dim=-1)),
        _calibrated(UniformQuantizer(bits=2, observer="minmax"), value * 2.0),
    )
    output, probs = dfq_attention_forward(_Attention(quantizers), query, key, value, attention_mask=None)
    q, k, v = quantizers.query.fake_quant(query), quantizers.key.fake_quant(key), quantizers.value.fake_quant(value)
    expected_probs = quantizers.probs.fake_quant(torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1))
    torch.testing.assert_close(probs, expected_probs)
    torch.testing.assert_close(output, (expected_probs @ v).transpose(1, 2))


class _ValueObservingQuantizer(UniformQuantizer):
    """A probs quantizer that calibrates on `A·V` (like TanQ) and records the `V` it is given."""

    observes_value = True

    def __init__(self) -> None:
        super().__init__(bits=4, observer="minmax")
        self.values: list[torch.Tensor] = []

    def observe_value(self, value: torch.Tensor) -> None:
        self.values.append(value)


@pytest.mark.parametrize(("mode", "observes"), [("observe", True), ("calibrate", True), ("quantize", False),
                                                ("off", False)])
def test_a_probs_quantizer_on_a_v_gets_the_quantized_v_while_calibrating(mode, observes):
    query, key, value = _operands()
    probs_quantizer = _calibrated(_ValueObservingQuantizer(), torch.rand(8))
    probs_quantizer.set_mode(mode)
    value_quantizer = _calibrated(UniformQuantizer(bits=2, observer="minmax"), value)
    quantizers = AttentionQuantizers(UniformQuantizer(bits=8), UniformQuantizer(bits=8), probs_quantizer,
                                     value_quantizer)
    quantizers.query.set_mode("off")
    quantizers.key.set_mode("off")
    dfq_attention_forward(_Attention(quantizers), query, key, value, attention_mask=None)
    assert len(probs_quantizer.values) == int(observes)
    if observes:
        torch.testing.assert_close(probs_quantizer.values[0], value_quantizer.fake_quant(value), rtol=0, atol=0)


def test_capture_records_float_probabilities_with_their_graph_only_inside_the_block():
    query, key, value = _operands()
    query.requires_grad_(True)
    quantizers = AttentionQuantizers(*(_calibrated(UniformQuantizer(bits=2, observer="minmax"), t)
                                       for t in (query, key, torch.rand(8), value)))
    module = _Attention(quantizers)
    with capture_attention(tiny_vit()) as records:
        _, quantized_probs = dfq_attention_forward(module, query, key, value, attention_mask=None)
    assert len(records) == 1 and records[0].module is module
    q, k = quantizers.query.fake_quant(query.detach()), quantizers.key.fake_quant(key)
    torch.testing.assert_close(records[0].probs, torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1))
    assert not torch.equal(records[0].probs, quantized_probs)
    records[0].probs[..., 0].sum().backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    dfq_attention_forward(module, query, key, value, attention_mask=None)
    assert len(records) == 1
