"""Attention Priors Alignment really pulls the aligned attention towards the priors."""

from __future__ import annotations

import pytest
import torch
from synth_helpers import NORM, one_thread, tiny_deit, tiny_swin, tiny_vit  # noqa: F401

from optimum_dfq.calibration.data import expected_image_shape
from optimum_dfq.models import get_adapter
from optimum_dfq.synthesis import get_synthesizer
from optimum_dfq.synthesis.features import FeatureCapture, probe_attention_sites
from optimum_dfq.synthesis.losses import aligned_attention
from optimum_dfq.synthesis.pixel_synthesizer import ModelInfo

pytestmark = pytest.mark.usefixtures("one_thread")

#: APA alone, no augmentation: on these models the loss falls by 58x to 400x in 40 steps; we require 10x.
APA_ONLY = {"iterations": (40,), "warmup": 4, "jitter": 0, "flip_prob": 0.0, "sl_weight": 0.0, "tv_weight": 0.0,
            "msr_regions": 0, "lr": 0.1, "log_every": 1}
REQUIRED_FACTOR = 10.0


def _apa_mse(model, pixels, priors, sites, num_prefix_tokens) -> float:
    with torch.no_grad(), FeatureCapture(model, sites, {"attention_probs"}) as capture:
        model(pixel_values=pixels)
        total = 0.0
        for site in sites:
            if site.index in priors:
                probs = capture.attention_probs(site.index)
                attention = aligned_attention(probs, pixels.shape[0], site.windows, num_prefix_tokens)
                total += float((attention - priors[site.index]).square().mean())
    return total


@pytest.mark.parametrize("builder", [tiny_vit, tiny_deit, tiny_swin])
def test_attention_moves_towards_the_priors(builder):
    # initializer_range=0.2: the default 0.02 makes a tiny random model's attention almost uniform whatever the input.
    model = builder(initializer_range=0.2)
    synth = get_synthesizer("sardfq", **APA_ONLY)
    calib = synth.synthesize(model, 2, seed=0, **NORM)
    history = calib.metadata["loss_history"]["apa"]
    assert history[0] / history[-1] > REQUIRED_FACTOR

    adapter = get_adapter(model)
    sites = probe_attention_sites(model, adapter)
    info = ModelInfo(model, adapter, sites, expected_image_shape(model), 10, torch.device("cpu"))
    plan = synth.plan_batch(info, [0, 1], seed=0)
    priors = plan.terms[0].priors
    before = _apa_mse(model, plan.init, priors, sites, adapter.num_prefix_tokens)
    after = _apa_mse(model, calib.pixel_values, priors, sites, adapter.num_prefix_tokens)
    assert before / after > REQUIRED_FACTOR
