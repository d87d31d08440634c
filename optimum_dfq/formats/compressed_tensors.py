"""Export to compressed-tensors: a checkpoint that plain `transformers` + `compressed-tensors` load without optimum_dfq.

Install the extra first: `pip install "optimum-dfq[compressed-tensors]"`.

What compressed-tensors (0.20) can express **exactly** for our models, and what it cannot:

* Linear weights (per output channel, 2..8 bits, symmetric or not): yes, our integer codes are stored; format
  `pack-quantized` when symmetric, `int-quantized` (int8 containers) when asymmetric, because transformers 5.23
  cannot load the packed zero points of `pack-quantized` (size mismatch of `weight_zero_point`).
* the patch-embedding Conv2d weight: compressed-tensors has no Conv2d scheme; it is stored as its dequantized float
  weight (same values, not compressed).
* Linear inputs, static per tensor (post-LayerNorm quantizers become the input quantizer of each consumer): only
  symmetric ranges are exact. compressed-tensors rounds `x/s + z` where optimum_dfq rounds `x/s` and then adds `z`;
  the two differ on values within ~1e-5 of a rounding boundary (a few per million). Our activation quantizers are
  asymmetric, so these export only with `exact=False`.
* the image-input quantizer of the patch embedding: no (compressed-tensors quantizes Linear inputs only). Raises.
* attention quantizers (Q, K, softmax output, V): no (compressed-tensors hooks the query and a KV cache). Raises.
* per-channel post-LayerNorm quantizers (`post_layernorm="per_channel"`): no static per-channel activation
  scheme. Raises.
* a bias added by re-parameterisation where the architecture has none (Swin's patch-merging reduction): the float
  class cannot hold it. Raises.
* activation corrections attached as modules (`correction` with `fold=False`): no. Raises. Folded corrections are
  plain weights and biases, exported like any other.

So the exact exports are the weight-only configurations (`w8a16`, `w4a16`, `w3a16`, ...). Configurations that also
quantize Linear inputs (`quantize_attention=False`, the patch embedding in `modules_to_not_convert`) export with
`exact=False`; the rest raise and name what would be lost.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator

import torch
from torch import nn

from ..config import DFQConfig
from ..errors import ConfigError
from ..nn import AttentionQuantizers, QConv2d, QLayerNorm, QLinear
from ..nn.modules import FrozenWeightMixin
from ..quantizers import Quantizer, UniformQuantizer
from ..version import __version__
from .checkpoint import consumers_of

INSTALL_HINT = 'pip install "optimum-dfq[compressed-tensors]"  (compressed-tensors>=0.20,<0.21)'
# a top-level config.json key naming the export's origin: `quantize(save_dir=...)` may replace a folder holding it
EXPORT_MARKER = "optimum_dfq_export"


def _require_compressed_tensors() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as err:
        raise ImportError(f"Exporting to compressed-tensors needs the compressed-tensors package: {INSTALL_HINT}") \
            from err


def _float_config(model: nn.Module):
    config = copy.deepcopy(model.config)
    for attribute in ("quantization_config", "attn_implementation"):
        if attribute in config.__dict__:
            delattr(config, attribute)
    config.attn_implementation = "eager"  # serialised: bit-identical to our attention without quantizers
    config._attn_implementation = "eager"
    return config


def _input_quantizers(model: nn.Module) -> dict[str, Quantizer | None]:
    """Each quantized Linear's input quantizer: its own, or the output quantizer of the LayerNorm it reads."""
    hf_quantizer = getattr(model, "hf_quantizer", None)
    plan = getattr(hf_quantizer, "plan", None)
    shared = consumers_of(model, plan.layernorm_consumers if plan is not None else {})
    out: dict[str, Quantizer | None] = {}
    for name, module in model.named_modules():
        if isinstance(module, QLinear):
            out[name] = module.input_quantizer if module.input_quantizer is not None else (
                shared[name].output_quantizer if name in shared else None)
    return out


def _asymmetric(quantizer: Quantizer) -> bool:
    symmetric_zero = 2 ** (quantizer.bits - 1)
    return not (isinstance(quantizer, UniformQuantizer) and bool((quantizer.zero_point == symmetric_zero).all()))


def _zero_point_fits_int8(quantizer: UniformQuantizer) -> bool:
    signed = quantizer.zero_point - 2 ** (quantizer.bits - 1)  # compressed-tensors' signed-code convention
    return bool(((signed >= -128) & (signed <= 127)).all())


