"""PSAQ-ViT synthesis: its defaults and the per-image targets of its plan."""

from __future__ import annotations

import pytest
import torch
from synth_helpers import plan_batch, tiny_vit

from optimum_dfq.synthesis import get_synthesizer
from optimum_dfq.synthesis.targets import initial_noise, random_labels, uniform_per_image


def test_defaults_are_psaq_vits_generate_data_settings():
    # shared/research/algorithms.md §4.1: L_PSE + 1.0 · CE + 0.05 · |TV - τ|, τ ~ U(2500, 3000) for a batch of 32
    # images of 224 pixels, KDE bandwidth 0.01 on 10 points with p + 1e-4
    synthesizer = get_synthesizer("psaq")
    assert (synthesizer.pse_weight, synthesizer.ce_weight, synthesizer.tv_weight) == (1.0, 1.0, 0.05)
    assert synthesizer.tv_target == (2500.0, 3000.0) and synthesizer.tv_reference == (32, 224)
    assert (synthesizer.kde_bandwidth, synthesizer.kde_points, synthesizer.kde_floor) == (0.01, 10, 1e-4)


def test_each_image_gets_its_own_label_and_tau_from_its_own_streams():
    indices, seed = [4, 0, 9], 0  # the seed plan_batch uses
    synthesizer = get_synthesizer("psaq", tv_target=(10.0, 20.0), iterations=(2, 2), jitter=(1, 1), warmup=0)
    plan = plan_batch(synthesizer, tiny_vit(), indices)
    terms = {term.name: term for term in plan.terms}
    labels = random_labels(indices, seed, 10)
    assert torch.equal(plan.labels, labels) and torch.equal(terms["ce"].labels, labels)
    taus = terms["tv"].targets
    assert torch.equal(taus, uniform_per_image(indices, seed, "tv", 10.0, 20.0))
    assert bool(((taus >= 10.0) & (taus <= 20.0)).all()) and len(set(taus.tolist())) == 3
    assert torch.equal(plan.init, initial_noise(indices, seed, (3, 32, 32)))


def test_without_a_tv_reference_each_images_own_tv_is_compared_with_tau():
    plan = plan_batch(get_synthesizer("psaq", tv_reference=None), tiny_vit(), [0])
    assert {term.name: term for term in plan.terms}["tv"].scale == pytest.approx(1.0)
