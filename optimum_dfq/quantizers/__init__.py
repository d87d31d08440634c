"""Fake-quantizer primitives and their registry (`kind` name → class)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..registry import qualified_name, register_unique
from .base import MODES, Quantizer
from .log import Log2Quantizer, LogSqrt2Quantizer
from .pixel import PixelGridQuantizer
from .stats import tail_quantiles
from .tanq import TanQuantizer, tanq_codebook
from .uniform import UniformQuantizer, round_ste

QUANTIZER_REGISTRY: dict[str, type[Quantizer]] = {}


def register_quantizer_kind(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator that adds a quantizer class to [`QUANTIZER_REGISTRY`] under its `kind` name.

    A `kind` already taken by another class is refused: remove it from [`QUANTIZER_REGISTRY`] first to replace it.
    A class with the same module and qualified name (a module reloaded, a notebook cell re-run) replaces itself.

    Args:
        cls (`type[Quantizer]`): a [`Quantizer`] subclass with a non-empty `kind` class attribute.

    Returns:
        `type[Quantizer]`: `cls` itself, unchanged.

    Raises:
        `ConfigError`: when `cls.kind` is empty or already registered to another class.

    Example:

    ```python
    >>> from optimum_dfq.quantizers import QUANTIZER_REGISTRY, UniformQuantizer, build_quantizer
    >>> from optimum_dfq.quantizers import register_quantizer_kind
    >>> @register_quantizer_kind
    ... class MinMaxQuantizer(UniformQuantizer):
    ...     kind = "uniform_minmax"
    ...     def __init__(self, bits: int, **kwargs) -> None:
    ...         super().__init__(bits, observer="minmax", **kwargs)
    >>> build_quantizer("uniform_minmax", bits=4).observer
    'minmax'
    >>> del QUANTIZER_REGISTRY["uniform_minmax"]  # unregister again
    ```
    """
    if not cls.kind:
        raise ConfigError(f"{cls.__name__} has no `kind` name; set the class attribute `kind = \"...\"`.")
    register_unique(QUANTIZER_REGISTRY, cls.kind, cls, lambda existing: ConfigError(
        f"Quantizer kind {cls.kind!r} is already registered to {qualified_name(existing)}; "
        f"choose another kind, or `del QUANTIZER_REGISTRY[{cls.kind!r}]` first to replace it."
    ))
    return cls


for _cls in (UniformQuantizer, Log2Quantizer, LogSqrt2Quantizer, TanQuantizer, PixelGridQuantizer):
    register_quantizer_kind(_cls)


def build_quantizer(kind: str, **kwargs: Any) -> Quantizer:
    """Instantiates a registered quantizer from its kind name.

    Args:
        kind (`str`): registry name: `"uniform"`, `"log2"`, `"log_sqrt2"`, `"tanq"`, `"pixel_grid"`, or one added
            with [`register_quantizer_kind`].
        kwargs (`Any`, *optional*): keyword arguments passed to that class's constructor (e.g. `bits`).

    Returns:
        `Quantizer`: a new, uncalibrated quantizer in `"quantize"` mode.

    Raises:
        `ConfigError`: when `kind` is not registered (the message lists the registered kinds).

    Example:

    ```python
    >>> from optimum_dfq.quantizers import build_quantizer
    >>> q = build_quantizer("log_sqrt2", bits=4)
    >>> type(q).__name__, q.mode, bool(q.calibrated)
    ('LogSqrt2Quantizer', 'quantize', False)
    >>> q.levels().numel()  # 2^4 levels plus an exact zero
    17
    ```
    """
    try:
        cls = QUANTIZER_REGISTRY[kind]
    except KeyError:
        raise ConfigError(f"Unknown quantizer kind {kind!r}; registered: {sorted(QUANTIZER_REGISTRY)}.") from None
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
