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
layout) that rebuilds the skeleton without running
the model, provenance (the float `base_model` and a summary of the
calibration set, for model cards), the float dtype, and a SHA-256 digest of the whole state dict that proves a
loaded model is bit-identical to the saved one.
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
from ..errors import CheckpointError
from ..models import get_adapter
from ..nn import QLayerNorm, QLinear
from ..nn.modules import FrozenWeightMixin
from ..quantizers import Quantizer

logger = logging.getLogger(__name__)

#: Key of the JSON entry in the safetensors header metadata.
METADATA_KEY = "optimum_dfq"
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


def state_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor (names sorted): equal iff bit-identical."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
        data = tensor.reshape(-1).contiguous().cpu()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _float_dtype(model: nn.Module) -> str | None:
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            return str(tensor.dtype).removeprefix("torch.")
    return None


def checkpoint_metadata(
    model: nn.Module, plan: QuantizationPlan, provenance: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """The safetensors header metadata of a checkpoint of `model` (one JSON string under [`METADATA_KEY`]).

    Args:
        model (`PreTrainedModel`): a frozen quantized model (checked with [`check_saveable`]).
        plan (`QuantizationPlan`): the structure quantization gave the model (returned by `quantize_model`).
        provenance (`Mapping`, *optional*): JSON-serialisable `{"base_model": ..., "calibration": {...}}`.

    Returns:
        `dict[str, str]`
    """
    check_saveable(model)
    payload = {
        "plan": dataclasses.asdict(plan),
        "provenance": dict(provenance or {}),
        "float_dtype": _float_dtype(model),
        "sha256": state_digest(model.state_dict()),
    }
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
        tensor_names (`set[str]`): every tensor name in the files (checkpoint names, possibly legacy ones).
    """

    plan: QuantizationPlan
    sha256: str
    provenance: dict[str, Any] = field(default_factory=dict)
    float_dtype: str | None = None
    tensor_names: set[str] = field(default_factory=set)


def read_checkpoint_info(files: Sequence[str] | None) -> CheckpointInfo:
    """Reads and validates the safetensors headers of a native checkpoint.

    Args:
        files (`Sequence[str]`): the checkpoint files transformers resolved (one per shard).

    Returns:
        [`CheckpointInfo`]

    Raises:
        `CheckpointError`: not safetensors, unreadable/corrupt/truncated file, or no optimum_dfq metadata.
    """
    from safetensors import SafetensorError, safe_open

    if not files:
        raise CheckpointError(
            "optimum_dfq checkpoints load from safetensors files, but transformers resolved none (was a state_dict "
            "passed to from_pretrained?). Load from the saved folder or Hub repository instead."
        )
    names: set[str] = set()
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
                names.update(handle.keys())
                metadata = metadata if metadata is not None else (handle.metadata() or {})
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"The checkpoint file {path} is corrupt or truncated ({err}). Download it again "
                "(from_pretrained(..., force_download=True)) or re-save the model."
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
        return CheckpointInfo(
            plan=QuantizationPlan(**payload["plan"]),
            sha256=str(payload["sha256"]),
            provenance=dict(payload.get("provenance") or {}),
            float_dtype=payload.get("float_dtype"),
            tensor_names=names,
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


def _checkpoint_names(model: nn.Module, names: list[str]) -> set[str]:
    """Best effort: the names `names` (in-memory) get in a checkpoint (transformers' save-time renaming)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion

        return set(revert_weight_conversion(model, {name: torch.empty(0) for name in names}))
    except Exception:  # noqa: BLE001 - only used to name keys in an error message
        return set(names)


def verify_loaded(model: nn.Module, info: CheckpointInfo) -> None:
    """Proves that loading filled the skeleton exactly with the checkpoint (raises [`CheckpointError`] otherwise).

    Checks, in order: every tensor was loaded (transformers only warns about missing or shape-mismatched keys and
    leaves them uninitialised), no checkpoint tensor was left unused, every packed weight has the module's shape,
    every quantizer is calibrated, and the SHA-256 of the loaded state dict equals the saved one (skipped when
    `from_pretrained(dtype=...)` changed the float dtype).
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
    current = _float_dtype(model)
    if info.float_dtype is not None and current != info.float_dtype:
        logger.info("Loaded in %s instead of %s: skipping the checkpoint digest check.", current, info.float_dtype)
        return
    if state_digest(model.state_dict()) != info.sha256:
        raise CheckpointError(
            "The loaded tensors differ from the ones that were saved (SHA-256 mismatch): the checkpoint file is "
            "corrupt. Download it again (from_pretrained(..., force_download=True)) or re-save the model."
        )


def consumers_of(model: nn.Module, layernorm_consumers: Mapping[str, list[str]]) -> dict[str, QLayerNorm]:
    """Maps each consuming `QLinear` name to the `QLayerNorm` whose output quantizer quantizes its input."""
    out: dict[str, QLayerNorm] = {}
    for norm_name, consumers in layernorm_consumers.items():
        norm = model.get_submodule(norm_name)
        for name in consumers:
            if isinstance(model.get_submodule(name), QLinear) and isinstance(norm, QLayerNorm):
                out[name] = norm
    return out
