"""Sharding synthesis over processes with Accelerate's `PartialState`."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..errors import SynthesisError

logger = logging.getLogger(__name__)


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
