"""Calibration: calibration sets, the conversion to quantized modules, calibration and re-parameterisation."""

from .convert import QuantizationPlan, convert_model
from .data import CalibrationSet, calibration_set_from_dataset, expected_image_shape
from .engine import (
    calibrate_activations,
    calibrate_weights,
    iter_quantizers,
    quantization_disabled,
    quantize_model,
    set_quantizer_modes,
)
from .reparam import SCALE_SELECTOR_REGISTRY, register_scale_selector, reparameterize_layernorm, reparameterize_model

__all__ = [
    "SCALE_SELECTOR_REGISTRY",
    "CalibrationSet",
    "QuantizationPlan",
    "calibrate_activations",
    "calibrate_weights",
    "calibration_set_from_dataset",
    "convert_model",
    "expected_image_shape",
    "iter_quantizers",
    "quantization_disabled",
    "quantize_model",
    "register_scale_selector",
    "reparameterize_layernorm",
    "reparameterize_model",
    "set_quantizer_modes",
]
