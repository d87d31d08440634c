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
    CrossEntropyTerm,
    EngineConfig,
    LossTerm,
    PatchSimilarityEntropyTerm,
    PhaseRamp,
    SoftLabelTerm,
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
    assert terms["tv"].scale == pytest.approx(math.sqrt(8 * 64 * 64 / (32 * 32)))  # = sqrt(32)


def test_psaq_kde_options_reach_the_patch_similarity_entropy():
    synthesizer = get_synthesizer("psaq", kde_bandwidth=0.2, kde_points=7, kde_floor=1e-3)
    pse = {term.name: term for term in plan_batch(synthesizer, tiny_vit(), [0]).terms}["pse"]
    assert (pse.bandwidth, pse.num_points, pse.floor) == (0.2, 7, 1e-3)


def test_cross_entropy_term_is_log_sum_exp_minus_the_label_logit_of_each_image():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0], [9.0, 9.0, 9.0]], dtype=torch.float64)  # last row: a crop
    images = torch.zeros(2, 3, 8, 8)
    ctx = StepContext(0, 0, 0, 1, 1, images=images, inputs=torch.zeros(3, 3, 8, 8), logits=logits,
                      owners=torch.tensor([0, 1, 0]), features=None)
    expected = torch.tensor([math.log(math.exp(2) + math.exp(-1) + math.exp(0.5)) - 0.5,
                             math.log(1 + math.exp(3) + math.exp(1)) - 0.0], dtype=torch.float64)
    torch.testing.assert_close(CrossEntropyTerm(torch.tensor([2, 0]))(ctx), expected)


def test_soft_label_term_is_the_soft_cross_entropy_summed_over_each_images_rows():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, generator=generator, dtype=torch.float64) * 3  # two images, then a crop of image 1
    targets = torch.softmax(torch.randn(3, 4, generator=generator, dtype=torch.float64) * 3, -1)
    ctx = StepContext(0, 0, 0, 1, 1, images=torch.zeros(2, 3, 8, 8), inputs=torch.zeros(3, 3, 8, 8), logits=logits,
                      owners=torch.tensor([0, 1, 1]), features=None)
    per_row = [-sum(float(targets[r, k]) * (float(logits[r, k]) - math.log(sum(math.exp(float(v)) for v in logits[r])))
                    for k in range(4)) for r in range(3)]
    expected = torch.tensor([per_row[0], per_row[1] + per_row[2]], dtype=torch.float64)
    torch.testing.assert_close(SoftLabelTerm(targets)(ctx).double(), expected, rtol=1e-5, atol=1e-6)


def test_tv_reference_scale_uses_the_image_area_for_non_square_images():
    # sqrt(batch · side² / (H · W)): a 16 x 64 image has the area of a 32 x 32 one
    scale = TotalVariationTerm.reference_scale((16, 64), (2, 32))
    assert scale == pytest.approx(math.sqrt(2.0)) == TotalVariationTerm.reference_scale((32, 32), (2, 32))


def _entropy64(tokens, floor=1e-4):
    """PSAQ-ViT's patch-similarity entropy of one group of tokens `[N, dim]`, in float64 (bandwidth 0.05, 8 points)."""
    tokens = tokens.double()
    sims = torch.nn.functional.cosine_similarity(tokens[:, None], tokens[None], dim=-1).flatten()
    grid = torch.linspace(float(sims.min()), float(sims.max()), 8, dtype=torch.float64)
    kernel = torch.exp(-((grid[:, None] - sims[None]) ** 2) / (2 * 0.05**2)) / math.sqrt(2 * math.pi * 0.05**2)
    density = kernel.mean(-1) + floor
    return torch.trapezoid(-density * density.log(), grid)


def test_patch_similarity_entropy_term_drops_every_prefix_token():
    # DeiT: CLS and distillation tokens are both dropped (and a floor other than PSAQ-ViT's reaches the density)
    outputs = torch.randn(2, 7, 2, 4, generator=torch.Generator().manual_seed(1))  # [B, tokens, heads, head_dim]
    features = SimpleNamespace(attention_output=lambda i: outputs)
    term = PatchSimilarityEntropyTerm(bandwidth=0.05, num_points=8, floor=0.05)
    value = term(context(torch.zeros(2, 3, 8, 8), features, [SimpleNamespace(index=0, windows=1)], 2))
    expected = torch.stack([-_entropy64(outputs[b].mean(dim=1)[2:], floor=0.05) for b in range(2)])
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-5)


