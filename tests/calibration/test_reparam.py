import copy

import pytest
import torch

from optimum_dfq import DFQConfig
from optimum_dfq.calibration import (
    SCALE_SELECTOR_REGISTRY,
    calibrate_activations,
    calibrate_weights,
    convert_model,
    quantization_disabled,
    reparameterize_layernorm,
    reparameterize_model,
    set_quantizer_modes,
)
from optimum_dfq.calibration.convert import activation_quantizer, weight_quantizer
from optimum_dfq.calibration.data import CalibrationSet
from optimum_dfq.config import SCALE_SELECTORS
from optimum_dfq.models import find_layernorm_consumers, get_adapter
from optimum_dfq.nn import QLayerNorm, QLinear, use_quantized_attention


def prepared(model, config, images):
    model = copy.deepcopy(model)
    use_quantized_attention(model)
    consumers = find_layernorm_consumers(model, images[:1])
    plan = convert_model(model, config, get_adapter(model), consumers)
    calibrate_weights(model)
    calibrate_activations(model, CalibrationSet(images), config)
    return model, plan


@pytest.mark.parametrize("selector", SCALE_SELECTORS)
def test_reparameterisation_keeps_the_float_function(tiny_model, selector):
    torch.manual_seed(1)
    images = torch.randn(8, 3, 32, 32)
    config = DFQConfig(bits="w4a4", scale_selector=selector)
    model, plan = prepared(tiny_model, config, images)
    assert plan.layernorm_consumers
    with quantization_disabled(model):
        before = model(pixel_values=images).logits
        reparameterize_model(model, plan.layernorm_consumers, config)
        after = model(pixel_values=images).logits
    assert (before - after).abs().max() < 1e-4
    reference = tiny_model(pixel_values=images).logits
    assert (reference - after).abs().max() < 1e-4


def test_reparameterised_activation_codes_are_exact(tiny_model):
    """With integer zero points the per-tensor codes equal the per-channel ones: only weights change."""
    torch.manual_seed(2)
    images = torch.randn(8, 3, 32, 32)
    config = DFQConfig(bits="w4a4")
    model, plan = prepared(tiny_model, config, images)
    set_quantizer_modes(model, weights="off")
    before = model(pixel_values=images).logits
    reparameterize_model(model, plan.layernorm_consumers, config, recalibrate_weights=False)
    set_quantizer_modes(model, weights="off")
    after = model(pixel_values=images).logits
    assert (before - after).abs().max() < 1e-4
    norms = [m for m in model.modules() if isinstance(m, QLayerNorm)]
    assert norms and all(not m.output_quantizer.per_channel for m in norms)
    assert all(float(m.output_quantizer.zero_point) == round(float(m.output_quantizer.zero_point)) for m in norms)


def test_selectors_on_a_planted_outlier_channel():
    scale = torch.full((64,), 0.1, dtype=torch.float64)
    scale[5] = 10.0
    zero = torch.full((64,), 8.0, dtype=torch.float64)
    mean_scale, _ = SCALE_SELECTOR_REGISTRY["mean"](scale, zero)
    median_scale, median_zero = SCALE_SELECTOR_REGISTRY["median"](scale, zero)
    mad_scale, _ = SCALE_SELECTOR_REGISTRY["mad"](scale, zero)
    assert float(median_scale) == pytest.approx(0.1)
    assert float(median_zero) == pytest.approx(8.0)
    assert float(mad_scale) == pytest.approx(0.1)
    assert float(mean_scale) > 0.25  # the outlier drags RepQ's mean up


def test_selectors_agree_on_constant_scales():
    scale = torch.full((16,), 0.3, dtype=torch.float64)
    zero = torch.full((16,), 5.0, dtype=torch.float64)
    results = [SCALE_SELECTOR_REGISTRY[name](scale, zero) for name in SCALE_SELECTORS]
    for s, z in results:
        assert float(s) == pytest.approx(0.3) and float(z) == pytest.approx(5.0)


def test_fixed_selectors_by_hand():
    # channel scales and zero points chosen so that every rule gives a different, hand-computable answer
    scale = torch.tensor([0.1, 0.2, 0.4, 0.3, 8.0], dtype=torch.float64)
    zero = torch.tensor([2.0, 10.0, 5.0, 4.0, 1.0], dtype=torch.float64)
    s, z = SCALE_SELECTOR_REGISTRY["mean"](scale, zero)  # RepQ-ViT: plain means
    assert float(s) == pytest.approx(9.0 / 5) and float(z) == pytest.approx(22.0 / 5)
    # median: s̃ = median(s) = 0.3; lower bounds m = -z·s = [-0.2, -2, -2, -1.2, -8], median -2 -> z̃ = 2 / 0.3
    s, z = SCALE_SELECTOR_REGISTRY["median"](scale, zero)
    assert float(s) == pytest.approx(0.3) and float(z) == pytest.approx(2.0 / 0.3)
    # mad: |s - 0.3| = [0.2, 0.1, 0.1, 0, 7.7], mean 1.62; k = 3 drops only the outlier channel
    s, z = SCALE_SELECTOR_REGISTRY["mad"](scale, zero)
    assert float(s) == pytest.approx(0.25) and float(z) == pytest.approx(21.0 / 4)
    # a tighter k = 0.1 (threshold 0.162) keeps the channels within 0.162 of the median: 0.2, 0.4, 0.3
    s, z = SCALE_SELECTOR_REGISTRY["mad"](scale, zero, k=0.1)
    assert float(s) == pytest.approx(0.3) and float(z) == pytest.approx(19.0 / 3)


