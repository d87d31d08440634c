"""PSAQ-ViT, SARDFQ and DFQ-ViT synthesizers on tiny ViT, DeiT and Swin models."""

from __future__ import annotations

import math

import pytest
import torch
from synth_helpers import BUILDERS, FAST, NORM, SYNTHESIZERS, bounds, one_thread, tiny_vit  # noqa: F401
from transformers import ViTConfig, ViTForImageClassification

from optimum_dfq.calibration.data import expected_image_shape
from optimum_dfq.errors import SynthesisError
from optimum_dfq.models import get_adapter
from optimum_dfq.synthesis import StepContext, get_synthesizer
from optimum_dfq.synthesis.features import FeatureCapture, probe_attention_sites
from optimum_dfq.synthesis.pixel_synthesizer import ModelInfo, batch_grid, frozen_model, grid_batch_size
from optimum_dfq.version import __version__

pytestmark = pytest.mark.usefixtures("one_thread")

EXPECTED_TERMS = {"psaq": {"pse", "ce", "tv"}, "sardfq": {"apa", "sl", "tv"}, "dfq-vit": {"sl", "tv", "pse"}}


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("name", SYNTHESIZERS)
def test_synthesizer_runs_in_range_finite_and_deterministic(name, family):
    model = BUILDERS[family]()
    first = get_synthesizer(name, **FAST).synthesize(model, 3, seed=1, **NORM)
    again = get_synthesizer(name, **FAST).synthesize(model, 3, seed=1, **NORM)
    other = get_synthesizer(name, **FAST).synthesize(model, 3, seed=2, **NORM)

    assert first.pixel_values.shape == (3, *expected_image_shape(model))
    low, high = bounds()
    assert bool((first.pixel_values >= low - 1e-6).all() and (first.pixel_values <= high + 1e-6).all())
    assert not torch.equal(first.pixel_values, torch.randn(3, 3, 32, 32).clamp(low, high))
    assert torch.equal(first.pixel_values, again.pixel_values) and torch.equal(first.labels, again.labels)
    assert not torch.allclose(first.pixel_values, other.pixel_values)

    history = first.metadata["loss_history"]
    assert EXPECTED_TERMS[name] <= set(history["final"])
    for term in EXPECTED_TERMS[name]:
        values = [v for v in history[term] if v is not None]
        assert values and all(math.isfinite(v) for v in values), term
        assert history["final"][term] is not None, f"{term} was never active"
    assert history["steps"] == [0, 1, 2, 3]
    meta = first.metadata
    assert meta["synthesizer"] == name and meta["seed"] == 1 and meta["library_version"] == __version__
    assert len(meta["model"]["fingerprint"]) == 64 and meta["image_mean"] == NORM["image_mean"]
    assert meta["hyperparameters"]["iterations"] == [2, 2]
    assert first.labels.shape == (3,) and int(first.labels.max()) < 10
    if name != "psaq":
        assert first.soft_labels.shape == (3, 10)
        assert torch.allclose(first.soft_labels.sum(-1), torch.ones(3))
        assert torch.equal(first.soft_labels.argmax(-1), first.labels) or name == "sardfq"


def _step_context(synth, model, indices):
    adapter = get_adapter(model)
    sites = probe_attention_sites(model, adapter)
    info = ModelInfo(model, adapter, sites, expected_image_shape(model), 10, torch.device("cpu"))
    plan = synth.plan_batch(info, indices, seed=0)
    pixels = plan.init.clone().requires_grad_(True)
    inputs = plan.views(pixels) if plan.views is not None else pixels
    needs = set().union(*(term.needs for term in plan.terms))
    return plan, pixels, inputs, sites, adapter, needs


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("name", SYNTHESIZERS)
def test_every_loss_term_has_a_finite_nonzero_pixel_gradient(name, family):
    model = BUILDERS[family]()
    synth = get_synthesizer(name, **FAST)
    with frozen_model(model, None):
        plan, pixels, inputs, sites, adapter, needs = _step_context(synth, model, [0, 1])
        with FeatureCapture(model, sites, needs) as capture:
            logits = model(pixel_values=inputs).logits
            ctx = StepContext(3, 1, 1, 2, 4, inputs[:2], inputs, logits, plan.owners, capture, sites,
                              adapter.num_prefix_tokens)
            assert {term.name for term in plan.terms} == EXPECTED_TERMS[name]
            for term in plan.terms:
                value = term(ctx)
                assert value.shape == (2,) and bool(torch.isfinite(value).all()), term.name
                (grad,) = torch.autograd.grad(value.sum(), pixels, retain_graph=True)
                assert bool(torch.isfinite(grad).all()), term.name
                assert float(grad[0].abs().sum()) > 0 and float(grad[1].abs().sum()) > 0, term.name
                assert term.weight_at(ctx) > 0, term.name


