"""The RepQ-ViT post-training quantization pipeline on a calibration set: convert → calibrate → re-parameterise."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import DFQConfig
from ..errors import CalibrationError, ConfigError
from ..models import find_quantization_consumers, get_adapter
from ..nn import QModuleMixin, use_quantized_attention
from .capture import capture_module_inputs
from .convert import PixelNormalization, QuantizationPlan, convert_model
from .correction import correct_activations, correction_layout
from .data import CalibrationSet
from .modes import iter_quantizers, set_quantizer_modes, weight_quantizer_names
from .reconstruction import reconstruct_blocks
from .reparam import reparameterize_model, selector_needs_context

#: LayerNorm-output rows per LayerNorm kept for measuring scale selectors (`"search"`).
SELECTOR_ROWS = 1024

logger = logging.getLogger(__name__)


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
    weight_names = weight_quantizer_names(model)
    activation_quantizers = [(n, q) for n, q in iter_quantizers(model) if n not in weight_names]
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


def quantize_model(
    model: nn.Module,
    calibration: CalibrationSet,
    config: DFQConfig,
    input_normalization: PixelNormalization | None = None,
) -> tuple[nn.Module, QuantizationPlan]:
    """Quantizes `model` in place with the RepQ-ViT pipeline.

    1. find the LayerNorm → Linear pairs by dataflow; 2. swap in quantized modules (sites S1-S8);
    3. calibrate weights, then activations on `calibration`; 4. re-parameterise post-LayerNorm quantizers to per
    tensor (when `config.post_layernorm == "per_channel_reparam"`) and re-calibrate the changed weights;
    5. activation correction (`config.correction`); 6. block reconstruction (`config.reconstruction`).

    Correction runs before reconstruction: folding a correction re-calibrates the consumer's weight quantizer, which
    would re-round (partly undo) reconstructed weights, whereas reconstruction keeps every quantizer frozen and only
    refines what the correction left. Both use as float reference a copy of the model taken after step 4 with every
    quantizer off: re-parameterisation keeps the float function, and the copy shares the re-parameterised
    coordinates of the LayerNorm outputs that the corrections act on.

    Args:
        model (`PreTrainedModel`): a float ViT/DeiT/Swin (modified in place; pass a copy).
        calibration (`CalibrationSet`): calibration images in the model's input space.
        config (`DFQConfig`): the run definition (`input_range` resolved, see [`resolve_input_range`]).
        input_normalization (*optional*): `(image_mean, image_std)` for `input_range="pixels"`.

    Returns:
        `tuple[PreTrainedModel, QuantizationPlan]`
    """
    if config.input_range == "pixels" and input_normalization is None and config.activation_bits is not None:
        raise ConfigError(
            "input_range='pixels' needs the image processor's normalisation; resolve the config with "
            "resolve_input_range(config, image_processor) and pass its normalisation as input_normalization."
        )
    adapter = get_adapter(model)
    calibration.check_image_size(model)
    model.eval()
    use_quantized_attention(model)
    layernorm_consumers, activation_consumers = find_quantization_consumers(model, calibration.pixel_values[:1])
    if not activation_consumers and config.activation_bits is not None:
        logger.warning("No Linear reads an activation-function module's output, so no input gets the "
                       "post-activation range estimator (%s); check the model's MLP.",
                       config.post_activation_range_observer)
    plan = convert_model(model, config, adapter, layernorm_consumers, input_normalization,
                         activation_consumers=activation_consumers)
    calibrate_weights(model)
    calibrate_activations(model, calibration, config)
    if config.post_layernorm == "per_channel_reparam":
        activations = None
        if selector_needs_context(config.scale_selector):
            activations = capture_layernorm_outputs(model, plan, calibration, config)
        folded = reparameterize_model(model, plan.layernorm_consumers, config, activations=activations)
        logger.info("Re-parameterised %d post-LayerNorm quantizers to per-tensor.", folded)
    if config.correction or config.reconstruction:
        float_model = float_reference(model)
        plan.corrections = correction_layout(correct_activations(model, float_model, calibration, config))
        reconstruct_blocks(model, float_model, calibration, config)
    return model, plan


def float_reference(model: nn.Module) -> nn.Module:
    """A copy of a quantized model with every quantizer off: its float function, in the same coordinates."""
    reference = copy.deepcopy(model)
    set_quantizer_modes(reference, weights="off", activations="off")
    return reference


def capture_layernorm_outputs(
    model: nn.Module, plan: QuantizationPlan, calibration: CalibrationSet, config: DFQConfig
) -> dict[str, torch.Tensor]:
    """Float outputs (inputs of their output quantizers) of the quantized LayerNorms on the calibration images,
    about `SELECTOR_ROWS` rows each, for measuring scale selectors."""
    quantizers = {name: model.get_submodule(name).output_quantizer for name in plan.layernorm_consumers}
    return capture_module_inputs(model, quantizers, calibration.batches(config.calibration_batch_size), SELECTOR_ROWS)
