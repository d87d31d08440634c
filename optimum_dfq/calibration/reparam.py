"""RepQ-ViT scale re-parameterisation of post-LayerNorm quantizers (per channel → per tensor).

Given the per-channel parameters `(s_c, z_c)` of a LayerNorm's output quantizer (lower bound `m_c = -z_c s_c`) and
a layer-wise target `(s̃, z̃)` chosen by a *scale selector*:

    r_c = s_c / s̃,   δ_c = m_c / r_c - m̃   (m̃ = -z̃ s̃)
    LayerNorm:  γ'_c = γ_c / r_c,   β'_c = β_c / r_c - δ_c
    each consumer Linear:  W' = W · diag(r),   b' = b + W' δ

The float function is unchanged, and with integer `z_c` and `z̃` the activation codes are *identical* to the
per-channel ones; only the consumers' weights change, so their weight quantizers are re-calibrated.

A consequence worth knowing when comparing selectors: with integer zero points and per-output-channel weight
quantizers, the layer-wise *scale* `s̃` is a gauge. Changing it rescales `x'` by a constant and `W'` by its inverse,
and both the activation codes and the (scale-equivariant) weight quantization are unchanged, so the quantized
consumer output does not depend on `s̃`. It depends on the selector only through the layer-wise zero point `z̃`,
because the bias absorbs `W'δ` with the *float* `W'` while the matmul uses the quantized one: the output carries an
input-independent error `(W' − Q(W'))·δ` with `δ_c = s̃ (z̃ − z_c)`. The `"search"` selector measures the real
consumer-output error, so it picks whatever actually matters.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import DFQConfig
from ..errors import ConfigError
from ..nn import QLayerNorm, QLinear
from ..quantizers import UniformQuantizer
from ..registry import closest_hint, qualified_name, register_unique
from .convert import activation_quantizer

logger = logging.getLogger(__name__)

ScaleSelector = Callable[..., tuple[torch.Tensor, torch.Tensor]]
SCALE_SELECTOR_REGISTRY: dict[str, ScaleSelector] = {}
#: Quantiles of the channel scales tried by the `"search"` selector.
SEARCH_QUANTILES = tuple(0.5 + 0.05 * i for i in range(11))


@dataclass
class SelectorContext:
    """What a measuring selector (registered with `needs_context=True`) gets besides the channel parameters.

    Attributes:
        activations (`torch.Tensor`): `[rows, C]` float LayerNorm outputs (before its quantizer) on calibration
            images, in the parameterisation before re-parameterisation.
        consumers (`list[QLinear]`): the Linears reading them (weights not folded yet).
        bits (`int`): bit width of the layer-wise activation quantizer.
        round_zero_point (`bool`): whether the layer-wise zero point will be rounded.
    """

    activations: torch.Tensor
    consumers: list[QLinear]
    bits: int
    round_zero_point: bool = True


def register_scale_selector(name: str, needs_context: bool = False):
    """Decorator that registers a scale selector `fn(scale[C], zero_point[C]) -> (layer_scale, layer_zero_point)`.

    A scale selector picks the layer-wise (per-tensor) scale and zero point that [`reparameterize_layernorm`] folds a
    per-channel post-LayerNorm quantizer into; it receives the per-channel parameters as float64 tensors. With
    `needs_context=True` it is called as `fn(scale, zero_point, context=SelectorContext | None)`. Once registered, the
    name can be used as `DFQConfig(scale_selector=...)` to quantize; loading a checkpoint made with it does not need
    the registration (its effect is folded into the weights). A name already taken by another function is refused
    (delete it from [`SCALE_SELECTOR_REGISTRY`] first to replace it); the same function registered again (a module
    reloaded, a notebook cell re-run) simply replaces itself.

    Args:
        name (`str`): the key in [`SCALE_SELECTOR_REGISTRY`].
        needs_context (`bool`, *optional*, defaults to `False`): whether the selector measures on calibration
            activations and consumers (a [`SelectorContext`]); `quantize_model` then captures them.

    Returns:
        `Callable[[ScaleSelector], ScaleSelector]`: the decorator, which returns the function unchanged (with a
        `needs_context` attribute set).

    Raises:
        `ConfigError`: (from the decorator) when `name` is registered to another function.

    Example:

    ```python
    >>> from optimum_dfq import DFQConfig
    >>> from optimum_dfq.calibration import SCALE_SELECTOR_REGISTRY, register_scale_selector
    >>> @register_scale_selector("doc_max")
    ... def max_selector(scale, zero_point):
    ...     return scale.max(), zero_point.mean()
    >>> SCALE_SELECTOR_REGISTRY["doc_max"] is max_selector, max_selector.needs_context
    (True, False)
    >>> DFQConfig(bits="w4a4", scale_selector="doc_max").scale_selector
    'doc_max'
    >>> del SCALE_SELECTOR_REGISTRY["doc_max"]  # the registry is global
    ```
    """

    def wrapper(fn: ScaleSelector) -> ScaleSelector:
        register_unique(SCALE_SELECTOR_REGISTRY, name, fn, lambda existing: ConfigError(
            f"Scale selector {name!r} is already registered to {qualified_name(existing)}; choose another name, or "
            f"`del SCALE_SELECTOR_REGISTRY[{name!r}]` first to replace it."
        ))
        fn.needs_context = needs_context
        SCALE_SELECTOR_REGISTRY[name] = fn
        return fn

    return wrapper


def get_scale_selector(name: str) -> ScaleSelector:
    """The registered scale selector `name`.

    Args:
        name (`str`): a key of [`SCALE_SELECTOR_REGISTRY`], e.g. `DFQConfig.scale_selector`.

    Returns:
        `ScaleSelector`

    Raises:
        `ConfigError`: when no selector is registered under `name`.
    """
    selector = SCALE_SELECTOR_REGISTRY.get(name)
    if selector is None:
        raise ConfigError(
            f"Unknown scale selector {name!r}{closest_hint(name, SCALE_SELECTOR_REGISTRY)}; registered: "
            f"{sorted(SCALE_SELECTOR_REGISTRY)}. Register a custom "
            "one with optimum_dfq.calibration.register_scale_selector before quantizing."
        )
    return selector


def selector_needs_context(name: str) -> bool:
    """Whether the selector `name` measures on calibration activations (see [`SelectorContext`])."""
    return bool(getattr(get_scale_selector(name), "needs_context", False))


@register_scale_selector("mean")
def mean_selector(scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT: `s̃ = mean(s)`, `z̃ = mean(z)`."""
    return scale.mean(), zero_point.mean()