@pytest.mark.parametrize("name", SYNTHESIZERS)
def test_images_do_not_depend_on_their_batch_mates(name):
    model = tiny_vit()
    together = get_synthesizer(name, **FAST).synthesize(model, 3, seed=0, batch_size=3, **NORM)
    alone = get_synthesizer(name, **FAST).synthesize(model, 3, seed=0, batch_size=1, **NORM)
    assert torch.allclose(together.pixel_values, alone.pixel_values, atol=1e-5)
    assert torch.equal(together.labels, alone.labels)


@pytest.mark.parametrize("num_images, num_processes, expected", [
    (3, 2, [(0, 2), (2, 3)]),  # ceil(3 / 2) = 2: a batch for each process (not 3 batches of 1)
    (1, 4, [(0, 1)]),  # fewer images than processes: batches of 1, never of 0
    (7, 3, [(0, 3), (3, 6), (6, 7)]),
    (65, 2, [(0, 32), (32, 64), (64, 65)]),  # at most 32 images a batch
])
def test_the_default_batch_grid_gives_every_process_a_batch(num_images, num_processes, expected):
    size = grid_batch_size(num_images, num_processes=num_processes)
    assert batch_grid(num_images, size) == expected
    assert grid_batch_size(num_images, 64, num_processes) == min(64, num_images)  # a given size: at most the images


def test_a_finalize_that_drops_images_is_refused_and_nothing_is_cached(tmp_path):
    from optimum_dfq import CalibrationSet
    from optimum_dfq.synthesis import PSAQSynthesizer

    class KeepsOne(PSAQSynthesizer):
        def finalize(self, calibration_set):
            return CalibrationSet(calibration_set.pixel_values[:1], metadata=calibration_set.metadata)

    with pytest.raises(SynthesisError, match="has 1 images instead of num_images=2.*finalize must keep every image"):
        KeepsOne(**FAST).synthesize(tiny_vit(), 2, seed=0, cache_dir=tmp_path, **NORM)
    assert not list(tmp_path.rglob("calibration_set"))


def test_first_image_is_the_gaussian_synthesizers_image_before_optimisation():
    model = tiny_vit()
    gaussian = get_synthesizer("gaussian").synthesize(model, 2, seed=0)
    synth = get_synthesizer("psaq", **FAST)
    plan = _step_context(synth, model, [0, 1])[0]
    assert torch.equal(plan.init, gaussian.pixel_values)


def test_sardfq_crops_and_soft_labels():
    model = tiny_vit()
    synth = get_synthesizer("sardfq", **FAST)
    plan, pixels, inputs, *_ = _step_context(synth, model, list(range(6)))
    crops = inputs.shape[0] - 6
    assert 6 <= crops <= 24
    assert torch.equal(inputs[:6], pixels)
    soft = plan.terms[1].targets
    assert soft.shape == (6 + crops, 10) and torch.allclose(soft.sum(-1), torch.ones(6 + crops))
    for position in range(6):
        crop_rows = (plan.owners == position).nonzero().flatten()[1:]
        assert 1 <= len(crop_rows) <= 4
        crop_classes = soft[crop_rows].argmax(-1).tolist()
        assert len(set(crop_classes + [int(plan.labels[position])])) == len(crop_rows) + 1
        relevant = (soft[position] > soft[position].min() * 10).nonzero().flatten().tolist()
        assert sorted(relevant) == sorted(crop_classes + [int(plan.labels[position])])
    quadrant = inputs[6][None]
    owner = int(plan.owners[6])
    assert quadrant.shape == (1, 3, 32, 32) and int(owner) < 6
    (grad,) = torch.autograd.grad(inputs[6].sum(), pixels)
    touched = grad[owner].abs().sum(0) > 0
    assert 0 < int(touched.sum()) <= 16 * 16 and int(grad.abs().sum(dim=(1, 2, 3)).gt(0).sum()) == 1


