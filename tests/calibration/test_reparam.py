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
    reparameterize_model,
    set_quantizer_modes,
)
from optimum_dfq.calibration.data import CalibrationSet
from optimum_dfq.config import SCALE_SELECTORS
from optimum_dfq.models import find_layernorm_consumers, get_adapter
from optimum_dfq.nn import QLayerNorm, use_quantized_attention


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
