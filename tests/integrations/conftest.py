"""Quantized checkpoints shared by the integration tests, and a runner for fresh Python processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from optimum_dfq import DataFreeViTQuantizer, DFQConfig
from optimum_dfq.calibration import iter_quantizers

from ..conftest import tiny_deit_teacher, tiny_swin, tiny_vit

FAMILIES = {"vit": tiny_vit, "deit_teacher": tiny_deit_teacher, "swin": tiny_swin}
ROUND_TRIP_BITS = ("w8a8", "w4a8", "w4a4", "w3a4")
#: name -> (model, quantize kwargs): every family at every preset, plus the stages that change the structure
ROUND_TRIP_CASES = {
    **{f"{family}-{bits}": (factory, {"bits": bits})
       for family, factory in FAMILIES.items() for bits in ROUND_TRIP_BITS},
    "vit-w4a4-ridge-correction": (tiny_vit, {"config": DFQConfig(bits="w4a4", correction={"kind": "ridge"})}),
    "swin-w4a4-folded-correction-tanq": (
        tiny_swin, {"config": DFQConfig(bits="w4a4", post_softmax="tanq", correction={"kind": "affine"})}),
}


def quantize(factory, bits: str | None = None, **kwargs):
    """Gaussian-calibrated quantization on 8 images; `bits` overrides `config.bits` when both are given."""
    return DataFreeViTQuantizer().quantize(factory(), bits=bits, synthesizer="gaussian", num_images=8, **kwargs)


def quantizer_layout(model) -> dict[str, tuple[str, int | None, str | None]]:
    """Every quantizer's kind, bit width and range estimator, by module name."""
    return {name: (type(q).__name__, q.bits, getattr(q, "observer", None)) for name, q in iter_quantizers(model)}


def logits(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter (offline), returning the completed process."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False,
                          env=environment, timeout=600)


@pytest.fixture(scope="session")
def pixels(tmp_path_factory) -> tuple[torch.Tensor, Path]:
    torch.manual_seed(123)
    values = torch.randn(4, 3, 32, 32)
    path = tmp_path_factory.mktemp("pixels") / "pixels.pt"
    torch.save(values, path)
    return values, path


@pytest.fixture(scope="session")
def round_trip_checkpoints(tmp_path_factory, pixels) -> dict[str, dict]:
    """Every round-trip case: saved folder and the in-memory quantized model's logits."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name, (factory, kwargs) in ROUND_TRIP_CASES.items():
        qmodel = quantize(factory, **kwargs)
        qmodel.save_pretrained(root / name)
        out[name] = {"dir": str(root / name), "logits": logits(qmodel, pixels[0]), "layout": quantizer_layout(qmodel)}
    return out


@pytest.fixture(scope="session")
def vit_w4a4(tmp_path_factory, image_processor):
    """A tiny W4A4 ViT quantized with an image processor, and its saved folder."""
    qmodel = DataFreeViTQuantizer(tiny_vit(), image_processor).quantize(bits="w4a4", synthesizer="gaussian",
                                                                       num_images=8)
    folder = tmp_path_factory.mktemp("vit-w4a4")
    qmodel.save_pretrained(folder)
    return qmodel, folder
