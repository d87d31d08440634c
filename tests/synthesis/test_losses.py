"""Loss terms of the pixel optimisation, checked against independent transcriptions of their formulas."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from synth_helpers import NORM, one_thread, plan_batch, tiny_vit  # noqa: F401

from optimum_dfq.models import get_adapter
from optimum_dfq.synthesis import (
    AttentionPriorTerm,
    BatchPlan,
    EngineConfig,
    LossTerm,
    PatchSimilarityEntropyTerm,
    StepContext,
    TotalVariationTerm,
    get_synthesizer,
    optimize_batch,
)
from optimum_dfq.synthesis.features import probe_attention_sites
from optimum_dfq.synthesis.kde import patch_similarity_entropy
from optimum_dfq.synthesis.losses import total_variation
from optimum_dfq.synthesis.normalization import valid_pixel_range

pytestmark = pytest.mark.usefixtures("one_thread")


def psaq_image_prior(x):
    """PSAQ-ViT's `get_image_prior_losses` (the L2 part), one image at a time."""
    out = []
    for image in x:
        diff1 = image[:, :, :-1] - image[:, :, 1:]
        diff2 = image[:, :-1, :] - image[:, 1:, :]
        diff3 = image[:, 1:, :-1] - image[:, :-1, 1:]
        diff4 = image[:, :-1, :-1] - image[:, 1:, 1:]
        out.append(diff1.norm() + diff2.norm() + diff3.norm() + diff4.norm())
    return torch.stack(out)


def context(images, features=None, sites=(), num_prefix_tokens=0):
    return StepContext(0, 0, 0, 1, 1, images=images, inputs=images, logits=torch.zeros(images.shape[0], 10),
                       owners=torch.arange(images.shape[0]), features=features, sites=list(sites),
                       num_prefix_tokens=num_prefix_tokens)


def test_total_variation_value_and_hand_written_gradient_match_autograd_of_psaq_reference():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, 6, generator=generator, dtype=torch.float64)
    x[2] = 0.7  # a flat image: TV 0, zero gradient (not NaN)
    mine = x.clone().requires_grad_(True)
    reference = x.clone().requires_grad_(True)
    value = total_variation(mine)
    expected = psaq_image_prior(reference)
    torch.testing.assert_close(value, expected)
    weights = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    (value * weights).sum().backward()
    (expected[:2] * weights[:2]).sum().backward()  # the reference's norm has a NaN gradient at exactly 0
    torch.testing.assert_close(mine.grad[:2], reference.grad[:2])
    assert torch.equal(mine.grad[2], torch.zeros_like(mine.grad[2]))
    assert torch.autograd.gradcheck(total_variation, (x[:2].clone().requires_grad_(True),))


def test_total_variation_term_is_the_scaled_distance_to_the_target():
    images = torch.zeros(2, 3, 4, 4)
    images[0, 0, 1, 1] = 1.0  # one bright pixel: 2 + 2 + 2 + 2 unit differences -> TV = 4 · sqrt(2)
    targets = torch.tensor([10.0, 3.0])
    term = TotalVariationTerm(targets, scale=2.0)
    expected = torch.tensor([abs(2.0 * 4 * math.sqrt(2) - 10.0), 3.0])
    torch.testing.assert_close(term(context(images)), expected)
    assert TotalVariationTerm.reference_scale((112, 112), (32, 224)) == pytest.approx(math.sqrt(128))
    assert TotalVariationTerm.reference_scale((224, 224), None) == 1.0


def test_patch_similarity_entropy_term_is_minus_the_entropy_of_the_chosen_sites_patch_tokens():
    generator = torch.Generator().manual_seed(0)
    outputs = {i: torch.randn(2, 5, 2, 4, generator=generator) for i in range(3)}  # [B, tokens, heads, head_dim]
    features = SimpleNamespace(attention_output=lambda i: outputs[i])
    sites = [SimpleNamespace(index=i, windows=1) for i in range(3)]
    images = torch.zeros(2, 3, 8, 8)
    term = PatchSimilarityEntropyTerm(sites=[0, 2], bandwidth=0.05, num_points=8)
    value = term(context(images, features, sites, num_prefix_tokens=1))
    expected = -sum(patch_similarity_entropy(outputs[i].mean(dim=2)[:, 1:], 0.05, 8) for i in (0, 2))
    torch.testing.assert_close(value, expected)
    everything = PatchSimilarityEntropyTerm(bandwidth=0.05, num_points=8)(context(images, features, sites, 1))
    torch.testing.assert_close(everything, expected - patch_similarity_entropy(outputs[1].mean(dim=2)[:, 1:], 0.05, 8))


