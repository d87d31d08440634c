"""Autograd functions whose ONNX symbolic is a QDQ (QuantizeLinear/DequantizeLinear) or integer-weight subgraph.

Each function computes in PyTorch exactly what the fake-quantized module computes (so tracing never changes the
numbers), and tells the TorchScript ONNX exporter which ONNX nodes express it. Quantization parameters are carried as
NumPy arrays in a spec object (a non-tensor argument), so they become ONNX constants with the right integer types
instead of float tensors traced through the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _const(g, array: np.ndarray):
    return g.op("Constant", value_t=torch.from_numpy(np.ascontiguousarray(array)))


@dataclass
class ActivationQDQSpec:
    """A uniform activation quantizer lowered to `[Clip] → QuantizeLinear(uint8) → DequantizeLinear`.

    Codes `0 .. qmax` live in a uint8 container; for `qmax < 255` a `Clip` to the representable float range runs
    before `QuantizeLinear`, which reproduces the quantizer's clamp exactly.
    """

    scale: np.ndarray  # float32, shape () or (channels,)
    zero_point: np.ndarray  # uint8, same shape
    qmax: int
    axis: int | None

    def clip_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        zp = self.zero_point.astype(np.float32)
        return ((0.0 - zp) * self.scale).astype(np.float32), ((self.qmax - zp) * self.scale).astype(np.float32)


class ActivationQDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: ActivationQDQSpec) -> torch.Tensor:
        scale = torch.from_numpy(spec.scale).to(x.dtype)
        zero_point = torch.from_numpy(spec.zero_point.astype(np.float32)).to(x.dtype)
        if spec.axis is not None:
            shape = [1] * x.dim()
            shape[spec.axis] = -1
            scale, zero_point = scale.view(shape), zero_point.view(shape)
        q = torch.clamp(torch.round(x / scale) + zero_point, 0, spec.qmax)
        return (q - zero_point) * scale

    @staticmethod
    def symbolic(g, x, spec: ActivationQDQSpec):
        kwargs = {} if spec.axis is None else {"axis_i": spec.axis}
        if spec.qmax < 255:
            lo, hi = spec.clip_bounds()
            if spec.axis is None:
                x = g.op("Clip", x, _const(g, lo), _const(g, hi))
            else:  # per-channel bounds: Clip takes scalars only, and Max/Min broadcast from the last dimension
                rank = x.type().dim()
                shape = [-1] + [1] * (rank - 1 - spec.axis % rank)
                x = g.op("Max", x, _const(g, lo.reshape(shape)))
                x = g.op("Min", x, _const(g, hi.reshape(shape)))
        scale, zero_point = _const(g, spec.scale), _const(g, spec.zero_point)
        q = g.op("QuantizeLinear", x, scale, zero_point, **kwargs)
        return g.op("DequantizeLinear", q, scale, zero_point, **kwargs)


@dataclass
class IntWeightSpec:
    """An integer weight `w = (codes - zero_point) · scale` (codes of up to 8 bits).

    `codes` are the weight quantizer's unsigned codes, kept as uint8 when they need all 8 bits and shifted into int8
    centred on zero otherwise (see `optimum_dfq.export.onnx._integer_container` for why).
    """

    codes: np.ndarray  # uint8 or int8, layout of the ONNX operand
    scale: np.ndarray  # float32, () or (channels,)
    zero_point: np.ndarray  # same dtype as codes
    axis: int | None
    bias: np.ndarray | None
    weight: torch.Tensor  # the dequantized float weight in PyTorch layout (forward only)

    def dequantize_node(self, g):
        kwargs = {} if self.axis is None else {"axis_i": self.axis}
        codes, scale, zero_point = _const(g, self.codes), _const(g, self.scale), _const(g, self.zero_point)
        return g.op("DequantizeLinear", codes, scale, zero_point, **kwargs)


def _add_bias(g, y, bias: np.ndarray | None):
    return y if bias is None else g.op("Add", y, _const(g, bias))


def _reference_linear(x: torch.Tensor, spec: IntWeightSpec | NBitsWeightSpec) -> torch.Tensor:
    """The PyTorch value of a lowered Linear: `F.linear` with the dequantized weight."""
    bias = None if spec.bias is None else torch.from_numpy(spec.bias).to(x.dtype)
    return F.linear(x, spec.weight.to(x.dtype), bias)


class IntWeightLinear(torch.autograd.Function):
    """`F.linear` with an integer weight: `DequantizeLinear(codes[K, N], axis=1) → MatMul → Add(bias)`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: IntWeightSpec) -> torch.Tensor:
        return _reference_linear(x, spec)

    @staticmethod
    def symbolic(g, x, spec: IntWeightSpec):
        y = g.op("MatMul", x, spec.dequantize_node(g))
        return _add_bias(g, y, spec.bias)


@dataclass
class ConvSpec:
    weight: IntWeightSpec
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


