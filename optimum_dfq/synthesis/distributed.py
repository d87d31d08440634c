"""Sharding synthesis over processes with Accelerate's `PartialState`."""

from __future__ import annotations

import logging
import os
from typing import Any, TypeVar

import torch

from ..errors import SynthesisError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def resolve_state(state=None):
    """The process state to shard with: `state`, or `PartialState(cpu=<no CUDA>)`.

    `cpu=True` matters under `torchrun` on machines without GPUs: a plain `PartialState()` there makes every process
    believe it is rank 0 of 1. When `WORLD_SIZE > 1` but the state has one process, this refuses to go on rather
    than have every process synthesize (and write) the whole set.

    Args:
        state (`accelerate.PartialState`, *optional*): an existing state.

    Returns:
        `accelerate.PartialState`
    """
    from accelerate import PartialState

    if state is None:
        state = PartialState(cpu=not torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and state.num_processes == 1:
        raise SynthesisError(
            f"WORLD_SIZE={world_size} but the accelerate state has a single process, so every process would "
            "synthesize every image. On CPU-only machines build the state with `PartialState(cpu=True)` (or let "
            "the synthesizer build it: pass state=None); with GPUs launch with `accelerate launch` or `torchrun`."
        )
    logger.debug("synthesis sharded over %d process(es)", state.num_processes)
    return state


def gather_lists(state, items: list[Any]) -> list[Any]:
    """Concatenates every process's `items` (in rank order) on every process."""
    if state.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def broadcast_from_main(state, value: Any) -> Any:
    """`value` as computed on the main process, on every process."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def shard_chunks(chunks: list[T], process_index: int, num_processes: int) -> list[T]:
    """The share of `chunks` that process `process_index` of `num_processes` works on.

    Each process gets a contiguous block of whole chunks (the first `len(chunks) % num_processes` processes one more
    than the others; a process may get none). The chunks themselves are never re-cut, so an image is optimised in
    the same batch whatever the number of processes.

    Args:
        chunks (`list`): the work items, e.g. `(start, stop)` batches of a grid.
        process_index (`int`): this process's rank.
        num_processes (`int`): how many processes share the work.

    Returns:
        `list`: this process's chunks, in order.

    Example:
        >>> [shard_chunks([(0, 2), (2, 4), (4, 5)], rank, 2) for rank in (0, 1)]
        [[(0, 2), (2, 4)], [(4, 5)]]
        >>> shard_chunks([(0, 5)], 1, 2)
        []
    """
    per_process, extra = divmod(len(chunks), num_processes)
    start = process_index * per_process + min(process_index, extra)
    return list(chunks[start:start + per_process + (1 if process_index < extra else 0)])
