"""Stable fingerprints: of a model's weights, and of a synthesis run (the cache key)."""

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


def run_fingerprint(material: dict[str, Any]) -> str:
    """SHA-256 of a JSON description of a run (sorted keys), used as its cache key."""
    text = json.dumps(to_jsonable(material), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
