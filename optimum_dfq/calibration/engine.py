"""The RepQ-ViT post-training quantization pipeline on a calibration set: convert → calibrate → re-parameterise."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils.logging import is_progress_bar_enabled

from ..config import DFQConfig
from ..errors import CalibrationError, ConfigError
from ..models import find_quantization_consumers, get_adapter
from ..models.adapters import window_sizes_kept
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
    """(Re-)calibrates the weight quantizer of every quantized module of `model` from its current float weight.

    Each weight quantizer forgets its old parameters, observes the weight, calibrates and is left in `"quantize"`
    mode (or `"off"` if it was off). Modules without a weight quantizer ([`QLayerNorm`]) are skipped.

    Args:
        model (`nn.Module`): a model converted by [`convert_model`] (weights not frozen yet).

    Raises:
        `DFQError`: when a module's weight is frozen to integer codes (e.g. a model returned by
            `DataFreeViTQuantizer.quantize`).

    Example:

    ```python
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq import DFQConfig
    >>> from optimum_dfq.calibration import calibrate_weights, convert_model, iter_quantizers
    >>> from optimum_dfq.models import get_adapter
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> plan = convert_model(model, DFQConfig(bits="w4a4"), get_adapter(model), layernorm_consumers={})
    >>> calibrate_weights(model)
    >>> sum(bool(q.calibrated) for name, q in iter_quantizers(model) if name.endswith("weight_quantizer"))
    8
    ```
    """
    for module in model.modules():
        if isinstance(module, QModuleMixin):
            module.calibrate_weights()


@torch.no_grad()
def calibrate_activations(model: nn.Module, calibration: CalibrationSet, config: DFQConfig) -> None:
    """Calibrates every activation quantizer of a converted model on the calibration images.

    `"sequential"` order runs the whole set in one forward pass, each quantizer calibrating when the data reaches
    it (so it sees the output of the already-quantized prefix). `"parallel"` runs batches of
    `calibration_batch_size` with every activation quantizer only observing (passing its input through), then
    calibrates them all; weight quantizers keep their mode, so after [`calibrate_weights`] the observed activations
    are those of the weight-quantized model. Afterwards every activation quantizer is in `"quantize"` mode. Does
    nothing when the model has no activation quantizer (e.g. `bits="w4a16"`).

    Args:
        model (`nn.Module`): a model converted by [`convert_model`], its weight quantizers calibrated and its
            attention switched to the quantized implementation (`optimum_dfq.nn.use_quantized_attention`), so that
            the attention quantizers receive data.
        calibration (`CalibrationSet`): the calibration images.
        config (`DFQConfig`): `calibration_order` and `calibration_batch_size` are read.

    Raises:
        `CalibrationError`: when some activation quantizers received no data (their names are listed).

    Example:

    ```python
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq import DFQConfig
    >>> from optimum_dfq.calibration import CalibrationSet, calibrate_activations, calibrate_weights, convert_model
    >>> from optimum_dfq.calibration import iter_quantizers
    >>> from optimum_dfq.models import get_adapter
    >>> from optimum_dfq.nn import use_quantized_attention
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> config = DFQConfig(bits="w4a4")
    >>> plan = convert_model(model.eval(), config, get_adapter(model), layernorm_consumers={})
    >>> calibrate_weights(model)
    >>> previous = use_quantized_attention(model)
    >>> calibrate_activations(model, CalibrationSet(pixel_values=torch.randn(4, 3, 32, 32)), config)
    >>> all(bool(q.calibrated) for _, q in iter_quantizers(model))
    True
    ```
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
        for batch in tqdm(calibration.batches(config.calibration_batch_size), desc="calibration", leave=False,
                          disable=not is_progress_bar_enabled()):
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
        input_normalization (`tuple[Sequence[float], Sequence[float]]`, *optional*): `(image_mean, image_std)`,
            needed when `config.input_range == "pixels"` (the second item returned by [`resolve_input_range`]).

    Returns:
        `tuple[PreTrainedModel, QuantizationPlan]`: `model` itself (fake-quantized, weights still float: unlike
        `DataFreeViTQuantizer.quantize` nothing is frozen and no `hf_quantizer` is attached) and the plan of what
        was converted.

    Raises:
        `ConfigError`: when `input_range="pixels"` and activations are quantized but no `input_normalization` is
            given, or when a layer to quantize has no registered quantized class.
        `UnsupportedArchitectureError`: when `model` is not a supported ViT/DeiT/Swin class.
        `ImageSizeError`: when the calibration images do not match the model's input size.
        `CalibrationError`: when some activation quantizer receives no calibration data.

    Example:

    ```python
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq import DFQConfig
    >>> from optimum_dfq.calibration import CalibrationSet, quantize_model
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> calibration = CalibrationSet(pixel_values=torch.randn(4, 3, 32, 32))
    >>> qmodel, plan = quantize_model(model, calibration, DFQConfig(bits="w4a4", input_range="calibrated"))
    >>> qmodel is model, type(model.classifier).__name__, plan.activation_consumers
    (True, 'QLinear', ['vit.layers.0.mlp.fc2'])
    ```
    """
    if config.input_range == "pixels" and input_normalization is None and config.activation_bits is not None:
        raise ConfigError(
            "input_range='pixels' needs the image processor's normalisation; resolve the config with "
            "resolve_input_range(config, image_processor) and pass its normalisation as input_normalization."
        )
    adapter = get_adapter(model)
    calibration.check_image_size(model)
    # transformers' Swin blocks shrink their window in place on a native-size forward pass; calibration must not
    # leave that behind (the model would predict otherwise than its reloaded checkpoint on larger inputs)
    with window_sizes_kept(model):
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
