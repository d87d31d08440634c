"""Roles of Linear layers (`qkv`, `o_proj`, `fc1`, `fc2`, `reduction`, `classifier`), found from structure and dataflow.

A role is decided without parameter names: by which adapter-typed module contains the Linear (a transformer block,
its attention module, Swin's patch merging, or none = a classifier head) and by what it reads, observed in one
forward pass in floating point:

* inside the attention module: reads the attention module's own input → `qkv`, anything else → `o_proj`;
* inside a block but outside attention: reads a LayerNorm output of the block → `fc1`, anything else → `fc2`;
* inside a patch-merging module → `reduction`; outside every block → `classifier`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import CORRECTION_SITES
from ..errors import ConfigError
from ..models import ModelAdapter
from ..nn import AttentionQuantizers, QConv2d, QLayerNorm, QLinear
from .modes import iter_quantizers, quantization_disabled

ROLES = CORRECTION_SITES

#: Groups of activation quantizers, by the tensor they quantize, in the forward order of a block (RepQ-ViT's sites
#: S2-S8, with the post-LayerNorm site S3 and the Linear-input site S4 split by which Linear reads the tensor).
ACTIVATION_SITES = ("image", "qkv_input", "query", "key", "probs", "value", "o_proj_input", "fc1_input",
                    "fc2_input", "reduction_input", "classifier_input")


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read one and the same (quantized) tensor: a correction site.

    Attributes:
        role (`str`): one of [`ROLES`].
        names (`tuple[str, ...]`): module names, in forward order (q, k, v share one site when their input is
            quantized once, at the LayerNorm output).
    """

    role: str
    names: tuple[str, ...]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QLinear))


def _uncalibrated(model: nn.Module) -> list[str]:
    """The quantizers to switch off so that a probe forward pass runs. Calibrated ones stay as they are: frozen
    (packed) weights cannot run in float, and the dataflow does not depend on them."""
    return [name for name, quantizer in iter_quantizers(model) if not bool(quantizer.calibrated)]


def _inside(name: str, containers: list[str]) -> str | None:
    for container in containers:
        if name.startswith(container + "."):
            return container
    return None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and torch.equal(a, b))


@torch.no_grad()
def linear_roles(model: nn.Module, adapter: ModelAdapter, pixel_values: torch.Tensor) -> dict[str, str]:
    """Maps every Linear (float or [`QLinear`]) of `model` to its role, in forward order.

    The roles (`"qkv"`, `"o_proj"`, `"fc1"`, `"fc2"`, `"reduction"`, `"classifier"`) are found from the module
    structure and one probe forward pass (see the module docstring), not from parameter names.

    Args:
        model (`PreTrainedModel`): a float or quantized ViT/DeiT/Swin (its uncalibrated quantizers are switched
            off for the probe).
        adapter (`ModelAdapter`): its adapter.
        pixel_values (`torch.Tensor`): a small probe batch (one image is enough).

    Returns:
        `dict[str, str]`: Linear name → role, ordered by first call; Linears not called in the probe are absent.

    Example:

    ```python
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq.calibration import linear_roles
    >>> from optimum_dfq.models import get_adapter
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> roles = linear_roles(model, get_adapter(model), torch.zeros(1, 3, 32, 32))
    >>> list(roles.values())
    ['qkv', 'qkv', 'qkv', 'o_proj', 'fc1', 'fc2', 'classifier']
    ```
    """
    blocks = [name for name, _ in adapter.blocks(model)]
    attentions = [name for name, _ in adapter.attention_modules(model)]
    mergings = [] if adapter.merging_type is None else [
        name for name, m in model.named_modules() if isinstance(m, adapter.merging_type)
    ]
    linear_inputs: dict[str, torch.Tensor] = {}
    attention_inputs: dict[str, torch.Tensor] = {}
    norm_outputs: dict[str, list[torch.Tensor]] = {}

    def attention_hook(name):
        def hook(module, args, kwargs):
            attention_inputs.setdefault(name, args[0] if args else kwargs["hidden_states"])
        return hook

    handles = []
    for name, module in model.named_modules():
        if is_linear(module):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, n=name: linear_inputs.setdefault(n, args[0])))
        elif name in attentions:
            handles.append(module.register_forward_pre_hook(attention_hook(name), with_kwargs=True))
        elif isinstance(module, nn.LayerNorm) and _inside(name, blocks):
            block = _inside(name, blocks)
            handles.append(module.register_forward_hook(
                lambda m, args, out, b=block: norm_outputs.setdefault(b, []).append(out)))
    try:
        with quantization_disabled(model, _uncalibrated(model)):
            model(pixel_values=pixel_values)
    finally:
        for handle in handles:
            handle.remove()

    roles: dict[str, str] = {}
    for name, x in linear_inputs.items():
        attention, block = _inside(name, attentions), _inside(name, blocks)
        if _inside(name, mergings):
            roles[name] = "reduction"
        elif attention is not None:
            roles[name] = "qkv" if _same(x, attention_inputs[attention]) else "o_proj"
        elif block is not None:
            roles[name] = "fc1" if any(_same(x, out) for out in norm_outputs.get(block, [])) else "fc2"
        else:
            roles[name] = "classifier"
    return roles


