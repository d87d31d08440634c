"""The DopQ-ViT and DFQ-ViT recipes quantize every family data-free, with their components really in the model."""

import logging
from pathlib import Path

import pytest
import torch

from optimum_dfq import DataFreeViTQuantizer, DFQConfig
from optimum_dfq.calibration import iter_quantizers
from optimum_dfq.models import get_adapter
from optimum_dfq.nn import QLinear
from optimum_dfq.quantizers import TanQuantizer
from optimum_dfq.synthesis import get_synthesizer

from .conftest import tiny_deit, tiny_swin, tiny_vit

pytestmark = pytest.mark.usefixtures("single_thread")

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FAMILIES = {"vit": tiny_vit, "deit": tiny_deit, "swin": tiny_swin}


def recipe(name: str, **changes) -> DFQConfig:
    """The recipe cut down to seconds: few images and synthesis/reconstruction steps."""
    config = DFQConfig.from_yaml(RECIPES / name)
    cut = {"num_images": 4, **changes}
    if config.synthesizer != "gaussian":
        phases = len(get_synthesizer(config.synthesizer).iterations)
        cut["synthesizer_kwargs"] = {**config.synthesizer_kwargs, "iterations": [2] * phases, "warmup": 1}
    if config.reconstruction and "reconstruction" not in changes:
        cut["reconstruction"] = {**config.reconstruction, "iterations": 3}
    return config.replace(**cut)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dopq_vit_recipe_has_tanq_and_reconstructs_every_block(family, caplog, image_processor):
    config = DFQConfig.from_yaml(RECIPES / "dopq_vit_w4a4.yaml")
    assert (config.bits, config.post_softmax, config.scale_selector) == ("w4a4", "tanq", "median")
    assert config.reconstruction == {"iterations": 1000, "lr": 4e-5, "batch_size": 32}
    model = FAMILIES[family]()
    with caplog.at_level(logging.INFO, logger="optimum_dfq.calibration.reconstruction"):
        qmodel = DataFreeViTQuantizer(model, image_processor).quantize(config=recipe("dopq_vit_w4a4.yaml"))  # no data
    probs = [q for n, q in iter_quantizers(qmodel) if n.endswith("dfq_attention.probs")]
    assert len(probs) == len(get_adapter(qmodel).attention_modules(qmodel))
    assert all(isinstance(q, TanQuantizer) and bool(q.calibrated) and q.levels().numel() == 16 for q in probs)
    reconstructed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reconstruction ")]
    assert len(reconstructed) == len(get_adapter(qmodel).blocks(qmodel))
    assert torch.isfinite(qmodel(pixel_values=torch.randn(2, 3, 32, 32)).logits).all()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dfq_vit_recipe_folds_corrections_into_the_corrected_linears(family, image_processor):
    config = DFQConfig.from_yaml(RECIPES / "dfq_vit_w3a8.yaml")
    assert config.bits == "w3a8" and config.synthesizer == "dfq-vit"
    assert config.correction["kind"] == "affine" and config.correction["fold"]
    model = FAMILIES[family]()
    quantizer = DataFreeViTQuantizer(model, image_processor)  # the processor gives the synthesizer's pixel range
    corrected = quantizer.quantize(config=recipe("dfq_vit_w3a8.yaml"))  # no dataset
    plain = quantizer.quantize(config=recipe("dfq_vit_w3a8.yaml", correction={}))
    moved = {n for n, m in corrected.named_modules()
             if isinstance(m, QLinear) and not torch.equal(m.weight, plain.get_submodule(n).weight)}
    classifiers = {n for n, m in corrected.named_modules() if isinstance(m, QLinear) and "classifier" in n}
    blocks = get_adapter(corrected).blocks(corrected)
    # every block's q/k/v, o_proj, fc1 and fc2 (6 Linears) was corrected; nothing outside the blocks
    assert len(moved) == 6 * len(blocks)
    assert all(any(n.startswith(b + ".") for b, _ in blocks) for n in moved) and not moved & classifiers
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(corrected(pixel_values=pixels).logits).all()
    assert not torch.equal(corrected(pixel_values=pixels).logits, plain(pixel_values=pixels).logits)
