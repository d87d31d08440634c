"""TanQ: a tangent-compander quantizer for post-softmax attention probabilities (DopQ-ViT).

**OUR INTERPRETATION, unverified.** DopQ-ViT (arXiv 2408.03291) names a "tangent quantizer" that gives fine steps
both near 0 (where most probabilities lie) and near 1 (the few large, important ones), but its exact mapping could
not be read. This module implements the design proposed in the library's research spec (sections 3.4 and 10.3):

* compander `g(a) = tan(θ(a))` with `θ(a) = h · (a - c)` on `a ∈ [0, 1]`, renormalised to `u ∈ [0, 1]` over
  `[g(0), g(1)]`; `u` is quantized uniformly with `2^b` levels and mapped back with `arctan`;
* centre `c` (the coarsest point) and curvature `κ`: `h = κ · (π/2) / max(c, 1 - c)`, so the farther end reaches
  `±κπ/2`. With `c = 1/2` this is the spec's symmetric form `tan(κπ(a - 1/2)) / tan(κπ/2)`; for `c ≠ 1/2` it is the
  spec's asymmetric form `tan(κ'π(a - c))` with `κ' = κ / (2 max(c, 1 - c))`. Parameterising by `κ` keeps every
  point of the grid valid (the spec's `κ'` must satisfy `κ' · max(c, 1 - c) < 1/2`, or `tan` wraps around).
* level density ∝ `sec²(θ(a))`: densest at both ends, `0` and `1` are always levels, the codebook has exactly `2^b`
  values (an inference kernel dequantizes through a `2^b`-entry look-up table, [`TanQuantizer.levels`]). The end
  farther from `c` gets the finer steps: `c > 1/2` favours small probabilities, `c < 1/2` those near 1.

Calibration: `(κ, c)` is chosen per layer by grid search (κ ∈ {0.5, 0.6, 0.7, 0.8, 0.9, 0.95} as proposed;
c ∈ {0.1, ..., 0.9}, wider than the proposed {0.1, ..., 0.5}, see `DEFAULT_CENTRES`), minimising the error of the
attention output `‖(A - Â) V‖²` over the observed probabilities `A` and the values `V` they multiply. The attention
function hands `V` to the quantizer (see [`TanQuantizer.observe_value`]). When no `V` was observed (the quantizer
used on its own), the search minimises the probability MSE `‖A - Â‖²` instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import CalibrationError
from .base import Quantizer

#: Curvatures searched by default (spec 10.3).
DEFAULT_KAPPAS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
#: Centres searched by default; 0.5 is the symmetric form. The spec proposes c ∈ {0.1, ..., 0.5}, but c < 1/2 only
#: moves resolution towards 1; attention probabilities mostly sit near 1/N, where c > 1/2 helps (see
#: `benchmarks/post_softmax_quantizers.py`), so both sides are searched.
DEFAULT_CENTRES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _slope(kappa: float, centre: float) -> float:
    return kappa * (math.pi / 2) / max(centre, 1.0 - centre)


def tanq_codebook(bits: int, kappa: float, centre: float = 0.5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The `2^b` output values of a TanQ quantizer, ascending, from exactly 0 to exactly 1.

    Args:
        bits (`int`): bit width.
        kappa (`float`): curvature in `(0, 1)`; larger = more levels at the ends.
        centre (`float`, defaults to 0.5): the coarsest point `c ∈ (0, 1)`; 0.5 = symmetric.
        dtype (`torch.dtype`): dtype of the result.

    Returns:
        `torch.Tensor`: `[2^bits]` levels.

    Example:
        >>> [round(v, 4) for v in tanq_codebook(3, 0.9).tolist()]
        [0.0, 0.0216, 0.0696, 0.2404, 0.7596, 0.9304, 0.9784, 1.0]
    """
    _check_shape(kappa, centre)
    slope = _slope(kappa, centre)
    low, high = math.tan(-slope * centre), math.tan(slope * (1.0 - centre))
    u = torch.linspace(0.0, 1.0, 2**bits, dtype=torch.float64)
    levels = centre + torch.atan(low + u * (high - low)) / slope
    levels[0], levels[-1] = 0.0, 1.0  # exact ends (arctan round-off otherwise leaves ~1e-17)
    return levels.to(dtype)


def _check_shape(kappa: float, centre: float) -> None:
    if not 0.0 < kappa < 1.0:
        raise ValueError(f"TanQ curvature kappa must be in (0, 1), got {kappa}.")
    if not 0.0 < centre < 1.0:
        raise ValueError(f"TanQ centre must be in (0, 1), got {centre}.")