def test_attention_prior_term_compares_the_renormalised_cls_row_with_depth_weights():
    generator = torch.Generator().manual_seed(0)
    batch, heads, tokens = 2, 2, 5  # CLS + 4 patches
    probs = {i: torch.softmax(torch.randn(batch, heads, tokens, tokens, generator=generator), -1) for i in (0, 1)}
    priors = {i: torch.softmax(torch.randn(batch, 1, heads, tokens - 1, generator=generator), -1) for i in (0, 1)}
    features = SimpleNamespace(attention_probs=lambda i: probs[i])
    sites = [SimpleNamespace(index=i, windows=1) for i in (0, 1)]
    term = AttentionPriorTerm(priors, depth_weights={0: 0.5, 1: 1.0})
    value = term(context(torch.zeros(batch, 3, 8, 8), features, sites, num_prefix_tokens=1))
    expected = torch.zeros(batch)
    for i, depth in ((0, 0.5), (1, 1.0)):
        row = probs[i][:, :, 0, 1:]
        row = row / row.sum(-1, keepdim=True)
        expected += depth * ((row - priors[i][:, 0]) ** 2).mean(-1).sum(-1)
    torch.testing.assert_close(value, expected)


class _Constant(LossTerm):
    def __init__(self, name, values, weight):
        super().__init__(weight)
        self.name, self.values = name, values

    def __call__(self, ctx):
        return ctx.logits[: ctx.num_images].sum(-1) * 0 + self.values


def test_the_engine_total_is_the_weighted_sum_of_the_terms():
    model = tiny_vit()
    terms = [_Constant("a", torch.tensor([1.0, 3.0]), 2.0), _Constant("b", torch.tensor([4.0, 8.0]), 0.25),
             _Constant("off", torch.tensor([100.0, 100.0]), lambda ctx: 0.0)]
    plan = BatchPlan([0, 1], torch.randn(2, 3, 32, 32), terms)
    result = optimize_batch(model, plan, EngineConfig(iterations=(2,), jitter=(0,), warmup=0),
                            bounds=valid_pixel_range(NORM["image_mean"], NORM["image_std"]),
                            sites=probe_attention_sites(model, get_adapter(model)), num_prefix_tokens=1, seed=0)
    assert result.history["a"] == [2.0, 2.0] and result.history["b"] == [6.0, 6.0]
    assert result.history["off"] == [None, None]
    # per image: 2 · a + 0.25 · b = [3, 8], mean over the 2 images 5.5
    assert result.history["total"] == pytest.approx([5.5, 5.5])


@pytest.mark.parametrize("name", ["psaq", "sardfq"])
def test_synthesizer_weights_and_tv_reference_reach_their_terms(name):
    weights = {"tv_weight": 0.3, **({"ce_weight": 2.5, "pse_weight": 0.7} if name == "psaq"
                                     else {"sl_weight": 1.5, "apa_weight": 7.0})}
    synthesizer = get_synthesizer(name, tv_reference=(8, 64), **weights)
    terms = {term.name: term for term in plan_batch(synthesizer, tiny_vit(), [0, 1]).terms}
    expected = {"tv": 0.3, **({"ce": 2.5, "pse": 0.7} if name == "psaq" else {"sl": 1.5, "apa": 7.0})}
    assert {n: terms[n].weight for n in expected} == expected
    assert terms["tv"].scale == pytest.approx(math.sqrt(8 * 64 * 64 / (32 * 32)))  # = 4


def test_psaq_kde_options_reach_the_patch_similarity_entropy():
    synthesizer = get_synthesizer("psaq", kde_bandwidth=0.2, kde_points=7, kde_floor=1e-3)
    pse = {term.name: term for term in plan_batch(synthesizer, tiny_vit(), [0]).terms}["pse"]
    assert (pse.bandwidth, pse.num_points, pse.floor) == (0.2, 7, 1e-3)
