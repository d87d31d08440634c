"""Where each attention token lies in the image, and how a token map moves when the image is rolled and flipped.

SARDFQ's attention priors say where in the *image* an image's attention should go, but the synthesis engine rolls
and flips every image at every step (PSAQ-ViT's augmentation). For a prior to keep describing the same image
content, it must be rolled and flipped with the image before it is compared with the attention of the augmented
input. That needs, for every attention module, the image position of each token it attends over: for ViT/DeiT the
patch grid; for Swin the stage's grid, cut into (possibly cyclically shifted) windows.

The positions are found by probing, not by re-implementing each model's window partition: one forward pass in which
every LayerNorm inside a transformer block outputs its token's raster index instead of normalised features, with a
pre-hook on each attention module reading which index arrived at each (window, token) slot. Padding (Swin pads a
stage's grid to a multiple of the window) shows up as slots without an index; they hold no image content, so a moved
prior puts no mass there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration.data import expected_image_shape
from ..errors import SynthesisError
from ..models.adapters import ModelAdapter
from .features import AttentionSite


@dataclass(frozen=True)
class TokenGrid:
    """The token grid of one attention module, in the frame of the (un-augmented) image.

    Attributes:
        rows (`int`), cols (`int`): the module's token grid (patch tokens only).
        positions (`torch.Tensor`): `[windows, tokens]` long, the raster index (`row · cols + col`) of each token
            the attention priors cover, in the module's window and token order: the patch tokens for global attention
            (prefix tokens excluded), every token of every window for windowed attention; -1 for a padding slot.
        pixels (`tuple[int, int]`): image pixels per token, `(height, width)`.
    """

    rows: int
    cols: int
    positions: torch.Tensor
    pixels: tuple[int, int]


@torch.no_grad()
def probe_token_grids(model: nn.Module, adapter: ModelAdapter, sites: list[AttentionSite]) -> dict[int, TokenGrid]:
    """Finds the image position of every token of every attention module (see the module docstring).

    Args:
        model (`PreTrainedModel`): a supported ViT, DeiT or Swin model (frozen, in eval mode).
        adapter (`ModelAdapter`): its adapter.
        sites (`list[AttentionSite]`): its attention modules ([`probe_attention_sites`]).

    Returns:
        `dict[int, TokenGrid]`: attention-site index → its grid.

    Raises:
        `SynthesisError`: if a module's tokens do not tile the image exactly once (a token missing or repeated, a
            grid that does not divide the image, or tokens that are not the patch scaled by a whole factor, as when
            the image is no whole number of patches), so that a token map cannot follow a roll or flip of the image.

    Example:

    ```python
    >>> from transformers import SwinConfig, SwinForImageClassification
    >>> from optimum_dfq.models import get_adapter
    >>> from optimum_dfq.synthesis import probe_token_grids
    >>> from optimum_dfq.synthesis.features import probe_attention_sites
    >>> model = SwinForImageClassification(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2],
    ...                                               num_heads=[2], window_size=4, num_labels=10)).eval()
    >>> adapter = get_adapter(model)
    >>> grids = probe_token_grids(model, adapter, probe_attention_sites(model, adapter))
    >>> grid = grids[1]  # the shifted-window block: 8x8 tokens of 4x4 pixels, windows of 4x4 tokens shifted by 2
    >>> grid.rows, grid.cols, grid.pixels, grid.positions.shape, grid.positions[0, :3].tolist()
    (8, 8, (4, 4), torch.Size([4, 16]), [18, 19, 20])
    ```
    """
    arrived: dict[int, torch.Tensor] = {}
    handles = []
    for _, block in adapter.blocks(model):
        for norm in block.modules():
            if isinstance(norm, nn.LayerNorm):
                handles.append(norm.register_forward_hook(_emit_raster_index))
    for site in sites:
        handles.append(site.module.register_forward_pre_hook(_record_arrivals(arrived, site.index), with_kwargs=True))
    shape = expected_image_shape(model)
    parameter = next(model.parameters())
    try:
        model(pixel_values=torch.zeros(1, *shape, device=parameter.device, dtype=parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()
    prefix = 0 if adapter.windowed else adapter.num_prefix_tokens
    patch = adapter.patch_size(model)
    return {site.index: _grid(site, arrived, prefix, shape[1:], patch) for site in sites}


_DIGIT = 256  # every integer up to 256 is exact in float16 and bfloat16 too


def _emit_raster_index(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Token `t` of the sequence → channels `(t // 256 + 1, t % 256)`, zeros elsewhere (padding stays all-zero)."""
    marked = torch.zeros_like(output)
    index = torch.arange(output.shape[-2], device=output.device)
    marked[..., 0] = (index // _DIGIT + 1).to(output.dtype)
    marked[..., 1] = (index % _DIGIT).to(output.dtype)
    return marked


def _record_arrivals(arrived: dict[int, torch.Tensor], index: int):
    def hook(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).float().round().long().cpu()
        high, low = hidden[..., 0], hidden[..., 1]
        arrived[index] = torch.where(high > 0, (high - 1) * _DIGIT + low, -1)

    return hook


def _grid(
    site: AttentionSite, arrived: dict[int, torch.Tensor], prefix: int, image: tuple[int, int], patch: tuple[int, int]
) -> TokenGrid:
    """The grid of one module's tokens. A token has the shape of a patch (`(height, width)` in pixels) at every stage
    (Swin's patch merging halves both sides), so `count` tokens on an `H x W` image form
    `rows = sqrt(count · H · patch_width / (W · patch_height))` rows."""
    if site.index not in arrived:
        raise SynthesisError(f"Attention module #{site.index} was not called during the token-position probe.")
    raster = arrived[site.index].reshape(site.windows, -1)[:, prefix:]
    raster = torch.where(raster >= 0, raster - prefix, -1)
    found = raster[raster >= 0].sort().values
    count = found.numel()
    height, width = image
    numerator, denominator = count * height * patch[1], width * patch[0]
    rows = math.isqrt(numerator // denominator) if numerator % denominator == 0 else 0
    cols = count // rows if rows else 0
    problem = None
    if not torch.equal(found, torch.arange(count)):
        missing = count - found.unique().numel()
        problem = f"{missing} token position(s) repeated or missing among {count}"
    elif not (rows and rows * cols == count and height % rows == 0 and width % cols == 0):
        problem = f"its {count} tokens form no grid that divides the {height}x{width} image into equal patches"
    elif not _whole_patches((height // rows, width // cols), patch):
        problem = (f"its {rows}x{cols} tokens would be {height // rows}x{width // cols} pixels, not the "
                   f"{patch[0]}x{patch[1]} patch scaled by one whole factor, so the tokens do not cover the image")
    if problem is not None:
        raise SynthesisError(
            f"Cannot place the tokens of attention module #{site.index} in the image ({problem}), so attention "
            "priors cannot be rolled and flipped with the image. Pass `apa_follow_augmentation=False` to keep the "
            "priors fixed in the frame of the model's input."
        )
    return TokenGrid(rows, cols, raster, (height // rows, width // cols))


def _whole_patches(token: tuple[int, int], patch: tuple[int, int]) -> bool:
    """Whether a token of `token` pixels is the patch, or the patch enlarged by patch merging (the same whole factor on
    both axes). Not so when the image is no whole number of patches: the patch embedding then drops the remainder and
    the tokens cover only part of the image, which a roll of the whole image does not move token by token."""
    return token[0] % patch[0] == 0 and token[1] % patch[1] == 0 and token[0] // patch[0] == token[1] // patch[1]


def roll_and_flip_maps(
    maps: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None, pixels: tuple[int, int]
) -> torch.Tensor:
    """Moves token maps with their images: the token-grid counterpart of [`JitterFlip.apply`].

    Image `b` rolled by `offsets[b]` pixels on both axes and then flipped horizontally where `flips[b]`: its map is
    rolled cyclically by `offsets[b] / pixels` tokens (linear interpolation between the two nearest whole-token
    rolls when the offset is not a multiple of the token size, which keeps each map's sum) and then flipped.

    Args:
        maps (`torch.Tensor`): `[B, ..., rows, cols]` maps, one per image.
        offsets (`torch.Tensor`): `[B]` integer pixel offsets.
        flips (`torch.Tensor`, *optional*): `[B]` booleans; `None`: no image is flipped.
        pixels (`tuple[int, int]`): image pixels per token, `(height, width)`.

    Returns:
        `torch.Tensor`: same shape as `maps`.

    Example:
        >>> maps = torch.arange(4.0).view(1, 1, 2, 2)
        >>> roll_and_flip_maps(maps, torch.tensor([4]), torch.tensor([True]), (4, 4))
        tensor([[[[2., 3.],
                  [0., 1.]]]])
    """
    offsets = offsets.to(maps.device)
    moved = _fractional_roll(maps, offsets / pixels[0], dim=-2)
    moved = _fractional_roll(moved, offsets / pixels[1], dim=-1)
    if flips is None:
        return moved
    flips = flips.to(maps.device).view(-1, *([1] * (maps.dim() - 1)))
    return torch.where(flips, moved.flip(-1), moved)


def _fractional_roll(maps: torch.Tensor, shifts: torch.Tensor, dim: int) -> torch.Tensor:
    """`out[..., r] = map(r - shift)` along `dim`, cyclic, linear between whole tokens; one shift per image."""
    size = maps.shape[dim]
    source = torch.arange(size, device=maps.device, dtype=torch.float32)[None] - shifts.float()[:, None]
    lower = source.floor()
    frac = (source - lower).to(maps.dtype)
    lower = torch.remainder(lower.long(), size)
    upper = torch.remainder(lower + 1, size)
    view = [maps.shape[0]] + [1] * (maps.dim() - 1)
    view[dim] = size

    def take(index: torch.Tensor) -> torch.Tensor:
        return maps.gather(dim, index.view(view).expand_as(maps))

    frac = frac.view(view)
    return (1 - frac) * take(lower) + frac * take(upper)
