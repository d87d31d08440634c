"""Random structure priors for SARDFQ's Attention Priors Alignment: 2-D Gaussian mixtures on a token grid.

SARDFQ's abstract says only that the priors are "randomly generated structure attention priors"; third-party notes on
the paper add that they are Gaussian-mixture maps, one per head, with `K_APA = 5`. The construction here is our
interpretation (the paper's sampler is not public): per map, a component count uniform in `1..max_components`,
means uniform over the grid, isotropic standard deviations uniform in `sigma_range` patches (stated for a 14×14 grid
and scaled with the grid side; `covariance="diagonal"` draws one per axis, the library spec's other option), mixing
weights from a flat Dirichlet, evaluated at the token centres and normalised to sum 1, like an attention row.
"""

from __future__ import annotations

import torch

#: Covariance shapes of the mixture components.
COVARIANCES = ("isotropic", "diagonal")


def gaussian_mixture_maps(
    generator: torch.Generator,
    num_maps: int,
    grid: tuple[int, int],
    max_components: int = 5,
    sigma_range: tuple[float, float] = (1.0, 4.0),
    reference_grid: int = 14,
    covariance: str = "isotropic",
) -> torch.Tensor:
    """Draws `num_maps` random Gaussian-mixture maps on a `rows × cols` grid.

    Args:
        generator (`torch.Generator`): the image's prior stream.
        num_maps (`int`): how many maps (e.g. windows × heads).
        grid (`tuple[int, int]`): `(rows, cols)` of tokens.
        max_components (`int`): SARDFQ's `K_APA` (5).
        sigma_range (`tuple[float, float]`): component standard deviations, in patches of a `reference_grid` grid.
        reference_grid (`int`): the grid side `sigma_range` refers to (14 = 224 px / 16 px patches).
        covariance (`str`, *optional*, defaults to `"isotropic"`): `"isotropic"` (one standard deviation per
            component: round blobs) or `"diagonal"` (one per axis, drawn independently: axis-aligned ellipses).

    Returns:
        `torch.Tensor`: `[num_maps, rows · cols]`, each row non-negative and summing to 1.

    Example:
        >>> maps = gaussian_mixture_maps(torch.Generator().manual_seed(0), 3, (4, 4))
        >>> maps.shape, bool(torch.allclose(maps.sum(-1), torch.ones(3)))
        (torch.Size([3, 16]), True)
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance={covariance!r} must be one of {list(COVARIANCES)}.")
    rows, cols = grid
    scale = max(rows, cols) / reference_grid
    counts = torch.randint(1, max_components + 1, (num_maps, 1), generator=generator)
    means = torch.rand(num_maps, max_components, 2, generator=generator) * torch.tensor([rows - 1, cols - 1])
    low, high = sigma_range
    axes = (2,) if covariance == "diagonal" else ()
    sigmas = (low + (high - low) * torch.rand(num_maps, max_components, *axes, generator=generator)) * scale
    gamma = -torch.log(torch.rand(num_maps, max_components, generator=generator).clamp_min(1e-12))
    gamma = gamma * (torch.arange(max_components)[None] < counts)
    weights = gamma / gamma.sum(dim=1, keepdim=True).clamp_min(1e-12)
    ys, xs = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                            indexing="ij")
    positions = torch.stack([ys.flatten(), xs.flatten()], dim=-1)
    offsets = (positions[None, None] - means[:, :, None]).square()  # [maps, components, tokens, 2]
    if covariance == "diagonal":
        variance = sigmas.square()[:, :, None, :]  # one per axis
        density = torch.exp(-(offsets / (2 * variance)).sum(-1)) / (2 * torch.pi * variance.prod(-1).sqrt())
    else:
        variance = sigmas.square()[:, :, None]
        density = torch.exp(-offsets.sum(-1) / (2 * variance)) / (2 * torch.pi * variance)
    maps = (weights[:, :, None] * density).sum(dim=1)
    return maps / maps.sum(dim=-1, keepdim=True).clamp_min(1e-30)
