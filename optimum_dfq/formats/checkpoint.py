"""The native `optimum_dfq` checkpoint: what it holds, how a loading skeleton is rebuilt, and how a load is verified.

A checkpoint is what `save_pretrained` writes for a frozen quantized model ([`freeze_model`]): `config.json` with
the full [`DFQConfig`] as `quantization_config`, and safetensors files whose tensors are exactly the model's
`state_dict()`, so transformers' ordinary loading (key renaming included) fills them:

| tensor | meaning |
|---|---|
| `<linear or conv>.weight_packed` | `uint8`, weight codes packed densely to their bit width ([`~formats.packing`]) |
| `<linear or conv>.weight_shape` | `int64`, the unpacked weight shape |
| `<module>.<site>_quantizer.scale`, `.zero_point` | `float32` parameters of every uniform quantizer |
| `<attention>.dfq_attention.probs.scale` | log-2 / log-√2 quantizer scale (and query/key/value uniform quantizers) |
| `<...>_quantizer.calibrated` | `bool`, set for every quantizer of a calibrated model |
| everything else | the float tensors of the model (LayerNorm affine after re-parameterisation, biases, embeddings) |

The safetensors header metadata holds one JSON entry under [`METADATA_KEY`]: the [`QuantizationPlan`] (the
LayerNorm → Linear consumer map, the Linears reading an activation function's output, and the activation-correction
layout) that rebuilds the skeleton without running the model, provenance (the float `base_model` and a summary of the
calibration set, for model cards), the float dtype, a copy of the `quantization_config` (so that an edited or
mismatched `config.json` is caught before any tensor is loaded), and SHA-256 digests that prove a loaded model is
bit-identical to the saved one: of the whole state dict, of its integer and bool tensors alone (packed codes, weight
shapes, calibration flags; checked whatever `dtype` the model is loaded in), and of the whole state dict with the
float tensors cast to `bfloat16` and to `float16` (checked when `from_pretrained(dtype=...)` loads in those).
Checkpoints written before these entries existed load without the corresponding check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration.convert import QuantizationPlan, activation_quantizer, convert_model
from ..calibration.correction import attach_corrections
from ..config import DFQConfig
from ..errors import CheckpointError, ConfigError, DFQError
from ..models import ADAPTERS, get_adapter
from ..nn import QLayerNorm, QLinear
from ..nn.modules import FrozenWeightMixin
from ..quantizers import Quantizer

logger = logging.getLogger(__name__)

#: Key of the JSON entry in the safetensors header metadata.
METADATA_KEY = "optimum_dfq"
#: Float dtypes a checkpoint records a digest for (the state dict with its float tensors cast to them).
CAST_DIGEST_DTYPES = (torch.bfloat16, torch.float16)
_MAX_LISTED = 8


def _listing(names: Sequence[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _uncalibrated(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Quantizer) and not bool(m.calibrated)]


# ---------------------------------------------------------------------------------------------------- saving side
def freeze_model(model: nn.Module) -> int:
    """Freezes every quantized weight of `model` to packed integer codes (see [`FrozenWeightMixin.freeze`]).

    Args:
        model (`nn.Module`): a calibrated quantized model.

    Returns:
        `int`: the number of modules frozen by this call.

    Example:
        >>> freeze_model(qmodel)  # doctest: +SKIP
        14
    """
    count = 0
    for module in model.modules():
        if isinstance(module, FrozenWeightMixin) and not module.is_frozen:
            module.freeze()
            count += 1
    return count


def check_saveable(model: nn.Module) -> None:
    """Raises [`CheckpointError`] unless every quantized weight is frozen and every quantizer calibrated.

    A checkpoint must never hold float weights where packed codes are expected, nor default quantizer parameters.
    """
    unfrozen = [n for n, m in model.named_modules() if isinstance(m, FrozenWeightMixin) and not m.is_frozen]
    if unfrozen:
        raise CheckpointError(
            f"Cannot save a quantized checkpoint: the weights of {_listing(unfrozen)} are still float (not packed). "
            "Call `optimum_dfq.formats.checkpoint.freeze_model(model)` first; DataFreeViTQuantizer.quantize returns "
            "frozen models."
        )
    uncalibrated = _uncalibrated(model)
    if uncalibrated:
        raise CheckpointError(
            f"Cannot save a quantized checkpoint: quantizer(s) {_listing(uncalibrated)} are not calibrated. "
            "Calibrate them before saving (DataFreeViTQuantizer.quantize returns fully calibrated models)."
        )


def check_state_dict_argument(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raises [`ConfigError`] when a `save_pretrained(state_dict=...)` holds other tensors than `model`'s own.

    transformers writes the state dict the quantizer gives it, the model's (the one the checkpoint's digests are
    of), so any other `state_dict=` would be dropped without a word. The model's own state dict (what `accelerate`
    passes) is accepted.

    Args:
        model (`nn.Module`): the quantized model being saved.
        state_dict (`Mapping[str, torch.Tensor]`): the `state_dict=` given to `save_pretrained`.

    Raises:
        `ConfigError`: naming the tensors that are missing, extra, or differ (dtype, shape or bits).
    """
    own = model.state_dict()
    differing = sorted(set(own) ^ set(state_dict)) + sorted(
        name for name in own.keys() & state_dict.keys()
        if state_digest({name: own[name]}) != state_digest({name: state_dict[name]})
    )
    if differing:
        raise ConfigError(
            f"save_pretrained(state_dict=...) got a state dict that differs from the model's own tensors: "
            f"{_listing(differing)}. A quantized checkpoint is written from the model itself (packed codes and "
            "quantizers, with digests of them), so these tensors would not be saved. Load them into the model first "
            "(`model.load_state_dict(state_dict)`), then call save_pretrained without state_dict=."
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def state_digest(state_dict: Mapping[str, torch.Tensor], float_dtype: torch.dtype | None = None) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor (names sorted): equal iff bit-identical.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): the tensors.
        float_dtype (`torch.dtype`, *optional*): cast every floating-point tensor to this dtype first (the digest of
            the state a `from_pretrained(dtype=float_dtype)` load yields).

    Returns:
        `str`: the hexadecimal digest.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        if float_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(float_dtype)
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
        data = tensor.reshape(-1).contiguous().cpu()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _float_dtypes(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The floating-point dtypes of `state_dict`, in order of first appearance."""
    dtypes = [_dtype_name(t.dtype) for t in state_dict.values() if t.is_floating_point()]
    return list(dict.fromkeys(dtypes))


def _float_dtype(model: nn.Module) -> str | None:
    dtypes = _float_dtypes(model.state_dict())
    return dtypes[0] if dtypes else None


def _integer_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in state_dict.items() if not tensor.is_floating_point()}


def checkpoint_metadata(
    model: nn.Module,
    plan: QuantizationPlan,
    provenance: Mapping[str, Any] | None = None,
    quantization_config: DFQConfig | None = None,
) -> dict[str, str]:
    """The safetensors header metadata of a checkpoint of `model` (one JSON string under [`METADATA_KEY`]).

    Args:
        model (`PreTrainedModel`): a frozen quantized model (checked with [`check_saveable`]).
        plan (`QuantizationPlan`): the structure quantization gave the model (returned by `quantize_model`).
        provenance (`Mapping`, *optional*): JSON-serialisable `{"base_model": ..., "calibration": {...}}`.
        quantization_config (`DFQConfig`, *optional*): the config written into `config.json` alongside; recorded so
            that loading can check `config.json` against the weights ([`check_quantization_config`]).

    Returns:
        `dict[str, str]`
    """
    check_saveable(model)
    state = model.state_dict()
    payload = {
        "plan": dataclasses.asdict(plan),
        "provenance": dict(provenance or {}),
        "float_dtype": _float_dtype(model),
        "sha256": state_digest(state),
        "integer_sha256": state_digest(_integer_tensors(state)),
    }
    if _float_dtypes(state):
        payload["cast_sha256"] = {_dtype_name(dtype): state_digest(state, dtype) for dtype in CAST_DIGEST_DTYPES}
    if quantization_config is not None:
        payload["quantization_config"] = quantization_config.to_dict()
    return {METADATA_KEY: json.dumps(payload, sort_keys=True)}


# --------------------------------------------------------------------------------------------------- loading side
@dataclass
class CheckpointInfo:
    """What the headers of a checkpoint's safetensors files say (read before any tensor is loaded).

    Attributes:
        plan (`QuantizationPlan`): the saved model's structure (in-memory module names).
        provenance (`dict`): recorded at save time (`base_model`, `calibration`).
        float_dtype (`str`, *optional*): dtype of the saved float tensors.
        sha256 (`str`): digest of the saved state dict.
        integer_sha256 (`str`, *optional*): digest of its integer and bool tensors (`None`: an older checkpoint).
        cast_sha256 (`dict[str, str]`): digest of the state dict with the float tensors cast to each dtype named.
        quantization_config (`dict`, *optional*): the `quantization_config` saved with the weights (`None`: an older
            checkpoint).
        tensor_names (`set[str]`): every tensor name in the files (checkpoint names, possibly legacy ones).
        tensor_shapes (`dict[str, tuple[int, ...]]`): the shape of every tensor in the files, by checkpoint name,
            read from the headers.
        files (`list[str]`): the checkpoint files.
    """

    plan: QuantizationPlan
    sha256: str
    provenance: dict[str, Any] = field(default_factory=dict)
    float_dtype: str | None = None
    integer_sha256: str | None = None
    cast_sha256: dict[str, str] = field(default_factory=dict)
    quantization_config: dict[str, Any] | None = None
    tensor_names: set[str] = field(default_factory=set)
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def read_checkpoint_info(files: Sequence[str] | None) -> CheckpointInfo:
    """Reads and validates the safetensors headers of a native checkpoint.

    Args:
        files (`Sequence[str]`): the checkpoint files transformers resolved (one per shard).

    Returns:
        [`CheckpointInfo`]

    Raises:
        `CheckpointError`: not safetensors, a file that cannot be read (naming the `OSError`), a corrupt or
            truncated file, or no optimum_dfq metadata.
    """
    from safetensors import SafetensorError, safe_open

    if not files:
        raise CheckpointError(
            "optimum_dfq checkpoints load from safetensors files, but transformers resolved none (was a state_dict "
            "passed to from_pretrained?). Load from the saved folder or Hub repository instead."
        )
    shapes: dict[str, tuple[int, ...]] = {}
    metadata: dict[str, str] | None = None
    for path in files:
        path = str(path)
        if not path.endswith(".safetensors"):
            raise CheckpointError(
                f"{path} is not a safetensors file; optimum_dfq checkpoints are safetensors only. Re-save the model "
                "with `save_pretrained` (it writes model.safetensors)."
            )
        try:
            with safe_open(path, framework="pt") as handle:
                names = handle.keys()
                shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in names})
                metadata = metadata if metadata is not None else (handle.metadata() or {})
        except SafetensorError as err:
            raise CheckpointError(
                f"The checkpoint file {path} is corrupt or truncated ({err}). Download it again "
                "(from_pretrained(..., force_download=True)) or re-save the model."
            ) from err
        except OSError as err:  # the file itself may be sound: do not call it corrupt
            raise CheckpointError(
                f"The checkpoint file {path} could not be read ({type(err).__name__}: {err}). Check that it exists "
                "and that this process may read it; a link into the Hugging Face cache whose file is gone is restored "
                "by from_pretrained(..., force_download=True)."
            ) from err
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise CheckpointError(
            f"{files[0]} has no '{METADATA_KEY}' metadata, so it was not written by optimum_dfq's save_pretrained "
            "(or a tool rewrote the file and dropped its header metadata). Re-save the quantized model with "
            "`model.save_pretrained(...)`."
        )
    try:
        payload = json.loads(raw)
        known = {f.name for f in dataclasses.fields(QuantizationPlan)}
        unknown = sorted(set(payload["plan"]) - known)
        if unknown:
            raise CheckpointError(
                f"The checkpoint's quantization plan has field(s) {unknown} that this optimum_dfq version does not "
                "know: it was written by a newer version. Upgrade optimum-dfq (pip install -U optimum-dfq)."
            )
        quantization_config = payload.get("quantization_config")
        return CheckpointInfo(
            plan=QuantizationPlan(**payload["plan"]),
            sha256=str(payload["sha256"]),
            provenance=dict(payload.get("provenance") or {}),
            float_dtype=payload.get("float_dtype"),
            integer_sha256=payload.get("integer_sha256"),
            cast_sha256={str(k): str(v) for k, v in (payload.get("cast_sha256") or {}).items()},
            quantization_config=dict(quantization_config) if quantization_config is not None else None,
            tensor_names=set(shapes),
            tensor_shapes=shapes,
            files=[str(path) for path in files],
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"The '{METADATA_KEY}' metadata of {files[0]} is malformed ({type(err).__name__}: {err}). The file is "
            "corrupt; download or save it again."
        ) from err


def build_skeleton(model: nn.Module, config: DFQConfig, saved: QuantizationPlan) -> QuantizationPlan:
    """Turns a float model (normally on the meta device) into the frozen quantized layout a checkpoint fills.

    Applies [`convert_model`], then the structural effects of the later stages: RepQ re-parameterisation
    (per-tensor LayerNorm output quantizers, a bias on every consumer, see `calibration/reparam.py`) and the
    activation corrections (`attach_corrections`), then the frozen weight layout. No calibration runs and no tensor
    is initialised: every value comes from the checkpoint.

    Args:
        model (`PreTrainedModel`): a float ViT/DeiT/Swin (modified in place).
        config (`DFQConfig`): the checkpoint's quantization config.
        saved (`QuantizationPlan`): the plan recorded in the checkpoint metadata.

    Returns:
        `QuantizationPlan`
    """
    plan = convert_model(model, config, get_adapter(model), dict(saved.layernorm_consumers),
                         activation_consumers=list(saved.activation_consumers))
    if config.post_layernorm == "per_channel_reparam":
        for norm_name, consumers in plan.layernorm_consumers.items():
            norm = model.get_submodule(norm_name)
            per_tensor = activation_quantizer(config, bits=norm.output_quantizer.bits)
            per_tensor.site = norm.output_quantizer.site
            norm.output_quantizer = per_tensor
            for name in consumers:
                model.get_submodule(name).ensure_bias()
    attach_corrections(model, saved.corrections)
    plan.corrections = dict(saved.corrections)
    for module in model.modules():
        if isinstance(module, FrozenWeightMixin):
            module.prepare_frozen()
    return plan


def _saved_architectures(config: Any) -> list[type[nn.Module]]:
    """The supported classes named in `config.architectures` (the class the checkpoint was saved from)."""
    supported = {cls.__name__: cls for cls in ADAPTERS}
    return [supported[str(name)] for name in (getattr(config, "architectures", None) or []) if str(name) in supported]


def _wrong_class_error(saved: type[nn.Module], loading_into: str) -> CheckpointError:
    return CheckpointError(
        f"This quantized checkpoint was saved from a {saved.__name__} (config.json's `architectures`) but is being "
        f"loaded into {loading_into}. Its packed weights and quantizers are those of {saved.__name__}'s layers and "
        f"heads, so it only loads into that class: use {saved.__name__}.from_pretrained(...) or "
        "AutoModelForImageClassification.from_pretrained(...). To get another head, quantize the float model of "
        "that class."
    )


def check_config_family(config: Any) -> None:
    """Raises [`CheckpointError`] when the checkpoint is being loaded with a class of another model family.

    Runs on the config, before the model is built: transformers converts `config.json` to the loading class's
    config type, so a ViT checkpoint loaded with `SwinForImageClassification` would otherwise fail inside Swin's
    construction with an unrelated error (`'int' object is not subscriptable`). Within one family (DeiT with or
    without the distillation head), [`check_architecture`] decides once the model is built.

    Args:
        config (`PretrainedConfig`): the configuration transformers built for the loading class.

    Raises:
        `CheckpointError`: the checkpoint was saved from a supported class of another family.
    """
    saved = _saved_architectures(config)
    if saved and not isinstance(config, saved[0].config_class):
        raise _wrong_class_error(saved[0], f"a model of type {type(config).model_type!r} ({type(config).__name__})")


def check_architecture(model: nn.Module) -> None:
    """Raises [`CheckpointError`] when `config.architectures` names another supported class than `model`'s.

    A quantized checkpoint holds the packed weights and quantizers of its own class's heads (DeiT with or without
    the distillation head, ...): it cannot fill another class, and the missing or unexpected tensors that loading it
    anyway produces would otherwise look like a damaged file. Classes optimum_dfq does not support are left to
    [`get_adapter`], which names the supported ones.

    Args:
        model (`PreTrainedModel`): the model being loaded (its config read from the checkpoint's `config.json`).

    Raises:
        `CheckpointError`: the checkpoint was saved from another supported class.
    """
    saved = _saved_architectures(model.config)
    if saved and type(model) in ADAPTERS and type(model) not in saved:
        raise _wrong_class_error(saved[0], f"a {type(model).__name__}")


def check_quantization_config(info: CheckpointInfo, config: DFQConfig) -> None:
    """Raises [`CheckpointError`] when `config.json`'s `quantization_config` is not the one saved with the weights.

    The safetensors metadata keeps a copy of the config the weights were quantized with; an edited `config.json`, or
    one from another save next to these weights, would otherwise build different quantizers (other bit widths, other
    softmax quantizer, ...) that load silently or fail with a shape error. Checkpoints written before the copy was
    recorded are not checked.

    Args:
        info (`CheckpointInfo`): what the checkpoint's headers say.
        config (`DFQConfig`): the quantization config transformers read from `config.json`.

    Raises:
        `CheckpointError`: a field differs, or the saved copy is malformed.
    """
    if info.quantization_config is None:
        return
    try:
        saved = DFQConfig.from_dict(dict(info.quantization_config)).to_dict()
    except DFQError as err:
        raise CheckpointError(
            f"The quantization_config recorded in the '{METADATA_KEY}' metadata of the checkpoint is invalid "
            f"({err}), although config.json's is valid: the weights file is damaged or was written by another "
            "version of optimum-dfq than config.json. Download or save the checkpoint again as a whole."
        ) from err
    current = config.to_dict()
    differing = sorted(key for key in saved.keys() & current.keys() if saved[key] != current[key])
    if differing:
        details = "; ".join(
            f"{key} is {current[key]!r} in config.json but {saved[key]!r} in the weights" for key in differing
        )
        raise CheckpointError(
            f"config.json and the weights disagree: the `quantization_config` in config.json is not the one the "
            f"weights (model.safetensors) were quantized with: {details}. config.json was edited, or it and the "
            "weights come from different saves. Restore config.json from the same save as the weights (download the "
            "checkpoint again with from_pretrained(..., force_download=True)), or re-save the quantized model."
        )


def _loading_names(model: nn.Module, names: Sequence[str], hf_quantizer: Any = None, *,
                   identity_on_failure: bool = True) -> dict[str, str] | None:
    """Checkpoint name -> in-memory name, as transformers' loading renames them (identity when unavailable, or `None`
    if not `identity_on_failure`)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        conversions = get_model_conversion_mapping(model, None, hf_quantizer)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        meta = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        out = {}
        for name in names:
            renamed, converted = rename_source_key(name, renamings, converters, prefix, meta)
            out[name] = name if converted is not None else renamed  # converters merge tensors: shapes differ
        return out
    except Exception as err:  # noqa: BLE001 - transformers internals; verify_loaded still checks after loading
        logger.debug("Could not map checkpoint names to the model's (%r).", err)
        return {name: name for name in names} if identity_on_failure else None


