"""Quantized eager attention, plugged in through transformers' `AttentionInterface`.

ViT, DeiT and Swin in transformers 5 compute attention through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`.
We register one more implementation, `"optimum_dfq"`: plain eager attention (`softmax(Q·Kᵀ·scale + mask)·V`) in which
the operands of both matmuls are fake-quantized when the attention module carries an [`AttentionQuantizers`]
child. **A quantized model therefore always runs eager attention** (no SDPA/flash kernels): the quantizers need the
explicit probabilities. The same function records attention probabilities for the synthesizers (see
[`capture_attention`]), with gradients, on float models too.

**A float model is refused unless it opted in.** Quantized checkpoints carry
`"attn_implementation": "optimum_dfq (requires import optimum_dfq before from_pretrained)"` in `config.json`
([`SAVED_ATTENTION_IMPLEMENTATION`], registered as a second name of the same function; see
`optimum_dfq.integrations.transformers`). If a tool strips their `quantization_config`,
transformers loads them as float models with randomly initialised weights and that attention implementation.
[`dfq_attention_forward`] therefore raises [`CheckpointError`] for an attention module that has no quantizers, whose
config has no `quantization_config` and that was not switched over by [`use_quantized_attention`] (which
[`capture_attention`] and calibration call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError
from ..quantizers import Quantizer

ATTENTION_IMPLEMENTATION = "optimum_dfq"
# What quantized checkpoints write into config.json. Loaded without `import optimum_dfq`, transformers refuses an
# unknown attention implementation and quotes the name in its error, so the name itself says what is missing.
# Checkpoints saved before it carry ATTENTION_IMPLEMENTATION, which stays registered.
SAVED_ATTENTION_IMPLEMENTATION = "optimum_dfq (requires import optimum_dfq before from_pretrained)"
ATTENTION_IMPLEMENTATIONS = (ATTENTION_IMPLEMENTATION, SAVED_ATTENTION_IMPLEMENTATION)
ATTENTION_QUANTIZERS_ATTR = "dfq_attention"


class AttentionQuantizers(nn.Module):
    """The four attention quantization sites of one attention module.

    Conversion stores an instance as the attention module's `dfq_attention` attribute; [`dfq_attention_forward`]
    finds it there and fake-quantizes the operands of both attention matmuls with it.

    Args:
        query (`Quantizer`): `Q`, the left operand of `Q·Kᵀ` (per tensor, uniform).
        key (`Quantizer`): `K`, the right operand of `Q·Kᵀ` (per tensor, uniform).
        probs (`Quantizer`): post-softmax probabilities, the left operand of `A·V` (log-√2 in RepQ-ViT).
        value (`Quantizer`): `V`, the right operand of `A·V` (per tensor, uniform).
        site (`str`, defaults to `""`): path of the attention module; each quantizer's `site` becomes
            `"<site>.query"`, `"<site>.key"`... (just `"query"`, `"key"`... when empty).

    Example:

    ```python
    >>> from optimum_dfq.nn import AttentionQuantizers
    >>> from optimum_dfq.quantizers import LogSqrt2Quantizer, UniformQuantizer
    >>> quantizers = AttentionQuantizers(UniformQuantizer(bits=4), UniformQuantizer(bits=4), LogSqrt2Quantizer(bits=4),
    ...                                  UniformQuantizer(bits=4), site="attn")
    >>> [q.site for q in quantizers.quantizers()]
    ['attn.query', 'attn.key', 'attn.probs', 'attn.value']
    ```
    """

    def __init__(self, query: Quantizer, key: Quantizer, probs: Quantizer, value: Quantizer, site: str = "") -> None:
        super().__init__()
        self.query, self.key, self.probs, self.value = query, key, probs, value
        for name in ("query", "key", "probs", "value"):
            getattr(self, name).site = f"{site}.{name}" if site else name

    def quantizers(self) -> Iterator[Quantizer]:
        """Yields the query, key, probs and value quantizers, in that order."""
        yield from (self.query, self.key, self.probs, self.value)

    def quantize_probs(self, probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Quantizes the probabilities with the probs quantizer and returns them.

        A probs quantizer that calibrates on the attention output `A·V` (it declares `observes_value = True`, e.g.
        TanQ) also receives `value` (the `V` the probabilities multiply) while its mode is `"observe"` or
        `"calibrate"`.
        """
        if getattr(self.probs, "observes_value", False) and self.probs.mode in ("observe", "calibrate"):
            self.probs.observe_value(value)
        return self.probs(probs)


