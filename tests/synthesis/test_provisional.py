"""The provisional quantized model and the disagreement (hardness) term of DFQ-ViT's hard phase."""

from __future__ import annotations

import copy

import pytest
import torch
from synth_helpers import FAST, MEAN, STD, bounds, one_thread, tiny_swin, tiny_vit  # noqa: F401

from optimum_dfq.errors import BitPresetError, ConfigError
from optimum_dfq.nn import QModuleMixin
from optimum_dfq.quantizers import PixelGridQuantizer
from optimum_dfq.synthesis import BatchPlan, DisagreementTerm, EngineConfig, StepContext, optimize_batch
from optimum_dfq.synthesis.losses import float_quantized_kl
from optimum_dfq.synthesis.provisional import provisional_config, provisional_quantized_model


def test_provisional_config_defaults_to_w4a4_and_takes_overrides():
    assert provisional_config().bits == "w4a4"
    config = provisional_config({"bits": "w3a4", "post_softmax": "tanq"})
    assert (config.bits, config.post_softmax) == ("w3a4", "tanq")


@pytest.mark.parametrize("overrides,error,message", [
    ({"bitz": "w4a4"}, ConfigError, r"Unknown provisional-model setting\(s\) \['bitz'\]"),
    ({"synthesizer": "psaq"}, ConfigError, r"Unknown provisional-model setting\(s\) \['synthesizer'\]"),
    ({"bits": "w9a1"}, BitPresetError, "Weight bits 9 in preset 'w9a1'"),
    ("w4a4", ConfigError, "provisional must be a mapping of DFQConfig fields"),
])
def test_provisional_config_refuses_bad_settings(overrides, error, message):
    with pytest.raises(error, match=message):
        provisional_config(overrides)


@pytest.mark.parametrize("builder", [tiny_vit, tiny_swin])
def test_provisional_model_is_a_frozen_quantized_copy_that_passes_gradients(builder):
    model = builder()
    images = torch.randn(4, 3, 32, 32)
    quantized = provisional_quantized_model(copy.deepcopy(model), images, provisional_config(), (MEAN, STD))
    assert not any(isinstance(m, QModuleMixin) for m in model.modules())  # the float model is untouched
    assert any(isinstance(m, QModuleMixin) for m in quantized.modules())
    assert not quantized.training and not any(p.requires_grad for p in quantized.parameters())
    x = images.clone().requires_grad_(True)
    with torch.no_grad():
        assert not torch.allclose(quantized(pixel_values=images).logits, model(pixel_values=images).logits)
    quantized(pixel_values=x).logits.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # straight through the rounding


def test_provisional_model_input_range_follows_the_normalization():
    model = tiny_vit()
    images = torch.randn(4, 3, 32, 32)

    def input_quantizers(quantized):
        return [m for m in quantized.modules() if isinstance(m, PixelGridQuantizer)]

    with_grid = provisional_quantized_model(copy.deepcopy(model), images, provisional_config(), (MEAN, STD))
    calibrated = provisional_quantized_model(copy.deepcopy(model), images, provisional_config())
    assert len(input_quantizers(with_grid)) == 1 and not input_quantizers(calibrated)
    with pytest.raises(ConfigError, match="input_range='pixels' needs the model's normalisation"):
        provisional_quantized_model(copy.deepcopy(model), images, provisional_config({"input_range": "pixels"}))


def test_float_quantized_kl_matches_the_definition():
    p_logits, q_logits = torch.randn(3, 10), torch.randn(3, 10)
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    torch.testing.assert_close(float_quantized_kl(p_logits, q_logits), (p * (p / q).log()).sum(-1))


def _context(model, images, step=0):
    return StepContext(step, 0, step, 4, 4, images=images, inputs=images, logits=model(pixel_values=images).logits,
                       owners=torch.arange(images.shape[0]), features=None)


def test_disagreement_term_builds_its_model_once_from_the_first_active_step():
    model = tiny_vit()
    seen = []

    def build(images):
        seen.append(images)
        return provisional_quantized_model(copy.deepcopy(model), images, provisional_config())

    term = DisagreementTerm(build)
    first, second = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    values = term(_context(model, first))
    term(_context(model, second, step=1))
    assert len(seen) == 1 and torch.equal(seen[0], first) and not seen[0].requires_grad
    with torch.no_grad():
        expected = float_quantized_kl(model(pixel_values=first).logits, term.quantized_model(pixel_values=first).logits)
    torch.testing.assert_close(values, -expected)
    assert bool((expected > 0).all())


@pytest.mark.usefixtures("one_thread")
def test_minimising_the_term_raises_the_float_quantized_disagreement():
    model = tiny_vit(initializer_range=0.2).requires_grad_(False)
    low, high = bounds()
    init = torch.maximum(torch.minimum(torch.randn(4, 3, 32, 32), high), low)
    quantized = provisional_quantized_model(copy.deepcopy(model), init, provisional_config())
    term = DisagreementTerm(lambda images: quantized)
    result = optimize_batch(model, BatchPlan([0, 1, 2, 3], init, [term]),
                            EngineConfig(lr=0.05, iterations=(30,), warmup=0, jitter=(0,), flip_prob=0.0),
                            bounds=(low, high), sites=[], num_prefix_tokens=1, seed=0)

    @torch.no_grad()
    def disagreement(images):
        kl = float_quantized_kl(model(pixel_values=images).logits, quantized(pixel_values=images).logits)
        return float(kl.mean())

    assert disagreement(result.images) > 3 * disagreement(init)


def test_run_settings_keep_the_quantizers_and_drop_source_and_refinements():
    from optimum_dfq import DFQConfig
    from optimum_dfq.synthesis.provisional import run_provisional_settings

    run = DFQConfig(bits="w3a4", scale_selector="median", seed=5, num_images=64, synthesizer="psaq",
                    correction={"kind": "affine"}, reconstruction={"iterations": 10})
    settings = run_provisional_settings(run)
    assert not {"synthesizer", "num_images", "seed", "correction", "reconstruction"} & set(settings)
    config = provisional_config(settings)
    assert (config.bits, config.scale_selector, config.correction, config.reconstruction) == ("w3a4", "median", {}, {})
    with pytest.raises(ConfigError, match="provisional='run'.*resolved by DataFreeViTQuantizer.quantize"):
        provisional_config("run")
