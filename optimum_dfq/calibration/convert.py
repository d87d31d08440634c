"""Turns a float model into a fake-quantized one: quantizers placed at RepQ-ViT's sites S1-S8.

| site | tensor | quantizer |
|---|---|---|
| S1 | patch-embedding weight | w-bits, per output filter |
| S2 | image input of the patch embedding | `input_bits` (8): the pixel grid per channel, or calibrated per tensor |
| S3 | LayerNorm outputs read by q/k/v, fc1, Swin's reduction | a-bits, per channel (→ per tensor after re-param.) |
| S4 | inputs of every other Linear (o_proj, post-GELU fc2, classifiers) | a-bits, per tensor |
| S5 | every Linear weight, classifiers included | w-bits, per output channel |
| S6 | Q and K (operands of Q·Kᵀ) | a-bits, per tensor |
| S7 | softmax probabilities (left operand of A·V) | a-bits, `post_softmax` quantizer |
| S8 | V | a-bits, per tensor |

LayerNorm, softmax, GELU, residual additions and position embeddings stay in floating point.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import DFQConfig
from ..errors import ConfigError
from ..models import ModelAdapter
from ..nn import AttentionQuantizers, QLayerNorm, QModuleMixin, quantized_class_for
from ..nn.attention import ATTENTION_QUANTIZERS_ATTR
from ..quantizers import PixelGridQuantizer, Quantizer, build_quantizer

logger = logging.getLogger(__name__)


@dataclass
class QuantizationPlan:
    """Which modules get quantized, and how post-LayerNorm sites are shared.

    Attributes:
        layernorm_consumers (`dict[str, list[str]]`): quantized LayerNorm name → the Linears reading its output
            (which then have no input quantizer of their own). Empty when activations stay float.
        skipped (`list[str]`): patch embeddings, Linears and attention modules kept in float because they match
            `DFQConfig.modules_to_not_convert`.
        corrections (`dict[str, str]`): Linear name → `"folded"` (an activation correction was folded into its
            weight and bias, which may have created the bias) or the kind of the correction module attached as its
            `input_correction` (`"affine"`, `"ridge"`); see `calibration/correction.py`. Loading a checkpoint
            rebuilds this structure with `attach_corrections`.
        activation_consumers (`list[str]`): Linears whose input quantizer reads an activation function's output
            and so uses `DFQConfig.post_activation_range_observer`. Recorded so that a loaded checkpoint rebuilds
            the same range estimators (checkpoints written before this field existed load with an empty list).
    """

    layernorm_consumers: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    corrections: dict[str, str] = field(default_factory=dict)
    activation_consumers: list[str] = field(default_factory=list)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif name == pattern:
            return True
    return False


def check_convertible(model: nn.Module, adapter: ModelAdapter, modules_to_not_convert: Sequence[str]) -> None:
    """Raises `ConfigError` if a layer that would be quantized has no registered quantized class.

    Called before calibration, so that an unsupported layer is reported before minutes of synthesis are spent.

    Args:
        model (`nn.Module`): the float model.
        adapter (`ModelAdapter`): its family's structure, from [`get_adapter`].
        modules_to_not_convert (`Sequence[str]`): names or `re:` patterns kept in float.

    Raises:
        `ConfigError`: when a layer to convert is already quantized or has no registered quantized class, or when an
            entry of `modules_to_not_convert` names no patch embedding, Linear, LayerNorm or attention module.
    """
    for modules in (adapter.patch_embeddings(model), adapter.linears(model)):
        _with_quantized_class(modules, modules_to_not_convert, skipped=[])
    _check_every_pattern_matches(model, adapter, modules_to_not_convert)


def _check_every_pattern_matches(model: nn.Module, adapter: ModelAdapter, patterns: Sequence[str]) -> None:
    """An entry that matches nothing would quantize the module the user meant to keep in float: refuse it."""
    names = [name for modules in (adapter.patch_embeddings(model), adapter.linears(model),
                                  adapter.attention_modules(model)) for name, _ in modules]
    names += [name for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)]
    unmatched = [pattern for pattern in patterns if not any(_matches(name, [pattern]) for name in names)]
    if unmatched:
        linears = [name for name, _ in adapter.linears(model)]
        raise ConfigError(
            f"modules_to_not_convert entries {unmatched} match no patch embedding, Linear, LayerNorm or attention "
            f"module of this model. Entries are exact module names (e.g. {linears[:2]}) or 're:' + a regular "
            "expression matched against the whole name (e.g. 're:.*\\.layers\\.0\\..*' for every layer of "
            "block 0); list the model's names with `[name for name, _ in model.named_modules()]`."
        )


def _with_quantized_class(
    modules: list[tuple[str, nn.Module]], skip: Sequence[str], skipped: list[str]
) -> list[tuple[str, nn.Module, type[nn.Module]]]:
    """The modules to convert with their registered quantized class; the names of skipped ones go to `skipped`."""
    converted = []
    for name, module in modules:
        if _matches(name, skip):
            skipped.append(name)
        elif isinstance(module, QModuleMixin):
            raise ConfigError(f"{name} is already quantized ({type(module).__name__}): quantize the float model, not a "
                              "quantized one.")
        else:
            converted.append((name, module, quantized_class_for(module, name)))
    return converted


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def weight_quantizer(config: DFQConfig, channels: int) -> Quantizer:
    return build_quantizer(
        "uniform",
        bits=config.weight_bits,
        channels=channels,
        axis=0,
        symmetric=config.weight_symmetric,
        observer=config.weight_observer,
        percentiles=config.weight_percentiles,
    )


def activation_quantizer(
    config: DFQConfig, bits: int | None = None, channels: int | None = None, post_activation: bool = False
) -> Quantizer:
    observer = config.post_activation_range_observer if post_activation else config.activation_range_observer
    return build_quantizer(
        "uniform",
        bits=bits or config.activation_bits,
        channels=channels,
        axis=-1,
        observer=observer,
        percentiles=config.activation_percentiles,
    )


PixelNormalization = tuple[Sequence[float], Sequence[float]]


def pixel_normalization(image_processor: Any | None) -> tuple[PixelNormalization | None, str]:
    """The `(image_mean, image_std)` of an image processor that maps 8-bit pixels to the model's input, or `None` and
    the reason why the pixel grid is unknown."""
    if image_processor is None:
        return None, "no image processor was given"
    if getattr(image_processor, "do_rescale", False) is not True:
        return None, "the image processor does not rescale pixels (do_rescale is not True)"
    factor = getattr(image_processor, "rescale_factor", None)
    if factor is None or not math.isclose(float(factor), 1 / 255, rel_tol=1e-6):
        return None, f"the image processor's rescale_factor is {factor}, not 1/255 (8-bit pixels)"
    if getattr(image_processor, "do_normalize", True) is False:
        return ([0.0], [1.0]), ""
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if mean is None or std is None:
        return None, "the image processor has no image_mean/image_std"
    return (mean, std), ""


def resolve_input_range(config: DFQConfig, image_processor: Any | None) -> tuple[DFQConfig, PixelNormalization | None]:
    """Resolves `config.input_range` (`"auto"` → `"pixels"` or `"calibrated"`) with the model's image processor.

    Args:
        config (`DFQConfig`): the run's config.
        image_processor (*optional*): the model's image processor.

    Returns:
        `tuple[DFQConfig, PixelNormalization | None]`: the config with a concrete `input_range`, and the
        normalisation the pixel grid is built from (`None` for `"calibrated"`).

    Example:

    ```python
    >>> resolve_input_range(DFQConfig(bits="w8a8"), None)[0].input_range
    'calibrated'
    ```
    """
    if config.input_range == "calibrated" or config.activation_bits is None:
        return config, None
    normalization, reason = pixel_normalization(image_processor)
    if normalization is None:
        if config.input_range == "pixels":
            raise ConfigError(
                f"DFQConfig(input_range='pixels') builds the image-input levels from the image processor, but "
                f"{reason}. Pass `image_processor=AutoImageProcessor.from_pretrained(<model>)` to quantize(), or use "
                "input_range='calibrated'."
            )
        logger.info("Image input quantized with a calibrated range: %s (input_range='auto').", reason)
        return dataclasses.replace(config, input_range="calibrated"), None
    return dataclasses.replace(config, input_range="pixels"), normalization


def input_quantizer(config: DFQConfig, channels: int, normalization: PixelNormalization | None) -> Quantizer:
    """The quantizer of the image input (site S2): the pixel grid, or a calibrated per-tensor range.

    A stored `"auto"` comes from a checkpoint written before `input_range` existed, when the input was calibrated.
    """
    if config.input_range != "pixels":
        return activation_quantizer(config, bits=config.input_bits)
    quantizer = PixelGridQuantizer(bits=config.input_bits, channels=channels)
    if normalization is not None:
        # transformers' image processors take one value for all channels (a number or a one-element list) too
        mean, std = (torch.as_tensor(v, dtype=torch.float32).flatten() for v in normalization)
        quantizer.set_normalization(*(t.expand(channels) if t.numel() == 1 else t for t in (mean, std)))
    return quantizer


def probs_quantizer(config: DFQConfig) -> Quantizer:
    kind = config.post_softmax_quantizer
    if kind == "uniform":  # probabilities: the range starts at an exact 0
        return build_quantizer("uniform", bits=config.activation_bits, observer=config.activation_range_observer,
                               percentiles=config.activation_percentiles, include_zero=True)
    if kind == "tanq":  # shape grid searched on A·V, no percentiles (quantizers/tanq.py)
        return build_quantizer("tanq", bits=config.activation_bits)
    return build_quantizer(kind, bits=config.activation_bits, percentiles=config.activation_percentiles)


def convert_model(
    model: nn.Module,
    config: DFQConfig,
    adapter: ModelAdapter,
    layernorm_consumers: dict[str, list[str]],
    input_normalization: PixelNormalization | None = None,
    activation_consumers: Sequence[str] = (),
) -> QuantizationPlan:
    """Replaces modules of `model` in place by their quantized twins (quantizers still uncalibrated).

    The patch-embedding `Conv2d` and every `nn.Linear` become [`QConv2d`] / [`QLinear`], the LayerNorms of
    `layernorm_consumers` become [`QLayerNorm`]s with an output quantizer (shared by the Linears that read it), and
    each attention module gets [`AttentionQuantizers`], which run once the model uses the quantized attention
    (`optimum_dfq.nn.use_quantized_attention`). With float activations (`bits="w4a16"`, ...) only weights get
    quantizers. Modules matching `config.modules_to_not_convert` stay float.

    Args:
        model (`PreTrainedModel`): the float model (a copy: it is modified).
        config (`DFQConfig`): bits and quantizer choices (`input_range` resolved, see [`resolve_input_range`]).
        adapter (`ModelAdapter`): the model family's structure.
        layernorm_consumers (`dict[str, list[str]]`): LayerNorm → consuming Linears, from
            [`find_layernorm_consumers`] on the float model; an empty dict gives every Linear its own input quantizer.
        input_normalization (`tuple[Sequence[float], Sequence[float]]`, *optional*): `(image_mean, image_std)` of
            the pixel-grid input quantizer (`input_range="pixels"`); `None` when the quantizer's parameters come from
            a checkpoint.
        activation_consumers (`Sequence[str]`, *optional*, defaults to `()`): Linears reading an activation
            function's output, from [`find_activation_consumers`] (or a checkpoint's plan); their input quantizers
            use `config.post_activation_range_observer`.

    Returns:
        `QuantizationPlan`: the LayerNorms actually quantized, the skipped modules and the activation consumers
        that got their own range estimator (`corrections` is left empty).

    Raises:
        `ConfigError`: when a module to convert has no registered quantized class (checked before anything is
            replaced, so the model is then left unchanged).

    Example:

    ```python
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq import DFQConfig
    >>> from optimum_dfq.calibration import convert_model
    >>> from optimum_dfq.models import find_layernorm_consumers, get_adapter
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> consumers = find_layernorm_consumers(model, torch.zeros(1, 3, 32, 32))
    >>> plan = convert_model(model, DFQConfig(bits="w4a4", input_range="calibrated"), get_adapter(model), consumers)
    >>> type(model.classifier).__name__, list(plan.layernorm_consumers)
    ('QLinear', ['vit.layers.0.layernorm_before', 'vit.layers.0.layernorm_after'])
    ```
    """
    plan = QuantizationPlan()
    skip = config.modules_to_not_convert
    quantize_activations = config.activation_bits is not None

    shared_inputs: set[str] = set()
    if quantize_activations:
        for norm_name, consumers in layernorm_consumers.items():
            if any(_matches(c, skip) for c in consumers) or _matches(norm_name, skip):
                logger.info("LayerNorm %s feeds a module kept in float; its consumers quantize their own input.",
                            norm_name)
                continue
            plan.layernorm_consumers[norm_name] = list(consumers)
            shared_inputs.update(consumers)

    # Every quantized class is looked up before the first module is replaced, so that an unsupported layer leaves
    # the model untouched.
    patch_embeddings = _with_quantized_class(adapter.patch_embeddings(model), skip, plan.skipped)
    linears = _with_quantized_class(adapter.linears(model), skip, plan.skipped)

    for name, module, qclass in patch_embeddings:
        input_q = input_quantizer(config, module.in_channels, input_normalization) if quantize_activations else None
        _set_submodule(model, name, qclass.from_float(module, weight_quantizer(config, module.out_channels), input_q,
                                                      name))

    for name, module, qclass in linears:
        input_q = None
        if quantize_activations and name not in shared_inputs:
            post_activation = name in activation_consumers
            input_q = activation_quantizer(config, post_activation=post_activation)
            if post_activation:
                plan.activation_consumers.append(name)
        _set_submodule(model, name, qclass.from_float(module, weight_quantizer(config, module.out_features), input_q,
                                                      name))

    per_channel = config.post_layernorm in ("per_channel_reparam", "per_channel")
    for norm_name in plan.layernorm_consumers:
        norm = model.get_submodule(norm_name)
        channels = norm.normalized_shape[-1] if per_channel else None
        _set_submodule(model, norm_name, QLayerNorm.from_float(norm, activation_quantizer(config, channels=channels),
                                                               norm_name))

    if quantize_activations and config.quantize_attention:
        for name, attention in adapter.attention_modules(model):
            if _matches(name, skip):
                plan.skipped.append(name)
                continue
            quantizers = AttentionQuantizers(
                query=activation_quantizer(config),
                key=activation_quantizer(config),
                probs=probs_quantizer(config),
                value=activation_quantizer(config),
                site=name,
            )
            setattr(attention, ATTENTION_QUANTIZERS_ATTR, quantizers)
    return plan