@dataclass
class AttentionRecord:
    """One call of an attention module, as recorded by [`capture_attention`].

    Attributes:
        module (`nn.Module`): the attention module that was called.
        probs (`torch.Tensor`): its attention probabilities `[batch·windows, heads, queries, keys]`, after dropout
            and before any quantization, with their autograd graph.
    """

    module: nn.Module
    probs: torch.Tensor


_CAPTURES: list[list[AttentionRecord]] = []
#: Set (to `True`) by `use_quantized_attention` on the modules of a model switched to this attention on purpose; a
#: plain attribute, so copies and pickles of the model keep it and checkpoints do not.
OPT_IN_ATTR = "_optimum_dfq_attention_opt_in"


def _check_quantized_or_opted_in(module: nn.Module) -> None:
    """Raises [`CheckpointError`] when a float model runs this attention without having asked for it."""
    config = getattr(module, "config", None)
    if config is None or _CAPTURES or getattr(module, OPT_IN_ATTR, False):
        return
    if getattr(config, "quantization_config", None) is not None:
        return
    raise CheckpointError(
        f"{type(module).__name__} runs the {ATTENTION_IMPLEMENTATION!r} attention implementation, but the model is "
        "not quantized: its config has no `quantization_config`. This is what loading an optimum_dfq checkpoint whose "
        "config.json lost its `quantization_config` (e.g. rewritten by a tool) gives: transformers then builds a "
        "float model with randomly initialised weights. Restore `quantization_config` in config.json (download the "
        "checkpoint again, or re-save it from the quantized model) and load it again. To run a float model with this "
        "attention on purpose, call `optimum_dfq.nn.use_quantized_attention(model)` first."
    )


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[AttentionRecord]]:
    """Records the attention probabilities of every attention call inside the block, in call order.

    The model is switched to the `"optimum_dfq"` attention implementation for the duration (and restored after).
    Probabilities keep their autograd graph, so losses on them back-propagate to the input pixels.

    Args:
        model (`PreTrainedModel`): a ViT, DeiT or Swin model (float or quantized).

    Returns:
        A context manager yielding the list that fills up during forward passes.

    Example:
        >>> with capture_attention(model) as records:  # doctest: +SKIP
        ...     model(pixel_values)
        >>> records[0].probs.shape  # doctest: +SKIP
        torch.Size([8, 3, 65, 65])
    """
    records: list[AttentionRecord] = []
    previous = use_quantized_attention(model)
    _CAPTURES.append(records)
    try:
        yield records
    finally:
        _CAPTURES.remove(records)
        _set_implementation(model, previous)


