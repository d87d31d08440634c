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
    top, bottom, left, right = plan.views.layout.boxes[0]
    assert bottom - top == right - left == 16 and top in (0, 16) and left in (0, 16)  # a quadrant
    quadrant = plan.init[:1, :, top:bottom, left:right]
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


def test_default_msr_layout_is_the_quadrant_layout_and_keeps_the_cache_key():
    from optimum_dfq.synthesis.regions import quadrant_layout

    plan = plan_batch(get_synthesizer("sardfq", **FAST), tiny_vit(), list(range(6)))
    labels, layout = quadrant_layout(list(range(6)), 0, 10, 4, (32, 32))
    assert torch.equal(plan.labels, labels) and plan.views.layout == layout
    assert plan.owners[6:].tolist() == layout.owners
    default = resolved()
    assert "msr_layout" not in default and "msr_region_scale" not in default  # runs from before keep their cache key
    assert resolved(msr_layout="quadrants", msr_region_scale=[0.25, 0.5]) == default
    assert resolved(msr_layout="grid:2x2") == default  # the same regions, so the same images and key


@pytest.mark.parametrize("layout, regions", [("grid:3x3", 9), ("grid:1x4", 4), ("random", 4), ("random", 6)])
def test_msr_layout_sets_where_the_crops_lie(layout, regions):
    synth = get_synthesizer("sardfq", **FAST, msr_layout=layout, msr_regions=regions)
    plan = plan_batch(synth, tiny_vit(), list(range(8)))
    boxes, owners = plan.views.layout.boxes, plan.views.layout.owners
    assert plan.owners[8:].tolist() == owners  # crops are jittered and flipped with their parent (engine: owners)
    assert plan.views(plan.init).shape == (8 + len(owners), 3, 32, 32)
    assert max(owners.count(position) for position in range(8)) > 1
    if layout.startswith("grid"):
        rows, cols = (int(n) for n in layout[5:].split("x"))
        assert {(bottom - top, right - left) for top, bottom, left, right in boxes} <= {
            (32 // rows + extra_h, 32 // cols + extra_w) for extra_h in (0, 1) for extra_w in (0, 1)}
    else:
        assert len({bottom - top for top, bottom, _, _ in boxes}) > 1 and all(
            8 <= bottom - top <= 16 for top, bottom, _, _ in boxes)  # 0.25 and 0.5 of 32
    assert resolved(msr_layout=layout, msr_regions=regions)["msr_layout"] == layout


def test_random_msr_layout_scale_enters_the_cache_key_off_its_default():
    assert "msr_region_scale" not in resolved(msr_layout="random")
    assert resolved(msr_layout="random", msr_region_scale=[0.2, 0.4])["msr_region_scale"] == (0.2, 0.4)
    synth = get_synthesizer("sardfq", **FAST, msr_layout="random", msr_region_scale=(0.2, 0.25))
    boxes = plan_batch(synth, tiny_vit(), list(range(8))).views.layout.boxes
    assert all(7 <= bottom - top <= 8 for top, bottom, _, _ in boxes)  # 0.2 * 32 = 6.4, 0.25 * 32 = 8


def test_msr_crops_are_rolled_and_flipped_with_their_parent(monkeypatch):
    from optimum_dfq.synthesis import augment

    applied = []
    original = augment.JitterFlip.apply

    def recording(inputs, offsets, flips):
        applied.append((offsets.clone(), flips.clone()))
        return original(inputs, offsets, flips)

    monkeypatch.setattr(augment.JitterFlip, "apply", staticmethod(recording))
    synth = get_synthesizer("sardfq", **dict(FAST, jitter=(4, 4)), msr_layout="random", flip_prob=0.5)
    owners = plan_batch(synth, tiny_vit(), list(range(4))).owners
    synth.synthesize(tiny_vit(), 4, seed=0, cache_dir=False, batch_size=4, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert len(applied) == 4 and all(len(offsets) == len(owners) for offsets, _ in applied)
    for offsets, flips in applied:
        assert torch.equal(offsets, offsets[:4][owners]) and torch.equal(flips, flips[:4][owners])
    assert len({tuple(offsets[:4].tolist()) for offsets, _ in applied}) > 1  # the rolls do change between steps


@pytest.mark.parametrize("options, match", [
    ({"msr_layout": "hexagons"}, r"msr_layout='hexagons' must be one of \['quadrants', 'random'\] or 'grid:RxC'"),
    ({"msr_layout": "grid:3"}, "'grid:RxC'"),
    ({"msr_layout": 4}, "'grid:RxC'"),
    ({"msr_regions": 5}, r"msr_regions=5 exceeds the 4 cells of msr_layout='quadrants'"),
    ({"msr_layout": "grid:2x3", "msr_regions": 7}, "msr_regions=7 exceeds the 6 cells"),
    ({"msr_regions": -1}, "msr_regions >= 0"),
    ({"msr_region_scale": (0.2, 0.4)}, "only applies to msr_layout='random'"),
    ({"msr_layout": "random", "msr_region_scale": (0.6, 0.3)}, "0 < low <= high <= 1"),
    ({"msr_layout": "random", "msr_region_scale": (0.0, 0.3)}, "0 < low <= high <= 1"),
    ({"msr_layout": "random", "msr_region_scale": (0.3, 1.5)}, "0 < low <= high <= 1"),
    ({"msr_layout": "random", "msr_region_scale": 0.3}, "must be two numbers"),
    ({"msr_layout": "random", "msr_region_scale": ["0.3", "0.6"]}, "must be two numbers"),
    ({"msr_layout": "random", "msr_regions": 9, "msr_region_scale": (0.34, 0.4)}, r"at most 1/ceil\(sqrt"),
])
def test_invalid_msr_options_are_refused(options, match):
    with pytest.raises(SynthesisError, match=match):
        get_synthesizer("sardfq", **options)


def test_msr_options_round_trip_through_yaml_and_config_json(tmp_path):
    import json

    from optimum_dfq import DFQConfig
    from optimum_dfq.synthesis import synthesizer_from_config

    options = {"msr_layout": "random", "msr_region_scale": (0.2, 0.45), "msr_regions": 3}
    config = DFQConfig(synthesizer="sardfq", synthesizer_kwargs=options)
    (tmp_path / "recipe.yaml").write_text(config.to_yaml())
    from_yaml = DFQConfig.from_yaml(tmp_path / "recipe.yaml")
    from_json = DFQConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert from_yaml == config == from_json
    direct = get_synthesizer("sardfq", **options)
    for loaded in (from_yaml, from_json):  # YAML and JSON give lists: the synthesizer (and its cache key) is the same
        synth = synthesizer_from_config(loaded)
        assert synth.msr_region_scale == (0.2, 0.45) and synth.hyperparameters() == direct.hyperparameters()
    bad = DFQConfig(synthesizer="sardfq", synthesizer_kwargs={"msr_layout": "grid:2x2", "msr_regions": 5})
    with pytest.raises(SynthesisError, match="msr_regions=5 exceeds"):
        synthesizer_from_config(bad)


@pytest.mark.parametrize("apa_start, expected", [(0.5, {2: 0.75, 3: 1.0}), (0.25, {1: 0.5, 2: 0.75, 3: 1.0}),
                                                 (0.75, {3: 1.0})])
def test_apa_aligns_the_modules_after_apa_start_with_depth_weights_l_over_l(apa_start, expected):
    # L = 4 modules: module l (1-based) is aligned when l > apa_start · L, with weight l / L of the whole depth
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4,
                                                num_attention_heads=2, intermediate_size=64, num_labels=10)).eval()
    apa = plan_batch(get_synthesizer("sardfq", **FAST, apa_start=apa_start), model, [0]).terms[0]
    assert apa.depth_weights == pytest.approx(expected) and sorted(apa.priors) == sorted(expected)
