"""Fake-quantizer primitives and their registry (`kind` name → class)."""

from __future__ import annotations

from typing import Any

from .base import MODES, Quantizer
from .log import Log2Quantizer, LogSqrt2Quantizer
from .pixel import PixelGridQuantizer
from .stats import tail_quantiles
from .tanq import TanQuantizer, tanq_codebook
from .uniform import UniformQuantizer, round_ste

QUANTIZER_REGISTRY: dict[str, type[Quantizer]] = {}


def register_quantizer_kind(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator adding a quantizer to the registry under its `kind`."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no `kind` name.")
    QUANTIZER_REGISTRY[cls.kind] = cls
    return cls


for _cls in (UniformQuantizer, Log2Quantizer, LogSqrt2Quantizer, TanQuantizer, PixelGridQuantizer):
    register_quantizer_kind(_cls)


def build_quantizer(kind: str, **kwargs: Any) -> Quantizer:
    """Instantiates a registered quantizer by kind name.

    Args:
        kind (`str`): registry name, e.g. `"uniform"`, `"log2"`, `"log_sqrt2"`.
        kwargs: constructor arguments of that quantizer.

    Returns:
        `Quantizer`
    """
    try:
        cls = QUANTIZER_REGISTRY[kind]
    except KeyError:
        raise ValueError(f"Unknown quantizer kind {kind!r}; registered: {sorted(QUANTIZER_REGISTRY)}.") from None
    return cls(**kwargs)


__all__ = [
    "MODES",
    "QUANTIZER_REGISTRY",
    "Log2Quantizer",
    "LogSqrt2Quantizer",
    "PixelGridQuantizer",
    "Quantizer",
    "TanQuantizer",
    "UniformQuantizer",
    "build_quantizer",
    "register_quantizer_kind",
    "round_ste",
    "tail_quantiles",
    "tanq_codebook",
]