def check_tensor_shapes(model: nn.Module, info: CheckpointInfo, hf_quantizer: Any = None) -> None:
    """Raises [`CheckpointError`] when a checkpoint tensor has another shape than the skeleton's (before loading).

    transformers would stop on such a tensor with a generic `RuntimeError` (or, with `ignore_mismatched_sizes=True`,
    replace it with a random one). The shapes come from the safetensors headers; names are mapped the way
    transformers' loading maps them.

    Args:
        model (`PreTrainedModel`): the quantized skeleton ([`build_skeleton`]).
        info (`CheckpointInfo`): what the checkpoint's headers say.
        hf_quantizer (*optional*): the loading `HfQuantizer` (its key renamings apply).

    Raises:
        `CheckpointError`: naming the mismatched tensors and the likely cause (another `num_labels`, or
            `config.json` and weights from different saves).
    """
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    mapping = _loading_names(model, list(info.tensor_shapes), hf_quantizer)
    mismatched = sorted(
        (mapping[name], tuple(shape), expected[mapping[name]])
        for name, shape in info.tensor_shapes.items()
        if mapping[name] in expected and expected[mapping[name]] != tuple(shape)
    )
    if not mismatched:
        return
    shown = "; ".join(f"{name}: {list(saved)} in the checkpoint, {list(wanted)} in the model"
                      for name, saved, wanted in mismatched[:_MAX_LISTED])
    more = f" ... ({len(mismatched) - _MAX_LISTED} more)" if len(mismatched) > _MAX_LISTED else ""
    num_labels = getattr(model.config, "num_labels", None)
    if num_labels is not None and all(
        wanted and saved and wanted[0] == num_labels != saved[0] and wanted[1:] == saved[1:]
        for _, saved, wanted in mismatched
    ):
        cause = (
            f"The model was built with num_labels={num_labels} (a `num_labels=` or `config=` given to "
            f"from_pretrained) but the checkpoint's classifier has {mismatched[0][1][0]} outputs. A quantized "
            "classifier cannot be resized or re-initialised (`ignore_mismatched_sizes` does not apply): load the "
            f"checkpoint with its own labels, or quantize a float model fine-tuned for {num_labels} labels."
        )
    else:
        cause = (
            "config.json (its quantization_config or the model's sizes) and the weights come from different saves, or "
            "the file was written for another model. Restore config.json and model.safetensors from the same save "
            "(download the checkpoint again), or re-save the quantized model."
        )
    raise CheckpointError(
        f"The checkpoint's tensors do not have the shapes of the quantized {type(model).__name__} built from its "
        f"config.json: {shown}{more}. {cause}"
    )


