"""SARDFQ's Gaussian-mixture attention priors (optimum_dfq/synthesis/priors.py), recomputed from their definition."""

from __future__ import annotations

import math

import pytest
import torch

from optimum_dfq.synthesis.priors import gaussian_mixture_maps


def _reference_maps(generator, num_maps, rows, cols, max_components, sigma_range, reference_grid, covariance):
    """The module docstring's construction, one map and one component at a time in float64, from the same draws in
    the same order: counts uniform in 1..K, means uniform over the token centres' extent (row, col), standard
    deviations uniform in `sigma_range` scaled by the grid side / `reference_grid` (one per axis for "diagonal"),
    flat-Dirichlet mixing weights (normalised exponentials), densities of the normalised 2-D Gaussians at the token
    centres, each map normalised to sum 1."""
    counts = torch.randint(1, max_components + 1, (num_maps, 1), generator=generator)
    means = torch.rand(num_maps, max_components, 2, generator=generator)
    axes = (2,) if covariance == "diagonal" else ()
    sigma_draws = torch.rand(num_maps, max_components, *axes, generator=generator)
    uniforms = torch.rand(num_maps, max_components, generator=generator)
    low, high = sigma_range
    scale = max(rows, cols) / reference_grid
    maps = []
    for m in range(num_maps):
        count = int(counts[m])
        gammas = [-math.log(float(uniforms[m, k])) for k in range(count)]
        values = torch.zeros(rows, cols, dtype=torch.float64)
        for k in range(count):
            mean_row, mean_col = float(means[m, k, 0]) * (rows - 1), float(means[m, k, 1]) * (cols - 1)
            draw = sigma_draws[m, k].double().reshape(-1)
            sigma_row, sigma_col = (low + (high - low) * draw.expand(2)) * scale
            for r in range(rows):
                for c in range(cols):
                    exponent = (r - mean_row) ** 2 / (2 * sigma_row**2) + (c - mean_col) ** 2 / (2 * sigma_col**2)
                    density = math.exp(-exponent) / (2 * math.pi * sigma_row * sigma_col)
                    values[r, c] += gammas[k] / sum(gammas) * density
        maps.append((values / values.sum()).flatten())
    return torch.stack(maps)


@pytest.mark.parametrize("covariance", ["isotropic", "diagonal"])
def test_maps_are_the_documented_gaussian_mixtures_on_a_non_square_grid(covariance):
    # a 3 x 7 grid with sigma_range stated for a 5-token side: rows and columns, and the sigma scale (7 / 5), cannot
    # be confused without changing the maps
    options = {"max_components": 4, "sigma_range": (0.5, 2.0), "reference_grid": 5, "covariance": covariance}
    maps = gaussian_mixture_maps(torch.Generator().manual_seed(3), 12, (3, 7), **options)
    expected = _reference_maps(torch.Generator().manual_seed(3), 12, 3, 7, **options)
    torch.testing.assert_close(maps.double(), expected, rtol=1e-5, atol=1e-7)


def test_means_are_uniform_over_the_token_centres():
    # one narrow component per map: its peak token is the token nearest its mean
    maps = gaussian_mixture_maps(torch.Generator().manual_seed(0), 600, (3, 9), max_components=1,
                                 sigma_range=(0.3, 0.3), reference_grid=9)
    peaks = maps.argmax(-1)
    rows, cols = (peaks // 9).bincount(minlength=3) / 600, (peaks % 9).bincount(minlength=9) / 600
    # means uniform on [0, rows - 1] x [0, cols - 1]: the border tokens get half the share of the inner ones
    torch.testing.assert_close(rows, torch.tensor([0.25, 0.5, 0.25]), atol=0.06, rtol=0)
    torch.testing.assert_close(cols, torch.tensor([0.5, 1, 1, 1, 1, 1, 1, 1, 0.5]) / 8, atol=0.04, rtol=0)
