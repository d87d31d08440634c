"""The quantized-module registry and mixin: conversion picks classes by exact type, and refuses unknown ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimum_dfq import DataFreeViTQuantizer, DFQConfig
from optimum_dfq.calibration import convert_model
from optimum_dfq.calibration.correction import AffineCorrection
from optimum_dfq.errors import ConfigError
from optimum_dfq.models import get_adapter
from optimum_dfq.nn import (
    QConv2d,
    QLinear,
    QModuleMixin,
    qmodule_class_for,
    quantized_class_for,
    register_qmodule,
    unregister_qmodule,
)
from optimum_dfq.quantizers import UniformQuantizer

from ..conftest import tiny_vit


class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward differs from `nn.Linear`'s: quantizing it as a plain Linear would be wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


def test_registry_maps_float_types_to_their_quantized_twins():
    assert qmodule_class_for(nn.Linear(4, 4)) is QLinear
    assert qmodule_class_for(nn.Conv2d(3, 8, 2)) is QConv2d
    assert qmodule_class_for(ScaledLinear(4, 4)) is None


def test_a_float_class_keeps_its_twin_until_unregistered():
    class OtherQLinear(QLinear):
        pass

    with pytest.raises(ConfigError, match=r"nn\.modules\.linear\.Linear already has .*QLinear.*unregister_qmodule"):
        register_qmodule(nn.Linear)(OtherQLinear)
    assert qmodule_class_for(nn.Linear(2, 2)) is QLinear
    register_qmodule(ScaledLinear)(OtherQLinear)
    try:
        assert qmodule_class_for(ScaledLinear(2, 2)) is OtherQLinear
    finally:
        unregister_qmodule(ScaledLinear)
    assert qmodule_class_for(ScaledLinear(2, 2)) is None


def test_registering_the_same_twin_again_is_allowed():
    assert register_qmodule(nn.Linear)(QLinear) is QLinear
    assert qmodule_class_for(nn.Linear(2, 2)) is QLinear


def test_an_already_quantized_model_is_refused():
    qmodel = DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", synthesizer="gaussian", num_images=2)
    with pytest.raises(ConfigError, match=r"is already quantized \(QConv2d\): quantize the float model"):
        DataFreeViTQuantizer().quantize(qmodel, bits="w4a4", synthesizer="gaussian", num_images=2)


def test_unregistering_a_class_without_a_twin_does_nothing():
    unregister_qmodule(ScaledLinear)
    assert qmodule_class_for(ScaledLinear(2, 2)) is None
    assert qmodule_class_for(nn.Linear(2, 2)) is QLinear


def test_unregistered_subclass_is_refused_with_the_fix():
    fix = r"modules_to_not_convert=\['blocks\.0'\]\) or register .* with @register_qmodule\(ScaledLinear\)"
    with pytest.raises(ConfigError, match=rf"blocks\.0 is of type .*ScaledLinear.*{fix}") as refusal:
        quantized_class_for(ScaledLinear(4, 4), "blocks.0")
    registered = str(refusal.value).split("(registered: ")[1].split(")")[0].split(", ")
    assert {"torch.nn.modules.linear.Linear", "torch.nn.modules.conv.Conv2d"} <= set(registered)


def _model_with_a_linear_subclass() -> nn.Module:
    model = tiny_vit()
    fc1 = model.vit.layers[0].mlp.fc1
    scaled = ScaledLinear(fc1.in_features, fc1.out_features)
    scaled.load_state_dict(fc1.state_dict())
    model.vit.layers[0].mlp.fc1 = scaled
    return model


def test_quantize_refuses_an_unregistered_layer_before_calibrating(monkeypatch):
    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration images were requested before the layers were checked")

    monkeypatch.setattr(DataFreeViTQuantizer, "calibration_set", no_calibration)
    with pytest.raises(ConfigError, match="ScaledLinear"):
        DataFreeViTQuantizer().quantize(_model_with_a_linear_subclass(), bits="w8a8", num_images=2)


def test_conversion_refusing_a_layer_leaves_the_model_unchanged():
    model = _model_with_a_linear_subclass()
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ConfigError, match="ScaledLinear"):
        convert_model(model, DFQConfig(bits="w8a8"), get_adapter(model), layernorm_consumers={})
    assert {name: type(m) for name, m in model.named_modules()} == before


def test_unregistered_layer_kept_in_float_on_request():
    model = _model_with_a_linear_subclass()
    config = DFQConfig(bits="w8a8", synthesizer="gaussian", modules_to_not_convert=["re:.*layers\\.0\\.mlp\\.fc1"])
    qmodel = DataFreeViTQuantizer().quantize(model, config=config, num_images=2)
    assert type(qmodel.vit.layers[0].mlp.fc1) is ScaledLinear
    assert isinstance(qmodel.vit.layers[1].mlp.fc1, QLinear)


def test_mixin_separates_weight_and_activation_quantizers():
    weight_quantizer, input_quantizer = UniformQuantizer(bits=4, channels=4, axis=0), UniformQuantizer(bits=8)
    layer = QLinear.from_float(nn.Linear(8, 4), weight_quantizer, input_quantizer, "fc")
    assert isinstance(layer, QModuleMixin)
    assert [name for name, _ in layer.named_quantizers()] == ["weight_quantizer", "input_quantizer"]
    assert list(layer.weight_quantizers()) == [layer.weight_quantizer]
    assert list(layer.activation_quantizers()) == [layer.input_quantizer]
    layer.input_correction = AffineCorrection(8)  # a child module that is not a quantizer
    assert [name for name, _ in layer.named_quantizers()] == ["weight_quantizer", "input_quantizer"]


def test_calibrate_weights_quantizes_the_weight_to_its_grid():
    torch.manual_seed(0)
    weight_quantizer = UniformQuantizer(bits=3, channels=4, axis=0, observer="minmax")
    layer = QLinear.from_float(nn.Linear(16, 4), weight_quantizer, None, "fc")
    layer.calibrate_weights()
    assert layer.weight_quantizer.mode == "quantize"
    quantized = layer.quantized_weight()
    assert not torch.equal(quantized, layer.weight)
    for row in quantized:
        assert row.unique().numel() <= 2**3


@pytest.mark.parametrize(("mode", "expected"), [("observe", "quantize"), ("calibrate", "quantize"),
                                                ("quantize", "quantize"), ("off", "off")])
def test_calibrate_weights_leaves_the_weight_quantizer_quantizing_unless_it_was_off(mode, expected):
    layer = QLinear.from_float(nn.Linear(8, 4), UniformQuantizer(bits=4, channels=4, axis=0), None, "fc")
    layer.weight_quantizer.set_mode(mode)
    layer.calibrate_weights()
    assert layer.weight_quantizer.mode == expected and bool(layer.weight_quantizer.calibrated)


def test_calibrate_weights_forgets_what_the_quantizer_observed_before():
    torch.manual_seed(0)
    layer = QLinear.from_float(nn.Linear(8, 4), UniformQuantizer(bits=4, channels=4, axis=0, observer="minmax"),
                               None, "fc")
    layer.weight_quantizer.set_mode("observe")
    layer(torch.randn(2, 8))  # observes the weight as it is now
    layer.weight = nn.Parameter(layer.weight.detach() * 0.5)  # a new weight (not in place: observing keeps a view)
    layer.calibrate_weights()
    fresh = UniformQuantizer(bits=4, channels=4, axis=0, observer="minmax")
    fresh.observe(layer.weight)
    fresh.calibrate()
    torch.testing.assert_close(layer.weight_quantizer.scale, fresh.scale, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight_quantizer.zero_point, fresh.zero_point, rtol=0, atol=0)
