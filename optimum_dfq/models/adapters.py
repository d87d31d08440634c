"""Model adapters: what optimum_dfq needs to know about each supported architecture.

An adapter selects modules by *type* (transformers' block and attention classes, `nn.Linear`, `nn.Conv2d`,
`nn.LayerNorm`) and by dataflow (see [`find_layernorm_consumers`]), never by parameter names: transformers 5
renamed ViT's modules, and checkpoints keep the old names.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn
from transformers import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    SwinForImageClassification,
    ViTForImageClassification,
)
from transformers.models.deit.modeling_deit import DeiTAttention, DeiTLayer
from transformers.models.swin.modeling_swin import SwinAttention, SwinLayer, SwinPatchMerging
from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ModelAdapter:
    """Structural description of one model family.

    Attributes:
        family (`str`): `"vit"`, `"deit"` or `"swin"`.
        block_type (`type`): the transformer block class (a reconstruction unit).
        attention_type (`type`): the self-attention class (calls the attention interface).
        num_prefix_tokens (`int`): non-patch tokens before the patch tokens (CLS = 1; DeiT CLS + distillation = 2).
        windowed (`bool`): attention runs on local windows (Swin) rather than on all tokens.
        merging_type (`type`, *optional*): Swin's patch-merging class (its LayerNorm → reduction pair is
            re-parameterised like the blocks' pairs); `None` for models without one.

    The attributes are also the constructor's arguments. [`get_adapter`] returns the adapter of a model from
    [`ADAPTERS`].

    Example:

    ```python
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq.models import get_adapter
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> adapter = get_adapter(model)
    >>> adapter.family, adapter.num_prefix_tokens, adapter.patch_grid(model)
    ('vit', 1, (4, 4))
    >>> [name for name, _ in adapter.blocks(model)]
    ['vit.layers.0']
    ```
    """

    family: str
    block_type: type[nn.Module]
    attention_type: type[nn.Module]
    num_prefix_tokens: int
    windowed: bool
    merging_type: type[nn.Module] | None = None

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Transformer blocks in forward order."""
        return [(name, m) for name, m in model.named_modules() if isinstance(m, self.block_type)]

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Self-attention modules in forward order."""
        return [(name, m) for name, m in model.named_modules() if isinstance(m, self.attention_type)]

    def patch_embeddings(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The patch-embedding convolutions (the only `Conv2d` in these models)."""
        return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]

    def linears(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every `nn.Linear` (q/k/v/o, fc1/fc2, Swin reduction, classifiers)."""
        return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]

    def patch_size(self, model: nn.Module) -> tuple[int, int]:
        """`(height, width)` of a patch in pixels (`config.patch_size` is an `int` or a pair)."""
        patch = model.config.patch_size
        return (patch, patch) if isinstance(patch, int) else tuple(patch)

    def patch_grid(self, model: nn.Module) -> tuple[int, int]:
        """`(rows, cols)` of the first-stage patch grid."""
        size = model.config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        ph, pw = self.patch_size(model)
        return height // ph, width // pw


_VIT = ModelAdapter("vit", ViTLayer, ViTAttention, num_prefix_tokens=1, windowed=False)
_DEIT = ModelAdapter("deit", DeiTLayer, DeiTAttention, num_prefix_tokens=2, windowed=False)
_DEIT_PLAIN = ModelAdapter("deit", DeiTLayer, DeiTAttention, num_prefix_tokens=2, windowed=False)
_SWIN = ModelAdapter("swin", SwinLayer, SwinAttention, num_prefix_tokens=0, windowed=True,
                     merging_type=SwinPatchMerging)

ADAPTERS: dict[type[nn.Module], ModelAdapter] = {
    ViTForImageClassification: _VIT,
    DeiTForImageClassification: _DEIT_PLAIN,
    DeiTForImageClassificationWithTeacher: _DEIT,
    SwinForImageClassification: _SWIN,
}


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Returns the adapter of a supported model, looked up by its exact class in [`ADAPTERS`].

    Supported: `ViTForImageClassification`, `DeiTForImageClassification`, `DeiTForImageClassificationWithTeacher`
    and `SwinForImageClassification` (float or quantized; subclasses are not matched).

    Args:
        model (`nn.Module`): a transformers image-classification model.

    Returns:
        `ModelAdapter`

    Raises:
        `UnsupportedArchitectureError`: when the model's class is not supported.

    Example:

    ```python
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq.models import get_adapter
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> get_adapter(model).family
    'vit'
    ```
    """
    adapter = ADAPTERS.get(type(model))
    if adapter is None and isinstance(model, (str, os.PathLike)):
        raise UnsupportedArchitectureError(
            f"Got the model name or path {str(model)!r}, not a model. Load it first: "
            f"`DataFreeViTQuantizer.from_pretrained({str(model)!r}).quantize(...)`, or pass "
            "`AutoModelForImageClassification.from_pretrained(...)`."
        )
    original = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    if adapter is None and original is not None and type(original) in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"The model is wrapped by torch.compile ({type(model).__name__}); quantize the model it wraps, "
            "`model._orig_mod`, and compile the quantized model afterwards if you wish."
        )
    if adapter is None:
        supported = ", ".join(sorted(cls.__name__ for cls in ADAPTERS))
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not supported by optimum_dfq. Supported architectures: {supported}. "
            "Load the checkpoint with one of these classes (e.g. AutoModelForImageClassification for a ViT, DeiT or "
            "Swin checkpoint)."
        )
    return adapter


@contextlib.contextmanager
def window_sizes_kept(model: nn.Module) -> Iterator[None]:
    """Restores every Swin block's window and shift sizes on exit to what they were on entry.

    transformers' `SwinLayer` shrinks its window to the feature map (and drops its shift) *in place* on the first
    forward pass whose feature map is not larger than the window, and never grows it back. Calibrating a copy of a
    model at its native size must not leave that behind: the quantized model would then predict differently from its
    reloaded checkpoint (and from the float model) on a first input larger than the calibration images. Models
    without Swin blocks are left alone.

    Args:
        model (`nn.Module`): the model run inside the context.
    """
    saved = {name: (m.window_size, m.shift_size) for name, m in model.named_modules() if isinstance(m, SwinLayer)}
    try:
        yield
    finally:
        for name, (window_size, shift_size) in saved.items():
            layer = model.get_submodule(name)
            layer.window_size, layer.shift_size = window_size, shift_size
