"""Quantized twins of `nn.Linear`, `nn.Conv2d` (patch embedding) and `nn.LayerNorm` (post-LN activations)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationError, DFQError
from ..formats.packing import pack_codes, packed_shape, unpack_codes
from ..quantizers import Quantizer, UniformQuantizer
from .qmodule import QModuleMixin, register_qmodule


def _label(quantizer: Quantizer | None, site: str) -> Quantizer | None:
    if quantizer is not None:
        quantizer.site = site
    return quantizer


class FrozenWeightMixin:
    """The *frozen* state of a module with a quantized weight: integer codes instead of the float weight.

    [`freeze`] replaces the float `weight` parameter by two buffers, `weight_packed` (the codes of the weight
    quantizer, packed to its bit width, see [`~optimum_dfq.formats.packing`]) and `weight_shape`; the weight
    quantizer keeps its `scale` and `zero_point`. The forward pass then uses [`quantized_weight`], which dequantizes
    the codes and is bit-for-bit the fake-quantized float weight it replaces. This is what quantized checkpoints
    store, and freezing is one-way: the float weight is gone.

    While frozen, reading `module.weight` returns that dequantized weight (a new tensor on each read, so writing
    into it changes nothing), because model code reads e.g. `projection.weight.dtype`.
    """

    @property
    def is_frozen(self) -> bool:
        """Whether the weight is stored as packed integer codes."""
        return "weight_packed" in self._buffers

    def weight_dims(self) -> tuple[int, ...]:
        """The (unpacked) weight shape, output channels first."""
        raise NotImplementedError

    def _packable_quantizer(self) -> UniformQuantizer:
        quantizer = self.weight_quantizer
        if not isinstance(quantizer, UniformQuantizer):
            raise DFQError(
                f"{quantizer.site or type(self).__name__}: only uniform weight quantizers can be packed, got "
                f"{type(quantizer).__name__}."
            )
        return quantizer

    def _set_packed(self, packed: torch.Tensor, shape: torch.Tensor) -> None:
        del self.weight
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_shape", shape)

    @torch.no_grad()
    def freeze(self) -> None:
        """Replaces the float weight by its packed integer codes (no-op when already frozen).

        Raises:
            `CalibrationError`: when the weight quantizer is not calibrated yet.
        """
        if self.is_frozen:
            return
        quantizer = self._packable_quantizer()
        if not bool(quantizer.calibrated):
            raise CalibrationError(
                f"{quantizer.site or type(self).__name__}: cannot freeze an uncalibrated weight quantizer; "
                "calibrate the model first (DataFreeViTQuantizer.quantize does)."
            )
        weight = self.weight
        codes = quantizer.codes(weight.detach())
        shape = torch.tensor(weight.shape, dtype=torch.int64, device=weight.device)
        self._set_packed(pack_codes(codes, quantizer.bits), shape)

    def prepare_frozen(self) -> None:
        """Switches to the frozen layout with uninitialised buffers, to be filled by loading a checkpoint."""
        if self.is_frozen:
            return
        quantizer = self._packable_quantizer()
        device = self.weight.device
        dims = self.weight_dims()
        packed = torch.empty(packed_shape(dims, quantizer.bits), dtype=torch.uint8, device=device)
        self._set_packed(packed, torch.empty(len(dims), dtype=torch.int64, device=device))

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: fake-quantized float weight, or the dequantized codes when frozen."""
        if not self.is_frozen:
            return self.weight_quantizer(self.weight)
        quantizer = self.weight_quantizer
        if quantizer.mode == "off":
            raise DFQError(
                f"{quantizer.site or type(self).__name__}: the weight is frozen to integer codes, so it cannot run "
                "in float (weight quantizer mode 'off'). Use the float model that was quantized instead."
            )
        return quantizer.dequantize(unpack_codes(self.weight_packed, quantizer.bits, self.weight_dims()))

    def calibrate_weights(self) -> None:
        if self.is_frozen:
            raise DFQError(
                f"{type(self).__name__} weights are frozen to integer codes and cannot be re-calibrated; "
                "quantize the float model again instead."
            )
        super().calibrate_weights()

    def __getattr__(self, name: str):
        if name == "weight" and "weight_packed" in self.__dict__.get("_buffers", {}):
            return self.quantized_weight()
        return super().__getattr__(name)


