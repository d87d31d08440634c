"""Exceptions raised by optimum_dfq.

Every error names the problem and what the user can do about it. They all derive from
[`DFQError`] (itself a `ValueError`), so callers can catch one type.
"""

from __future__ import annotations


class DFQError(ValueError):
    """Base class of every error raised on bad input by optimum_dfq."""


class BitPresetError(DFQError):
    """An unknown or ill-formed bit preset such as `"w4a"` or `"w9a9"`."""


class UnsupportedArchitectureError(DFQError):
    """The model is not one of the supported vision-transformer classes."""


class ImageSizeError(DFQError):
    """Calibration or evaluation images do not have the size the model accepts."""


class CalibrationError(DFQError):
    """The calibration set is empty, malformed, or produced non-finite activations."""


class ConfigError(DFQError):
    """A `DFQConfig` field, recipe key or value is wrong."""


class SynthesisError(DFQError):
    """Image synthesis failed (unknown synthesizer, non-finite loss, ...)."""


class CheckpointError(DFQError):
    """A quantized checkpoint is corrupt, incomplete, or was written by a newer format; or the float checkpoint to
    quantize is unreadable or lacks weights (such as its classifier)."""