def test_patch_similarity_entropy_term_averages_windows_and_keeps_their_first_token():
    # windowed attention (Swin): one KDE per window, all its tokens (there is no CLS), averaged over the image's windows
    batch, windows = 2, 3
    outputs = torch.randn(batch * windows, 5, 2, 4, generator=torch.Generator().manual_seed(2))
    features = SimpleNamespace(attention_output=lambda i: outputs)
    term = PatchSimilarityEntropyTerm(bandwidth=0.05, num_points=8)
    value = term(context(torch.zeros(batch, 3, 8, 8), features, [SimpleNamespace(index=0, windows=windows)], 1))
    per_window = torch.stack([-_entropy64(outputs[row].mean(dim=1)) for row in range(batch * windows)])
    torch.testing.assert_close(value.double(), per_window.view(batch, windows).mean(dim=1), rtol=1e-4, atol=1e-5)


def test_attention_prior_term_drops_every_prefix_column_of_the_cls_row():
    # DeiT: the CLS query's row without the CLS and distillation columns, renormalised
    generator = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(2, 2, 6, 6, generator=generator, dtype=torch.float64), -1)
    priors = {0: torch.softmax(torch.randn(2, 1, 2, 4, generator=generator, dtype=torch.float64), -1)}
    term = AttentionPriorTerm(priors, depth_weights={0: 0.25})
    features = SimpleNamespace(attention_probs=lambda i: probs)
    value = term(context(torch.zeros(2, 3, 8, 8), features, [SimpleNamespace(index=0, windows=1)], 2))
    row = probs[:, :, 0, 2:] / probs[:, :, 0, 2:].sum(-1, keepdim=True)
    expected = 0.25 * ((row - priors[0][:, 0]) ** 2).mean(-1).sum(-1)  # mean over tokens, sum over heads
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-8)


def test_windowed_attention_prior_term_averages_the_queries_and_the_windows():
    # Swin: per window, the attention averaged over its queries; the MSE is averaged over windows and tokens and summed
    # over heads; prefix tokens do not apply to windowed attention
    generator = torch.Generator().manual_seed(4)
    batch, windows, heads, tokens = 2, 3, 2, 4
    draw = {"generator": generator, "dtype": torch.float64}
    probs = torch.softmax(torch.randn(batch * windows, heads, tokens, tokens, **draw), -1)
    priors = {1: torch.softmax(torch.randn(batch, windows, heads, tokens, **draw), -1)}
    term = AttentionPriorTerm(priors, depth_weights={1: 0.75})
    features = SimpleNamespace(attention_probs=lambda i: probs)
    value = term(context(torch.zeros(batch, 3, 8, 8), features, [SimpleNamespace(index=1, windows=windows)], 1))
    expected = torch.zeros(batch, dtype=torch.float64)
    for b in range(batch):
        for w in range(windows):
            averaged = probs[b * windows + w].mean(dim=1)  # [heads, keys]
            expected[b] += 0.75 * ((averaged - priors[1][b, w]) ** 2).mean(-1).sum() / windows
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-8)


def test_phase_ramp_rises_linearly_then_holds_its_maximum():
    ramp = PhaseRamp(phase=1, max_weight=2.0, ramp_fraction=0.4)  # 4 of the phase's 10 steps
    weights = [ramp(SimpleNamespace(phase=phase, phase_step=step, phase_iterations=10, total_steps=30))
               for phase in range(3) for step in range(10)]
    assert weights[:10] == [0.0] * 10
    assert weights[10:14] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert weights[14:] == [2.0] * 16
    assert PhaseRamp(phase=0, max_weight=3.0, ramp_fraction=0.0)(SimpleNamespace(phase=0, phase_step=0,
                                                                                 phase_iterations=10)) == 3.0
