"""Switching quantizers between modes (`"observe"`, `"calibrate"`, `"quantize"`, `"off"`), by kind or by name."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator

from torch import nn

from ..quantizers import Quantizer


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """Every quantizer of a quantized model, with its module path."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module


def weight_quantizer_names(model: nn.Module) -> set[str]:
    return {name for name, _ in iter_quantizers(model) if name.endswith("weight_quantizer")}


def set_quantizer_modes(model: nn.Module, weights: str | None = None, activations: str | None = None) -> None:
    """Sets the mode (`"observe"`, `"calibrate"`, `"quantize"`, `"off"`) of weight and/or activation quantizers."""
    weight_names = weight_quantizer_names(model)
    for name, quantizer in iter_quantizers(model):
        mode = weights if name in weight_names else activations
        if mode is not None:
            quantizer.set_mode(mode)


@contextlib.contextmanager
def quantization_disabled(model: nn.Module, names: Collection[str] | None = None) -> Iterator[None]:
    """Runs the model with quantizers off inside the block (all of them, or those named in `names`, e.g. one site
    of [`activation_sites`]), restoring their modes after."""
    quantizers = [q for name, q in iter_quantizers(model) if names is None or name in names]
    saved = [q.mode for q in quantizers]
    for quantizer in quantizers:
        quantizer.set_mode("off")
    try:
        yield
    finally:
        for quantizer, mode in zip(quantizers, saved):
            quantizer.set_mode(mode)