def compressed_tensors_blockers(model: nn.Module, exact: bool = True) -> list[str]:
    """What a compressed-tensors export of `model` would lose (empty when it is expressible).

    Args:
        model (`PreTrainedModel`): an optimum_dfq quantized model.
        exact (`bool`): also count the activation rounding difference (see the module docstring) as a loss.

    Returns:
        `list[str]`: one readable item per kind of loss.
    """
    config = model.config.quantization_config
    problems: list[str] = []
    attention = [n for n, m in model.named_modules() if isinstance(m, AttentionQuantizers)]
    if attention:
        problems.append(f"the attention quantizers (Q, K, softmax output, V) of {len(attention)} attention module(s): "
                        "set quantize_attention=False")
    image_inputs = [n for n, m in model.named_modules() if isinstance(m, QConv2d) and m.input_quantizer is not None]
    if image_inputs:
        problems.append(f"the image-input quantizer of the patch embedding {', '.join(image_inputs)} "
                        "(compressed-tensors quantizes Linear inputs only): add it to modules_to_not_convert")
    per_channel = [n for n, m in model.named_modules() if isinstance(m, QLayerNorm)
                   and isinstance(m.output_quantizer, UniformQuantizer) and m.output_quantizer.per_channel]
    if per_channel:
        problems.append(f"the per-channel output quantizers of {len(per_channel)} LayerNorm(s) (no static per-channel "
                        "activation scheme): use post_layernorm='per_channel_reparam' or 'per_tensor'")
    corrected = [n for n, m in model.named_modules() if isinstance(m, QLinear) and m.input_correction is not None]
    if corrected:
        problems.append(f"the activation corrections attached to the inputs of {len(corrected)} Linear(s): use "
                        "correction={'fold': True} (folded corrections are plain weights and biases) or none")
    covered = {id(q) for m in model.modules() if isinstance(m, (QLinear, QConv2d, QLayerNorm, AttentionQuantizers))
               for q in m.children() if isinstance(q, Quantizer)}
    others = [n for n, m in model.named_modules() if isinstance(m, Quantizer) and id(m) not in covered]
    if others:
        problems.append(f"quantizers compressed-tensors has no place for: {', '.join(others)}")
    with torch.device("meta"):
        float_model = type(model)(_float_config(model))
    added = [n for n, m in model.named_modules()
             if isinstance(m, QLinear) and m.bias is not None and float_model.get_submodule(n).bias is None]
    if added:
        problems.append(f"the bias that re-parameterisation added to {', '.join(added)} (the float architecture has "
                        "none there): use post_layernorm='per_tensor'")
    inputs = _input_quantizers(model)
    with_zero_points = [] if config.weight_symmetric else [(f"{n}.weight", m.weight_quantizer)
                                                           for n, m in _quantized_linears(model)]
    if config.activation_bits is not None:
        with_zero_points += [(f"{n}.input", q) for n, q in inputs.items() if isinstance(q, UniformQuantizer)]
    unstorable = [name for name, quantizer in with_zero_points if not _zero_point_fits_int8(quantizer)]
    if unstorable:
        problems.append(f"the zero points of {', '.join(unstorable)}: outside the int8 range compressed-tensors stores "
                        "them in (their calibrated range excludes 0, e.g. a weight row of one sign); keep those "
                        "layers in float (modules_to_not_convert) or use weight_symmetric=True")
    if config.activation_bits is not None:
        missing = [n for n, q in inputs.items() if q is None]
        if missing:
            problems.append(f"unquantized inputs of {', '.join(missing)} in a model whose other Linear inputs are "
                            "quantized (one compressed-tensors scheme covers all Linears)")
        asymmetric = [n for n, q in inputs.items() if q is not None and _asymmetric(q)]
        if exact and asymmetric:
            problems.append(f"bit-exactness of the {len(asymmetric)} asymmetric Linear input quantizer(s): "
                            "compressed-tensors rounds x/s + z where optimum_dfq rounds x/s then adds z, so a few "
                            "values per million land one level apart; pass exact=False to accept that")
    return problems


def _quantized_linears(model: nn.Module) -> Iterator[tuple[str, QLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, QLinear):
            yield name, module


def _float_state_dict(model: nn.Module, float_model: nn.Module) -> dict[str, torch.Tensor]:
    """The float model's state dict with every quantized weight replaced by its dequantized codes."""
    state = {}
    for key in float_model.state_dict():
        module_name, _, attribute = key.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, FrozenWeightMixin) and attribute == "weight":
            state[key] = module.quantized_weight().detach()
        else:
            state[key] = getattr(module, attribute).detach()
    return state


