"""Quantized modules (`QLinear`, `QConv2d`, `QLayerNorm`) and quantized eager attention."""

from .attention import (
    ATTENTION_IMPLEMENTATION,
    SAVED_ATTENTION_IMPLEMENTATION,
    AttentionQuantizers,
    AttentionRecord,
    capture_attention,
    dfq_attention_forward,
    register_attention_implementation,
    use_quantized_attention,
)
from .modules import QConv2d, QLayerNorm, QLinear
from .qmodule import QModuleMixin, qmodule_class_for, quantized_class_for, register_qmodule, unregister_qmodule

__all__ = [
    "ATTENTION_IMPLEMENTATION",
    "SAVED_ATTENTION_IMPLEMENTATION",
    "AttentionQuantizers",
    "AttentionRecord",
    "QConv2d",
    "QLayerNorm",
    "QLinear",
    "QModuleMixin",
    "capture_attention",
    "dfq_attention_forward",
    "qmodule_class_for",
    "quantized_class_for",
    "register_attention_implementation",
    "register_qmodule",
    "unregister_qmodule",
    "use_quantized_attention",
]
