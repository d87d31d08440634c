"""The quantizer base class: explicit observe → calibrate → fake-quantize life cycle.

A quantizer never initialises itself lazily from the first tensor it happens to see (a RepQ-ViT pitfall: a warm-up
batch silently fixes the ranges). Its `mode` says what `forward` does:

* `"observe"`: record the input, return it unchanged (float network);
* `"calibrate"`: record the input, calibrate at once, switch to `"quantize"` and return the quantized input
  (sequential calibration: every quantizer sees the output of the already-quantized prefix, as RepQ-ViT does with
  its whole calibration batch);
* `"quantize"`: fake-quantize (straight-through gradient);
* `"off"`: identity.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from ..errors import CalibrationError

MODES = ("observe", "calibrate", "quantize", "off")


class Quantizer(nn.Module, ABC):
    """Base class of fake-quantizers, with an explicit observe → calibrate → quantize life cycle.

    The `mode` attribute says what `forward` does with its input:

    * `"observe"`: stores a detached copy of the input and returns the input unchanged;
    * `"calibrate"`: stores the input, calls [`calibrate`] at once, switches the mode to `"quantize"` and returns the
      quantized input;
    * `"quantize"` (the mode of a new quantizer): returns `fake_quant(x)`, with a straight-through gradient when `x`
      requires grad; raises `CalibrationError` if the quantizer is not calibrated yet;
    * `"off"`: returns the input unchanged, calibrated or not.

    [`calibrate`] turns the stored observations into parameters and sets the `calibrated` buffer, but does not change
    the mode: after observing, call `set_mode("quantize")` yourself. [`reset`] drops the observations and clears
    `calibrated`, also without changing the mode. Subclasses implement [`fake_quant`], [`levels`] and
    [`_calibrate_from`]; they keep their parameters in registered buffers, so they travel with `state_dict()`.

    Args:
        bits (`int`): bit width, 1..16 (the library uses 2..8 for weights and activations, 8 for the image input).

    Attributes:
        kind (`str`): class-level registry name (see [`register_quantizer_kind`]); empty on the base class.
        mode (`str`): one of `"observe"`, `"calibrate"`, `"quantize"`, `"off"`; change it with [`set_mode`].
        site (`str`): human-readable location in the model, set by the module that owns the quantizer (used in
            error messages); empty until then.
        calibrated (`torch.Tensor`): boolean buffer, `True` once parameters have been computed or set.

    Raises:
        `ValueError`: when `bits` is outside 1..16.

    Example:

    ```python
    >>> import torch
    >>> from optimum_dfq.quantizers import UniformQuantizer
    >>> q, x = UniformQuantizer(bits=2, observer="minmax"), torch.linspace(0, 1, 9)
    >>> q.set_mode("observe"); torch.equal(q(x), x)  # observing leaves the input unchanged
    True
    >>> q.calibrate(); q.mode, bool(q.calibrated)  # calibrating does not switch the mode
    ('observe', True)
    >>> q.set_mode("quantize"); q(x).unique().numel()  # 2 bits: at most 4 distinct values
    4
    ```
    """

    kind: ClassVar[str] = ""

    def __init__(self, bits: int) -> None:
        super().__init__()
        if not 1 <= bits <= 16:
            raise ValueError(f"Quantizer bits must be in 1..16, got {bits}.")
        self.bits = bits
        self.mode = "quantize"
        self.site = ""  # human-readable location, set by the module that owns the quantizer
        self._observed: list[torch.Tensor] = []
        self.register_buffer("calibrated", torch.tensor(False), persistent=True)

    # ------------------------------------------------------------------ life cycle
    def set_mode(self, mode: str) -> None:
        """Sets `mode` to `"observe"`, `"calibrate"`, `"quantize"` or `"off"`; raises `ValueError` otherwise."""
        if mode not in MODES:
            raise ValueError(f"Unknown quantizer mode {mode!r}; expected one of {MODES}.")
        self.mode = mode

    def observe(self, x: torch.Tensor) -> None:
        """Records a copy of a tensor for calibration (detached); raises `CalibrationError` if it holds NaN or inf.

        A copy, so that changing the tensor in place afterwards (before `calibrate()`) does not change what was
        observed, and an observed view does not keep its whole base tensor alive.
        """
        x = x.detach()
        # amax/amin propagate NaN and expose inf without materialising a boolean mask
        if x.numel() and not (torch.isfinite(x.amax()) and torch.isfinite(x.amin())):
            bad = int((~torch.isfinite(x)).sum())
            raise CalibrationError(
                f"{bad} non-finite value(s) (NaN/inf) reached the quantizer at {self.site or type(self).__name__} "
                "during calibration. Check the calibration images (they must be finite and normalised like the "
                "model's training inputs) and that the float model itself produces finite outputs."
            )
        self._observed.append(x.clone())

    @property
    def num_observed(self) -> int:
        """Number of elements recorded since the last [`calibrate`] or [`reset`]."""
        return sum(t.numel() for t in self._observed)

    def calibrate(self) -> None:
        """Computes the quantization parameters from everything observed so far, then forgets the observations.

        Sets `calibrated` but leaves `mode` unchanged. Raises `CalibrationError` when nothing was observed.
        """
        if not self._observed:
            raise CalibrationError(
                f"Quantizer at {self.site or type(self).__name__} has observed nothing: calibrate() needs at least "
                "one calibration batch to flow through this part of the model."
            )
        observed = self._observed
        self._observed = []
        self._calibrate_from(observed)
        self.calibrated.fill_(True)

    def reset(self) -> None:
        """Drops observations and marks the quantizer uncalibrated (the mode and parameter values are kept)."""
        self._observed = []
        self.calibrated.fill_(False)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self.observe(x)
            return x
        if self.mode == "calibrate":
            self.observe(x)
            self.calibrate()
            self.mode = "quantize"
        elif not bool(self.calibrated):
            raise CalibrationError(
                f"Quantizer at {self.site or type(self).__name__} is used before calibrate(); run the calibration "
                "step (DataFreeViTQuantizer.quantize does this) before inference."
            )
        quantized = self.fake_quant(x)
        if x.requires_grad:
            return x + (quantized - x).detach()  # straight-through estimator
        return quantized

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def _calibrate_from(self, observed: list[torch.Tensor]) -> None:
        """Sets the quantization parameters from the observed tensors."""

    @abstractmethod
    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize `x` with the calibrated parameters."""

    @abstractmethod
    def levels(self) -> torch.Tensor:
        """Every value the quantizer can output: `[num_levels]`, or `[channels, num_levels]` per channel."""

    def extra_repr(self) -> str:
        return f"kind={self.kind}, bits={self.bits}, mode={self.mode}"
