"""Patch-similarity entropy (PSAQ-ViT): differential entropy of a Gaussian KDE of the cosine similarities of tokens.

The KDE is evaluated exactly as in PSAQ-ViT's `utils/kde.py` (Gaussian kernel, mean over all `N²` similarity
entries including the diagonal), with exact rewrites for speed: the symmetric matrix is read once (the strict
upper triangle counts twice, the diagonal once); kernel exponents below -50 are clamped before `exp` (those kernel
values are below 2e-22, far under the `1e-4` added to the density, and float32 `exp` of very negative numbers is slow
because it produces denormals); and the kernel sum has a hand-written backward that needs only the kernel values,
computed in place, so a single `[groups, points, pairs]` buffer is allocated per call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_CUTOFF = math.sqrt(50.0)
_TRIU_CACHE: dict[tuple[int, str], torch.Tensor] = {}


class _GaussianKernelSum(torch.autograd.Function):
    """`S[g, p] = Σ_m exp(-(x[g, p] - t[g, m])²)` for pre-scaled points `x` (constant) and samples `t`.

    The backward uses `Σ_p g_p k_pm (x_p - t_m) = (Σ_p g_p x_p k_pm) - t_m (Σ_p g_p k_pm)`: one batched matmul over
    the saved kernel values, with no saved differences.
    """

    @staticmethod
    def forward(ctx, points: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        kernel = points.unsqueeze(-1) - samples.unsqueeze(1)
        kernel.clamp_(-_CUTOFF, _CUTOFF)
        torch.addcmul(kernel.new_zeros(()), kernel, kernel, value=-1.0, out=kernel).exp_()
        ctx.save_for_backward(points, samples, kernel)
        return kernel.sum(-1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        points, samples, kernel = ctx.saved_tensors
        grad_output = grad_output.to(kernel.dtype)
        weights = torch.stack([grad_output * points, grad_output], dim=1)
        moments = torch.bmm(weights, kernel)
        return None, (moments[:, 0] - samples * moments[:, 1]).mul_(2.0)


def _upper_triangle(size: int, device: torch.device) -> torch.Tensor:
    """Flat indices of the strict upper triangle of a `size × size` matrix (gathered: its backward is a cheap
    scatter-add, unlike advanced indexing's accumulating index_put)."""
    key = (size, str(device))
    if key not in _TRIU_CACHE:
        rows, cols = torch.triu_indices(size, size, offset=1, device=device)
        _TRIU_CACHE[key] = rows * size + cols
    return _TRIU_CACHE[key]


def patch_similarity_entropy(
    tokens: torch.Tensor, bandwidth: float = 0.01, num_points: int = 10, floor: float = 1e-4
) -> torch.Tensor:
    """Differential entropy of the distribution of pairwise cosine similarities of `tokens`, per group.

    For each group (an image, or a window of an image) the `N × N` cosine similarities `Γ` are smoothed with a
    Gaussian KDE of bandwidth `bandwidth`, evaluated at `num_points` points evenly spaced between the group's own
    minimum and maximum of `Γ` (PSAQ-ViT spans the whole batch's min/max; a per-group grid keeps an image's loss
    independent of its batch-mates), `floor` is added, and `∫ -p log p` is integrated with the trapezoid rule.

    Args:
        tokens (`torch.Tensor`): `[groups, N, dim]`.
        bandwidth (`float`): kernel bandwidth (PSAQ-ViT: 0.01).
        num_points (`int`): evaluation points (PSAQ-ViT: 10).
        floor (`float`): added to the density before the entropy (PSAQ-ViT: 1e-4).

    Returns:
        `torch.Tensor`: `[groups]` entropies (differentiable w.r.t. `tokens`).

    Example:
        >>> patch_similarity_entropy(torch.randn(2, 16, 8)).shape
        torch.Size([2])
    """
    groups, size, _ = tokens.shape
    unit = F.normalize(tokens.float(), dim=-1, eps=1e-8)
    sims = torch.bmm(unit, unit.transpose(1, 2))
    upper = _upper_triangle(size, tokens.device)
    off_diagonal = sims.reshape(groups, size * size).gather(1, upper.expand(groups, -1))
    diagonal = sims.diagonal(dim1=1, dim2=2)
    flat = sims.detach().reshape(groups, -1)
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    grid = low + (high - low) * torch.linspace(0, 1, num_points, device=tokens.device)
    scale = 1.0 / (math.sqrt(2.0) * bandwidth)
    points = grid * scale
    kernel_sum = 2.0 * _GaussianKernelSum.apply(points, off_diagonal * scale) + _GaussianKernelSum.apply(
        points, diagonal * scale
    )
    density = kernel_sum / (size * size * math.sqrt(2 * math.pi) * bandwidth) + floor
    return torch.trapezoid(-density * torch.log(density), grid, dim=-1)
