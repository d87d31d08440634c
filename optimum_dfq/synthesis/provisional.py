"""A provisional quantized copy of the float model, for synthesis terms that measure the quantization error.

DFQ-ViT's hard phase (our interpretation, see [`DFQViTSynthesizer`]) asks for images on which a quantized model
disagrees with the float one. Which quantized model is not known before calibration images exist, so a provisional
one is calibrated on the images of the batch as they stand when the hard phase starts.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..calibration.data import CalibrationSet
from ..calibration.engine import quantize_model
from ..config import DFQConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import Synthesizer

#: Provisional-model settings pinned here rather than left to `DFQConfig`'s defaults, so that a change of the library's
#: default preset does not change the images synthesized with a given `provisional`.
PROVISIONAL_DEFAULTS: dict[str, Any] = {"bits": "w4a4"}
#: `DFQConfig` fields that say where calibration images come from: meaningless for a provisional model.
_SOURCE_FIELDS = ("synthesizer", "synthesizer_kwargs", "calibration_dataset", "num_images")
#: `DFQConfig` fields a run's config does not pass on to its provisional model (`provisional="run"`): the calibration
#: source, the checkpoint bookkeeping, and the post-calibration refinements, which would be redone for every batch
#: (block reconstruction alone takes longer than the synthesis of a batch).
_NOT_FROM_RUN = (*_SOURCE_FIELDS, "seed", "format_version", "library_version", "quant_method", "correction",
                 "reconstruction")
#: The `provisional` value that stands for "the quantization settings of the run itself".
RUN = "run"


def run_provisional_settings(config: DFQConfig) -> dict[str, Any]:
    """The provisional-model settings matching a run's `config`: its quantizer settings, without the calibration
    source, correction and reconstruction (what `provisional="run"` stands for in `synthesizer_kwargs`).

    Args:
        config (`DFQConfig`): the run's config.

    Returns:
        `dict[str, Any]`: `DFQConfig` fields for [`provisional_config`].

    Example:
        >>> config = DFQConfig(bits="w3a4", post_softmax="tanq", correction={"kind": "affine"})
        >>> settings = run_provisional_settings(config)
        >>> settings["bits"], settings["post_softmax"], "correction" in settings
        ('w3a4', 'tanq', False)
    """
    return {f.name: copy.deepcopy(getattr(config, f.name)) for f in dataclasses.fields(DFQConfig)
            if f.name not in _NOT_FROM_RUN}


def synthesizer_from_config(config: DFQConfig) -> Synthesizer:
    """The synthesizer a run's `config` asks for: `config.synthesizer` with `config.synthesizer_kwargs`, where
    `provisional="run"` is replaced by the run's own settings ([`run_provisional_settings`]).

    Args:
        config (`DFQConfig`): the run's config.

    Returns:
        `Synthesizer`

    Example:
        >>> config = DFQConfig(bits="w3a4", synthesizer_kwargs={"hardness_weight": 10.0, "provisional": "run"})
        >>> synthesizer_from_config(config).provisional["bits"]
        'w3a4'
    """
    from .base import get_synthesizer

    kwargs = dict(config.synthesizer_kwargs)
    if kwargs.get("provisional") == RUN:
        kwargs["provisional"] = run_provisional_settings(config)
    return get_synthesizer(config.synthesizer, **kwargs)


def provisional_config(overrides: Mapping[str, Any] | str | None = None) -> DFQConfig:
    """The `DFQConfig` of a provisional quantized model: `PROVISIONAL_DEFAULTS` updated with `overrides`.

    Args:
        overrides (`Mapping[str, Any]`, *optional*): `DFQConfig` fields, e.g. `{"bits": "w4a8"}`.

    Returns:
        `DFQConfig`

    Raises:
        `ConfigError`: for an unknown field, a field naming a calibration source, an invalid value, or `"run"` (only
            `DataFreeViTQuantizer.quantize` knows the run's settings; see [`run_provisional_settings`]).

    Example:
        >>> provisional_config({"bits": "w3a4"}).bits
        'w3a4'
    """
    if overrides == RUN:
        raise ConfigError("provisional='run' (the run's own quantization settings) is resolved by "
                          "DataFreeViTQuantizer.quantize; when calling the synthesizer directly, pass DFQConfig "
                          "fields, e.g. provisional={'bits': 'w4a4'}.")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"provisional must be a mapping of DFQConfig fields (e.g. {{'bits': 'w4a4'}}) or 'run'; got "
                          f"{overrides!r}.")
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(DFQConfig)} - set(_SOURCE_FIELDS)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"Unknown provisional-model setting(s) {unknown}; use DFQConfig fields other than "
                          f"{list(_SOURCE_FIELDS)} (it is calibrated on the images being synthesized).")
    return DFQConfig(**(PROVISIONAL_DEFAULTS | overrides))


def provisional_quantized_model(
    model: nn.Module,
    images: torch.Tensor,
    config: DFQConfig,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
) -> nn.Module:
    """Quantizes `model` in place, calibrated on `images`, and freezes it (eval mode, no gradients).

    It runs the library's quantization pipeline ([`quantize_model`]) with `config`; the fake quantizers pass
    gradients straight through, so a loss on its outputs reaches the input images.

    Args:
        model (`nn.Module`): a float ViT/DeiT/Swin classifier, modified in place: pass a copy (`copy.deepcopy`, taken
            while no feature-capture hooks are attached, or they are copied along).
        images (`torch.Tensor`): `[N, C, H, W]` calibration images in the model's input space.
        config (`DFQConfig`): the provisional model's settings ([`provisional_config`]); `input_range="auto"` becomes
            `"pixels"` when `normalization` is given, else `"calibrated"`.
        normalization (`tuple[Sequence[float], Sequence[float]]`, *optional*): the model's `(image_mean, image_std)`.

    Returns:
        `nn.Module`: the quantized copy.

    Example:

    ```python
    >>> import copy
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq.synthesis.provisional import provisional_config, provisional_quantized_model
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=64, num_labels=10)).eval()
    >>> qmodel = provisional_quantized_model(copy.deepcopy(model), torch.randn(4, 3, 32, 32), provisional_config())
    >>> type(qmodel.classifier).__name__, type(model.classifier).__name__
    ('QLinear', 'Linear')
    ```
    """
    if config.input_range == "auto":
        config = dataclasses.replace(config, input_range="pixels" if normalization is not None else "calibrated")
    elif config.input_range == "pixels" and normalization is None:
        raise ConfigError("A provisional model with input_range='pixels' needs the model's normalisation; use "
                          "input_range='calibrated'.")
    quantized, _ = quantize_model(model, CalibrationSet(pixel_values=images.detach()), config,
                                  normalization if config.input_range == "pixels" else None)
    return quantized.eval().requires_grad_(False)
