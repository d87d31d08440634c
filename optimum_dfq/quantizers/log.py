"""Logarithmic quantizers for post-softmax attention probabilities (non-negative inputs)."""

from __future__ import annotations

import math

import torch

from .base import Quantizer
from .stats import check_percentiles, tail_quantiles


class _LogQuantizer(Quantizer):
    """Shared calibration of log quantizers: the scale Δ is the candidate upper percentile with the smallest MSE."""

    def __init__(self, bits: int, percentiles: list[float] | tuple[float, ...] = (0.999, 0.9999, 0.99999)) -> None:
        super().__init__(bits)
        self.percentiles = check_percentiles(percentiles, type(self).__name__, above=0.0)
        self.register_buffer("scale", torch.ones(()))

    def _calibrate_from(self, observed: list[torch.Tensor]) -> None:
        data = torch.cat([t.reshape(-1) for t in observed]).float()
        upper, _ = tail_quantiles(data, self.percentiles)
        best_err, best_scale = None, None
        for candidate in upper:
            scale = candidate.clamp(min=1e-8)
            err = (data - self._quant_dequant(data, scale)).pow(2).mean()
            if best_err is None or err < best_err:
                best_err, best_scale = err, scale
        self.scale = best_scale.reshape(()).clone()

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_dequant(x, self.scale.to(x.dtype))

    def _quant_dequant(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def log2_level(exponent: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The log2 level `Δ · 2^-k` of exponents `k` (the one formula of the quantizer and of its ONNX lowering)."""
    return scale * torch.pow(2.0, -exponent)


def log_sqrt2_level(k: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The log-√2 level `Δ · 2^-ceil(k/2) · (√2 if k is odd else 1)` of exponents `k` (quantizer and ONNX lowering)."""
    odd = (k % 2) * (math.sqrt(2) - 1) + 1
    return torch.pow(2.0, -1 * torch.ceil(k / 2)) * odd * scale


class Log2Quantizer(_LogQuantizer):
    """Log2 quantizer of non-negative values such as attention probabilities.

    `q = clamp(round(-log2(a / Δ)), 0, 2^b - 1)` and `â = Δ · 2^-q` (FQ-ViT / I&S-ViT notation). The codebook has
    exactly `2^b` values `Δ · 2^-k`, `k = 0 .. 2^b - 1`: values above Δ saturate to Δ and zero maps to the smallest
    level. Negative inputs are not supported (their logarithm is NaN, and so is their output).

    Calibration sets the scale Δ to the upper percentile of the observed values, among `percentiles`, whose
    quantization has the smallest mean squared error.

    Args:
        bits (`int`): bit width, 1..16.
        percentiles (`list[float]` or `tuple[float, ...]`, defaults to `(0.999, 0.9999, 0.99999)`): candidate
            upper percentiles for Δ, each in `(0, 1]`.

    Raises:
        `ValueError`: when `bits` is outside 1..16, or `percentiles` is empty or holds a value outside `(0, 1]`.

    Example:

    ```python
    >>> import torch
    >>> from optimum_dfq.quantizers import Log2Quantizer
    >>> q = Log2Quantizer(bits=3)
    >>> q.set_mode("calibrate")  # calibrate on the first input, then quantize
    >>> q(torch.linspace(0, 1, 1000)).unique().numel()  # 2^3 levels
    8
    >>> q.mode, q.levels().numel()
    ('quantize', 8)
    ```
    """

    kind = "log2"

    def _quant_dequant(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        exponent = torch.round(-torch.log2(x / scale))
        exponent = torch.clamp(exponent, 0, 2**self.bits - 1)
        return log2_level(exponent, scale)

    def levels(self) -> torch.Tensor:
        k = torch.arange(2**self.bits, dtype=self.scale.dtype, device=self.scale.device)
        return torch.sort(self.scale * torch.pow(2.0, -k)).values


class LogSqrt2Quantizer(_LogQuantizer):
    """Log-√2 quantizer of RepQ-ViT's post-softmax activations, reproduced exactly.

    `k = round(-2 · log2(a / Δ))`; if `k ≥ 2^b` the output is exactly 0, otherwise `k = clamp(k, 0, 2^b - 1)` and
    `â = Δ · 2^-ceil(k/2) · (√2 if k is odd else 1)` (= `Δ · 2^(-k/2)`). The codebook is therefore
    `{Δ · 2^(-k/2), k = 0 .. 2^b - 1} ∪ {0}`: **2^b + 1 values**, the extra exact zero needing a reserved code in an
    integer kernel. [`levels`] returns all of them.

    Calibration and inputs are as in [`Log2Quantizer`]: Δ is the candidate upper percentile with the smallest mean
    squared error, and inputs must be non-negative.

    Args:
        bits (`int`): bit width, 1..16.
        percentiles (`list[float]` or `tuple[float, ...]`, defaults to `(0.999, 0.9999, 0.99999)`): candidate
            upper percentiles for Δ, each in `(0, 1]`.

    Raises:
        `ValueError`: when `bits` is outside 1..16, or `percentiles` is empty or holds a value outside `(0, 1]`.

    Example:

    ```python
    >>> import torch
    >>> from optimum_dfq.quantizers import LogSqrt2Quantizer
    >>> q = LogSqrt2Quantizer(bits=3)
    >>> q.set_mode("calibrate")  # calibrate on the first input, then quantize
    >>> q(torch.linspace(0, 1, 1000)).unique().numel()  # 2^3 levels plus an exact zero
    9
    >>> q.levels().numel(), q.levels().min().item()
    (9, 0.0)
    ```
    """

    kind = "log_sqrt2"

    def _quant_dequant(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        k = torch.round(-1 * torch.log2(x / scale) * 2)
        underflow = k >= 2**self.bits
        k = torch.clamp(k, 0, 2**self.bits - 1)
        out = log_sqrt2_level(k, scale)
        return torch.where(underflow, torch.zeros_like(out), out)

    def levels(self) -> torch.Tensor:
        k = torch.arange(2**self.bits, dtype=self.scale.dtype, device=self.scale.device)
        odd = (k % 2) * (math.sqrt(2) - 1) + 1
        values = torch.pow(2.0, -torch.ceil(k / 2)) * odd * self.scale
        return torch.sort(torch.cat([values, values.new_zeros(1)])).values