@torch.no_grad()
def export_compressed_tensors(
    model: nn.Module, save_directory: str | os.PathLike, *, exact: bool = True, **save_kwargs
) -> None:
    """Writes `model` as a compressed-tensors checkpoint that plain transformers loads without optimum_dfq.

    Also reachable as `qmodel.save_pretrained(save_directory, format="compressed-tensors")`.

    Args:
        model (`PreTrainedModel`): an optimum_dfq quantized model whose quantizers compressed-tensors can express
            (see the module docstring).
        save_directory (`str` or `os.PathLike`): output folder.
        exact (`bool`, defaults to `True`): refuse any difference from optimum_dfq's predictions; `False` accepts
            compressed-tensors' rounding of asymmetric activation quantizers.
        save_kwargs: forwarded to `save_pretrained` (e.g. `max_shard_size`).

    Raises:
        `ConfigError`: naming every quantizer the export would lose.
        `ImportError`: compressed-tensors is not installed.

    Example:
        >>> qmodel = DataFreeViTQuantizer(model).quantize(bits="w4a16")  # doctest: +SKIP
        >>> qmodel.save_pretrained("vit-w4a16-ct", format="compressed-tensors")  # doctest: +SKIP
        >>> AutoModelForImageClassification.from_pretrained("vit-w4a16-ct")  # without optimum_dfq  # doctest: +SKIP
    """
    _require_compressed_tensors()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    config = getattr(model.config, "quantization_config", None)
    if not isinstance(config, DFQConfig):
        raise ConfigError(f"{type(model).__name__} is not an optimum_dfq quantized model (no DFQConfig).")
    problems = compressed_tensors_blockers(model, exact=exact)
    if problems:
        raise ConfigError(
            "compressed-tensors cannot express this quantized model; the export would lose: - "
            + "\n - ".join(problems)
            + "\nSave it in the native format instead (model.save_pretrained(path)), which keeps every quantizer."
        )
    device = next(model.parameters()).device
    float_model = type(model)(_float_config(model)).to(device).eval()
    float_model.load_state_dict(_float_state_dict(model, float_model), strict=True)

    weight_bits, activation_bits = config.weight_bits, config.activation_bits
    inputs = None
    if activation_bits is not None:
        inputs = QuantizationArgs(num_bits=activation_bits, type="int", symmetric=False, strategy="tensor",
                                  dynamic=False)
    # our codes are stored: compressing the dequantized weight with the same scale and zero point reproduces them.
    # Asymmetric weights use int-quantized (int8 containers): pack-quantized packs their zero points too, and
    # transformers 5.23's loader then rejects them (size mismatch of weight_zero_point). The format is the scheme's,
    # not a model-wide override, which compressed-tensors warns about ("Compression may fail") when it differs from
    # the format it infers.
    fmt = "pack-quantized" if weight_bits < 8 and config.weight_symmetric else "int-quantized"
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=weight_bits, type="int", symmetric=config.weight_symmetric,
                                 strategy="channel"),
        input_activations=inputs,
        format=fmt,
    )
    linears = dict(_quantized_linears(model))
    ignore = [n for n, m in float_model.named_modules() if isinstance(m, nn.Linear) and n not in linears]
    apply_quantization_config(float_model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore))

    input_quantizers = _input_quantizers(model)
    for name, qlinear in linears.items():
        target = float_model.get_submodule(name)
        _set_params(target, "weight", qlinear.weight_quantizer, not config.weight_symmetric)
        if inputs is not None:
            _set_params(target, "input", input_quantizers[name], True)
        target.quantization_status = QuantizationStatus.FROZEN

    compressor = ModelCompressor.from_pretrained_model(float_model)
    compressor.compress_model(float_model)
    float_model.save_pretrained(save_directory, **save_kwargs)
    compressor.update_config(save_directory)
    _mark_export(save_directory, config)


def _mark_export(save_directory: str | os.PathLike, config: DFQConfig) -> None:
    """Records in `config.json` that optimum_dfq wrote this export (plain transformers keeps it as an attribute)."""
    path = os.path.join(save_directory, "config.json")
    with open(path, encoding="utf-8") as file:
        stored = json.load(file)
    stored[EXPORT_MARKER] = {"format": "compressed-tensors", "bits": config.bits, "version": __version__}
    with open(path, "w", encoding="utf-8") as file:
        json.dump(stored, file, indent=2, sort_keys=True)
        file.write("\n")


def _set_params(module: nn.Module, base: str, quantizer: UniformQuantizer, with_zero_point: bool) -> None:
    """Copies an optimum_dfq uniform quantizer into compressed-tensors parameters (signed-code convention)."""
    scale = getattr(module, f"{base}_scale")
    scale.data.copy_(quantizer.scale.reshape(scale.shape).to(scale.dtype))
    if with_zero_point:
        zero_point = getattr(module, f"{base}_zero_point")
        signed = quantizer.zero_point - 2 ** (quantizer.bits - 1)
        zero_point.data.copy_(signed.reshape(zero_point.shape).to(zero_point.dtype))
