"""Every YAML recipe loads, round-trips, and runs a reduced quantization on a tiny model."""

from pathlib import Path

import pytest
import torch

from optimum_dfq import DataFreeViTQuantizer, DFQConfig
from optimum_dfq.calibration import iter_quantizers
from optimum_dfq.synthesis import synthesizer_from_config

from .conftest import tiny_vit

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def reduced(config: DFQConfig) -> DFQConfig:
    """The same recipe, cut down to seconds: few images, few synthesis and reconstruction steps."""
    changes = {"num_images": 4}
    if config.synthesizer != "gaussian":
        phases = len(synthesizer_from_config(config).iterations)
        changes["synthesizer_kwargs"] = {**config.synthesizer_kwargs, "iterations": [2] * phases, "warmup": 1}
    if config.reconstruction:
        changes["reconstruction"] = {**config.reconstruction, "iterations": 2}
    return config.replace(**changes)


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    for expected in ("default.yaml", "repq_vit_w4a4.yaml", "psaq_vit_w4a8.yaml", "sardfq_w4a4.yaml",
                     "dfq_vit_w3a8.yaml", "dopq_vit_w4a4.yaml"):
        assert expected in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_cites_and_round_trips(path):
    text = path.read_text()
    assert text.startswith("#"), "each recipe starts with a comment header"
    config = DFQConfig.from_yaml(path)
    assert DFQConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_reduced(path, cifar_train, image_processor):
    config = reduced(DFQConfig.from_yaml(path))
    model = tiny_vit()
    dataset = cifar_train if config.calibration_dataset else None
    qmodel = DataFreeViTQuantizer(model, image_processor).quantize(config=config, calibration_dataset=dataset)
    assert qmodel.config.quantization_config.bits == config.bits
    weight_bits = config.weight_bits
    assert all(q.bits == weight_bits for n, q in iter_quantizers(qmodel) if n.endswith("weight_quantizer"))
    logits = qmodel(pixel_values=torch.randn(2, 3, 32, 32)).logits
    assert torch.isfinite(logits).all()
