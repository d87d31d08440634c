"""The calibration pipeline: which images and which model state each quantizer is calibrated on."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from optimum_dfq import DFQConfig
from optimum_dfq.calibration import (
    CalibrationSet,
    calibrate_activations,
    calibrate_weights,
    convert_model,
    iter_quantizers,
    quantize_model,
)
from optimum_dfq.calibration.engine import SELECTOR_ROWS, capture_layernorm_outputs, float_reference
from optimum_dfq.calibration.modes import set_quantizer_modes
from optimum_dfq.errors import CalibrationError, ConfigError, ImageSizeError
from optimum_dfq.models import find_quantization_consumers, get_adapter
from optimum_dfq.models.tracing import is_activation_function
from optimum_dfq.nn import QLayerNorm, QLinear, use_quantized_attention

from ..conftest import tiny_vit


def activation_modes(model: nn.Module) -> set[str]:
    return {q.mode for name, q in iter_quantizers(model) if not name.endswith("weight_quantizer")}


@pytest.mark.parametrize("order", ["sequential", "parallel"])
def test_activation_ranges_cover_every_calibration_image(order):
    """With min/max ranges, the image-input quantizer must represent every calibration pixel without clipping, also
    those of the last image (the one outside the first parallel batch)."""
    pixels = torch.randn(6, 3, 32, 32)
    pixels[-1] *= 10
    config = DFQConfig(bits="w8a8", input_range="calibrated", activation_observer="minmax", calibration_order=order,
                       calibration_batch_size=4)
    model, _ = quantize_model(tiny_vit(), CalibrationSet(pixel_values=pixels), config)
    image_input = model.vit.embeddings.patch_embeddings.projection.input_quantizer
    error = (image_input(pixels) - pixels).abs().max()
    assert error <= image_input.scale / 2 * (1 + 1e-4)


def test_parallel_calibration_observes_the_weight_quantized_model():
    """`"parallel"` ranges are those of the model with quantized weights and float activations (and the weights stay
    quantized afterwards)."""
    model = tiny_vit()
    pixels = torch.randn(5, 3, 32, 32)
    config = DFQConfig(bits="w4a8", input_range="calibrated", activation_observer="minmax",
                       calibration_order="parallel", calibration_batch_size=2)
    layernorm_consumers, activation_consumers = find_quantization_consumers(model, pixels[:1])
    convert_model(model, config, get_adapter(model), layernorm_consumers, activation_consumers=activation_consumers)
    calibrate_weights(model)
    use_quantized_attention(model)
    fc2 = model.vit.layers[1].mlp.fc2
    reference = copy.deepcopy(model)
    set_quantizer_modes(reference, activations="off")
    seen = []
    handle = reference.vit.layers[1].mlp.fc2.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        reference(pixel_values=pixels)
    handle.remove()
    low, high = min(float(seen[0].min()), 0.0), max(float(seen[0].max()), 0.0)

    calibrate_activations(model, CalibrationSet(pixel_values=pixels), config)

    assert float(fc2.input_quantizer.scale) == pytest.approx((high - low) / 255, rel=1e-5)
    assert {q.mode for name, q in iter_quantizers(model) if name.endswith("weight_quantizer")} == {"quantize"}
    assert activation_modes(model) == {"quantize"}


def test_quantizers_the_data_never_reaches_are_named():
    """Without the quantized attention the attention quantizers see nothing: that must be an error naming them, not
    a model with default (uncalibrated) ranges."""
    model = tiny_vit()
    config = DFQConfig(bits="w4a4", input_range="calibrated")
    convert_model(model, config, get_adapter(model), layernorm_consumers={})
    calibrate_weights(model)
    with pytest.raises(CalibrationError, match=r"no calibration data: \['vit\.layers\.0\.attention\.dfq_attention"):
        calibrate_activations(model, CalibrationSet(pixel_values=torch.randn(2, 3, 32, 32)), config)


def test_pixel_levels_need_the_normalisation_only_when_activations_are_quantized():
    calibration = CalibrationSet(pixel_values=torch.randn(2, 3, 32, 32))
    with pytest.raises(ConfigError, match="input_range='pixels' needs the image processor's normalisation"):
        quantize_model(tiny_vit(), calibration, DFQConfig(bits="w8a8", input_range="pixels"))
    model, _ = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w4a16", input_range="pixels"))
    assert model.vit.embeddings.patch_embeddings.projection.input_quantizer is None


def test_images_of_another_size_are_refused_before_the_model_is_changed():
    model = tiny_vit()
    with pytest.raises(ImageSizeError, match=r"shape \(3, 48, 48\).*expects \(3, 32, 32\)"):
        quantize_model(model, CalibrationSet(pixel_values=torch.randn(2, 3, 48, 48)), DFQConfig(bits="w8a8"))
    assert not any(isinstance(module, QLinear) for module in model.modules())


def test_a_model_in_training_mode_is_calibrated_without_dropout():
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=10, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    torch.manual_seed(0)
    evaluating = ViTForImageClassification(config).eval()
    training = copy.deepcopy(evaluating).train()
    calibration = CalibrationSet(pixel_values=torch.randn(4, 3, 32, 32))
    dfq_config = DFQConfig(bits="w8a8", input_range="calibrated")
    for model in (evaluating, training):
        quantize_model(model, calibration, dfq_config)
    expected = dict(iter_quantizers(evaluating))
    for name, quantizer in iter_quantizers(training):
        for key, value in quantizer.state_dict().items():
            assert torch.equal(value, expected[name].state_dict()[key]), f"{name}.{key}"


class CustomGelu(nn.Module):
    """A GELU that is neither a torch.nn nor a transformers activation module (so no Linear reads an activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


def test_a_model_without_activation_modules_is_reported(caplog):
    model = tiny_vit()
    activations = [name for name, module in model.named_modules() if is_activation_function(module)]
    assert activations
    for name in activations:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, CustomGelu())
    calibration = CalibrationSet(pixel_values=torch.randn(2, 3, 32, 32))
    with caplog.at_level(logging.WARNING, logger="optimum_dfq.calibration.engine"):
        _, plan = quantize_model(model, calibration, DFQConfig(bits="w4a4", input_range="calibrated"))
    assert plan.activation_consumers == []
    assert "No Linear reads an activation-function module's output" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optimum_dfq.calibration.engine"):
        _, plan = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w4a4", input_range="calibrated"))
    assert plan.activation_consumers and "No Linear reads" not in caplog.text


