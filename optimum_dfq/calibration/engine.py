"""The RepQ-ViT post-training quantization pipeline on a calibration set: convert → calibrate → re-parameterise."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import DFQConfig
from ..errors import CalibrationError
from ..models import find_layernorm_consumers, get_adapter
from ..nn import QModuleMixin, use_quantized_attention
from ..quantizers import Quantizer
from .convert import QuantizationPlan, convert_model
from .data import CalibrationSet
from .reparam import reparameterize_model

logger = logging.getLogger(__name__)


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """Every quantizer of a quantized model, with its module path."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module


def weight_quantizer_names(model: nn.Module) -> set[str]:
    return {name for name, _ in iter_quantizers(model) if name.endswith("weight_quantizer")}


def set_quantizer_modes(model: nn.Module, weights: str | None = None, activations: str | None = None) -> None:
    """Sets the mode (`"observe"`, `"calibrate"`, `"quantize"`, `"off"`) of weight and/or activation quantizers."""
    weight_names = weight_quantizer_names(model)
    for name, quantizer in iter_quantizers(model):
        mode = weights if name in weight_names else activations
        if mode is not None:
            quantizer.set_mode(mode)


@contextlib.contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[None]:
    """Runs the model in floating point (every quantizer off) inside the block, restoring the modes after."""
    saved = {name: q.mode for name, q in iter_quantizers(model)}
    set_quantizer_modes(model, weights="off", activations="off")
    try:
        yield
    finally:
        for name, quantizer in iter_quantizers(model):
            quantizer.set_mode(saved[name])


def calibrate_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, QModuleMixin):
            module.calibrate_weights()


@torch.no_grad()
def calibrate_activations(model: nn.Module, calibration: CalibrationSet, config: DFQConfig) -> None:
    """Calibrates every activation quantizer on the calibration images.

    `"sequential"` order runs the whole set in one forward pass, each quantizer calibrating when the data reaches
    it (so it sees the output of the already-quantized prefix). `"parallel"` observes all quantizers on the float
    activations in batches of `calibration_batch_size`, then calibrates them all.
    """
    activation_quantizers = [(n, q) for n, q in iter_quantizers(model) if n not in weight_quantizer_names(model)]
    if not activation_quantizers:
        return
    if config.calibration_order == "sequential":
        set_quantizer_modes(model, activations="calibrate")
        model(pixel_values=calibration.pixel_values)
    else:
        set_quantizer_modes(model, activations="observe")
        for batch in tqdm(calibration.batches(config.calibration_batch_size), desc="calibration", leave=False):
            model(pixel_values=batch)
        for _, quantizer in activation_quantizers:
            quantizer.calibrate()
    missed = [name for name, q in activation_quantizers if not bool(q.calibrated)]
    set_quantizer_modes(model, activations="quantize")
    if missed:
        raise CalibrationError(f"These quantizers received no calibration data: {missed}.")


def quantize_model(model: nn.Module, calibration: CalibrationSet, config: DFQConfig) -> tuple[nn.Module, QuantizationPlan]:
    """Quantizes `model` in place with the RepQ-ViT pipeline.

    1. find the LayerNorm → Linear pairs by dataflow; 2. swap in quantized modules (sites S1-S8);
    3. calibrate weights, then activations on `calibration`; 4. re-parameterise post-LayerNorm quantizers to per
    tensor (when `config.post_layernorm == "per_channel_reparam"`) and re-calibrate the changed weights.

    Args:
        model (`PreTrainedModel`): a float ViT/DeiT/Swin (modified in place; pass a copy).
        calibration (`CalibrationSet`): calibration images in the model's input space.
        config (`DFQConfig`): the run definition.

    Returns:
        `tuple[PreTrainedModel, QuantizationPlan]`
    """
    adapter = get_adapter(model)
    calibration.check_image_size(model)
    model.eval()
    use_quantized_attention(model)
    consumers = find_layernorm_consumers(model, calibration.pixel_values[:1])
    plan = convert_model(model, config, adapter, consumers)
    calibrate_weights(model)
    calibrate_activations(model, calibration, config)
    if config.post_layernorm == "per_channel_reparam":
        folded = reparameterize_model(model, plan.layernorm_consumers, config)
        logger.info("Re-parameterised %d post-LayerNorm quantizers to per-tensor.", folded)
    return model, plan
