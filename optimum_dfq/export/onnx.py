"""Export a quantized model to ONNX with real integer weights and QDQ activations, and report what runs in integer.

The exported graph is what ONNX Runtime needs to run int8 kernels on CPU:

* every **uniform activation quantizer** (post-LayerNorm outputs, Linear inputs, the image, Q, K and V of attention,
  a uniform post-softmax quantizer) becomes `QuantizeLinear → DequantizeLinear` with a uint8 container (codes of
  fewer than 8 bits get a `Clip` before `QuantizeLinear`, which is exact);
* every **Linear** weight becomes an integer constant feeding `DequantizeLinear → MatMul` (ONNX Runtime fuses the
  `DQ(activation), DQ(weight) → MatMul` pattern into an integer matmul), or, for weights of at most 4 bits and
  `weight_only_int4=True`, ONNX Runtime's `com.microsoft::MatMulNBits` with the weight packed two codes per byte
  (size first: the 4-bit weights stay 4-bit in the file, the matmul itself runs in float);
* the patch-embedding **Conv2d** weight becomes an integer constant through `DequantizeLinear`;
* integer weight constants are uint8 for 8-bit codes and int8 centred on zero for narrower ones: ONNX Runtime's
  uint8 × int8 kernels saturate on x86 CPUs without VNNI when an int8 code lies outside [-64, 63];
* quantizers ONNX cannot express as QDQ (log2, log-√2, TanQ post-softmax; the pixel-grid image input, whose
  per-channel zero points are fractional; per-channel activation quantizers, whose zero points ONNX Runtime's
  integer matmuls cannot take; uniform quantizers whose zero point falls outside the code range) are
  exported as the float operations that emulate them (`Log`, `Round`, `Clip`, `Pow`...): numerically the same as
  PyTorch, but they run in float. Unfolded correction matrices are float `MatMul`s.

[`to_onnx`] returns an [`ExportReport`] listing every quantizer with its lowering, the integer/float operators ONNX
Runtime actually runs after its graph optimisations, and the measured difference between ONNX Runtime's and
PyTorch's logits on probe images.

The exporter uses PyTorch's TorchScript-based ONNX exporter (`torch.onnx.export(..., dynamo=False)`), whose
`autograd.Function.symbolic` hook is what lets each quantized layer choose its own ONNX nodes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import types
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..calibration.data import expected_image_shape
from ..errors import DFQError
from ..formats.packing import unpack_codes
from ..models.state import eval_mode
from ..nn.modules import QConv2d, QLinear
from ..quantizers import Log2Quantizer, LogSqrt2Quantizer, PixelGridQuantizer, Quantizer, UniformQuantizer
from .onnx_ops import (
    ActivationQDQ,
    ActivationQDQSpec,
    ConvSpec,
    IntWeightConv2d,
    IntWeightLinear,
    IntWeightSpec,
    LogQDQ,
    LogQDQSpec,
    NBitsLinear,
    NBitsWeightSpec,
    pack_matmul_nbits,
)

logger = logging.getLogger(__name__)

INTEGER_ORT_OPS = (
    "QLinearMatMul",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QLinearConv",
    "ConvInteger",
    "QGemm",
    "MatMulNBits",
    "QAttention",
)
FLOAT_MATMUL_OPS = ("MatMul", "Gemm", "FusedMatMul", "Conv", "FusedConv", "FusedGemm")
#: `MatMulNBits` computes with int8 activations at this `accuracy_level` only (0 or 1: float32, 2: float16, 3: bfloat16)
MATMUL_NBITS_INT8_ACCURACY = 4
#: QuantizeLinear/DequantizeLinear take an `axis` (per-channel weights and activations) from opset 13 on
MIN_OPSET = 13


@dataclass
class QuantizerExport:
    """How one quantizer (or one unfolded input correction) of the model was lowered to ONNX.

    Attributes:
        name (`str`): module path of the quantizer in the PyTorch model (`"<layer>.input_correction"` for a
            correction matrix).
        kind (`str`): quantizer kind (`uniform`, `log2`, `log_sqrt2`, `tanq`, `pixel_grid`...), or `"correction"`.
        bits (`int`): its bit width (32 for a correction matrix).
        role (`str`): `"weight"` or `"activation"` (corrections count as activations).
        lowering (`str`): the ONNX construct that expresses it, e.g. `"uint8 DequantizeLinear -> MatMul"`,
            `"QuantizeLinear/DequantizeLinear uint8"`, `"float emulation"`, or `"off"` for a disabled quantizer.
        integer (`bool`): whether the exported graph hands this quantizer's values to ONNX Runtime as integers.
        note (`str`, defaults to `""`): why a quantizer stayed in float, when it did (`"disabled"` when off).
    """

    name: str
    kind: str
    bits: int
    role: str
    lowering: str
    integer: bool
    note: str = ""


@dataclass
class ExportReport:
    """What [`to_onnx`] wrote and how faithful it is.

    Attributes:
        path (`str`): the ONNX file.
        file_size (`int`): its size in bytes.
        quantizers (`list[QuantizerExport]`): every quantizer of the model: first the weight quantizers (and
            unfolded input corrections) of the quantized Linear/Conv2d layers, then all other quantizers, each
            group in module order.
        ort_operators (`dict[str, int]`): operator counts of the graph ONNX Runtime runs after its optimisations
            (empty when onnxruntime is not installed).
        integer_operators (`int`), float_matmuls (`int`): the integer matmul/conv operators and the float ones in
            that optimised graph. A `MatMulNBits` counts as integer only when it runs with int8 activations
            (`accuracy_level` 4, what ONNX Runtime gives the 5..8-bit weight matmuls it fuses); the 4-bit ones of the
            file run in float.
        max_abs_logit_diff (`float`, *optional*): max |ONNX Runtime - PyTorch| over the logits of the probe images
            (PyTorch in inference mode, like the exported graph, whatever mode the model was in).
        top1_agreement (`float`, *optional*): fraction of probe images with the same arg-max in both.
        num_probe_images (`int`): probe images used for the two figures above.
    """

    path: str
    file_size: int
    quantizers: list[QuantizerExport] = field(default_factory=list)
    ort_operators: dict[str, int] = field(default_factory=dict)
    integer_operators: int = 0
    float_matmuls: int = 0
    max_abs_logit_diff: float | None = None
    top1_agreement: float | None = None
    num_probe_images: int = 0

    @property
    def num_integer(self) -> int:
        """Number of entries of `quantizers` exported as integers."""
        return sum(q.integer for q in self.quantizers)

    @property
    def num_float(self) -> int:
        """Number of entries of `quantizers` emulated in float (disabled quantizers are not counted)."""
        return sum(not q.integer for q in self.quantizers if q.lowering != "off")

    def to_dict(self) -> dict:
        """The report as a JSON-serialisable `dict` (the quantizer entries become dicts too)."""
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Writes [`to_dict`] to `path` as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        """A short human-readable summary (the CLI prints it)."""
        lowered = Counter(q.lowering for q in self.quantizers)
        lines = [
            f"ONNX model: {self.path} ({self.file_size / 1e6:.2f} MB)",
            f"quantizers: {len(self.quantizers)} ({self.num_integer} as integers, {self.num_float} emulated in float)",
        ]
        lines += [f"  {count:4d} x {lowering}" for lowering, count in sorted(lowered.items())]
        floats = sorted({f"{q.kind} {q.bits}-bit ({q.note})" for q in self.quantizers
                         if not q.integer and q.note and q.lowering != "off"})  # a disabled quantizer is no float op
        lines += [f"  float: {reason}" for reason in floats]
        if self.ort_operators:
            lines.append(
                f"onnxruntime runs {self.integer_operators} integer matmul/conv operator(s) and "
                f"{self.float_matmuls} float one(s)"
            )
        if self.max_abs_logit_diff is not None:
            lines.append(
                f"onnxruntime vs PyTorch on {self.num_probe_images} probe image(s): max |logit diff| = "
                f"{self.max_abs_logit_diff:.3g}, top-1 agreement = {self.top1_agreement:.1%}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- specs
def _activation_spec(quantizer: UniformQuantizer) -> ActivationQDQSpec | None:
    """The QDQ form of a calibrated uniform activation quantizer, or `None` when uint8 QDQ cannot express it."""
    if quantizer.bits > 8 or quantizer.per_channel:
        # ONNX Runtime fuses `DequantizeLinear(activation) -> MatMul` into MatMulIntegerToFloat, which takes one
        # activation zero point: a per-channel activation QDQ gives a graph that fails when run
        return None
    zero_point = quantizer.zero_point.detach().cpu().double().numpy()
    if not (
        np.all(zero_point == np.round(zero_point)) and zero_point.min() >= 0 and zero_point.max() <= quantizer.qmax
    ):
        return None
    axis = quantizer.axis if quantizer.per_channel else None
    return ActivationQDQSpec(
        scale=quantizer.scale.detach().cpu().float().numpy().copy(),
        zero_point=zero_point.astype(np.uint8),
        qmax=quantizer.qmax,
        axis=axis,
    )


def _weight_codes(module: QLinear | QConv2d) -> torch.Tensor:
    quantizer = module._packable_quantizer()
    if module.is_frozen:
        return unpack_codes(module.weight_packed, quantizer.bits, module.weight_dims())
    return quantizer.codes(module.weight.detach())


@dataclass(frozen=True)
class _WeightLayout:
    """How weights are written: `weight_only_int4` / `block_size` for MatMulNBits, `signed_weights` for 8-bit codes."""

    weight_only_int4: bool
    block_size: int
    signed_weights: bool


def _integer_container(
    codes: np.ndarray, zero_point: np.ndarray, bits: int, signed_weights: bool = False
) -> tuple[np.ndarray, np.ndarray, str]:
    """Unsigned codes `0 .. 2^bits - 1` → the ONNX integer container: uint8 for 8-bit codes, int8 centred on 0 below.

    ONNX Runtime's uint8 × int8 kernels on x86 CPUs without VNNI (AVX2) add pairs of products in int16 with
    saturation, so int8 weight codes beyond [-64, 63] can silently change the result of a fused integer matmul.
    8-bit codes therefore go into uint8 (uint8 × uint8 kernels widen before multiplying), narrower codes into int8
    shifted to `-2^(bits-1) .. 2^(bits-1) - 1`, which never saturates and keeps the faster uint8 × int8 kernels.
    `signed_weights=True` shifts 8-bit codes into int8 too: faster, and exact only where those kernels do not
    saturate (x86 CPUs with AVX512-VNNI or AVX-VNNI, ARM).
    """
    if bits == 8 and not signed_weights:
        return codes.astype(np.uint8), zero_point.astype(np.uint8), "uint8"
    shift = 1 << (bits - 1)
    return ((codes.astype(np.int16) - shift).astype(np.int8), (zero_point.astype(np.int16) - shift).astype(np.int8),
            "int8")


def _check_weight_quantizer(module: QLinear | QConv2d, name: str) -> UniformQuantizer:
    quantizer = module._packable_quantizer()
    if quantizer.mode != "quantize" or not bool(quantizer.calibrated):
        raise DFQError(
            f"{name}: its weight quantizer is {'uncalibrated' if not bool(quantizer.calibrated) else 'off'}; "
            "export a model produced by DataFreeViTQuantizer.quantize (or loaded from a quantized checkpoint)."
        )
    zero_point = quantizer.zero_point.detach()
    if quantizer.per_channel and quantizer.axis != 0:
        raise DFQError(f"{name}: per-channel weight quantizers must be on axis 0 (output channels) to export.")
    if not torch.equal(zero_point, zero_point.round()):
        raise DFQError(f"{name}: the weight zero point is not an integer; it cannot be stored as integer codes.")
    outside = ((zero_point < 0) | (zero_point > quantizer.qmax)).flatten().nonzero().flatten().tolist()
    if outside:
        # a row whose weights do not straddle 0 gets a calibrated range without 0; fake quantization handles that,
        # but ONNX zero points live in the codes' container and would wrap around (silently wrong weights)
        rows = "it" if not quantizer.per_channel else (
            f"{len(outside)} of its output channels (first: {outside[0]}, zero point "
            f"{int(zero_point.flatten()[outside[0]])})")
        raise DFQError(
            f"{name}: the weight zero point of {rows} lies outside the code range 0..{quantizer.qmax} (the weights "
            "there do not straddle 0, so their calibrated range excludes 0), and ONNX integer containers cannot "
            f"hold it. Keep this layer in float (DFQConfig(modules_to_not_convert=[{name!r}])) or quantize the "
            "weights symmetrically (DFQConfig(weight_symmetric=True)), then export again."
        )
    return quantizer


def _linear_spec(module: QLinear, name: str, layout: _WeightLayout) -> tuple[object, str]:
    quantizer = _check_weight_quantizer(module, name)
    codes = _weight_codes(module).cpu().numpy()
    scale = quantizer.scale.detach().cpu().float().numpy()
    zero_point = quantizer.zero_point.detach().cpu().numpy().astype(np.int64)
    bias = None if module.bias is None else module.bias.detach().cpu().float().numpy().copy()
    weight = module.quantized_weight().detach().float().cpu()
    if layout.weight_only_int4 and quantizer.bits <= 4:
        # no block wider than the (power-of-two rounded) row: padding would only add bytes
        block_size = max(16, min(layout.block_size, 1 << (module.in_features - 1).bit_length()))
        packed, scales, zps = pack_matmul_nbits(codes.astype(np.uint8), scale, zero_point, block_size)
        spec = NBitsWeightSpec(
            packed, scales, zps, module.in_features, module.out_features, 4, block_size, bias, weight
        )
        return spec, f"MatMulNBits (4-bit container, block {block_size})"
    codes8, zp8, container = _integer_container(codes, zero_point, quantizer.bits, layout.signed_weights)
    spec = IntWeightSpec(
        codes=np.ascontiguousarray(codes8.T),  # [K, N]: the right operand of MatMul
        scale=scale.copy(),
        zero_point=zp8,
        axis=1 if quantizer.per_channel else None,
        bias=bias,
        weight=weight,
    )
    return spec, f"{container} DequantizeLinear -> MatMul"


def _conv_spec(module: QConv2d, name: str, layout: _WeightLayout) -> tuple[ConvSpec, str]:
    quantizer = _check_weight_quantizer(module, name)
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise DFQError(f"{name}: only zero padding with explicit sizes can be exported.")
    codes = _weight_codes(module).cpu().numpy()
    codes8, zp8, container = _integer_container(
        codes, quantizer.zero_point.detach().cpu().numpy().astype(np.int64), quantizer.bits, layout.signed_weights
    )
    weight = IntWeightSpec(
        codes=codes8,
        scale=quantizer.scale.detach().cpu().float().numpy().copy(),
        zero_point=zp8,
        axis=0 if quantizer.per_channel else None,
        bias=None if module.bias is None else module.bias.detach().cpu().float().numpy().copy(),
        weight=module.quantized_weight().detach().float().cpu(),
    )
    spec = ConvSpec(weight, tuple(module.stride), tuple(module.padding), tuple(module.dilation), module.groups)
    return spec, f"{container} DequantizeLinear -> Conv"


# ---------------------------------------------------------------------------------------------------- forwards
def _qdq_forward(spec: ActivationQDQSpec):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ActivationQDQ.apply(x, spec)

    return forward


def _log_reference(quant_dequant, scale: float, x: torch.Tensor) -> torch.Tensor:
    return quant_dequant(x, torch.tensor(scale, dtype=x.dtype))


def _log_forward(spec: LogQDQSpec):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LogQDQ.apply(x, spec)

    return forward


def _linear_forward(spec):
    op = NBitsLinear if isinstance(spec, NBitsWeightSpec) else IntWeightLinear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.input_correction is not None:
            x = self.input_correction(x)
        return op.apply(x, spec)

    return forward


def _conv_forward(spec: ConvSpec):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return IntWeightConv2d.apply(x, spec)

    return forward


@contextlib.contextmanager
def _lowered(model: nn.Module, layout: _WeightLayout) -> Iterator[list[QuantizerExport]]:
    """Temporarily replaces the forwards of quantized modules by their ONNX-lowering twins."""
    entries: list[QuantizerExport] = []
    patched: list[nn.Module] = []
    weight_quantizers = set()
    for name, module in model.named_modules():
        if isinstance(module, QLinear):
            spec, lowering = _linear_spec(module, name, layout)
            module.forward = types.MethodType(_linear_forward(spec), module)
        elif isinstance(module, QConv2d):
            spec, lowering = _conv_spec(module, name, layout)
            module.forward = types.MethodType(_conv_forward(spec), module)
        else:
            continue
        patched.append(module)
        quantizer = module.weight_quantizer
        weight_quantizers.add(id(quantizer))
        entries.append(
            QuantizerExport(f"{name}.weight_quantizer", quantizer.kind, quantizer.bits, "weight", lowering, True)
        )
        if isinstance(module, QLinear) and module.input_correction is not None:
            entries.append(
                QuantizerExport(
                    f"{name}.input_correction",
                    "correction",
                    32,
                    "activation",
                    "float MatMul",
                    False,
                    "unfolded correction matrix",
                )
            )
    for name, module in model.named_modules():
        if not isinstance(module, Quantizer) or id(module) in weight_quantizers:
            continue
        if module.mode == "off":
            entries.append(QuantizerExport(name, module.kind, module.bits, "activation", "off", False, "disabled"))
            continue
        if not bool(module.calibrated):
            raise DFQError(f"{name}: the quantizer is not calibrated; quantize the model before exporting it.")
        if isinstance(module, (Log2Quantizer, LogSqrt2Quantizer)):
            steps = 2 if isinstance(module, LogSqrt2Quantizer) else 1
            scale = float(module.scale)
            # the PyTorch reference must not read the module's buffers (they are traced values during export)
            reference = functools.partial(_log_reference, module._quant_dequant, scale)
            log_spec = LogQDQSpec(scale, module.bits, steps, reference)
            module.forward = types.MethodType(_log_forward(log_spec), module)
            patched.append(module)
            entries.append(
                QuantizerExport(
                    name,
                    module.kind,
                    module.bits,
                    "activation",
                    "float Log/Round/Gather",
                    False,
                    "no exact ONNX QDQ form for a logarithmic codebook",
                )
            )
            continue
        spec = _activation_spec(module) if isinstance(module, UniformQuantizer) else None
        if spec is None:
            if isinstance(module, PixelGridQuantizer):
                note = "pixel grid: per-channel fractional zero point, no uint8 QDQ form"
            elif isinstance(module, UniformQuantizer) and module.per_channel:
                note = "per-channel activation range: ONNX Runtime's integer matmuls take one zero point"
            elif isinstance(module, UniformQuantizer) and not torch.equal(module.zero_point, module.zero_point.round()):
                note = "fractional zero point (round_zero_point=False): no uint8 QDQ form"
            elif isinstance(module, UniformQuantizer):
                note = "zero point outside the uint8 code range"
            else:
                note = "no exact ONNX QDQ form for a non-uniform codebook"
            entries.append(
                QuantizerExport(name, module.kind, module.bits, "activation", "float emulation", False, note)
            )
            continue
        module.forward = types.MethodType(_qdq_forward(spec), module)
        patched.append(module)
        lowering = "QuantizeLinear/DequantizeLinear uint8" + (" (+Clip)" if spec.qmax < 255 else "")
        lowering += " per-channel" if spec.axis is not None else ""
        entries.append(QuantizerExport(name, module.kind, module.bits, "activation", lowering, True))
    try:
        yield entries
    finally:
        for module in patched:
            del module.forward


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


# ---------------------------------------------------------------------------------------------------- public API
def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    weight_only_int4: bool = True,
    block_size: int = 128,
    signed_weights: bool = False,
    opset: int = 17,
    probe_images: torch.Tensor | None = None,
    verify: bool = True,
) -> ExportReport:
    """Exports a quantized ViT/DeiT/Swin image classifier to an ONNX file with integer weights and QDQ activations.

    Args:
        model (`PreTrainedModel`): a model quantized by optimum_dfq (fresh from `DataFreeViTQuantizer.quantize` or
            loaded from a quantized checkpoint). Its input is `pixel_values [batch, channels, height, width]`
            (dynamic batch) and its output the logits.
        path (`str` or `os.PathLike`): the `.onnx` file to write (missing folders are created; an existing file
            is replaced).
        weight_only_int4 (`bool`, defaults to `True`): Linear weights of at most 4 bits go through ONNX Runtime's
            `com.microsoft::MatMulNBits` (packed 4-bit in the file; float matmul). With `False` they are stored in
            8-bit containers like 5..8-bit weights (integer matmul, no size gain over 8 bits).
        block_size (`int`, defaults to 128): `MatMulNBits` block size (a power of two >= 16); per-channel scales are
            repeated over the blocks of a row, so any value is exact.
        signed_weights (`bool`, defaults to `False`): store 8-bit weight codes as int8 (shifted by 128) for ONNX
            Runtime's faster uint8 × int8 kernels. Exact only on CPUs where those kernels do not saturate (x86 with
            AVX512-VNNI or AVX-VNNI, ARM); on AVX2-only x86 CPUs their int16 pair sums saturate and the outputs are
            wrong (the report's `max_abs_logit_diff` shows it when verified there). By default 8-bit codes are uint8,
            exact everywhere (on an AVX2 CPU the ViT-Small-shaped W8A8 graph ran about 20% slower than with int8).
        opset (`int`, defaults to 17): ONNX opset of the default domain, at least 13 (per-channel
            QuantizeLinear/DequantizeLinear).
        probe_images (`torch.Tensor`, *optional*): images used to compare ONNX Runtime with PyTorch; defaults to
            8 standard-normal images of the model's input size (seeded).
        verify (`bool`, defaults to `True`): run the exported file in ONNX Runtime (when installed) to fill the
            report's operator counts and logit difference.

    Returns:
        [`ExportReport`]: every quantizer's lowering, ONNX Runtime's integer/float operator counts and the measured
        ONNX Runtime vs PyTorch difference.

    Raises:
        `DFQError`: the model has no quantized layers or is not in float32, a quantizer is uncalibrated or cannot
            be stored as integers, `block_size` or `opset` is not an integer, `opset` is below 13, `probe_images` is
            not a batch of the model's images (finite float pixel values), or `path` is a folder.

    Example:
        >>> from optimum_dfq.export import to_onnx  # doctest: +SKIP
        >>> report = to_onnx(qmodel, "deit-w8a8.onnx")  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    for name, value in (("block_size", block_size), ("opset", opset)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise DFQError(f"{name}={value!r} must be an integer, got {type(value).__name__}; pass e.g. {name}="
                           f"{128 if name == 'block_size' else 17}.")
    if block_size < 16 or block_size & (block_size - 1):
        raise DFQError(f"block_size must be a power of two >= 16, got {block_size}.")
    if opset < MIN_OPSET:
        raise DFQError(
            f"opset={opset} is too old: per-channel QuantizeLinear/DequantizeLinear (an axis) need at least "
            f"{MIN_OPSET}; pass opset={MIN_OPSET} or more (the default is 17)."
        )
    if not any(isinstance(m, (QLinear, QConv2d)) for m in model.modules()):
        raise DFQError(
            "The model has no quantized layers; quantize it with DataFreeViTQuantizer.quantize (or load a "
            "quantized checkpoint) before exporting."
        )
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in (*model.parameters(), *model.buffers())
                     if t.is_floating_point() and t.dtype != torch.float32})
    if dtypes:
        raise DFQError(
            f"The model holds {', '.join(dtypes)} tensors; the ONNX export writes float32 scales and activations. "
            "Export a float32 model: load the checkpoint without dtype= (or use model.to(torch.float32))."
        )
    example = torch.zeros(1, *expected_image_shape(model))
    if probe_images is not None:
        _check_probe_images(probe_images, example.shape[1:])
    path = Path(path)
    if path.is_dir():
        raise DFQError(f"{path} is a folder; pass the .onnx file to write, e.g. {path / 'model.onnx'}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = _WeightLayout(weight_only_int4, block_size, signed_weights)
    with eval_mode(model), _lowered(model, layout) as entries, torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated upstream and warns about it, and tracing warns about
        # shape-dependent Python branches that are constant for a fixed image size: neither is actionable here
        warnings.simplefilter("ignore")
        # declared only when used: the exporter warns about an unused custom domain
        uses_nbits = any(q.lowering.startswith("MatMulNBits") for q in entries)
        torch.onnx.export(
            _LogitsOnly(model),
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            custom_opsets={"com.microsoft": 1} if uses_nbits else None,
            do_constant_folding=True,
        )
    report = ExportReport(path=str(path), file_size=path.stat().st_size, quantizers=entries)
    floats = Counter(q.kind for q in entries if q.role == "activation" and not q.integer and q.lowering != "off")
    if floats:
        bits = getattr(model.config.quantization_config, "bits", "w8a8")
        caveat = "" if bits.endswith("a8") else " (uniform post-softmax levels cost accuracy below 8 bits)"
        logger.warning(
            "%s: %d activation quantizer(s) are exported as float operations (%s), so the matmuls they feed run in "
            "float and the model can be slower than its FP32 export (benchmarks/results/inference_speed.md). For an "
            "all-integer graph, quantize with DFQConfig(bits=%r, post_softmax='uniform', input_range='calibrated')%s.",
            path.name, sum(floats.values()), ", ".join(f"{kind} x{n}" for kind, n in sorted(floats.items())), bits,
            caveat,
        )
    if verify:
        _verify(model, report, example, probe_images)
    return report


def _check_probe_images(probe_images: object, image_shape: torch.Size) -> None:
    expected = f"[N, {', '.join(map(str, image_shape))}]"
    if not isinstance(probe_images, torch.Tensor):
        raise DFQError(
            f"probe_images must be a torch.Tensor, got {type(probe_images).__name__}; pass "
            f"torch.as_tensor(...) of shape {expected} (the model's channels and image size)."
        )
    if probe_images.dim() != 4 or probe_images.shape[1:] != image_shape or not probe_images.shape[0]:
        got = "none (an empty batch)" if probe_images.dim() == 4 and not probe_images.shape[0] else list(
            probe_images.shape)
        raise DFQError(
            f"probe_images has shape {got}; the exported model takes {expected} images (N >= 1, the model's "
            "channels and image size): pass images preprocessed by the model's image processor."
        )
    if not probe_images.is_floating_point():
        raise DFQError(
            f"probe_images has dtype {probe_images.dtype}: raw pixels, which the model never sees; pass float pixel "
            "values preprocessed by the model's image processor (image_processor(images, return_tensors='pt'))."
        )
    if not bool(torch.isfinite(probe_images).all()):
        raise DFQError(
            "probe_images holds NaN or inf values, on which ONNX Runtime and PyTorch cannot be compared; pass finite "
            "pixel values preprocessed by the model's image processor."
        )


def _verify(model: nn.Module, report: ExportReport, example: torch.Tensor, probe_images: torch.Tensor | None) -> None:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - optional dependency (pip install "optimum-dfq[onnx]")
        return
    if probe_images is None:
        generator = torch.Generator().manual_seed(0)
        probe_images = torch.randn((8, *example.shape[1:]), generator=generator)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        # errors only: saving this throw-away optimised copy warns that it is specific to this machine
        options.log_severity_level = 3
        session = ort.InferenceSession(report.path, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    counts = Counter(node.op_type for node in optimized.graph.node)
    report.ort_operators = dict(sorted(counts.items()))
    float_nbits = sum(node.op_type == "MatMulNBits" and _accuracy_level(node) != MATMUL_NBITS_INT8_ACCURACY
                      for node in optimized.graph.node)
    report.integer_operators = sum(counts[op] for op in INTEGER_ORT_OPS) - float_nbits
    report.float_matmuls = sum(counts[op] for op in FLOAT_MATMUL_OPS) + float_nbits
    ort_logits = session.run(["logits"], {"pixel_values": probe_images.numpy().astype(np.float32)})[0]
    with eval_mode(model), torch.no_grad():  # the file holds the inference graph: no dropout or drop path
        torch_logits = model(pixel_values=probe_images.to(next(model.parameters()).device)).logits.float().cpu()
    report.max_abs_logit_diff = float(np.abs(ort_logits - torch_logits.numpy()).max())
    report.top1_agreement = float((ort_logits.argmax(-1) == torch_logits.numpy().argmax(-1)).mean())
    report.num_probe_images = int(probe_images.shape[0])


def _accuracy_level(node) -> int:
    """The `accuracy_level` attribute of a `MatMulNBits` node (0, float32, when absent)."""
    return next((attribute.i for attribute in node.attribute if attribute.name == "accuracy_level"), 0)
