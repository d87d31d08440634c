"""Switching quantizers between modes (`"observe"`, `"calibrate"`, `"quantize"`, `"off"`), by kind or by name."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator

from torch import nn

from ..errors import ConfigError
from ..quantizers import MODES, Quantizer


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """Yields every quantizer of a quantized model with its module path, in `model.named_modules()` order.

    Weight, input and output quantizers of the quantized modules and the four attention quantizers of each attention
    module are all included; weight quantizers are the ones whose name ends with `weight_quantizer`.

    Args:
        model (`nn.Module`): a quantized (or converted) model; a float model yields nothing.

    Returns:
        `Iterator[tuple[str, Quantizer]]`: `(module name, quantizer)` pairs.

    Example:

    ```python
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq import DataFreeViTQuantizer
    >>> from optimum_dfq.calibration import iter_quantizers
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> qmodel = DataFreeViTQuantizer().quantize(model, bits="w4a4", synthesizer="gaussian", num_images=4)
    >>> names = [name for name, _ in iter_quantizers(qmodel)]
    >>> len(names), names[0]
    (18, 'vit.embeddings.patch_embeddings.projection.weight_quantizer')
    ```
    """
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module


def weight_quantizer_names(model: nn.Module) -> set[str]:
    """The module names of `model`'s weight quantizers (the `weight_quantizer` of each quantized layer)."""
    return {name for name, _ in iter_quantizers(model) if name.endswith("weight_quantizer")}


def set_quantizer_modes(model: nn.Module, weights: str | None = None, activations: str | None = None) -> None:
    """Sets the mode (`"observe"`, `"calibrate"`, `"quantize"` or `"off"`) of weight and/or activation quantizers.

    Weight quantizers are those whose name ends with `weight_quantizer`; every other quantizer (inputs, LayerNorm
    outputs, attention) counts as an activation quantizer.

    Args:
        model (`nn.Module`): a quantized model.
        weights (`str`, *optional*): mode of every weight quantizer; `None` leaves them as they are.
        activations (`str`, *optional*): mode of every activation quantizer; `None` leaves them as they are.

    Raises:
        `ValueError`: when a mode is not one of the four above (no quantizer is switched then).

    Example:

    ```python
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq import DataFreeViTQuantizer
    >>> from optimum_dfq.calibration import iter_quantizers, set_quantizer_modes
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> qmodel = DataFreeViTQuantizer().quantize(model, bits="w4a4", synthesizer="gaussian", num_images=4)
    >>> set_quantizer_modes(qmodel, activations="off")  # a weight-only quantized model
    >>> sorted({(name.endswith("weight_quantizer"), q.mode) for name, q in iter_quantizers(qmodel)})
    [(False, 'off'), (True, 'quantize')]
    ```
    """
    for mode in (weights, activations):  # checked first: a bad mode must not leave the model half switched
        if mode is not None and mode not in MODES:
            raise ValueError(f"Unknown quantizer mode {mode!r}; expected one of {MODES}.")
    weight_names = weight_quantizer_names(model)
    for name, quantizer in iter_quantizers(model):
        mode = weights if name in weight_names else activations
        if mode is not None:
            quantizer.set_mode(mode)


@contextlib.contextmanager
def quantization_disabled(model: nn.Module, names: Collection[str] | None = None) -> Iterator[None]:
    """Context manager that switches quantizers off inside the `with` block and restores their modes afterwards.

    Args:
        model (`nn.Module`): a quantized model.
        names (`Collection[str]`, *optional*): module names of the quantizers to switch off (as yielded by
            [`iter_quantizers`], e.g. one site of [`activation_sites`]). By default every quantizer, which a model
            with frozen weights (one returned by `DataFreeViTQuantizer.quantize`) cannot run: its weights have no
            float copy.

    Returns:
        `Iterator[None]`: used as `with quantization_disabled(model, names): ...`.

    Raises:
        `ConfigError`: when a name in `names` is not a quantizer of `model`.

    Example:

    ```python
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq import DataFreeViTQuantizer
    >>> from optimum_dfq.calibration import quantization_disabled
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> qmodel = DataFreeViTQuantizer().quantize(model, bits="w4a4", synthesizer="gaussian", num_images=4)
    >>> with quantization_disabled(qmodel, ["classifier.input_quantizer"]):
    ...     print(qmodel.classifier.input_quantizer.mode)
    off
    >>> qmodel.classifier.input_quantizer.mode
    'quantize'
    ```
    """
    named = dict(iter_quantizers(model))
    if names is not None:
        unknown = sorted(set(names) - set(named))
        if unknown:
            raise ConfigError(f"{unknown} are not quantizers of the model; names come from iter_quantizers(model).")
    quantizers = [q for name, q in named.items() if names is None or name in names]
    saved = [q.mode for q in quantizers]
    for quantizer in quantizers:
        quantizer.set_mode("off")
    try:
        yield
    finally:
        for quantizer, mode in zip(quantizers, saved):
            quantizer.set_mode(mode)