class IntWeightConv2d(torch.autograd.Function):
    """`F.conv2d` with an integer weight: `DequantizeLinear(codes[O, I, kh, kw], axis=0) → Conv`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
        w = spec.weight
        bias = None if w.bias is None else torch.from_numpy(w.bias).to(x.dtype)
        return F.conv2d(x, w.weight.to(x.dtype), bias, spec.stride, spec.padding, spec.dilation, spec.groups)

    @staticmethod
    def symbolic(g, x, spec: ConvSpec):
        inputs = [x, spec.weight.dequantize_node(g)]
        if spec.weight.bias is not None:
            inputs.append(_const(g, spec.weight.bias))
        kernel = list(spec.weight.codes.shape[2:])
        return g.op(
            "Conv",
            *inputs,
            kernel_shape_i=kernel,
            strides_i=list(spec.stride),
            pads_i=list(spec.padding) * 2,
            dilations_i=list(spec.dilation),
            group_i=spec.groups,
        )


@dataclass
class NBitsWeightSpec:
    """A weight for ONNX Runtime's `com.microsoft::MatMulNBits` (block-wise, unsigned 4-bit codes, packed).

    A per-channel quantizer is the block-wise case whose blocks of one output channel share scale and zero point.
    """

    packed: np.ndarray  # uint8 [N, n_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N * n_blocks]
    zero_points: np.ndarray  # uint8 [N * ceil(n_blocks * bits / 8)]
    in_features: int
    out_features: int
    bits: int
    block_size: int
    bias: np.ndarray | None
    weight: torch.Tensor


def pack_matmul_nbits(
    codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, block_size: int, bits: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lays out unsigned codes `[N, K]` (values `< 2^bits`) with per-row scale/zero point as `MatMulNBits` expects.

    Returns:
        `(packed [N, n_blocks, blob], scales [N * n_blocks], zero_points [N * ceil(n_blocks * bits / 8)])`.
    """
    if bits != 4:
        raise ValueError("Only 4-bit MatMulNBits containers are produced.")
    n, k = codes.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.uint8)
    padded[:, :k] = codes
    padded = padded.reshape(n, n_blocks, block_size)
    packed = (padded[..., 0::2] | (padded[..., 1::2] << 4)).astype(np.uint8)
    scales = np.repeat(np.broadcast_to(scale, (n,))[:, None], n_blocks, axis=1).astype(np.float32).reshape(-1)
    zp = np.repeat(np.broadcast_to(zero_point, (n,))[:, None], n_blocks, axis=1).astype(np.uint8)
    if n_blocks % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), dtype=np.uint8)], axis=1)
    zp_packed = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    return packed, scales, zp_packed


class NBitsLinear(torch.autograd.Function):
    """`F.linear` with a 4-bit weight lowered to `com.microsoft::MatMulNBits` (weights stay packed in the file)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: NBitsWeightSpec) -> torch.Tensor:
        return _reference_linear(x, spec)

    @staticmethod
    def symbolic(g, x, spec: NBitsWeightSpec):
        y = g.op(
            "com.microsoft::MatMulNBits",
            x,
            _const(g, spec.packed),
            _const(g, spec.scales),
            _const(g, spec.zero_points),
            K_i=spec.in_features,
            N_i=spec.out_features,
            bits_i=spec.bits,
            block_size_i=spec.block_size,
        )
        return _add_bias(g, y, spec.bias)


@dataclass
class LogQDQSpec:
    """A log2 / log-√2 post-softmax quantizer lowered to float ONNX ops (no QDQ form exists for a log codebook).

    `k = clip(round(-steps · log2(x / Δ)))` written as `Div`, `Log`, `Mul`, `Round` and `Clip`, then the level looked
    up in a table of the quantizer's own levels (`Gather`; `steps` = 1 for log2, 2 for log-√2). The table holds the
    values PyTorch computes, so every level is the quantizer's to the bit (a `Δ · 2^(-k / steps)` written
    with `Exp` was off by one unit in the last place on most values, which downstream quantizers can turn into whole
    steps). Only the exponent can still differ, for an input lying within rounding error of a level boundary
    (`Log` times a constant is not PyTorch's `log2`: 1 input in 10 million in a check of log-√2). Log-√2's
    `k = 2^b` (an underflow) maps to the table's exact zero, at every bit width.
    """

    scale: float
    bits: int
    steps: int  # 1: log2, 2: log-sqrt2
    reference: Callable[[torch.Tensor], torch.Tensor]  # the quantizer's own fake_quant (PyTorch forward)

    @property
    def top(self) -> int:
        """The largest exponent index: `2^b - 1` for log2, `2^b` (the exact zero) for log-√2."""
        return 2**self.bits - 1 if self.steps == 1 else 2**self.bits

    def levels(self) -> np.ndarray:
        """The output of each exponent `0 .. top`, computed with the quantizer's own formula in float32."""
        from ..quantizers.log import log2_level, log_sqrt2_level

        k = torch.arange(2**self.bits, dtype=torch.float32)
        scale = torch.tensor(self.scale, dtype=torch.float32)
        if self.steps == 1:
            return log2_level(k, scale).numpy()
        return torch.cat([log_sqrt2_level(k, scale), torch.zeros(1)]).numpy()


class LogQDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: LogQDQSpec) -> torch.Tensor:
        return spec.reference(x)

    @staticmethod
    def symbolic(g, x, spec: LogQDQSpec):
        def f32(value):
            return _const(g, np.asarray(value, dtype=np.float32))

        k = g.op("Mul", g.op("Log", g.op("Div", x, f32(spec.scale))), f32(-spec.steps / np.log(2.0)))
        k = g.op("Clip", g.op("Round", k), f32(0.0), f32(float(spec.top)))
        index = g.op("Cast", k, to_i=7)  # INT64
        return g.op("Gather", _const(g, spec.levels().astype(np.float32)), index, axis_i=0)
