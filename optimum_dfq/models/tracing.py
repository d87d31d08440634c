"""Dataflow tracing: which Linear layers read a LayerNorm's output, and which read an activation function's.

RepQ-ViT re-parameterises a per-channel post-LayerNorm quantizer by folding scales into the LayerNorm's affine
parameters and into every Linear that consumes its output. We find those pairs by running one forward pass and
matching tensors, not names: a Linear consumes a LayerNorm's output when its input holds exactly the same values,
up to a permutation of token positions (Swin partitions and shifts windows in between; that is fine for a
per-channel fold). Padding or any arithmetic in between breaks the equality, and the pair is (correctly) not found.
The same matching finds the Linears fed by an activation function (the MLP's second Linear, part of site S4), whose
input range is estimated differently (see `DFQConfig.post_activation_range_observer`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ..errors import CalibrationError

logger = logging.getLogger(__name__)


def _channel_signature(x: torch.Tensor) -> tuple[int, torch.Tensor]:
    flat = x.detach().reshape(-1, x.shape[-1]).double()
    return flat.shape[0], flat.sum(dim=0)


def is_activation_function(module: nn.Module) -> bool:
    """Whether `module` is an element-wise activation function: a `torch.nn` activation (GELU, ReLU, SiLU, ...) or
    one of transformers' `ACT2FN` modules. Softmax is a normalisation over a dimension, not an element-wise
    activation, and is excluded."""
    if isinstance(module, (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.MultiheadAttention)):
        return False
    return type(module).__module__ in ("torch.nn.modules.activation", "transformers.activations")


@torch.no_grad()
def find_consumers(
    model: nn.Module, pixel_values: torch.Tensor, is_producer: Callable[[nn.Module], bool]
) -> dict[str, list[str]]:
    """Maps each producer module (by name) to the Linear layers that read its output directly.

    Args:
        model (`nn.Module`): the float model.
        pixel_values (`torch.Tensor`): one small example batch (a single image is enough).
        is_producer (`Callable[[nn.Module], bool]`): which modules count as producers.

    Returns:
        `dict[str, list[str]]`: producer name → names of consuming Linears, in forward order; producers with no
        direct Linear consumer are absent.

    Raises:
        `CalibrationError`: when the model's activations on `pixel_values` are NaN or inf (consumers would be matched
            on garbage and silently missed).

    Example:

    ```python
    >>> find_consumers(model, pixel_values[:1], lambda m: isinstance(m, nn.LayerNorm))  # doctest: +SKIP
    {'vit.layers.0.layernorm_before': ['vit.layers.0.attention.q_proj', ...], ...}
    ```
    """
    outputs: dict[str, torch.Tensor] = {}
    linear_inputs: list[tuple[str, torch.Tensor]] = []
    seen: list[tuple[str, torch.Tensor]] = []  # every captured tensor in forward order, to name the first bad one

    def record_output(name, output):
        outputs[name] = output
        seen.append((f"{name}'s output", output))

    def record_linear_input(name, x):
        linear_inputs.append((name, x))
        seen.append((f"{name}'s input", x))

    handles = []
    for name, module in model.named_modules():
        if is_producer(module):
            handles.append(module.register_forward_hook(lambda m, i, o, n=name: record_output(n, o)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(lambda m, i, n=name: record_linear_input(n, i[0])))
    try:
        model(pixel_values=pixel_values)
    finally:
        for handle in handles:
            handle.remove()

    non_finite = [name for name, tensor in seen if torch.is_tensor(tensor) and not bool(torch.isfinite(tensor).all())]
    if non_finite:
        raise CalibrationError(
            f"The float model's activations are NaN or inf on the first calibration image (first at "
            f"{non_finite[0]}; pixel values in [{float(pixel_values.min()):.3g}, {float(pixel_values.max()):.3g}]). "
            "Calibration images must be pixel values as the model's image processor produces them (normalised, not "
            "raw or rescaled), and the model must be finite on them (check its weights and config)."
        )
    signatures = {name: _channel_signature(out) for name, out in outputs.items() if torch.is_tensor(out)}
    consumers: dict[str, list[str]] = {}
    for linear_name, x in linear_inputs:
        rows, sums = _channel_signature(x)
        for producer_name, (producer_rows, producer_sums) in signatures.items():
            if rows != producer_rows or sums.shape != producer_sums.shape:
                continue
            if not torch.allclose(sums, producer_sums, rtol=1e-9, atol=1e-9):
                continue
            producer_out = outputs[producer_name].reshape(-1)
            if torch.equal(torch.sort(producer_out).values, torch.sort(x.reshape(-1)).values):
                consumers.setdefault(producer_name, []).append(linear_name)
                break
    return consumers


def find_layernorm_consumers(model: nn.Module, pixel_values: torch.Tensor) -> dict[str, list[str]]:
    """Maps each LayerNorm (by module name) to the Linear layers that read its output directly.

    Args:
        model (`nn.Module`): the float model.
        pixel_values (`torch.Tensor`): one small example batch (a single image is enough).

    Returns:
        `dict[str, list[str]]`: LayerNorm name → names of consuming Linears, in forward order; LayerNorms with no
        direct Linear consumer are absent. Only `nn.Linear` layers are seen, so a quantized model gives `{}`.

    Example:

    ```python
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq.models import find_layernorm_consumers
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> find_layernorm_consumers(model, torch.zeros(1, 3, 32, 32))
    {'vit.layers.0.layernorm_before': ['vit.layers.0.attention.q_proj', 'vit.layers.0.attention.k_proj',
                                       'vit.layers.0.attention.v_proj'],
     'vit.layers.0.layernorm_after': ['vit.layers.0.mlp.fc1']}
    ```
    """
    return find_consumers(model, pixel_values, lambda module: isinstance(module, nn.LayerNorm))


def find_activation_consumers(model: nn.Module, pixel_values: torch.Tensor) -> list[str]:
    """The Linear layers that read an activation function's output directly (in ViT, DeiT and Swin: each MLP's
    second Linear, whose input is the GELU output).

    Args:
        model (`nn.Module`): the float model.
        pixel_values (`torch.Tensor`): one small example batch (a single image is enough).

    Returns:
        `list[str]`: names of the Linears, in forward order. Only `nn.Linear` layers are seen, so a quantized model
        gives `[]`.

    Example:

    ```python
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq.models import find_activation_consumers
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> find_activation_consumers(model, torch.zeros(1, 3, 32, 32))
    ['vit.layers.0.mlp.fc2']
    ```
    """
    consumers = find_consumers(model, pixel_values, is_activation_function)
    return [name for names in consumers.values() for name in names]


def find_quantization_consumers(model: nn.Module, pixel_values: torch.Tensor) -> tuple[dict[str, list[str]], list[str]]:
    """[`find_layernorm_consumers`] and [`find_activation_consumers`] from one forward pass.

    Args:
        model (`nn.Module`): the float model.
        pixel_values (`torch.Tensor`): one small example batch (a single image is enough).

    Returns:
        `tuple[dict[str, list[str]], list[str]]`: LayerNorm name → consuming Linears, and the Linears reading an
        activation function's output.

    Example:

    ```python
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq.models import find_quantization_consumers
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> layernorm_consumers, activation_consumers = find_quantization_consumers(model, torch.zeros(1, 3, 32, 32))
    >>> sorted(layernorm_consumers), activation_consumers
    (['vit.layers.0.layernorm_after', 'vit.layers.0.layernorm_before'], ['vit.layers.0.mlp.fc2'])
    ```
    """
    modules = dict(model.named_modules())
    consumers = find_consumers(
        model, pixel_values, lambda module: isinstance(module, nn.LayerNorm) or is_activation_function(module)
    )
    layernorm = {name: names for name, names in consumers.items() if isinstance(modules[name], nn.LayerNorm)}
    activation = [linear for name, names in consumers.items() if name not in layernorm for linear in names]
    return layernorm, activation