def dfq_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with optional fake-quantization of Q, K, the probabilities and V.

    This is the function registered as the `"optimum_dfq"` attention implementation; transformers calls it from
    the attention modules of ViT, DeiT and Swin. It computes `softmax(Q·Kᵀ·scaling + mask)·V`. When `module` has a
    `dfq_attention` attribute (an [`AttentionQuantizers`]), Q and K are quantized before `Q·Kᵀ`, and V and the
    probabilities before `A·V`. Every call inside a [`capture_attention`] block is recorded.

    Args:
        module (`nn.Module`): the calling attention module (its `training` flag controls dropout).
        query (`torch.Tensor`): `[batch, heads, queries, head_dim]`.
        key (`torch.Tensor`): `[batch, heads, keys, head_dim]`.
        value (`torch.Tensor`): `[batch, heads, keys, head_dim]`.
        attention_mask (`torch.Tensor`, *optional*): additive mask, broadcastable to `[batch, heads, queries, keys]`.
        scaling (`float`, *optional*): factor applied to `Q·Kᵀ`; defaults to `head_dim ** -0.5`.
        dropout (`float`, defaults to 0.0): dropout probability of the attention probabilities (training mode only).
        kwargs (*optional*): other arguments passed by transformers; ignored.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the attention output `[batch, queries, heads, head_dim]` and the
        probabilities `[batch, heads, queries, keys]` (the quantized ones when `module` is quantized).

    Raises:
        `CheckpointError`: `module` belongs to a float model that did not opt in, typically a quantized checkpoint
            loaded without its `quantization_config`.

    Example:

    ```python
    >>> import torch
    >>> from torch import nn
    >>> from optimum_dfq.nn import dfq_attention_forward
    >>> query = key = value = torch.randn(2, 3, 5, 4)  # [batch, heads, tokens, head_dim]
    >>> output, probs = dfq_attention_forward(nn.Module(), query, key, value, attention_mask=None)
    >>> output.shape, probs.shape
    (torch.Size([2, 5, 3, 4]), torch.Size([2, 3, 5, 5]))
    ```
    """
    quantizers: AttentionQuantizers | None = getattr(module, ATTENTION_QUANTIZERS_ATTR, None)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if quantizers is not None:
        query, key = quantizers.query(query), quantizers.key(key)
    else:
        _check_quantized_or_opted_in(module)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    for records in _CAPTURES:
        records.append(AttentionRecord(module, probs))
    if quantizers is not None:
        value = quantizers.value(value)
        probs = quantizers.quantize_probs(probs, value)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


def register_attention_implementation() -> None:
    """Registers [`dfq_attention_forward`] as the `"optimum_dfq"` attention implementation of transformers.

    After this, models accept `attn_implementation="optimum_dfq"`, and the name quantized checkpoints save,
    [`SAVED_ATTENTION_IMPLEMENTATION`]. `import optimum_dfq` already calls it; calling it again does nothing.

    Example:

    ```python
    >>> from transformers import AttentionInterface
    >>> from optimum_dfq.nn import register_attention_implementation
    >>> register_attention_implementation()
    >>> "optimum_dfq" in AttentionInterface()
    True
    ```
    """
    from transformers import AttentionInterface

    for name in ATTENTION_IMPLEMENTATIONS:
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, dfq_attention_forward)


def _set_implementation(model: nn.Module, implementation: str | None) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # pragma: no cover - non-PreTrainedModel
        config._attn_implementation = implementation


def use_quantized_attention(model: nn.Module) -> str | None:
    """Switches `model` to the `"optimum_dfq"` eager attention, registering it first if needed.

    The switch stays in place (quantized models need it); restore the returned name with
    `model.set_attn_implementation(previous)` to undo it. It also marks the model's modules as having opted in, so
    that [`dfq_attention_forward`] runs them even without quantizers or `quantization_config` (a float model).

    Args:
        model (`PreTrainedModel`): a ViT, DeiT or Swin model (anything with a `config`).

    Returns:
        `str` or `None`: the model's previous `config._attn_implementation`, e.g. `"sdpa"` or `"eager"`.

    Example:

    ```python
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq.nn import use_quantized_attention
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64))
    >>> previous = use_quantized_attention(model)
    >>> model.config._attn_implementation
    'optimum_dfq'
    >>> model.set_attn_implementation(previous)  # switch back
    ```
    """
    register_attention_implementation()
    for module in model.modules():
        if getattr(module, "config", None) is not None:
            setattr(module, OPT_IN_ATTR, True)
    previous = model.config._attn_implementation
    if previous != ATTENTION_IMPLEMENTATION:
        _set_implementation(model, ATTENTION_IMPLEMENTATION)
    return previous
