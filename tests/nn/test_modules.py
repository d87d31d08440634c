"""The quantized twins of `nn.Linear`, `nn.Conv2d` and `nn.LayerNorm`: built from any float layer, frozen exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimum_dfq.errors import DFQError
from optimum_dfq.nn import QConv2d, QLayerNorm, QLinear
from optimum_dfq.quantizers import LogSqrt2Quantizer, UniformQuantizer


def _weight_quantizer(channels: int, mode: str = "quantize") -> UniformQuantizer:
    quantizer = UniformQuantizer(bits=3, channels=channels, axis=0, observer="minmax")
    quantizer.set_mode(mode)
    return quantizer


CONVS = {
    "patch_embedding": lambda: nn.Conv2d(3, 8, kernel_size=4, stride=4),
    "every_option": lambda: nn.Conv2d(4, 6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1),
                                      groups=2, bias=False, padding_mode="reflect"),
    "float64": lambda: nn.Conv2d(4, 6, kernel_size=3, padding=1, dtype=torch.float64),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_a_qconv2d_with_its_quantizers_off_computes_what_its_float_conv_computes(name):
    torch.manual_seed(0)
    conv = CONVS[name]()
    qconv = QConv2d.from_float(conv, _weight_quantizer(conv.out_channels, mode="off"), None, site="conv")
    pixels = torch.randn(2, conv.in_channels, 9, 10, dtype=conv.weight.dtype)
    with torch.no_grad():
        torch.testing.assert_close(qconv(pixels), conv(pixels), rtol=0, atol=0)
    assert {key for key in qconv.state_dict() if not key.startswith("weight_quantizer.")} == set(conv.state_dict())
    assert (qconv.bias is None) == (conv.bias is None) and qconv.weight.dtype == conv.weight.dtype


def test_building_a_quantized_layer_leaves_the_random_generator_untouched():
    conv, linear = nn.Conv2d(3, 8, kernel_size=4, stride=4), nn.Linear(8, 4)
    state = torch.get_rng_state()
    QConv2d.from_float(conv, _weight_quantizer(8), None, site="conv")
    QLinear.from_float(linear, _weight_quantizer(4), None, site="fc")
    assert torch.equal(torch.get_rng_state(), state)


def test_from_float_labels_each_quantizer_with_the_layer_path_and_its_role():
    linear = QLinear.from_float(nn.Linear(8, 4), _weight_quantizer(4), UniformQuantizer(bits=8), site="blocks.0.fc")
    conv = QConv2d.from_float(nn.Conv2d(3, 8, 4), _weight_quantizer(8), UniformQuantizer(bits=8), site="patch")
    norm = QLayerNorm.from_float(nn.LayerNorm(8), UniformQuantizer(bits=8), site="blocks.0.norm")
    assert (linear.weight_quantizer.site, linear.input_quantizer.site) == ("blocks.0.fc.weight", "blocks.0.fc.input")
    assert (conv.weight_quantizer.site, conv.input_quantizer.site) == ("patch.weight", "patch.input")
    assert norm.output_quantizer.site == "blocks.0.norm.output"


def test_a_qlinear_keeps_a_missing_bias_missing_until_one_is_needed():
    torch.manual_seed(0)
    layer = QLinear.from_float(nn.Linear(8, 4, bias=False), _weight_quantizer(4), None, site="fc")
    assert layer.bias is None and "bias" not in layer.state_dict()
    bias = layer.ensure_bias()
    assert layer.bias is bias and torch.equal(bias, torch.zeros(4))


def test_ensure_bias_keeps_an_existing_bias():
    float_layer = nn.Linear(8, 4)
    layer = QLinear.from_float(float_layer, _weight_quantizer(4), None, site="fc")
    bias = layer.bias
    assert layer.ensure_bias() is bias and torch.equal(bias, float_layer.bias)


NORMS = {
    "vit": lambda: nn.LayerNorm(8, eps=1e-12),
    "large_eps": lambda: nn.LayerNorm(8, eps=0.5),
    "no_affine": lambda: nn.LayerNorm(8, elementwise_affine=False),
    "no_bias": lambda: nn.LayerNorm(8, bias=False),
    "float64": lambda: nn.LayerNorm(8, dtype=torch.float64),
}


@pytest.mark.parametrize("name", sorted(NORMS))
def test_a_qlayernorm_with_its_quantizer_off_computes_what_its_float_layernorm_computes(name):
    torch.manual_seed(0)
    norm = NORMS[name]()
    if norm.weight is not None:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
    if norm.bias is not None:
        with torch.no_grad():
            norm.bias.uniform_(-1.0, 1.0)
    quantizer = UniformQuantizer(bits=8)
    quantizer.set_mode("off")
    qnorm = QLayerNorm.from_float(norm, quantizer, site="norm")
    x = torch.randn(4, 8, dtype=torch.float64 if name == "float64" else torch.float32) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(qnorm(x), norm(x), rtol=0, atol=0)
    assert {key for key in qnorm.state_dict() if not key.startswith("output_quantizer.")} == set(norm.state_dict())


def test_a_qlayernorm_quantizes_its_output_not_its_input():
    torch.manual_seed(0)
    quantizer = UniformQuantizer(bits=2, observer="minmax")
    quantizer.set_mode("calibrate")
    norm = QLayerNorm.from_float(nn.LayerNorm(16), quantizer, site="norm")
    with torch.no_grad():
        output = norm(torch.randn(8, 16) * 3.0 + 1.0)
    assert output.unique().numel() <= 4  # 2 bits


def _frozen_conv() -> tuple[nn.Conv2d, QConv2d, torch.Tensor]:
    """A grouped conv with a non-square kernel and weights well outside [-1, 1], frozen; and its fake-quantized
    weight before freezing."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel_size=(3, 2), groups=2)
    with torch.no_grad():
        conv.weight.mul_(20.0)
    qconv = QConv2d.from_float(conv, _weight_quantizer(6), None, site="conv")
    qconv.calibrate_weights()
    fake_quantized = qconv.quantized_weight().detach().clone()
    qconv.freeze()
    return conv, qconv, fake_quantized