def test_sardfq_aligns_only_the_second_half_with_depth_weights():
    model = tiny_vit()
    plan = _step_context(get_synthesizer("sardfq", **FAST), model, [0])[0]
    apa = plan.terms[0]
    assert apa.depth_weights == {1: 1.0}
    assert apa.priors[1].shape == (1, 1, 2, 16)
    assert torch.allclose(apa.priors[1].sum(-1), torch.ones(1, 1, 2))


def test_dfq_vit_ramps_local_term_in_phase_two_and_orders_easy_to_hard():
    model = tiny_vit()
    settings = dict(FAST, iterations=(2, 3), jitter=(2, 2))
    calib = get_synthesizer("dfq-vit", **settings).synthesize(model, 4, seed=0, **NORM)
    history = calib.metadata["loss_history"]
    assert history["pse"][:2] == [None, None] and all(v is not None for v in history["pse"][2:])
    difficulty = calib.metadata["per_image"]["difficulty"]
    assert difficulty == sorted(difficulty)
    assert sorted(calib.metadata["order"]) == [0, 1, 2, 3]
    plain = get_synthesizer("dfq-vit", order="index", **settings).synthesize(model, 4, seed=0, **NORM)
    assert torch.equal(calib.pixel_values, plain.pixel_values[calib.metadata["order"]])

    from optimum_dfq.synthesis.losses import PhaseRamp

    ramp = PhaseRamp(phase=1, max_weight=2.0, ramp_fraction=0.5)
    ctx = type("Ctx", (), {"phase": 1, "phase_iterations": 10, "phase_step": 1})()
    assert ramp(ctx) == pytest.approx(0.8)
    ctx.phase = 0
    assert ramp(ctx) == 0.0


def test_clear_errors():
    with pytest.raises(SynthesisError, match="image_processor"):
        get_synthesizer("psaq", **FAST).synthesize(tiny_vit(), 2)
    with pytest.raises(SynthesisError, match=r"Unknown hyper-parameter\(s\) 'not_a_parameter' for synthesizer 'psaq'"):
        get_synthesizer("psaq", not_a_parameter=1)
    with pytest.raises(SynthesisError, match="Invalid hyper-parameters for synthesizer 'psaq'"):  # a wrong type
        get_synthesizer("psaq", lr="fast")
    with pytest.raises(SynthesisError, match="local_phase"):
        get_synthesizer("dfq-vit", iterations=(5,), jitter=(1,), local_phase=1)
    with pytest.raises(SynthesisError, match="num_images"):
        get_synthesizer("psaq", **FAST).synthesize(tiny_vit(), 0, **NORM)


@pytest.mark.parametrize("name", SYNTHESIZERS)
def test_a_misspelt_hyperparameter_is_named_with_the_closest_one_and_the_accepted_list(name):
    """Every hyper-parameter up the constructors' `**kwargs` chain counts (PSAQ's `iterations` is PixelSynthesizer's),
    and the message lists exactly what the synthesizer's `hyperparameters()` reports."""
    accepted = sorted(get_synthesizer(name).hyperparameters())
    misspelt = accepted[0][:-1] + "x" + accepted[0][-1]
    with pytest.raises(SynthesisError) as error:
        get_synthesizer(name, **{misspelt: 1})
    assert f"'{misspelt}' (did you mean '{accepted[0]}'?)" in str(error.value)
    assert str(error.value).endswith(f"it takes: {accepted}.")


def test_a_misspelt_synthesizer_name_is_named_with_the_closest_one():
    with pytest.raises(SynthesisError, match=r"Unknown synthesizer 'dfqvit' \(did you mean 'dfq-vit'\?\)"):
        get_synthesizer("dfqvit")


