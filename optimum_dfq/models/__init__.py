"""Supported architectures: adapters and dataflow tracing."""

from .adapters import ADAPTERS, ModelAdapter, get_adapter
from .tracing import find_activation_consumers, find_layernorm_consumers, find_quantization_consumers

__all__ = [
    "ADAPTERS",
    "ModelAdapter",
    "find_activation_consumers",
    "find_layernorm_consumers",
    "find_quantization_consumers",
    "get_adapter",
]
