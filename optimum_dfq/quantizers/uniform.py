"""Uniform affine quantizer (asymmetric or symmetric, per tensor or per channel)."""

from __future__ import annotations

import torch

from ..errors import CalibrationError, DFQError
from .base import Quantizer
from .stats import check_percentiles, tail_quantiles


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Rounds to the nearest integer in the forward pass and passes the gradient through unchanged.

    The result equals `torch.round(x)`, but its gradient with respect to `x` is the identity (the straight-through
    estimator), so losses on rounded values can still train what produced `x`.

    Args:
        x (`torch.Tensor`): values to round, of any shape.

    Returns:
        `torch.Tensor`: `torch.round(x)`, with the same shape and dtype as `x`.

    Example:

    ```python
    >>> import torch
    >>> from optimum_dfq.quantizers import round_ste
    >>> x = torch.tensor([0.4, 1.6], requires_grad=True)
    >>> y = round_ste(x)
    >>> y.tolist()
    [0.0, 2.0]
    >>> y.sum().backward(); x.grad.tolist()  # torch.round alone would give zero gradients
    [1.0, 1.0]
    ```
    """
    return x + (torch.round(x) - x).detach()


_MIN_SCALE = 1e-8

class UniformQuantizer(Quantizer):
    """Uniform affine fake-quantizer: `q = clamp(round(x / s) + z, 0, 2^b - 1)`, `x̂ = (q - z) · s`.

    Codes are always unsigned `0 .. 2^b - 1`; a symmetric quantizer is the special case `z = 2^(b-1)` (signed
    range `-2^(b-1) .. 2^(b-1) - 1`), which keeps packing identical for both.

    Args:
        bits (`int`): bit width.
        channels (`int`, *optional*): number of channels for per-channel quantization; `None` = per tensor.
        axis (`int`, defaults to -1): the channel axis of the tensors this quantizer sees (0 for weights).
        symmetric (`bool`, defaults to `False`): zero point fixed at `2^(b-1)`, range from the absolute maximum
            (PSAQ-ViT's weight quantizer: `s = max|w| / ((2^b - 1) / 2)`).
        observer (`str`, defaults to `"percentile_mse"`): `"percentile_mse"` (RepQ-ViT: among the candidate
            percentiles keep the range with the smallest quantization MSE) or `"minmax"`.
        percentiles (`list[float]` or `tuple[float, ...]`, defaults to `(0.999, 0.9999, 0.99999)`): candidate upper
            percentiles, each in `(0.5, 1]` (lower = `1 - p`), for `"percentile_mse"`.
        include_zero (`bool`, defaults to `False`): every candidate range contains 0 (so 0 is exactly representable
            and the zero point lies in the code range, as integer runtimes require). Used for post-softmax
            probabilities, whose lower percentiles are otherwise small positive numbers.

    Raises:
        `ValueError`: when `bits` is outside 1..16, `observer` is unknown, or `percentiles` is empty or holds a value
            outside `(0.5, 1]`.

    Example:
        >>> q = UniformQuantizer(bits=4, observer="minmax")
        >>> q.set_mode("observe"); _ = q(torch.linspace(-1, 1, 100)); q.calibrate(); q.set_mode("quantize")
        >>> q.levels().numel()
        16
    """

    kind = "uniform"

    def __init__(
        self,
        bits: int,
        channels: int | None = None,
        axis: int = -1,
        symmetric: bool = False,
        observer: str = "percentile_mse",
        percentiles: list[float] | tuple[float, ...] = (0.999, 0.9999, 0.99999),
        include_zero: bool = False,
    ) -> None:
        super().__init__(bits)
        self.include_zero = include_zero
        if observer not in ("percentile_mse", "minmax"):
            raise ValueError(f"Unknown observer {observer!r}; expected 'percentile_mse' or 'minmax'.")
        self.channels = channels
        self.axis = axis
        self.symmetric = symmetric
        self.observer = observer
        self.percentiles = check_percentiles(percentiles, type(self).__name__)
        shape = () if channels is None else (channels,)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))

    @property
    def per_channel(self) -> bool:
        return self.channels is not None

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    # ------------------------------------------------------------------ parameters
    def _broadcast(self, p: torch.Tensor, x: torch.Tensor, axis: int | None = None) -> torch.Tensor:
        if not self.per_channel:
            return p
        shape = [1] * x.dim()
        shape[self.axis if axis is None else axis] = -1
        return p.view(shape)

    def _params_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A constant channel (lo == hi, e.g. a LayerNorm output with gamma = 0) would get the floor scale 1e-8 and a
        # zero point of -lo * 1e8, which wrecks layer-wise statistics of zero points (RepQ-ViT's scale selectors);
        # its range is widened to include 0 instead, which represents the constant exactly.
        degenerate = (hi - lo) <= _MIN_SCALE * self.qmax
        if self.include_zero or bool(degenerate.any()):
            widen = torch.ones_like(degenerate) if self.include_zero else degenerate
            lo = torch.where(widen, torch.clamp(lo, max=0), lo)
            hi = torch.where(widen, torch.clamp(hi, min=0), hi)
        if self.symmetric:
            bound = torch.maximum(lo.abs(), hi.abs())
            scale = (bound / (self.qmax / 2)).clamp(min=_MIN_SCALE)
            zero_point = torch.full_like(scale, float(2 ** (self.bits - 1)))
        else:
            scale = ((hi - lo) / self.qmax).clamp(min=_MIN_SCALE)
            zero_point = torch.round(-lo / scale)
        return scale, zero_point

    def _quant_dequant(
        self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None
    ) -> torch.Tensor:
        scale, zero_point = self._broadcast(scale, x, axis), self._broadcast(zero_point, x, axis)
        if not (x.requires_grad or scale.requires_grad):  # in-place fast path (calibration searches, inference)
            q = x / scale
            return q.round_().add_(zero_point).clamp_(0, self.qmax).sub_(zero_point).mul_(scale)
        q = torch.clamp(round_ste(x / scale) + zero_point, 0, self.qmax)
        return (q - zero_point) * scale

    def _calibrate_from(self, observed: list[torch.Tensor]) -> None:
        if self.per_channel:
            data = torch.cat([t.movedim(self.axis, -1).reshape(-1, t.shape[self.axis]) for t in observed]).t()
            if data.shape[0] != self.channels:
                raise CalibrationError(
                    f"Quantizer at {self.site} expects {self.channels} channels on axis {self.axis}, "
                    f"got {data.shape[0]}."
                )
            reduce_dim: int | None = -1
        else:
            data = torch.cat([t.reshape(-1) for t in observed])
            reduce_dim = None
        data = data.float()
        if self.observer == "minmax":
            lo = data.amin(dim=reduce_dim) if reduce_dim is not None else data.min()
            hi = data.amax(dim=reduce_dim) if reduce_dim is not None else data.max()
            lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
            scale, zero_point = self._params_from_range(lo, hi)
        else:
            scale, zero_point = self._search(data, reduce_dim)
        self.scale = scale.to(self.scale.dtype).reshape(self.scale.shape).clone()
        self.zero_point = zero_point.to(self.zero_point.dtype).reshape(self.zero_point.shape).clone()

    def _search(self, data: torch.Tensor, reduce_dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        upper, lower = tail_quantiles(data, self.percentiles, dim=reduce_dim)
        best_err = best_scale = best_zero = None
        for hi, lo in zip(upper, lower):
            scale, zero_point = self._params_from_range(lo, hi)
            # `data` is [channels, samples] here, so the channel axis is 0
            err = (data - self._quant_dequant(data, scale, zero_point, axis=0)).pow(2)
            err = err.mean(dim=reduce_dim) if reduce_dim is not None else err.mean()
            if best_err is None:
                best_err, best_scale, best_zero = err, scale, zero_point
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, scale, best_scale)
                best_zero = torch.where(better, zero_point, best_zero)
        return best_scale, best_zero

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Sets calibrated parameters directly (used by re-parameterisation and checkpoint loading)."""
        self.scale = scale.detach().to(self.scale.dtype).reshape(self.scale.shape).clone()
        self.zero_point = zero_point.detach().to(self.zero_point.dtype).reshape(self.zero_point.shape).clone()
        self.calibrated.fill_(True)

    # ------------------------------------------------------------------ quantize
    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_dequant(x, self.scale.to(x.dtype), self.zero_point.to(x.dtype))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes `0 .. 2^b - 1` of `x` (the values that packing stores).

        Raises:
            `DFQError`: when the zero point is not an integer (re-parameterised with `round_zero_point=False`):
                integer codes could not represent `round(x / s) + z`.
        """
        if not torch.equal(self.zero_point, self.zero_point.round()):
            raise DFQError(
                f"Quantizer at {self.site or type(self).__name__} has a fractional zero point, so it has no integer "
                "codes; only quantizers with integer zero points (weights, or activations re-parameterised with "
                "round_zero_point=True) can be packed or exported as codes."
            )
        scale, zero_point = self._broadcast(self.scale, x), self._broadcast(self.zero_point, x)
        return torch.clamp(torch.round(x / scale) + zero_point, 0, self.qmax).to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Inverse of [`codes`]."""
        scale, zero_point = self._broadcast(self.scale, codes), self._broadcast(self.zero_point, codes)
        return (codes.to(scale.dtype) - zero_point) * scale

    def levels(self) -> torch.Tensor:
        codes = torch.arange(self.qmax + 1, dtype=self.scale.dtype, device=self.scale.device)
        if self.per_channel:
            return (codes[None, :] - self.zero_point[:, None]) * self.scale[:, None]
        return (codes - self.zero_point) * self.scale

    def extra_repr(self) -> str:
        granularity = f"per_channel({self.channels}, axis={self.axis})" if self.per_channel else "per_tensor"
        sym = "symmetric" if self.symmetric else "asymmetric"
        return f"{super().extra_repr()}, {granularity}, {sym}, observer={self.observer}"