def _checkpoint_names(model: nn.Module, names: list[str]) -> set[str]:
    """Best effort: the names `names` (in-memory) get in a checkpoint (transformers' save-time renaming)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion

        return set(revert_weight_conversion(model, {name: torch.empty(0) for name in names}))
    except Exception:  # noqa: BLE001 - only used to name keys in an error message
        return set(names)


def verify_loaded(model: nn.Module, info: CheckpointInfo) -> None:
    """Proves that loading filled the skeleton exactly with the checkpoint (raises [`CheckpointError`] otherwise).

    Checks, in order: every tensor was loaded (transformers only warns about missing keys and leaves them
    uninitialised; shape mismatches were refused before loading by [`check_tensor_shapes`]), no checkpoint tensor
    was left unused, every packed weight has the module's shape, every quantizer is calibrated, the SHA-256 of the
    integer and bool tensors (packed codes, weight shapes, calibration flags) equals the saved one whatever the
    float dtype, and the SHA-256 of the whole loaded state dict equals the saved one. When `from_pretrained(dtype=...)`
    changed the float dtype, the whole state is compared with the digest recorded for that dtype (`bfloat16`,
    `float16`), modules left in the saved dtype included (`_keep_in_fp32_modules`); for another dtype, a mix of new
    dtypes, or a checkpoint written before those digests existed, only the integer tensors are verified (an info log
    says so).

    Args:
        model (`PreTrainedModel`): the loaded quantized model.
        info (`CheckpointInfo`): what the checkpoint's headers say.

    Raises:
        `CheckpointError`: naming what differs and how to get a sound file.
    """
    state = model.state_dict(keep_vars=True)
    flagged = [name for name, tensor in state.items() if getattr(tensor, "_is_hf_initialized", False)]
    if flagged:  # transformers flags every tensor it loaded; absent flags mean missing or mismatched tensors
        missing = sorted(set(state) - set(flagged))
        if missing:
            raise CheckpointError(
                f"The checkpoint is incomplete: {len(missing)} tensor(s) of the quantized model were missing or had "
                f"the wrong shape: {_listing(missing)}. The file is damaged or was written by another model or "
                "quantization config; save it again from the quantized model."
            )
    if len(info.tensor_names) > len(state):
        expected = _checkpoint_names(model, list(state)) | set(state)
        extra = sorted(info.tensor_names - expected) or [f"{len(info.tensor_names) - len(state)} tensor(s)"]
        raise CheckpointError(
            f"The checkpoint holds tensors the quantized model does not have: {_listing(extra)}. It was written for "
            "another architecture or quantization config; re-save it from the quantized model."
        )
    for name, module in model.named_modules():
        if isinstance(module, FrozenWeightMixin):
            stored = tuple(int(s) for s in module.weight_shape.tolist())
            if stored != module.weight_dims():
                raise CheckpointError(
                    f"{name}.weight_shape is {list(stored)} but the module's weight is {list(module.weight_dims())}. "
                    "The file is damaged or was written for another model; save it again from the quantized model."
                )
    uncalibrated = _uncalibrated(model)
    if uncalibrated:
        raise CheckpointError(
            f"The checkpoint has uncalibrated quantizer(s): {_listing(uncalibrated)}. optimum_dfq never saves those, "
            "so the file was altered; save it again from the quantized model."
        )
    state = model.state_dict()
    corrupt = ("the checkpoint file is corrupt. Download it again (from_pretrained(..., force_download=True)) or "
               "re-save the model.")
    if info.integer_sha256 is not None and state_digest(_integer_tensors(state)) != info.integer_sha256:
        raise CheckpointError(
            "The loaded integer tensors (packed weight codes, weight shapes, calibration flags) differ from the ones "
            f"that were saved (SHA-256 mismatch): {corrupt}"
        )
    loaded = _float_dtypes(state)
    changed = [dtype for dtype in loaded if dtype != info.float_dtype]
    if info.float_dtype is None or not changed:
        if state_digest(state) != info.sha256:
            raise CheckpointError(
                f"The loaded tensors differ from the ones that were saved (SHA-256 mismatch): {corrupt}"
            )
        return
    target = changed[0]
    if len(changed) == 1 and target in info.cast_sha256:
        if state_digest(state, getattr(torch, target)) != info.cast_sha256[target]:
            raise CheckpointError(
                f"The loaded tensors differ from the ones that were saved, cast to {target} (SHA-256 mismatch): "
                f"{corrupt}"
            )
        return
    if len(changed) > 1:  # e.g. `_keep_in_fp32_modules` beside dtype=...: digests exist for one dtype at a time
        loaded_as, no_digest = f"mixed float dtypes ({', '.join(loaded)})", "for a mix of dtypes"
    else:
        loaded_as, no_digest = target, "for that dtype"
    if info.integer_sha256 is not None:
        logger.info("Loaded in %s instead of %s: the checkpoint records no digest %s, so only its integer tensors "
                    "were verified.", loaded_as, info.float_dtype, no_digest)
    else:
        logger.info("Loaded in %s instead of %s: the checkpoint was written before per-dtype and integer digests were "
                    "recorded, so the digest check is skipped.", loaded_as, info.float_dtype)


def consumers_of(model: nn.Module, layernorm_consumers: Mapping[str, list[str]]) -> dict[str, QLayerNorm]:
    """Maps each consuming `QLinear` name to the `QLayerNorm` whose output quantizer quantizes its input."""
    out: dict[str, QLayerNorm] = {}
    for norm_name, consumers in layernorm_consumers.items():
        norm = model.get_submodule(norm_name)
        for name in consumers:
            if isinstance(model.get_submodule(name), QLinear) and isinstance(norm, QLayerNorm):
                out[name] = norm
    return out
