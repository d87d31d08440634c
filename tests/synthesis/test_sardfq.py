"""SARDFQ synthesizer options (optimum_dfq/synthesis/sardfq.py)."""

from __future__ import annotations

import pytest
import torch
from synth_helpers import FAST, one_thread, plan_batch, tiny_vit  # noqa: F401

from optimum_dfq.errors import SynthesisError
from optimum_dfq.synthesis import SoftLabelTerm, get_synthesizer
from optimum_dfq.synthesis.engine import EngineConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def resolved(**options) -> dict:
    """The hyper-parameters a SARDFQ run with `options` puts in its cache key."""
    return get_synthesizer("sardfq", **FAST, **options).resolved_hyperparameters(EngineConfig(**FAST))


def _relevant(row: torch.Tensor) -> list[int]:
    """Classes given a logit in U(5, 10) (all others have logit 0, so probability at least e^5 times smaller)."""
    return sorted((row > row.min() * 10).nonzero().flatten().tolist())


@pytest.mark.parametrize("crop_classes", [True, False])
def test_image_soft_label_includes_its_crops_classes_only_when_asked(crop_classes):
    synth = get_synthesizer("sardfq", **FAST, image_label_includes_crops=crop_classes)
    plan = plan_batch(synth, tiny_vit(), list(range(4)))
    targets = next(term for term in plan.terms if isinstance(term, SoftLabelTerm)).targets
    for position in range(4):
        crop_rows = (plan.owners == position).nonzero().flatten()[1:]
        crop_classes_of_image = [_relevant(targets[row])[0] for row in crop_rows.tolist()]
        assert all(len(_relevant(targets[row])) == 1 for row in crop_rows.tolist())  # a crop: its own class only
        expected = [int(plan.labels[position])] + (crop_classes_of_image if crop_classes else [])
        assert _relevant(targets[position]) == sorted(expected)
        torch.testing.assert_close(plan.soft_labels[position], targets[position])


def test_image_label_option_enters_the_cache_key_only_off_its_default():
    assert "image_label_includes_crops" not in resolved()  # runs from before the option keep their cache key
    assert resolved(image_label_includes_crops=True) == resolved()
    assert resolved(image_label_includes_crops=False)["image_label_includes_crops"] is False


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_msr_resize_mode_sets_how_each_quadrant_is_brought_to_the_input_size(mode):
    synth = get_synthesizer("sardfq", **FAST, msr_resize=mode)
    plan = plan_batch(synth, tiny_vit(), [0])
    inputs = plan.views(plan.init)
    first = plan.views.layout.quadrants[0]
    top, left = (first // 2) * 16, (first % 2) * 16
    quadrant = plan.init[:1, :, top:top + 16, left:left + 16]
    expected = torch.nn.functional.interpolate(quadrant, size=(32, 32), mode=mode,
                                               **({} if mode == "nearest" else {"align_corners": False}))
    torch.testing.assert_close(inputs[1:2], expected)
    if mode == "nearest":
        torch.testing.assert_close(inputs[1:2], quadrant.repeat_interleave(2, -1).repeat_interleave(2, -2))


def test_msr_resize_enters_the_cache_key_only_off_its_default():
    assert "msr_resize" not in resolved() and resolved(msr_resize="bilinear") == resolved()
    assert resolved(msr_resize="bicubic")["msr_resize"] == "bicubic"
    with pytest.raises(SynthesisError, match="msr_resize"):
        get_synthesizer("sardfq", msr_resize="sideways")


def _axis_sigmas(single_component_map: torch.Tensor, rows: int, cols: int) -> tuple[float, float]:
    """Standard deviations along rows and columns of a one-component Gaussian map: the second difference of its log
    along an axis is -1/σ² there (exact at every token, whatever the border truncation and normalisation)."""
    log = single_component_map.double().reshape(rows, cols).log()
    along_rows = log[2:, :] - 2 * log[1:-1, :] + log[:-2, :]
    along_cols = log[:, 2:] - 2 * log[:, 1:-1] + log[:, :-2]
    return float((-1 / along_rows.mean()).sqrt()), float((-1 / along_cols.mean()).sqrt())


@pytest.mark.parametrize("covariance", ["isotropic", "diagonal"])
def test_prior_components_are_round_or_axis_aligned_ellipses(covariance):
    from optimum_dfq.synthesis.priors import gaussian_mixture_maps

    maps = gaussian_mixture_maps(torch.Generator().manual_seed(0), 16, (8, 8), max_components=1,
                                 sigma_range=(1.0, 4.0), reference_grid=8, covariance=covariance)
    sigmas = torch.tensor([_axis_sigmas(row, 8, 8) for row in maps])
    assert bool(((sigmas > 1.0 - 1e-3) & (sigmas < 4.0 + 1e-3)).all())  # in sigma_range (grid = reference grid)
    ratios = sigmas[:, 0] / sigmas[:, 1]
    if covariance == "isotropic":
        torch.testing.assert_close(ratios, torch.ones(16, dtype=ratios.dtype), atol=1e-3, rtol=0)
    else:
        assert bool(((ratios - 1).abs() > 0.05).sum() >= 12)  # independent per-axis draws: almost never equal


def test_apa_covariance_reaches_the_priors_and_enters_the_cache_key_only_off_its_default():
    def priors(**options):
        synth = get_synthesizer("sardfq", **FAST, msr_regions=0, **options)
        return plan_batch(synth, tiny_vit(), [0, 1]).terms[0].priors

    default, diagonal = priors(), priors(apa_covariance="diagonal")
    assert default.keys() == diagonal.keys()
    assert all(torch.equal(default[k], priors(apa_covariance="isotropic")[k]) for k in default)
    assert not any(torch.allclose(default[k], diagonal[k]) for k in default)

    assert "apa_covariance" not in resolved() and resolved(apa_covariance="isotropic") == resolved()
    assert resolved(apa_covariance="diagonal")["apa_covariance"] == "diagonal"
    with pytest.raises(SynthesisError, match="apa_covariance"):
        get_synthesizer("sardfq", apa_covariance="full")
