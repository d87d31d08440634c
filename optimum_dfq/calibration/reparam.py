"""RepQ-ViT scale re-parameterisation of post-LayerNorm quantizers (per channel → per tensor).

Given the per-channel parameters `(s_c, z_c)` of a LayerNorm's output quantizer (lower bound `m_c = -z_c s_c`) and
a layer-wise target `(s̃, z̃)` chosen by a *scale selector*:

    r_c = s_c / s̃,   δ_c = m_c / r_c - m̃   (m̃ = -z̃ s̃)
    LayerNorm:  γ'_c = γ_c / r_c,   β'_c = β_c / r_c - δ_c
    each consumer Linear:  W' = W · diag(r),   b' = b + W' δ

The float function is unchanged, and with integer `z_c` and `z̃` the activation codes are *identical* to the
per-channel ones; only the consumers' weights change, so their weight quantizers are re-calibrated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import DFQConfig
from ..nn import QLayerNorm, QLinear
from ..quantizers import UniformQuantizer
from .convert import activation_quantizer

ScaleSelector = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SCALE_SELECTOR_REGISTRY: dict[str, ScaleSelector] = {}


def register_scale_selector(name: str):
    """Decorator registering `fn(scale[C], zero_point[C]) -> (layer_scale, layer_zero_point)`."""

    def wrapper(fn: ScaleSelector) -> ScaleSelector:
        SCALE_SELECTOR_REGISTRY[name] = fn
        return fn

    return wrapper


@register_scale_selector("mean")
def mean_selector(scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT: `s̃ = mean(s)`, `z̃ = mean(z)`."""
    return scale.mean(), zero_point.mean()


@register_scale_selector("median")
def median_selector(scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DopQ-ViT v1 MOSF ("median as the optimal scaling factor"), also the literal reading of v3's MAD rule
    (the scalar minimising the mean absolute deviation is the median). Our interpretation: `s̃ = median(s)` and
    the lower bound `m̃ = median(m)`, `z̃ = -m̃ / s̃`."""
    layer_scale = scale.median()
    lower = (-zero_point * scale).median()
    return layer_scale, -lower / layer_scale


@register_scale_selector("mad")
def mad_trimmed_selector(
    scale: torch.Tensor, zero_point: torch.Tensor, k: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our reading of DopQ-ViT v3's "MAD-guided" rule as an outlier filter: keep channels with
    `|s_c - median(s)| <= k · mean|s - median(s)|`, then average the kept channels' scales and zero points."""
    centre = scale.median()
    deviation = (scale - centre).abs()
    keep = deviation <= k * deviation.mean().clamp(min=1e-12)
    return scale[keep].mean(), zero_point[keep].mean()


@torch.no_grad()
def reparameterize_layernorm(
    norm: QLayerNorm, consumers: list[QLinear], config: DFQConfig, recalibrate_weights: bool = True
) -> None:
    """Folds the per-channel output quantizer of `norm` into per-tensor form (in place).

    Args:
        norm (`QLayerNorm`): LayerNorm with a calibrated per-channel output quantizer.
        consumers (`list[QLinear]`): every Linear reading its output (q, k and v all get the same fold).
        config (`DFQConfig`): `scale_selector` and `round_zero_point`.
        recalibrate_weights (`bool`): re-calibrate the consumers' weight quantizers afterwards.
    """
    quantizer = norm.output_quantizer
    if not isinstance(quantizer, UniformQuantizer) or not quantizer.per_channel:
        raise ValueError(f"{quantizer.site} is not a per-channel uniform quantizer; nothing to re-parameterise.")
    if norm.weight is None or norm.bias is None:
        raise ValueError(f"{quantizer.site}: re-parameterisation needs a LayerNorm with weight and bias.")
    scale, zero_point = quantizer.scale.double(), quantizer.zero_point.double()
    layer_scale, layer_zero = SCALE_SELECTOR_REGISTRY[config.scale_selector](scale, zero_point)
    if config.round_zero_point:
        layer_zero = torch.round(layer_zero)
    ratio = scale / layer_scale
    shift = (-zero_point * scale) / ratio - (-layer_zero * layer_scale)

    dtype = norm.weight.dtype
    norm.weight.copy_((norm.weight.double() / ratio).to(dtype))
    norm.bias.copy_((norm.bias.double() / ratio - shift).to(dtype))
    for linear in consumers:
        weight = linear.weight.double() * ratio[None, :]
        bias = linear.ensure_bias()
        bias.copy_((bias.double() + weight @ shift).to(bias.dtype))
        linear.weight.copy_(weight.to(linear.weight.dtype))
        if recalibrate_weights:
            linear.calibrate_weights()

    per_tensor = activation_quantizer(config, bits=quantizer.bits)
    per_tensor.site = quantizer.site
    per_tensor.set_params(layer_scale.float(), layer_zero.float())
    per_tensor.set_mode(quantizer.mode)
    norm.output_quantizer = per_tensor


def reparameterize_model(
    model: nn.Module, layernorm_consumers: dict[str, list[str]], config: DFQConfig, recalibrate_weights: bool = True
) -> int:
    """Applies [`reparameterize_layernorm`] to every quantized LayerNorm of `model`; returns how many were folded."""
    folded = 0
    for norm_name, consumer_names in layernorm_consumers.items():
        norm = model.get_submodule(norm_name)
        consumers = [model.get_submodule(name) for name in consumer_names]
        reparameterize_layernorm(norm, consumers, config, recalibrate_weights=recalibrate_weights)
        folded += 1
    return folded
