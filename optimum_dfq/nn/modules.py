"""Quantized twins of `nn.Linear`, `nn.Conv2d` (patch embedding) and `nn.LayerNorm` (post-LN activations)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers import Quantizer
from .qmodule import QModuleMixin, register_qmodule


def _label(quantizer: Quantizer | None, site: str) -> Quantizer | None:
    if quantizer is not None:
        quantizer.site = site
    return quantizer


@register_qmodule(nn.Linear)
class QLinear(QModuleMixin, nn.Module):
    """Linear layer with a fake-quantized weight and (optionally) a fake-quantized input.

    The input quantizer is absent when the input is already quantized upstream (post-LayerNorm activations are
    quantized at the LayerNorm's output, once for q, k and v together).

    Args:
        in_features (`int`), out_features (`int`), bias (`bool`): as `nn.Linear`.
        weight_quantizer (`Quantizer`): quantizer of the weight (per output channel: axis 0).
        input_quantizer (`Quantizer`, *optional*): quantizer of the input activations.
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

    @classmethod
    def from_float(
        cls, module: nn.Linear, weight_quantizer: Quantizer, input_quantizer: Quantizer | None, site: str
    ) -> "QLinear":
        qmodule = cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            _label(weight_quantizer, f"{site}.weight"),
            _label(input_quantizer, f"{site}.input"),
        )
        with torch.no_grad():
            qmodule.weight.copy_(module.weight)
            if module.bias is not None:
                qmodule.bias.copy_(module.bias)
        return qmodule.to(module.weight.device)

    def ensure_bias(self) -> nn.Parameter:
        """Creates a zero bias if the layer has none (re-parameterisation moves a shift into it)."""
        if self.bias is None:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=self.weight.device, dtype=self.weight.dtype))
        return self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@register_qmodule(nn.Conv2d)
class QConv2d(QModuleMixin, nn.Conv2d):
    """Conv2d (the patch embedding) with a fake-quantized weight and input image.

    Args:
        weight_quantizer (`Quantizer`): per output filter (axis 0).
        input_quantizer (`Quantizer`, *optional*): quantizer of the image (8-bit in RepQ-ViT's placement).
    """

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, weight_quantizer: Quantizer, input_quantizer: Quantizer | None, site: str
    ) -> "QConv2d":
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
        with torch.no_grad():
            qmodule.weight.copy_(module.weight)
            if module.bias is not None:
                qmodule.bias.copy_(module.bias)
        return qmodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QLayerNorm(QModuleMixin, nn.LayerNorm):
    """LayerNorm whose output is fake-quantized: the post-LayerNorm site that feeds q/k/v, fc1 or Swin's reduction.

    The LayerNorm itself runs in floating point (as in RepQ-ViT); only its output is quantized, once for all its
    consumers. The output quantizer is per channel until re-parameterisation makes it per tensor.
    """

    @classmethod
    def from_float(cls, module: nn.LayerNorm, output_quantizer: Quantizer, site: str) -> "QLayerNorm":
        qmodule = cls(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            bias=module.bias is not None,
            device=module.weight.device if module.weight is not None else None,
            dtype=module.weight.dtype if module.weight is not None else None,
        )
        qmodule.output_quantizer = _label(output_quantizer, f"{site}.output")
        with torch.no_grad():
            if module.weight is not None:
                qmodule.weight.copy_(module.weight)
            if module.bias is not None:
                qmodule.bias.copy_(module.bias)
        return qmodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(super().forward(x))
