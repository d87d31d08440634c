"""Recording intermediate tensors on the calibration images with forward hooks (for correction and reconstruction).

Every capture ends each forward pass as soon as the wanted tensor is recorded (a hook raises [`StopForward`]), so
capturing at block `l` costs the prefix up to `l`, not a whole pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..nn import QLinear


class StopForward(Exception):
    """Raised by a capture hook once the wanted tensor is recorded: the rest of the forward pass is skipped."""


def run_batches(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Forwards every batch through `model`, without gradients, tolerating [`StopForward`]."""
    with torch.no_grad():
        for batch in batches:
            try:
                model(pixel_values=batch)
            except StopForward:
                pass


def matmul_input_module(linear: nn.Module) -> tuple[nn.Module, bool]:
    """The module whose output (`True`) or input (`False`) is exactly what `linear`'s matmul multiplies: after the
    input quantizer and the input correction of a [`QLinear`], the plain input of a float Linear."""
    if isinstance(linear, QLinear):
        if linear.input_correction is not None:
            return linear.input_correction, True
        if linear.input_quantizer is not None:
            return linear.input_quantizer, True
    return linear, False


def _capture_rows(
    model: nn.Module,
    targets: dict[str, tuple[nn.Module, bool]],
    batches: list[torch.Tensor],
    max_rows: int,
    stop_after: str | None = None,
) -> dict[str, torch.Tensor]:
    """Records, per name, the output (`True`) or first input (`False`) of a module as `[rows, last_dim]` float32."""
    store: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    total_images = sum(batch.shape[0] for batch in batches)
    batch_images = 1  # of the batch being recorded (set below, read by the hooks)

    def recorder(name: str) -> Callable[[torch.Tensor], None]:
        def record(x: torch.Tensor) -> None:
            flat = x.detach().reshape(-1, x.shape[-1])
            # one stride for every batch, from the rows per image (flat rows / batch_images) over all images, so
            # that a smaller last batch is not sampled more densely than the others
            stride = max(1, -(-flat.shape[0] * total_images // (batch_images * max_rows)))
            store[name].append(flat[::stride].float().clone())
            if name == stop_after:
                raise StopForward

        return record

    handles = []
    for name, (module, use_output) in targets.items():
        record = recorder(name)
        if use_output:
            handles.append(module.register_forward_hook(lambda m, args, out, r=record: r(out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, args, r=record: r(args[0])))
    try:
        for batch in batches:
            batch_images = batch.shape[0]
            run_batches(model, [batch])
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks) for name, chunks in store.items()}


def capture_matmul_inputs(
    model: nn.Module, names: list[str], batches: list[torch.Tensor], max_rows: int, stop_after: str | None = None
) -> dict[str, torch.Tensor]:
    """Records what the matmul of each named Linear multiplies, as `[rows, in_features]` float32.

    Rows (token positions) are subsampled with one stride for all batches, so that about `max_rows` remain and every
    image is sampled alike (a smaller last batch included); the stride depends only on the tensor shapes, so two
    models of the same structure give aligned rows.

    Args:
        model (`nn.Module`): float or quantized model.
        names (`list[str]`): Linear module names.
        batches (`list[torch.Tensor]`): pixel batches.
        max_rows (`int`): rows to keep per name, about.
        stop_after (`str`, *optional*): end each forward pass right after this Linear's input is recorded.

    Returns:
        `dict[str, torch.Tensor]`
    """
    targets = {name: matmul_input_module(model.get_submodule(name)) for name in names}
    return _capture_rows(model, targets, batches, max_rows, stop_after)


def capture_module_inputs(
    model: nn.Module, modules: dict[str, nn.Module], batches: list[torch.Tensor], max_rows: int
) -> dict[str, torch.Tensor]:
    """Records the first input of each given module as `[rows, last_dim]` float32 (rows subsampled as in
    [`capture_matmul_inputs`]); e.g. a LayerNorm's float output, as the input of its output quantizer."""
    return _capture_rows(model, {name: (module, False) for name, module in modules.items()}, batches, max_rows)


@dataclass
class _Batched:
    """Marks a call argument whose first dimension runs over images (sliced per minibatch on replay)."""

    tensor: torch.Tensor


@dataclass
class BlockCalls:
    """The calls of one block on the whole calibration set, merged so that any subset of images can be replayed.

    Tensor arguments whose first dimension is the number of images of their batch are concatenated over batches;
    every other argument (Swin's `input_dimensions`, flags) is taken from the first call.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    num_images: int

    def replay(self, block: nn.Module, index: torch.Tensor | None = None) -> torch.Tensor:
        """Runs `block` on the images `index` (all when `None`); returns its hidden-state output."""

        def pick(value: Any) -> Any:
            if isinstance(value, _Batched):
                return value.tensor if index is None else value.tensor[index]
            return value

        output = block(*(pick(a) for a in self.args), **{k: pick(v) for k, v in self.kwargs.items()})
        return block_hidden_states(output)


def block_hidden_states(output: Any) -> torch.Tensor:
    """The hidden states of a block's output (ViT/DeiT blocks return a tensor, Swin blocks a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _merge(values: list[Any], sizes: list[int]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor) and first.dim() > 0 and all(
        isinstance(v, torch.Tensor) and v.shape[0] == n for v, n in zip(values, sizes)
    ):
        return _Batched(torch.cat([v.detach() for v in values]))
    return first


def capture_block_calls(model: nn.Module, block: nn.Module, batches: list[torch.Tensor]) -> BlockCalls:
    """Records the positional and keyword arguments `block` is called with, over all batches.

    Args:
        model (`nn.Module`): the model containing `block`.
        block (`nn.Module`): a transformer block (called once per forward pass).
        batches (`list[torch.Tensor]`): pixel batches.

    Returns:
        `BlockCalls`
    """
    calls: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        calls.append((args, kwargs))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_batches(model, batches)
    finally:
        handle.remove()
    sizes = [len(batch) for batch in batches]
    num_args = len(calls[0][0])
    args = tuple(_merge([call[0][i] for call in calls], sizes) for i in range(num_args))
    kwargs = {key: _merge([call[1][key] for call in calls], sizes) for key in calls[0][1]}
    return BlockCalls(args, kwargs, sum(sizes))


def capture_block_outputs(model: nn.Module, block: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """The hidden-state outputs of `block` over all batches, concatenated over images."""
    outputs: list[torch.Tensor] = []

    def hook(module, args, output):
        outputs.append(block_hidden_states(output).detach())
        raise StopForward

    handle = block.register_forward_hook(hook)
    try:
        run_batches(model, batches)
    finally:
        handle.remove()
    return torch.cat(outputs)