@register_scale_selector("median")
def median_selector(scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DopQ-ViT v1 MOSF ("median as the optimal scaling factor"), also the literal reading of v3's MAD rule
    (the scalar minimising the mean absolute deviation is the median). Our interpretation: `s̃ = median(s)` and
    the lower bound `m̃ = median(m)`, `z̃ = -m̃ / s̃`, both `torch.median` (the lower of the two middle values for
    an even channel count)."""
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
def requantized_consumers(consumers: list[QLinear], scale: torch.Tensor) -> list[torch.Tensor]:
    """`Q(W·diag(s))` for each consumer, with a fresh copy of its weight quantizer (the model is not modified).

    The folded weight for a layer scale `s̃` is `W·diag(s)/s̃`, and uniform weight quantizers are scale-equivariant
    (`Q(W/s̃) = Q(W)/s̃`: ranges, steps and codes all scale together), so one calibration serves every candidate.
    """
    weights = []
    for linear in consumers:
        quantizer = copy.deepcopy(linear.weight_quantizer)
        quantizer.reset()
        folded = (linear.weight.double() * scale[None, :]).float()
        quantizer.observe(folded)
        quantizer.calibrate()
        weights.append(quantizer.fake_quant(folded).double())
    return weights


@torch.no_grad()
def consumer_output_error(
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    layer_scale: torch.Tensor,
    layer_zero: torch.Tensor,
    context: SelectorContext,
    requantized: list[torch.Tensor] | None = None,
) -> float:
    """Consumer-output MSE of re-parameterising to `(layer_scale, layer_zero)`: quantized activations and
    re-quantized weights `W' = W·diag(r)` against the float consumers on the float activations, summed over
    consumers. Nothing in the model is modified.

    Args:
        scale (`torch.Tensor`), zero_point (`torch.Tensor`): the per-channel parameters `[C]`.
        layer_scale (`torch.Tensor`), layer_zero (`torch.Tensor`): the candidate layer-wise parameters.
        context (`SelectorContext`): activations and consumers.
        requantized (`list[torch.Tensor]`, *optional*): [`requantized_consumers`] of `scale` (computed if absent).

    Returns:
        `float`
    """
    if requantized is None:
        requantized = requantized_consumers(context.consumers, scale)
    if context.round_zero_point:
        layer_zero = torch.round(layer_zero)
    ratio = scale / layer_scale
    shift = (-zero_point * scale) / ratio + layer_zero * layer_scale
    x = context.activations.double()
    qmax = 2**context.bits - 1
    x_rep = x / ratio - shift
    x_hat = ((torch.round(x_rep / layer_scale) + layer_zero).clamp(0, qmax) - layer_zero) * layer_scale
    error = 0.0
    for linear, weight_q in zip(context.consumers, requantized):
        weight = linear.weight.double()
        bias = linear.bias.double() if linear.bias is not None else torch.zeros_like(weight[:, 0])
        reference = x @ weight.T + bias
        folded = weight * ratio[None, :]
        output = x_hat @ (weight_q / layer_scale).T + (bias + folded @ shift)
        error += float((output - reference).pow(2).mean())
    return error


@register_scale_selector("search", needs_context=True)
def search_selector(
    scale: torch.Tensor, zero_point: torch.Tensor, context: SelectorContext | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our reading of DopQ-ViT v2's SOSF ("search for the optimal scaling factor"): try `s̃ = t` for `t` on the 0.5,
    0.55, ..., 1.0 quantiles of the channel scales (lower bound `m̃ = median(m)`, as the median selector), plus
    RepQ-ViT's mean, and keep the candidate with the smallest consumer-output MSE on the calibration activations
    ([`consumer_output_error`]). So the search is never worse than `"mean"` on the calibration data. Its 0.5
    candidate is the *interpolated* median of the scales, while the median selector takes `torch.median` (the lower
    of the two middle values for an even channel count); the two can round to different zero points, and the search
    can then be slightly worse than `"median"` (2 of 60 random layers in an audit, by 0.1% of the error). Without a
    context (nothing to measure) it returns the median selector's result.
    """
    if context is None:
        logger.warning("scale selector 'search' got no calibration activations; using the median selector.")
        return median_selector(scale, zero_point)
    lower = (-zero_point * scale).median()
    thresholds = torch.quantile(scale, torch.tensor(SEARCH_QUANTILES, dtype=scale.dtype))
    candidates = [(t, -lower / t) for t in thresholds] + [mean_selector(scale, zero_point)]
    requantized = requantized_consumers(context.consumers, scale)
    errors = [consumer_output_error(scale, zero_point, s, z, context, requantized) for s, z in candidates]
    return candidates[min(range(len(candidates)), key=errors.__getitem__)]


@torch.no_grad()
def reparameterize_layernorm(
    norm: QLayerNorm,
    consumers: list[QLinear],
    config: DFQConfig,
    recalibrate_weights: bool = True,
    activations: torch.Tensor | None = None,
) -> None:
    """Folds the per-channel output quantizer of `norm` into per-tensor form (in place).

    The LayerNorm's weight and bias and the consumers' weights and biases are rescaled so that the float function is
    unchanged (a zero bias is created on consumers without one), and `norm.output_quantizer` is replaced by a
    calibrated per-tensor uniform quantizer in the same mode.

    Args:
        norm (`QLayerNorm`): LayerNorm with a calibrated per-channel uniform output quantizer.
        consumers (`list[QLinear]`): every Linear reading its output (q, k and v all get the same fold); leaving one
            out changes the model's function. Their weights must still be float (not frozen).
        config (`DFQConfig`): `scale_selector` and `round_zero_point` are read; the new per-tensor quantizer is
            built from it (with the bits of the old one).
        recalibrate_weights (`bool`, *optional*, defaults to `True`): re-calibrate the consumers' weight quantizers
            afterwards.
        activations (`torch.Tensor`, *optional*): `[rows, C]` float outputs of `norm` on calibration images, for
            selectors that measure (`"search"`; without them it falls back to the median).

    Raises:
        `ValueError`: when the output quantizer is not a per-channel uniform quantizer, or `norm` has no weight or
            no bias.

    Example:

    ```python
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq import DFQConfig
    >>> from optimum_dfq.calibration import CalibrationSet, quantize_model, reparameterize_layernorm
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> config = DFQConfig(bits="w4a4", input_range="calibrated", post_layernorm="per_channel")  # no re-param. yet
    >>> model, plan = quantize_model(model, CalibrationSet(pixel_values=torch.randn(4, 3, 32, 32)), config)
    >>> norm = model.get_submodule("vit.layers.0.layernorm_after")
    >>> reparameterize_layernorm(norm, [model.get_submodule("vit.layers.0.mlp.fc1")], config)
    >>> norm.output_quantizer.per_channel
    False
    ```
    """
    quantizer = norm.output_quantizer
    if not isinstance(quantizer, UniformQuantizer) or not quantizer.per_channel:
        raise ValueError(f"{quantizer.site} is not a per-channel uniform quantizer; nothing to re-parameterise.")
    if norm.weight is None or norm.bias is None:
        raise ValueError(f"{quantizer.site}: re-parameterisation needs a LayerNorm with weight and bias.")
    scale, zero_point = quantizer.scale.double(), quantizer.zero_point.double()
    selector = get_scale_selector(config.scale_selector)
    if selector_needs_context(config.scale_selector):
        context = None if activations is None else SelectorContext(
            activations, consumers, quantizer.bits, config.round_zero_point
        )
        layer_scale, layer_zero = selector(scale, zero_point, context=context)
    else:
        layer_scale, layer_zero = selector(scale, zero_point)
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
    model: nn.Module,
    layernorm_consumers: dict[str, list[str]],
    config: DFQConfig,
    recalibrate_weights: bool = True,
    activations: dict[str, torch.Tensor] | None = None,
) -> int:
    """Applies [`reparameterize_layernorm`] to every quantized LayerNorm of `model` (in place).

    Args:
        model (`nn.Module`): a calibrated quantized model whose post-LayerNorm quantizers are per channel (weights
            not frozen).
        layernorm_consumers (`dict[str, list[str]]`): [`QLayerNorm`] name → names of the Linears reading its output,
            as in `QuantizationPlan.layernorm_consumers`.
        config (`DFQConfig`): see [`reparameterize_layernorm`].
        recalibrate_weights (`bool`, *optional*, defaults to `True`): re-calibrate the consumers' weight quantizers.
        activations (`dict[str, torch.Tensor]`, *optional*): LayerNorm name → `[rows, C]` float outputs on
            calibration images (see `engine.capture_layernorm_outputs`), for measuring selectors (`"search"`).

    Returns:
        `int`: how many LayerNorms were folded (every entry of `layernorm_consumers`).

    Example:

    ```python
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq import DFQConfig
    >>> from optimum_dfq.calibration import CalibrationSet, quantize_model, reparameterize_model
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> config = DFQConfig(bits="w4a4", input_range="calibrated", post_layernorm="per_channel")  # no re-param. yet
    >>> model, plan = quantize_model(model, CalibrationSet(pixel_values=torch.randn(4, 3, 32, 32)), config)
    >>> reparameterize_model(model, plan.layernorm_consumers, config)
    2
    ```
    """
    folded = 0
    activations = activations or {}
    for norm_name, consumer_names in layernorm_consumers.items():
        norm = model.get_submodule(norm_name)
        consumers = [model.get_submodule(name) for name in consumer_names]
        reparameterize_layernorm(norm, consumers, config, recalibrate_weights=recalibrate_weights,
                                 activations=activations.get(norm_name))
        folded += 1
    return folded
