"""Calibration: calibration sets, the conversion to quantized modules, calibration and re-parameterisation."""

from .convert import QuantizationPlan, convert_model, resolve_input_range
from .correction import (
    AffineCorrection,
    CorrectionRecord,
    RidgeCorrection,
    attach_corrections,
    correct_activations,
    fold_correction,
)
from .data import CalibrationSet, calibration_set_from_dataset, expected_image_shape
from .engine import calibrate_activations, calibrate_weights, quantize_model
from .modes import iter_quantizers, quantization_disabled, set_quantizer_modes
from .reconstruction import BlockReport, reconstruct_blocks
from .reparam import SCALE_SELECTOR_REGISTRY, register_scale_selector, reparameterize_layernorm, reparameterize_model
from .sites import ACTIVATION_SITES, activation_sites, linear_roles

__all__ = [
    "ACTIVATION_SITES",
    "SCALE_SELECTOR_REGISTRY",
    "AffineCorrection",
    "BlockReport",
    "CalibrationSet",
    "CorrectionRecord",
    "QuantizationPlan",
    "RidgeCorrection",
    "activation_sites",
    "attach_corrections",
    "calibrate_activations",
    "calibrate_weights",
    "calibration_set_from_dataset",
    "convert_model",
    "correct_activations",
    "expected_image_shape",
    "fold_correction",
    "iter_quantizers",
    "linear_roles",
    "quantization_disabled",
    "quantize_model",
    "reconstruct_blocks",
    "register_scale_selector",
    "reparameterize_layernorm",
    "reparameterize_model",
    "resolve_input_range",
    "set_quantizer_modes",
]