@register_qmodule(nn.Linear)
class QLinear(FrozenWeightMixin, QModuleMixin, nn.Module):
    """Linear layer with a fake-quantized weight and, optionally, a fake-quantized input.

    The input quantizer is `None` when the input is already quantized upstream (post-LayerNorm activations are
    quantized once at the LayerNorm's output, for q, k and v together). The constructor leaves the weight
    uninitialised and the bias at zero; build the layer from a float one with [`from_float`]. Its quantizers must be
    calibrated (or switched off) before the forward pass, which raises `CalibrationError` otherwise; [`freeze`] then
    stores the weight as packed integer codes.

    Args:
        in_features (`int`): size of each input sample, as in `nn.Linear`.
        out_features (`int`): size of each output sample, as in `nn.Linear`.
        bias (`bool`): whether the layer has a bias.
        weight_quantizer (`Quantizer`): quantizer of the weight (per output channel: `channels=out_features`,
            `axis=0`).
        input_quantizer (`Quantizer`, *optional*): quantizer of the input activations.

    Attributes:
        input_correction (`nn.Module`, *optional*): an activation correction applied to the (dequantized) input
            right before the matmul (see `calibration/correction.py`); `None` unless an unfolded correction was fitted.

    Example:

    ```python
    >>> import torch
    >>> from torch import nn
    >>> from optimum_dfq.nn import QLinear
    >>> from optimum_dfq.quantizers import UniformQuantizer
    >>> layer = QLinear.from_float(nn.Linear(8, 4), UniformQuantizer(bits=4, channels=4, axis=0), None, site="fc")
    >>> layer.calibrate_weights(); layer(torch.randn(2, 8)).shape
    torch.Size([2, 4])
    >>> layer.freeze(); layer.is_frozen, layer.weight_packed.dtype  # 4-bit codes, two per byte
    (True, torch.uint8)
    ```
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_quantizer: Quantizer,
        input_quantizer: Quantizer | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.input_correction: nn.Module | None = None

    @classmethod
    def from_float(
        cls, module: nn.Linear, weight_quantizer: Quantizer, input_quantizer: Quantizer | None, site: str
    ) -> QLinear:
        """Builds the quantized twin of a float `nn.Linear`, with a copy of its weight and bias.

        Args:
            module (`nn.Linear`): the float layer (left unchanged).
            weight_quantizer (`Quantizer`): quantizer of the weight; its `site` becomes `"<site>.weight"`.
            input_quantizer (`Quantizer`, *optional*): quantizer of the input, or `None`; its `site` becomes
                `"<site>.input"`.
            site (`str`): the layer's path in the model, used to label the quantizers.

        Returns:
            [`QLinear`]: the new layer, moved (quantizers included) to the device of `module.weight`. Its parameters
            have the default floating-point dtype, whatever the dtype of `module`. The quantizers are used as given
            (uncalibrated if they were).
        """
        qmodule = cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            _label(weight_quantizer, f"{site}.weight"),
            _label(input_quantizer, f"{site}.input"),
        )
        return _copy_parameters(module, qmodule).to(module.weight.device)

    def ensure_bias(self) -> nn.Parameter:
        """Creates a zero bias if the layer has none (re-parameterisation moves a shift into it)."""
        if self.bias is None:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=self.weight.device, dtype=self.weight.dtype))
        return self.bias

    def weight_dims(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.input_correction is not None:
            x = self.input_correction(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@register_qmodule(nn.Conv2d)
class QConv2d(FrozenWeightMixin, QModuleMixin, nn.Conv2d):
    """Conv2d (the patch embedding) with a fake-quantized weight and, optionally, a fake-quantized input image.

    The constructor takes the arguments of `nn.Conv2d` and sets no quantizers: build the layer from a float one with
    [`from_float`], which attaches them. As for [`QLinear`], its quantizers must be calibrated (or switched off)
    before the forward pass, and [`freeze`] stores the weight as packed integer codes.

    Args:
        in_channels (`int`): channels of the input image, as in `nn.Conv2d`.
        out_channels (`int`): number of filters, as in `nn.Conv2d`.
        kernel_size (`int` or `tuple[int, int]`): as in `nn.Conv2d`.
        kwargs (*optional*): the other arguments of `nn.Conv2d` (`stride`, `padding`, `bias`, `device`, `dtype`...).

    Attributes:
        weight_quantizer (`Quantizer`): quantizer of the weight, per output filter (`axis=0`).
        input_quantizer (`Quantizer`, *optional*): quantizer of the image (8-bit in RepQ-ViT's placement), or `None`.

    Example:

    ```python
    >>> import torch
    >>> from torch import nn
    >>> from optimum_dfq.nn import QConv2d
    >>> from optimum_dfq.quantizers import UniformQuantizer
    >>> conv = QConv2d.from_float(nn.Conv2d(3, 8, kernel_size=4, stride=4),
    ...                           UniformQuantizer(bits=4, channels=8, axis=0), None, site="patch_embeddings")
    >>> conv.calibrate_weights(); conv(torch.randn(1, 3, 16, 16)).shape
    torch.Size([1, 8, 4, 4])
    ```
    """

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, weight_quantizer: Quantizer, input_quantizer: Quantizer | None, site: str
    ) -> QConv2d:
        """Builds the quantized twin of a float `nn.Conv2d`, with the same geometry and a copy of its weight and bias.

        Args:
            module (`nn.Conv2d`): the float layer (left unchanged).
            weight_quantizer (`Quantizer`): quantizer of the weight; its `site` becomes `"<site>.weight"`.
            input_quantizer (`Quantizer`, *optional*): quantizer of the image, or `None`; its `site` becomes
                `"<site>.input"`.
            site (`str`): the layer's path in the model, used to label the quantizers.

        Returns:
            [`QConv2d`]: the new layer, on the device and with the dtype of `module.weight`. The quantizers are used
            as given: they are neither moved nor calibrated.
        """
        qmodule = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        qmodule.weight_quantizer = _label(weight_quantizer, f"{site}.weight")
        qmodule.input_quantizer = _label(input_quantizer, f"{site}.input")
        return _copy_parameters(module, qmodule)

    def reset_parameters(self) -> None:
        """No random initialisation (`nn.Conv2d.__init__` calls this): the weight and bias are always copied from the
        float layer or loaded, as for [`QLinear`], so building one leaves the global random generator untouched."""

    def weight_dims(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QLayerNorm(QModuleMixin, nn.LayerNorm):
    """LayerNorm whose output is fake-quantized: the post-LayerNorm site that feeds q/k/v, fc1 or Swin's reduction.

    The LayerNorm itself runs in floating point (as in RepQ-ViT); only its output is quantized, once for all its
    consumers. The output quantizer is per channel until re-parameterisation makes it per tensor. The constructor
    takes the arguments of `nn.LayerNorm` and sets no quantizer: build the layer with [`from_float`]. Unlike
    [`QLinear`] and [`QConv2d`], it is not in the [`register_qmodule`] registry: the quantization plan decides which
    LayerNorms to quantize.

    Args:
        normalized_shape (`int` or `tuple[int, ...]`): the normalised trailing shape, as in `nn.LayerNorm`.
        kwargs (*optional*): the other arguments of `nn.LayerNorm` (`eps`, `elementwise_affine`, `bias`, `device`,
            `dtype`).

    Attributes:
        output_quantizer (`Quantizer`): quantizer of the normalised output.

    Example:

    ```python
    >>> import torch
    >>> from torch import nn
    >>> from optimum_dfq.nn import QLayerNorm
    >>> from optimum_dfq.quantizers import UniformQuantizer
    >>> norm = QLayerNorm.from_float(nn.LayerNorm(8), UniformQuantizer(bits=3, observer="minmax"), site="norm")
    >>> norm.output_quantizer.set_mode("calibrate")  # calibrate on the first batch, then quantize
    >>> norm(torch.randn(16, 8)).unique().numel() <= 8, norm.output_quantizer.mode
    (True, 'quantize')
    ```
    """

    @classmethod
    def from_float(cls, module: nn.LayerNorm, output_quantizer: Quantizer, site: str) -> QLayerNorm:
        """Builds the quantized twin of a float `nn.LayerNorm`, with the same shape, `eps` and affine parameters.

        Args:
            module (`nn.LayerNorm`): the float layer (left unchanged).
            output_quantizer (`Quantizer`): quantizer of the output; its `site` becomes `"<site>.output"`.
            site (`str`): the layer's path in the model, used to label the quantizer.

        Returns:
            [`QLayerNorm`]: the new layer, on the device and with the dtype of `module.weight` (when it has one). The
            quantizer is used as given: it is neither moved nor calibrated.
        """
        qmodule = cls(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            bias=module.bias is not None,
            device=module.weight.device if module.weight is not None else None,
            dtype=module.weight.dtype if module.weight is not None else None,
        )
        qmodule.output_quantizer = _label(output_quantizer, f"{site}.output")
        return _copy_parameters(module, qmodule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(super().forward(x))


def _copy_parameters(source: nn.Module, target: nn.Module) -> nn.Module:
    """Copies the float layer's weight and bias into its quantized replacement; returns the replacement."""
    with torch.no_grad():
        if source.weight is not None:
            target.weight.copy_(source.weight)
        if source.bias is not None:
            target.bias.copy_(source.bias)
    return target