def test_a_frozen_conv_keeps_its_fake_quantized_weight_exactly():
    _, qconv, fake_quantized = _frozen_conv()
    assert fake_quantized.abs().max() > 1.0
    assert torch.equal(qconv.quantized_weight(), fake_quantized)
    assert qconv.weight_shape.dtype == torch.int64 and qconv.weight_shape.tolist() == [6, 2, 3, 2]


def test_freezing_and_preparing_a_frozen_layer_again_change_nothing():
    _, qconv, fake_quantized = _frozen_conv()
    packed = qconv.weight_packed.clone()
    qconv.freeze()
    qconv.prepare_frozen()
    assert torch.equal(qconv.weight_packed, packed) and torch.equal(qconv.quantized_weight(), fake_quantized)


def test_a_frozen_conv_loads_into_a_layer_prepared_for_it():
    conv, qconv, fake_quantized = _frozen_conv()
    rebuilt = QConv2d.from_float(conv, _weight_quantizer(6), None, site="conv")
    rebuilt.prepare_frozen()
    assert rebuilt.weight_shape.dtype == torch.int64
    rebuilt.load_state_dict(qconv.state_dict())
    pixels = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixels), qconv(pixels), rtol=0, atol=0)
    assert torch.equal(rebuilt.weight, fake_quantized)


def test_only_a_uniform_weight_quantizer_can_be_frozen():
    torch.manual_seed(0)
    layer = QLinear.from_float(nn.Linear(8, 4), LogSqrt2Quantizer(bits=4), None, site="fc")
    layer.calibrate_weights()
    for freeze in (layer.freeze, layer.prepare_frozen):
        with pytest.raises(DFQError, match="fc.weight: only uniform weight quantizers can be packed, got LogSqrt2"):
            freeze()
    assert not layer.is_frozen
