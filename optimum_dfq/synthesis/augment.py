"""Per-image jitter (a cyclic roll by the same offset on both axes) and horizontal flip, as in PSAQ-ViT.

PSAQ-ViT draws one offset and one flip per step for the whole batch. Here each image draws its own from its own
generator, so an image's trajectory does not depend on which other images share its batch.
"""

from __future__ import annotations

import torch


class JitterFlip:
    """Random roll-jitter and horizontal flip, drawn per image and per step.

    Args:
        generators (`list[torch.Generator]`): one generator per image of the batch.
        flip_prob (`float`): probability of a horizontal flip.

    Example:
        >>> aug = JitterFlip([torch.Generator().manual_seed(i) for i in range(2)], flip_prob=0.5)
        >>> offsets, flips = aug.draw(max_offset=3)
        >>> aug.apply(torch.zeros(2, 3, 8, 8), offsets, flips).shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(self, generators: list[torch.Generator], flip_prob: float = 0.5) -> None:
        self.generators = generators
        self.flip_prob = float(flip_prob)

    def draw(self, max_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's offsets `[B]` (in `[-max_offset, max_offset]`) and flip flags `[B]` (bool)."""
        offsets, flips = [], []
        for generator in self.generators:
            offsets.append(int(torch.randint(-max_offset, max_offset + 1, (1,), generator=generator)))
            flips.append(bool(torch.rand(1, generator=generator) < self.flip_prob))
        return torch.tensor(offsets, dtype=torch.long), torch.tensor(flips, dtype=torch.bool)

    def get_states(self) -> torch.Tensor:
        """The generators' states, `[B, L]` uint8 (to resume the draws later with [`JitterFlip.set_states`])."""
        return torch.stack([generator.get_state() for generator in self.generators])

    def set_states(self, states: torch.Tensor) -> None:
        """Restores the generators' states from [`JitterFlip.get_states`].

        Raises:
            `ValueError`: if `states` does not hold one state per generator.
        """
        if states.dim() != 2 or states.shape[0] != len(self.generators) or states.dtype != torch.uint8:
            raise ValueError(f"expected one uint8 generator state per image ({len(self.generators)}), got a "
                             f"{tuple(states.shape)} {states.dtype} tensor")
        for generator, state in zip(self.generators, states):
            generator.set_state(state.clone())  # set_state crashes on a row view (storage offset), torch 2.13

    @staticmethod
    def apply(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Rolls image `b` by `offsets[b]` on both spatial axes, then flips it horizontally where `flips[b]`.

        Args:
            images (`torch.Tensor`): `[B, C, H, W]`.
            offsets (`torch.Tensor`): `[B]` integer offsets.
            flips (`torch.Tensor`): `[B]` booleans.

        Returns:
            `torch.Tensor`: `[B, C, H, W]`, differentiable w.r.t. `images`.
        """
        if not bool(offsets.any()) and not bool(flips.any()):
            return images
        return _Permute.apply(images, offsets.to(images.device), flips.to(images.device))


def _permutation(shape: tuple[int, ...], row_shift, col_shift, flips, device) -> torch.Tensor:
    """Flat source index of every output pixel: rows rolled by `row_shift`, columns by `col_shift`, then flipped."""
    batch, _, height, width = shape
    rows = torch.remainder(torch.arange(height, device=device)[None] - row_shift[:, None], height)
    cols = torch.remainder(torch.arange(width, device=device)[None] - col_shift[:, None], width)
    cols = torch.where(flips[:, None], cols.flip(-1), cols)
    return (rows[:, :, None] * width + cols[:, None, :]).view(batch, 1, height * width)


class _Permute(torch.autograd.Function):
    """A per-image pixel permutation whose backward is the inverse permutation (a gather, not a scatter-add)."""

    @staticmethod
    def forward(ctx, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        ctx.mark_non_differentiable(offsets, flips)
        ctx.save_for_backward(offsets, flips)
        index = _permutation(images.shape, offsets, offsets, flips, images.device)
        return _gather(images, index)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        offsets, flips = ctx.saved_tensors
        # Forward: out[h, w] = x[h - o, c(w)] with c(w) = w - o, or W-1-w-o when flipped (its own inverse).
        inverse = _permutation(grad_output.shape, -offsets, torch.where(flips, offsets, -offsets), flips,
                               grad_output.device)
        return _gather(grad_output, inverse), None, None


def _gather(images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = images.shape
    flat = images.reshape(batch, channels, height * width)
    return flat.gather(2, index.expand(batch, channels, height * width)).view(batch, channels, height, width)