class TanQuantizer(Quantizer):
    """TanQ post-softmax quantizer (DopQ-ViT) — **our interpretation**, see the module docstring.

    `â = levels[round(u(a) · (2^b - 1))]` with `u(a) = (tan(h(a - c)) - tan(-hc)) / (tan(h(1 - c)) - tan(-hc))`,
    `h = κ(π/2) / max(c, 1 - c)`; inputs are clamped to `[0, 1]`.

    Args:
        bits (`int`): bit width (`2^bits` levels).
        kappas (`Sequence[float]`): candidate curvatures of the calibration search, each in `(0, 1)`.
        centres (`Sequence[float]`): candidate centres, each in `(0, 1)`; `(0.5,)` = symmetric TanQ only.
        max_search_elements (`int`): the search uses at most about this many probabilities (batch entries evenly
            spaced over every observed call, so that a calibration set sorted by difficulty, as `dfq-vit` returns
            it, is sampled over its whole range), to bound its cost on large models.

    Example:
        >>> q = TanQuantizer(bits=3, kappas=[0.9], centres=[0.5])
        >>> q.set_mode("observe"); _ = q(torch.softmax(torch.randn(4, 8, 8), -1)); q.calibrate()
        >>> [round(v, 4) for v in q.levels().tolist()]
        [0.0, 0.0216, 0.0696, 0.2404, 0.7596, 0.9304, 0.9784, 1.0]
    """

    kind = "tanq"
    #: The attention function passes V to quantizers with this flag (see `AttentionQuantizers.quantize_probs`).
    observes_value = True

    def __init__(
        self,
        bits: int,
        kappas: Sequence[float] = DEFAULT_KAPPAS,
        centres: Sequence[float] = DEFAULT_CENTRES,
        max_search_elements: int = 2**22,
    ) -> None:
        super().__init__(bits)
        if not kappas or not centres:
            raise ValueError("TanQuantizer needs at least one candidate kappa and one centre.")
        for kappa in kappas:
            for centre in centres:
                _check_shape(kappa, centre)
        self.kappas, self.centres = [float(k) for k in kappas], [float(c) for c in centres]
        self.max_search_elements = int(max_search_elements)
        self._observed_values: list[torch.Tensor] = []
        self.register_buffer("kappa", torch.tensor(self.kappas[-1]))
        self.register_buffer("centre", torch.tensor(0.5 if 0.5 in self.centres else self.centres[-1]))

    # ------------------------------------------------------------------ observation of V
    def observe_value(self, value: torch.Tensor) -> None:
        """Records the `V` that the next observed probabilities multiply (`[..., keys, head_dim]`).

        Calibration then minimises the error of `A·V` instead of that of the probabilities: either every observed
        probability tensor has its `V`, or none has; `calibrate()` raises `CalibrationError` when they do not pair up.
        A copy is kept, as in [`~Quantizer.observe`].
        """
        self._observed_values.append(value.detach().clone())

    def reset(self) -> None:
        super().reset()
        self._observed_values = []

    # ------------------------------------------------------------------ codebook
    def _transform(self, x: torch.Tensor, kappa: float, centre: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes of `x` and the codebook, for one shape `(kappa, centre)`."""
        slope = _slope(kappa, centre)
        low, high = math.tan(-slope * centre), math.tan(slope * (1.0 - centre))
        compressed = (torch.tan(slope * (x.float().clamp(0.0, 1.0) - centre)) - low) / (high - low)
        codes = torch.round(compressed.clamp(0.0, 1.0) * (2**self.bits - 1)).long()
        return codes, tanq_codebook(self.bits, kappa, centre, dtype=torch.float32).to(x.device)

    def _quant_dequant(self, x: torch.Tensor, kappa: float, centre: float) -> torch.Tensor:
        codes, levels = self._transform(x, kappa, centre)
        # NaN has no code (it casts to the int64 minimum): it stays NaN, as in the other quantizers
        nan = torch.isnan(x)
        return torch.where(nan, x, levels[codes.masked_fill(nan, 0)].to(x.dtype))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_dequant(x, float(self.kappa), float(self.centre))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes `0 .. 2^b - 1` of `x` (indices into [`levels`])."""
        return self._transform(x, float(self.kappa), float(self.centre))[0].to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Look-up-table dequantization: `levels()[codes]`."""
        return self.levels()[codes.long()]

    def levels(self) -> torch.Tensor:
        return tanq_codebook(self.bits, float(self.kappa), float(self.centre), dtype=torch.float32).to(
            self.kappa.device
        )

    # ------------------------------------------------------------------ calibration
    def _search_pairs(self, observed: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        values = self._observed_values
        self._observed_values = []
        paired = len(values) == len(observed) and all(
            v.shape[:-2] == a.shape[:-2] and v.shape[-2] == a.shape[-1] for a, v in zip(observed, values)
        )
        if values and not paired:  # without any V the probability error is the objective; a wrong V is a bug
            shapes = f"{[list(a.shape) for a in observed]} and {[list(v.shape) for v in values]}"
            raise CalibrationError(
                f"Quantizer at {self.site or type(self).__name__} observed {len(observed)} probability tensor(s) and "
                f"{len(values)} V tensor(s) that do not pair up (shapes {shapes}; each V must be `[..., keys, "
                "head_dim]` for probabilities `[..., queries, keys]`). Pass each call's V with observe_value() "
                "before its probabilities, or none at all to calibrate on the probability error."
            )
        total = sum(a.numel() for a in observed)
        keep = min(1.0, self.max_search_elements / max(total, 1))
        pairs = []
        for i, probs in enumerate(observed):
            count = probs.shape[0]
            rows = max(1, math.ceil(count * keep)) if probs.dim() > 1 else count
            # Evenly spaced entries, not the leading ones: the leading images of a difficulty-sorted set are its
            # easiest (DFQ-ViT's easy-to-hard order), and Swin's leading windows are those of the first images.
            index = (torch.arange(rows, device=probs.device) * count) // rows
            value = values[i][index].float() if paired else None
            pairs.append((probs[index].float(), value))
        return pairs

    def _calibrate_from(self, observed: list[torch.Tensor]) -> None:
        pairs = self._search_pairs(observed)
        best = None
        for kappa in self.kappas:
            for centre in self.centres:
                err = 0.0
                for probs, value in pairs:
                    diff = probs - self._quant_dequant(probs, kappa, centre)
                    err += float((diff @ value).pow(2).sum() if value is not None else diff.pow(2).sum())
                if best is None or err < best[0]:
                    best = (err, kappa, centre)
        self.kappa.fill_(best[1])
        self.centre.fill_(best[2])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kappa={float(self.kappa):.3g}, centre={float(self.centre):.3g}"