@pytest.mark.parametrize("name", SYNTHESIZERS)
def test_an_image_processor_of_another_size_is_refused_before_synthesis(name, monkeypatch):
    # it was used for its mean/std only, so a processor of another model (224x224 for a 32x32 model) was accepted and
    # `optimum-dfq synthesize` spent the whole synthesis on a set that quantize then refused for the same processor
    from transformers import ViTImageProcessor

    from optimum_dfq.errors import ImageSizeError
    from optimum_dfq.synthesis import pixel_synthesizer

    monkeypatch.setattr(pixel_synthesizer, "optimize_batch", None)  # refused before any image is optimised
    wrong = ViTImageProcessor(size={"height": 224, "width": 224}, **NORM)
    with pytest.raises(ImageSizeError, match=r"resizes every image to 224x224 .* the model takes 32x32"):
        get_synthesizer(name, **FAST).synthesize(tiny_vit(), 2, image_processor=wrong)


@pytest.mark.parametrize("name", [*SYNTHESIZERS, "gaussian"])
@pytest.mark.parametrize("num_images, seed, match", [
    (0, 0, "num_images must be a positive integer, got 0"),
    (-1, 0, "num_images must be a positive integer, got -1"),
    (2.0, 0, "num_images must be a positive integer, got 2.0"),
    (True, 0, "num_images must be a positive integer, got True"),
    (2, 2.5, "seed must be an integer"),  # was torch's "manual_seed expected a long"
    (2, "1", "seed must be an integer"),
    (2, None, "seed must be an integer"),
    (2, -1, r"seed=-1 is outside 0\.\.2\*\*64 - 1, the seeds quantize accepts"),  # as quantize refuses it
    (2, 2**64, r"seed=18446744073709551616 is outside"),
])
def test_every_synthesizer_refuses_a_bad_image_count_or_seed(name, num_images, seed, match):
    synthesizer = get_synthesizer(name) if name == "gaussian" else get_synthesizer(name, **FAST)
    norm = {} if name == "gaussian" else NORM
    with pytest.raises(SynthesisError, match=match):
        synthesizer.synthesize(tiny_vit(), num_images, seed=seed, **norm)


@pytest.mark.parametrize("name", SYNTHESIZERS)
@pytest.mark.parametrize("kwargs, match", [
    ({"lr": "fast"}, r"synthesizer '.*' \(lr='fast'\)"),  # was a bare "could not convert string to float"
    ({"iterations": "abc"}, "iterations must be whole numbers .* got 'abc'"),  # was int("a")'s ValueError
    ({"iterations": 2.7}, "iterations must be whole numbers"),  # was silently truncated to 2 steps
    ({"iterations": (3, 2.5)}, "iterations must be whole numbers"),
    ({"warmup": 1.5}, "warmup must be whole numbers"),
    ({"jitter": (2, 0.5)}, "jitter must be whole numbers"),
])
def test_hyperparameters_of_a_wrong_type_name_the_parameter(name, kwargs, match):
    with pytest.raises(SynthesisError, match=match):
        get_synthesizer(name, **kwargs)


@pytest.mark.parametrize("num_labels", [0, 1])
@pytest.mark.parametrize("name", SYNTHESIZERS)
def test_class_conditional_synthesizers_refuse_a_head_without_classes(name, num_labels):
    # num_labels=1 (a regression head) makes the class term identically 0, num_labels=0 (nn.Identity head) crashed
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64,
                                                num_labels=num_labels)).eval()
    with pytest.raises(SynthesisError, match=rf"'{name}'.*num_labels={num_labels}.*synthesizer='gaussian'"):
        get_synthesizer(name, **FAST).synthesize(model, 2, **NORM)
    assert len(get_synthesizer("gaussian").synthesize(model, 2)) == 2  # class-free synthesis still works


def test_world_size_without_distributed_state_is_refused(monkeypatch):
    from accelerate import PartialState

    from optimum_dfq.synthesis.distributed import resolve_state

    state = PartialState(cpu=True)
    assert state.num_processes == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SynthesisError, match="PartialState\\(cpu=True\\)"):
        resolve_state(state)


