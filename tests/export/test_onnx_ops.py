"""The ONNX lowerings of single quantized operations, each checked against PyTorch in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from optimum_dfq.export.onnx_ops import (
    ActivationQDQ,
    ActivationQDQSpec,
    ConvSpec,
    IntWeightConv2d,
    IntWeightSpec,
    pack_matmul_nbits,
)
from optimum_dfq.quantizers import UniformQuantizer

ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("single_thread")


def _export_and_run(function, spec, x: torch.Tensor, path) -> np.ndarray:
    class Wrapper(torch.nn.Module):
        def forward(self, inputs):
            return function.apply(inputs, spec)

    torch.onnx.export(Wrapper(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]


@pytest.mark.parametrize("bits", [2, 4, 7, 8])
@pytest.mark.parametrize("axis", [None, 1, -1])
def test_activation_qdq_matches_the_uniform_quantizer_bit_for_bit(bits, axis, tmp_path):
    # inputs far beyond the quantizer's range on both sides: below 8 bits the uint8 container alone would not clamp
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 6) * 50
    channels = None if axis is None else x.shape[axis]
    quantizer = UniformQuantizer(bits, channels=channels, axis=-1 if axis is None else axis)
    shape = () if channels is None else (channels,)
    scale = torch.rand(shape) * 0.2 + 0.05
    zero_point = torch.randint(0, 2**bits, shape).float()  # any code, the ends included
    quantizer.set_params(scale, zero_point)
    quantizer.set_mode("quantize")
    spec = ActivationQDQSpec(scale.numpy(), zero_point.numpy().astype(np.uint8), 2**bits - 1, axis)
    expected = quantizer(x)
    view = [1] * x.dim()
    view[-1 if axis is None else axis] = -1
    lowest, highest = (-zero_point * scale).reshape(view), ((2**bits - 1 - zero_point) * scale).reshape(view)
    assert bool((x < lowest).any()) and bool((x > highest).any())  # both clamps at work

    assert torch.equal(ActivationQDQ.apply(x, spec), expected)  # tracing computes what the quantizer computes
    got = _export_and_run(ActivationQDQ, spec, x, tmp_path / "qdq.onnx")
    np.testing.assert_array_equal(got, expected.numpy())


def test_integer_weight_conv_keeps_stride_padding_dilation_and_groups(tmp_path):
    torch.manual_seed(0)
    codes = torch.randint(0, 256, (4, 2, 3, 2))  # a kernel, strides and paddings that differ per dimension
    scale, zero_point = torch.rand(4) * 0.1 + 0.01, torch.randint(100, 156, (4,))
    weight = (codes - zero_point.view(-1, 1, 1, 1)).float() * scale.view(-1, 1, 1, 1)
    bias = torch.randn(4)
    spec = ConvSpec(
        IntWeightSpec(codes.numpy().astype(np.uint8), scale.numpy(), zero_point.numpy().astype(np.uint8), 0,
                      bias.numpy(), weight),
        stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2,
    )
    x = torch.randn(2, 4, 11, 9)
    expected = F.conv2d(x, weight, bias, stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2)

    assert torch.equal(IntWeightConv2d.apply(x, spec), expected)
    got = _export_and_run(IntWeightConv2d, spec, x, tmp_path / "conv.onnx")
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_pack_matmul_nbits_refuses_other_widths():
    with pytest.raises(ValueError, match="Only 4-bit"):
        pack_matmul_nbits(np.zeros((2, 32), dtype=np.uint8), np.ones(2), np.zeros(2), 32, bits=8)
