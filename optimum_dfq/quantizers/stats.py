"""Order statistics for range estimation.

`torch.quantile` refuses inputs above 2**24 elements (and reference code then falls back to a slow NumPy path).
Range searches only need the tails of a distribution, so [`tail_quantiles`] reads them from one `topk` per side,
which has no size limit and costs O(n) per call. Interpolation is linear between order statistics, the same
convention as `torch.quantile(..., interpolation="linear")`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _order_statistics(x: torch.Tensor, positions: Sequence[float], largest: bool) -> list[torch.Tensor]:
    """Values at fractional ascending positions measured from the top (largest) or bottom end of the last dim."""
    n = x.shape[-1]
    depth = max(positions)  # distance from the chosen end, in elements
    k = min(n, math.floor(depth) + 2)
    tail = torch.topk(x, k, dim=-1, largest=largest, sorted=True).values
    out = []
    for distance in positions:
        low = math.floor(distance)
        high = min(low + 1, k - 1)
        frac = distance - low
        a, b = tail[..., low], tail[..., high]
        out.append(a + (b - a) * frac)
    return out


def check_percentiles(percentiles: Sequence[float], owner: str, above: float = 0.5) -> list[float]:
    """`percentiles` as a list of floats; raises `ValueError` unless it is non-empty with every value in (`above`, 1].

    Quantizers that also use the lower percentiles `1 - p` need `above=0.5`; those that use the upper ones only,
    `above=0`.
    """
    values = [float(p) for p in percentiles]
    if not values or not all(above < p <= 1.0 for p in values):  # `not all(...)` also refuses NaN
        raise ValueError(f"{owner} percentiles={list(percentiles)!r} must be a non-empty list of values in "
                         f"({above:g}, 1].")
    return values


def tail_quantiles(
    x: torch.Tensor, percentiles: Sequence[float], dim: int | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Upper `p` and lower `1 - p` quantiles of `x` for every `p` in `percentiles`.

    Args:
        x (`torch.Tensor`): any shape; any number of elements.
        percentiles (`Sequence[float]`): values in (0.5, 1].
        dim (`int`, *optional*): reduce along this dim (per-channel); `None` reduces over all elements.

    Returns:
        `tuple[list[Tensor], list[Tensor]]`: `(upper, lower)`, each a list aligned with `percentiles`.

    Example:
        >>> x = torch.arange(101.0)
        >>> upper, lower = tail_quantiles(x, [0.99])
        >>> float(upper[0]), float(lower[0])
        (99.0, 1.0)
    """
    if dim is None:
        x = x.reshape(-1)
    else:
        x = x.movedim(dim, -1)
    x = x.float()
    n = x.shape[-1]
    if n == 0:
        raise ValueError("tail_quantiles() needs a non-empty tensor.")
    # Ascending position of quantile p is p*(n-1); distance from the top end is (1-p)*(n-1).
    distances = [(1.0 - p) * (n - 1) for p in percentiles]
    upper = _order_statistics(x, distances, largest=True)
    lower = _order_statistics(x, distances, largest=False)
    return upper, lower