def test_image_streams_are_distinct_across_seeds_and_beyond_a_million_images():
    from optimum_dfq.synthesis import image_generator

    def first(seed, index):
        return torch.randn(4, generator=image_generator(seed, index))

    # The linear formula's streams stay what earlier releases (and their caches) drew.
    assert torch.equal(first(3, 5), torch.randn(4, generator=torch.Generator().manual_seed(3 * 1_000_003 + 5)))
    # Past 1,000,003 images the linear formula would replay seed + 1's first images.
    assert not torch.equal(first(0, 1_000_003), first(1, 0))
    assert not torch.equal(first(0, 1_000_004), first(1, 1))
    assert torch.equal(first(0, 1_000_004), first(0, 1_000_004))
    with pytest.raises(ValueError, match="index"):
        image_generator(0, -1)


def test_sardfq_apa_start_chooses_the_aligned_depth_and_weights_grow_with_depth():
    model = tiny_vit()
    plan = _step_context(get_synthesizer("sardfq", **FAST, apa_start=0.0), model, [0])[0]
    assert plan.terms[0].depth_weights == {0: 0.5, 1: 1.0}  # l / L for every one of the L = 2 layers


def test_gaussian_synthesizer_scales_and_shifts_the_same_noise():
    model = tiny_vit()
    standard = get_synthesizer("gaussian").synthesize(model, 3, seed=4).pixel_values
    shifted = get_synthesizer("gaussian", mean=2.0, std=0.5).synthesize(model, 3, seed=4).pixel_values
    torch.testing.assert_close(shifted, standard * 0.5 + 2.0)
    assert abs(float(standard.mean())) < 0.1 and abs(float(standard.std()) - 1.0) < 0.1


def test_jitter_reference_scales_the_offsets_to_the_input_and_keys_on_the_result():
    model = tiny_vit()  # 32-pixel inputs
    settings = dict(FAST, jitter=(15, 30))
    scaled = get_synthesizer("psaq", jitter_reference=224, **settings).synthesize(model, 2, seed=0, **NORM)
    assert scaled.metadata["engine"]["jitter"] == [2, 4]
    assert scaled.metadata["hyperparameters"]["jitter"] == [2, 4]  # the cache key hashes what the engine used
    same = get_synthesizer("psaq", **dict(settings, jitter=(2, 4))).synthesize(model, 2, seed=0, **NORM)
    assert scaled.metadata["cache_key"] == same.metadata["cache_key"]
    assert torch.equal(scaled.pixel_values, same.pixel_values)
    unscaled = get_synthesizer("psaq", **settings).synthesize(model, 2, seed=0, **NORM)
    assert unscaled.metadata["engine"]["jitter"] == [15, 30]
    assert unscaled.metadata["cache_key"] != scaled.metadata["cache_key"]
    assert get_synthesizer("psaq", jitter=(1, 0), jitter_reference=224).scaled_jitter((32, 48)) == (1, 0)
    for bad in (0, -224, 22.4, True):
        with pytest.raises(SynthesisError, match="jitter_reference"):
            get_synthesizer("psaq", jitter_reference=bad)


@pytest.mark.parametrize("name,weight", [
    ("psaq", "pse_weight"), ("psaq", "ce_weight"), ("psaq", "tv_weight"),
    ("sardfq", "apa_weight"), ("sardfq", "sl_weight"), ("sardfq", "tv_weight"),
    ("dfq-vit", "local_weight"), ("dfq-vit", "tv_weight"),
])
def test_negative_or_non_finite_loss_weights_are_refused(name, weight):
    # a negative weight turns a term the method minimises into one it maximises (a TV prior rewarding noise)
    for value in (-0.5, float("inf"), "1"):
        with pytest.raises(SynthesisError, match=rf"finite numbers >= 0 .*; got {weight}={value!r}"):
            get_synthesizer(name, **FAST, **{weight: value})
    assert getattr(get_synthesizer(name, **FAST, **{weight: 0}), weight) == 0.0  # 0 turns the term off


@pytest.mark.parametrize("options", [{"std": 0}, {"std": -1.0}, {"std": float("nan")}, {"mean": float("inf")}])
def test_gaussian_noise_needs_a_finite_mean_and_a_positive_std(options):
    with pytest.raises(SynthesisError, match="finite mean and a finite std > 0"):
        get_synthesizer("gaussian", **options)