def linear_groups(model: nn.Module, roles: dict[str, str], wanted: list[str] | tuple[str, ...]) -> list[LinearGroup]:
    """Correction sites of the wanted roles: [`QLinear`]s grouped by the tensor that reaches their matmul.

    q, k and v of one attention module form one group when none of them has its own input quantizer (their input
    is then the quantized LayerNorm output they share); otherwise every Linear is its own group. Float Linears
    (kept out of quantization) are skipped.

    Args:
        model (`nn.Module`): the quantized model.
        roles (`dict[str, str]`): from [`linear_roles`].
        wanted (`list[str]`): the roles to keep.

    Returns:
        `list[LinearGroup]` in forward order.
    """
    members: dict[str, tuple[str, list[str]]] = {}  # site key -> (role, names); dicts keep forward order
    for name, role in roles.items():
        module = model.get_submodule(name)
        if role not in wanted or not isinstance(module, QLinear):
            continue
        shares_input = role == "qkv" and module.input_quantizer is None
        key = name.rpartition(".")[0] + ".<qkv>" if shares_input else name
        members.setdefault(key, (role, []))[1].append(name)
    return [LinearGroup(role, tuple(names)) for role, names in members.values()]


def activation_sites(
    model: nn.Module,
    adapter: ModelAdapter,
    pixel_values: torch.Tensor,
    layernorm_consumers: dict[str, list[str]] | None = None,
) -> dict[str, list[str]]:
    """Groups the activation quantizers of a quantized model by the tensor they quantize (see [`ACTIVATION_SITES`]).

    A quantized LayerNorm's output quantizer belongs to the site of the Linears that read it (`qkv_input`,
    `fc1_input`, `reduction_input`); a Linear's own input quantizer to `<role>_input`; the attention quantizers to
    `query`, `key`, `probs` and `value`; the patch embedding's to `image`. Used to attribute a quantized model's
    error to its sites, e.g. by leaving one site in floating point (`benchmarks/site_attribution.py`).

    Args:
        model (`PreTrainedModel`): a quantized ViT/DeiT/Swin.
        adapter (`ModelAdapter`): its adapter.
        pixel_values (`torch.Tensor`): a small probe batch (one image is enough).
        layernorm_consumers (`dict[str, list[str]]`, *optional*): the quantization plan's LayerNorm → Linears map;
            by default the one of the model's own plan (`model.hf_quantizer.plan.layernorm_consumers`, set by
            `quantize()` and by `from_pretrained`).

    Returns:
        `dict[str, list[str]]`: site → quantizer module names, in [`ACTIVATION_SITES`] order; empty sites are absent.

    Example:

    ```python
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq import DataFreeViTQuantizer
    >>> from optimum_dfq.calibration.sites import activation_sites
    >>> from optimum_dfq.models import get_adapter
    >>> config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                    intermediate_size=64, num_labels=10)
    >>> qmodel = DataFreeViTQuantizer().quantize(ViTForImageClassification(config), bits="w4a4",
    ...                                          synthesizer="gaussian", num_images=4)
    >>> sites = activation_sites(qmodel, get_adapter(qmodel), torch.zeros(1, 3, 32, 32))
    >>> sorted(sites)[:3]
    ['classifier_input', 'fc1_input', 'fc2_input']
    >>> sites["fc2_input"]
    ['vit.layers.0.mlp.fc2.input_quantizer']
    ```
    """
    if layernorm_consumers is None:
        plan = getattr(getattr(model, "hf_quantizer", None), "plan", None)
        if plan is None:
            raise ConfigError("The model has no quantization plan (it was not made by quantize() or loaded from an "
                             "optimum_dfq checkpoint); pass layernorm_consumers=.")
        layernorm_consumers = plan.layernorm_consumers
    roles = linear_roles(model, adapter, pixel_values)
    sites: dict[str, list[str]] = {site: [] for site in ACTIVATION_SITES}
    for name, module in model.named_modules():
        if isinstance(module, QConv2d) and module.input_quantizer is not None:
            sites["image"].append(f"{name}.input_quantizer")
        elif isinstance(module, QLinear) and module.input_quantizer is not None:
            sites[f"{roles[name]}_input"].append(f"{name}.input_quantizer")
        elif isinstance(module, QLayerNorm):
            readers = {roles[consumer] for consumer in layernorm_consumers.get(name, [])}
            if len(readers) != 1:
                raise ConfigError(
                    f"The quantized LayerNorm {name} is read by Linears of roles {sorted(readers)}; expected exactly "
                    "one role. Pass the plan of this model (model.hf_quantizer.plan.layernorm_consumers)."
                )
            sites[f"{readers.pop()}_input"].append(f"{name}.output_quantizer")
        elif isinstance(module, AttentionQuantizers):
            for part in ("query", "key", "probs", "value"):
                sites[part].append(f"{name}.{part}")
    return {site: names for site, names in sites.items() if names}