def test_float_reference_is_a_copy_computing_the_float_function():
    float_model = tiny_vit()
    config = DFQConfig(bits="w4a4", input_range="calibrated", post_layernorm="per_tensor")
    model, _ = quantize_model(copy.deepcopy(float_model), CalibrationSet(pixel_values=torch.randn(4, 3, 32, 32)),
                              config)
    reference = float_reference(model)
    assert reference is not model
    assert {q.mode for _, q in iter_quantizers(reference)} == {"off"}
    assert {q.mode for _, q in iter_quantizers(model)} == {"quantize"}  # the quantized model is left as it was
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference(pixel_values=pixels).logits, float_model(pixel_values=pixels).logits)


def test_selector_rows_are_the_float_layernorm_outputs_with_a_fixed_stride():
    num_images = 64  # 64 x 17 tokens: more rows than SELECTOR_ROWS, so they are subsampled
    calibration = CalibrationSet(pixel_values=torch.randn(num_images, 3, 32, 32))
    config = DFQConfig(bits="w4a4", input_range="calibrated", post_layernorm="per_channel",
                       calibration_batch_size=num_images)
    model, plan = quantize_model(tiny_vit(), calibration, config)
    inputs = {}
    handles = [module.register_forward_pre_hook(lambda m, args, n=name: inputs.setdefault(n, args[0]))
               for name, module in model.named_modules() if isinstance(module, QLayerNorm)]
    with torch.no_grad():
        model(pixel_values=calibration.pixel_values)
    for handle in handles:
        handle.remove()

    rows = capture_layernorm_outputs(model, plan, calibration, config)

    assert sorted(rows) == sorted(plan.layernorm_consumers) and rows
    total = num_images * inputs[next(iter(rows))].shape[1]
    stride = math.ceil(total / SELECTOR_ROWS)
    for name, captured in rows.items():
        norm = model.get_submodule(name)
        outputs = F.layer_norm(inputs[name], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        assert SELECTOR_ROWS / 2 < captured.shape[0] <= SELECTOR_ROWS
        torch.testing.assert_close(captured, outputs.reshape(total, -1)[::stride])