def test_median_selector_takes_the_lower_middle_value_for_an_even_channel_count():
    # documented in the search selector: torch.median, not the interpolated median, for an even channel count
    scale = torch.tensor([0.1, 0.4, 0.2, 0.8], dtype=torch.float64)
    zero = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    s, z = SCALE_SELECTOR_REGISTRY["median"](scale, zero)
    # sorted scales 0.1, 0.2, 0.4, 0.8 -> 0.2; lower bounds -z·s sorted -3.2, -0.8, -0.6, -0.1 -> -0.8; z̃ = 0.8 / 0.2
    assert float(s) == pytest.approx(0.2) and float(z) == pytest.approx(4.0)


def test_mad_selector_default_k_is_three():
    # |s - 0.4| = [0.3, 0.2, 0.1, 0, 0.1, 0.2, 0.6], mean 1.5 / 7: the last channel is within 3x (0.643) of the mean
    # deviation but not within 2x (0.429), so the default k = 3 keeps every channel
    scale = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.0], dtype=torch.float64)
    zero = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 14.0], dtype=torch.float64)
    s, z = SCALE_SELECTOR_REGISTRY["mad"](scale, zero)
    assert float(s) == pytest.approx(3.1 / 7) and float(z) == pytest.approx(5.0)
    s, z = SCALE_SELECTOR_REGISTRY["mad"](scale, zero, k=2.0)
    assert float(s) == pytest.approx(0.35) and float(z) == pytest.approx(3.5)


def quantized_norm(bits, config, bias=True, per_channel=True, channels=16, outputs=8, seed=0):
    """A QLayerNorm with a calibrated `bits`-bit output quantizer feeding one QLinear, and calibration inputs."""
    generator = torch.Generator().manual_seed(seed)
    norm = torch.nn.LayerNorm(channels, bias=bias)
    linear = torch.nn.Linear(channels, outputs)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels, generator=generator) * 3 + 0.2)
        if bias:
            norm.bias.copy_(torch.randn(channels, generator=generator))
    quantizer = activation_quantizer(config, bits=bits, channels=channels if per_channel else None)
    qnorm = QLayerNorm.from_float(norm, quantizer, "block.norm")
    qlinear = QLinear.from_float(linear, weight_quantizer(config, outputs), None, "block.fc")
    qlinear.calibrate_weights()
    inputs = torch.randn(256, channels, generator=generator)
    quantizer.set_mode("observe")
    with torch.no_grad():
        qnorm(inputs)
    quantizer.calibrate()
    quantizer.set_mode("quantize")
    return qnorm, qlinear, inputs


def float_output(qnorm, inputs):
    with torch.no_grad(), quantization_disabled(qnorm):
        return qnorm(inputs)


def test_the_per_tensor_quantizer_keeps_the_bits_site_and_activation_codes_of_the_per_channel_one():
    config = DFQConfig(bits="w4a4", scale_selector="median")
    qnorm, qlinear, inputs = quantized_norm(8, config)  # 8 bits at this site, unlike the config's 4
    site = qnorm.output_quantizer.site
    codes = qnorm.output_quantizer.codes(float_output(qnorm, inputs))
    reparameterize_layernorm(qnorm, [qlinear], config)
    quantizer = qnorm.output_quantizer
    assert not quantizer.per_channel and quantizer.bits == 8 and quantizer.site == site
    folded_codes = quantizer.codes(float_output(qnorm, inputs))
    assert int(codes.max()) > 15  # the 8-bit range is really used
    assert float((folded_codes == codes).double().mean()) > 0.999  # equal up to float32 ties


def test_an_unrounded_zero_point_is_kept_when_round_zero_point_is_false():
    config = DFQConfig(bits="w4a4", scale_selector="median", round_zero_point=False)
    qnorm, qlinear, inputs = quantized_norm(4, config)
    scale, zero = qnorm.output_quantizer.scale.double(), qnorm.output_quantizer.zero_point.double()
    expected_zero = -(-zero * scale).median() / scale.median()  # the median selector, by its docstring
    assert float(expected_zero) != round(float(expected_zero))
    before = float_output(qnorm, inputs) @ qlinear.weight.T + qlinear.bias
    reparameterize_layernorm(qnorm, [qlinear], config)
    assert float(qnorm.output_quantizer.zero_point) == pytest.approx(float(expected_zero), rel=1e-6)
    after = float_output(qnorm, inputs) @ qlinear.weight.T + qlinear.bias
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias,per_channel,message", [
    (True, False, "block.norm.output is not a per-channel uniform quantizer"),
    (False, True, "block.norm.output: re-parameterisation needs a LayerNorm with weight and bias"),
])
def test_reparameterize_layernorm_refuses_what_it_cannot_fold(bias, per_channel, message):
    config = DFQConfig(bits="w4a4")
    qnorm, qlinear, _ = quantized_norm(4, config, bias=bias, per_channel=per_channel)
    with pytest.raises(ValueError, match=message):
        reparameterize_layernorm(qnorm, [qlinear], config)
