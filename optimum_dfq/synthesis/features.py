"""What loss terms read from the model during a forward pass: attention outputs `A·V` and attention probabilities.

Attention modules are found by type (the model adapter). Inside each, the output projection is found by dataflow:
a probe forward pass records the order in which the module's `nn.Linear` children are called, and the *last* one
called is the projection applied to the concatenated head outputs. A forward pre-hook on it therefore sees `A·V`
(before the projection), which is where PSAQ-ViT hooks (`attn.matmul2`). The probe also records each site's number of
heads, windows per image and tokens per window from the recorded attention probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..calibration.data import expected_image_shape
from ..errors import SynthesisError
from ..models.adapters import ModelAdapter
from ..nn.attention import capture_attention

ATTENTION_OUTPUTS = "attention_outputs"
ATTENTION_PROBS = "attention_probs"


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention module, in forward order.

    Attributes:
        index (`int`): 0-based position among the model's attention modules (its block index).
        module (`nn.Module`): the attention module.
        output_projection (`nn.Linear`): the Linear applied to the concatenated head outputs.
        heads (`int`): number of heads.
        windows (`int`): attention windows per image (1 for global attention).
        tokens (`int`): tokens per window (prefix tokens included).
    """

    index: int
    module: nn.Module
    output_projection: nn.Linear
    heads: int
    windows: int
    tokens: int


@torch.no_grad()
def probe_attention_sites(model: nn.Module, adapter: ModelAdapter) -> list[AttentionSite]:
    """Runs one forward pass on a blank image to describe every attention module of `model`.

    Args:
        model (`PreTrainedModel`): a supported ViT, DeiT or Swin model.
        adapter (`ModelAdapter`): its adapter.

    Returns:
        `list[AttentionSite]` in forward order.
    """
    modules = [module for _, module in adapter.attention_modules(model)]
    linear_calls: dict[int, list[nn.Linear]] = {id(module): [] for module in modules}
    handles = []
    for module in modules:
        for child in module.modules():
            if isinstance(child, nn.Linear):
                hook = _record_call(linear_calls[id(module)])
                handles.append(child.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    blank = torch.zeros(1, *expected_image_shape(model), device=device)
    try:
        with capture_attention(model) as records:
            model(pixel_values=blank)
    finally:
        for handle in handles:
            handle.remove()
    probs = {id(record.module): record.probs.shape for record in records}
    sites = []
    for index, module in enumerate(modules):
        calls = linear_calls[id(module)]
        if not calls or id(module) not in probs:
            raise SynthesisError(
                f"Attention module {type(module).__name__} #{index} was not called through the attention interface "
                "or has no Linear output projection; this model layout is not supported by the synthesizers."
            )
        windows, heads, _, keys = probs[id(module)]
        sites.append(AttentionSite(index, module, calls[-1], int(heads), int(windows), int(keys)))
    return sites


def _record_call(calls: list[nn.Linear]):
    def hook(linear, args):
        calls.append(linear)

    return hook


class FeatureCapture:
    """Context manager collecting, for each forward pass, the features the active loss terms need.

    Args:
        model (`PreTrainedModel`): the model.
        sites (`list[AttentionSite]`): from [`probe_attention_sites`].
        needs (`set[str]`): any of `"attention_outputs"` (`A·V` before the output projection, via pre-hooks) and
            `"attention_probs"` (post-softmax probabilities, via [`capture_attention`]; switches the model to eager
            attention for the duration).

    Example:
        >>> with FeatureCapture(model, sites, {"attention_outputs"}) as capture:  # doctest: +SKIP
        ...     model(pixel_values=x)
        ...     capture.attention_output(0).shape  # [rows·windows, tokens, heads, head_dim]
    """

    def __init__(self, model: nn.Module, sites: list[AttentionSite], needs: set[str]) -> None:
        unknown = set(needs) - {ATTENTION_OUTPUTS, ATTENTION_PROBS}
        if unknown:
            raise SynthesisError(f"Unknown feature(s) {sorted(unknown)} requested by a loss term.")
        self.model = model
        self.sites = sites
        self.needs = set(needs)
        self._outputs: dict[int, torch.Tensor] = {}
        self._records = None
        self._site_of = {id(site.module): site.index for site in sites}
        self._handles = []
        self._context = None

    def __enter__(self) -> FeatureCapture:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if ATTENTION_OUTPUTS in self.needs:
            for site in self.sites:
                self._handles.append(site.output_projection.register_forward_pre_hook(self._output_hook(site)))
        if ATTENTION_PROBS in self.needs:
            self._context = capture_attention(self.model)
            self._records = self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._context is not None:
            self._context.__exit__(*exc)
            self._context = None
        self.clear()

    def _output_hook(self, site: AttentionSite):
        def hook(linear, args):
            hidden = args[0]
            self._outputs[site.index] = hidden.view(*hidden.shape[:-1], site.heads, hidden.shape[-1] // site.heads)

        return hook

    def clear(self) -> None:
        """Forgets the features of the previous forward pass."""
        self._outputs.clear()
        if self._records is not None:
            self._records.clear()

    def attention_output(self, index: int) -> torch.Tensor:
        """`A·V` of attention site `index`: `[rows·windows, tokens, heads, head_dim]`."""
        try:
            return self._outputs[index]
        except KeyError:
            raise SynthesisError(
                f"No attention output was captured for attention module #{index}; the loss term must declare "
                f"'{ATTENTION_OUTPUTS}' in its `needs`."
            ) from None

    def attention_probs(self, index: int) -> torch.Tensor:
        """Attention probabilities of site `index` in the last forward pass: `[rows·windows, heads, queries, keys]`."""
        if self._records is None:
            raise SynthesisError(
                f"Attention probabilities were not captured; the loss term must declare '{ATTENTION_PROBS}' in its "
                "`needs`."
            )
        for record in reversed(self._records):
            if self._site_of.get(id(record.module)) == index:
                return record.probs
        raise SynthesisError(f"No attention probabilities were recorded for attention module #{index}.")
