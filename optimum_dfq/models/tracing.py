"""Dataflow tracing: which Linear layers read a LayerNorm's output.

RepQ-ViT re-parameterises a per-channel post-LayerNorm quantizer by folding scales into the LayerNorm's affine
parameters and into every Linear that consumes its output. We find those pairs by running one forward pass and
matching tensors, not names: a Linear consumes a LayerNorm's output when its input holds exactly the same values,
up to a permutation of token positions (Swin partitions and shifts windows in between; that is fine for a
per-channel fold). Padding or any arithmetic in between breaks the equality, and the pair is (correctly) not found.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _channel_signature(x: torch.Tensor) -> tuple[int, torch.Tensor]:
    flat = x.detach().reshape(-1, x.shape[-1]).double()
    return flat.shape[0], flat.sum(dim=0)


@torch.no_grad()
def find_layernorm_consumers(model: nn.Module, pixel_values: torch.Tensor) -> dict[str, list[str]]:
    """Maps each LayerNorm (by module name) to the Linear layers that read its output directly.

    Args:
        model (`nn.Module`): the float model.
        pixel_values (`torch.Tensor`): one small example batch (a single image is enough).

    Returns:
        `dict[str, list[str]]`: LayerNorm name → names of consuming Linears, in forward order; LayerNorms with no
        direct Linear consumer are absent.
    """
    norm_outputs: dict[str, torch.Tensor] = {}
    linear_inputs: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            handles.append(module.register_forward_hook(lambda m, i, o, n=name: norm_outputs.__setitem__(n, o)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(lambda m, i, n=name: linear_inputs.append((n, i[0]))))
    try:
        model(pixel_values=pixel_values)
    finally:
        for handle in handles:
            handle.remove()

    signatures = {name: _channel_signature(out) for name, out in norm_outputs.items()}
    consumers: dict[str, list[str]] = {}
    for linear_name, x in linear_inputs:
        rows, sums = _channel_signature(x)
        for norm_name, (norm_rows, norm_sums) in signatures.items():
            if rows != norm_rows or sums.shape != norm_sums.shape:
                continue
            if not torch.allclose(sums, norm_sums, rtol=1e-9, atol=1e-9):
                continue
            norm_out = norm_outputs[norm_name].reshape(-1)
            if torch.equal(torch.sort(norm_out).values, torch.sort(x.reshape(-1)).values):
                consumers.setdefault(norm_name, []).append(linear_name)
                break
    return consumers
