"""optimum_dfq: data-free low-bit quantization of Hugging Face vision transformers (ViT, DeiT, Swin).

Importing the package registers the `"optimum_dfq"` attention implementation and the `"optimum_dfq"` quantization
method with transformers, so that `AutoModelForImageClassification.from_pretrained` loads quantized checkpoints.
"""

from .bundled_recipes import list_recipes
from .calibration import CalibrationSet
from .config import BIT_PRESETS, DFQConfig, parse_bits
from .errors import (
    BitPresetError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    DFQError,
    ImageSizeError,
    SynthesisError,
    UnsupportedArchitectureError,
)
from .integrations.transformers import register_quantization_method
from .nn import capture_attention, register_attention_implementation
from .quantizer import DataFreeViTQuantizer
from .synthesis import get_synthesizer, register_synthesizer
from .version import FORMAT_VERSION, __version__

register_attention_implementation()
register_quantization_method()

__all__ = [
    "BIT_PRESETS",
    "FORMAT_VERSION",
    "BitPresetError",
    "CalibrationError",
    "CalibrationSet",
    "CheckpointError",
    "ConfigError",
    "DFQConfig",
    "DFQError",
    "DataFreeViTQuantizer",
    "ImageSizeError",
    "SynthesisError",
    "UnsupportedArchitectureError",
    "__version__",
    "capture_attention",
    "get_synthesizer",
    "list_recipes",
    "parse_bits",
    "register_synthesizer",
]
