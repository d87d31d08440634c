"""Stable fingerprints: of a model's weights and configuration, and of a synthesis run (the cache key)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from .dataset import to_jsonable


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's class and state dict (every tensor's name, dtype, shape and bytes).

    Example:
        >>> len(model_fingerprint(torch.nn.Linear(2, 2)))
        64
    """
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


#: Version of the run description that [`run_fingerprint`] hashes; bump it when that description changes meaning, so
#: that older cache entries are not mistaken for new ones.
CACHE_KEY_VERSION = 2

#: Configuration fields that do not change what the model computes in eval mode: provenance, label names, the dtype
#: hint of `from_pretrained` (the weights' dtypes are in [`model_fingerprint`]) and output switches.
CONFIG_FIELDS_NOT_HASHED = frozenset({
    "_name_or_path", "_commit_hash", "transformers_version", "architectures", "id2label", "label2id", "dtype",
    "torch_dtype", "_attn_implementation_autoset", "output_attentions", "output_hidden_states", "return_dict",
})

#: Run-description fields kept for provenance only (in `run.json` and the set's metadata), not hashed.
PROVENANCE_FIELDS = ("name_or_path",)


def model_config_material(config) -> dict[str, Any]:
    """The parts of a `transformers` model configuration that change the model's function.

    Two models with the same weights but, say, a different `hidden_act`, `layer_norm_eps` or (Swin) `image_size`
    compute different functions, so their synthesized images must not share a cache entry. The fields that differ
    from the configuration class's defaults (`to_diff_dict`) are kept, minus [`CONFIG_FIELDS_NOT_HASHED`]; the label
    names are dropped but `num_labels` is kept (class-conditional synthesis draws labels from it).

    Args:
        config (`PretrainedConfig`): the model's configuration.

    Returns:
        `dict[str, Any]`: JSON-plain configuration fields, with `num_labels`.

    Example:
        >>> from transformers import ViTConfig
        >>> material = model_config_material(ViTConfig(hidden_act="relu", num_labels=3))
        >>> material["hidden_act"], material["num_labels"], "id2label" in material
        ('relu', 3, False)
    """
    fields = {k: v for k, v in config.to_diff_dict().items() if k not in CONFIG_FIELDS_NOT_HASHED}
    return to_jsonable(fields | {"num_labels": int(config.num_labels)})


def run_fingerprint(material: dict[str, Any]) -> str:
    """SHA-256 of a JSON description of a run (sorted keys), used as its cache key.

    The provenance fields of `material["model"]` ([`PROVENANCE_FIELDS`], e.g. the folder the model was loaded from)
    are left out, and [`CACHE_KEY_VERSION`] is hashed in.

    Args:
        material (`dict[str, Any]`): the run description (see `PixelSynthesizer.synthesize`).

    Returns:
        `str`: 64 hex digits.

    Example:
        >>> run_fingerprint({"model": {"name_or_path": "a"}}) == run_fingerprint({"model": {"name_or_path": "b"}})
        True
    """
    hashed = dict(material)
    if isinstance(hashed.get("model"), dict):
        hashed["model"] = {k: v for k, v in hashed["model"].items() if k not in PROVENANCE_FIELDS}
    hashed["cache_key_version"] = CACHE_KEY_VERSION
    text = json.dumps(to_jsonable(hashed), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
