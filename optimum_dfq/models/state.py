"""Putting a model in a state for a block of work and giving it back as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Puts `model` in inference mode (`model.eval()`) for the block, then each of its modules back in its own mode.

    Each module's flag is restored, not only the top-level one: `model.train(was_training)` would put a submodule that
    was deliberately in eval mode (a frozen part of a model being trained) into training mode.

    Args:
        model (`nn.Module`): the model.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
        >>> model[1].eval()  # a mixed model
        Dropout(p=0.5, inplace=False)
        >>> with eval_mode(model):
        ...     model.training, model[1].training
        (False, False)
        >>> model.training, model[0].training, model[1].training
        (True, True, False)
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
