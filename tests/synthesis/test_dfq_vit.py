"""DFQ-ViT synthesis: option checks and the hard-label class loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from synth_helpers import BUILDERS, FAST, NORM, one_thread, plan_batch, tiny_vit  # noqa: F401

from optimum_dfq.errors import ConfigError, SynthesisError
from optimum_dfq.synthesis import get_synthesizer


@pytest.mark.parametrize("option,message", [
    ({"class_loss": "kl"}, r"class_loss='kl' must be one of \['soft', 'hard'\]"),
    ({"order": "random"}, r"order='random' must be one of \['easy_to_hard', 'index'\]"),
])
def test_unknown_options_are_refused(option, message):
    with pytest.raises(SynthesisError, match=message):
        get_synthesizer("dfq-vit", **FAST, **option)


@pytest.mark.usefixtures("one_thread")
def test_hard_class_loss_uses_cross_entropy_and_records_its_difficulty():
    model = tiny_vit()
    calib = get_synthesizer("dfq-vit", class_loss="hard", **FAST).synthesize(model, 3, seed=0, **NORM)
    assert calib.soft_labels is None and calib.labels.shape == (3,)
    history = calib.metadata["loss_history"]
    assert "ce" in history and "sl" not in history  # the hard cross-entropy term, not the soft-label one
    with torch.no_grad():
        expected = F.cross_entropy(model(pixel_values=calib.pixel_values).logits, calib.labels, reduction="none")
    difficulty = calib.metadata["per_image"]["difficulty"]
    torch.testing.assert_close(torch.tensor(difficulty), expected, rtol=1e-4, atol=1e-5)
    assert difficulty == sorted(difficulty)  # easy to hard, labels reordered with their images


def test_local_term_options_shape_its_weight_schedule():
    from optimum_dfq.synthesis import StepContext

    synthesizer = get_synthesizer("dfq-vit", iterations=(4, 4, 4), jitter=(1, 1, 1), warmup=0, local_weight=3.0,
                                  local_phase=2, ramp_fraction=0.5)
    pse = {term.name: term for term in plan_batch(synthesizer, tiny_vit(), [0]).terms}["pse"]

    def weight(phase, phase_step):
        return pse.weight_at(StepContext(0, phase, phase_step, 4, 12, None, None, None, None, None))

    # off before phase 2, then 3.0 reached linearly over half of the phase's 4 steps, then held
    assert [weight(phase, s) for phase in (0, 1) for s in range(4)] == [0.0] * 8
    assert [weight(2, s) for s in range(4)] == pytest.approx([1.5, 3.0, 3.0, 3.0])


def test_soft_labels_put_the_class_logit_in_soft_label_range():
    synthesizer = get_synthesizer("dfq-vit", **FAST, soft_label_range=(1.0, 2.0))
    plan = plan_batch(synthesizer, tiny_vit(), list(range(8)))
    log_probs = plan.soft_labels.log()
    for row, label in zip(log_probs, plan.labels.tolist()):
        others = torch.cat([row[:label], row[label + 1:]])
        assert torch.allclose(others, others[0].expand_as(others))  # every other class has logit 0
        assert 1.0 <= float(row[label] - others[0]) <= 2.0  # the class logit, relative to 0


@pytest.mark.usefixtures("one_thread")
def test_soft_class_loss_records_the_soft_cross_entropy_as_difficulty():
    model = tiny_vit(initializer_range=0.5)  # confident logits, and really soft labels: the two losses differ
    calib = get_synthesizer("dfq-vit", **FAST, soft_label_range=(0.5, 1.0)).synthesize(model, 3, seed=0, **NORM)
    assert calib.soft_labels is not None
    with torch.no_grad():
        log_probs = F.log_softmax(model(pixel_values=calib.pixel_values).logits, dim=-1)
    expected = -(calib.soft_labels * log_probs).sum(-1)
    assert (expected - F.nll_loss(log_probs, calib.labels, reduction="none")).abs().min() > 0.05
    difficulty = calib.metadata["per_image"]["difficulty"]
    torch.testing.assert_close(torch.tensor(difficulty), expected, rtol=1e-4, atol=1e-5)
    assert difficulty == sorted(difficulty)


@pytest.mark.parametrize("option,error,message", [
    ({"hardness_weight": 1.0, "hardness_phase": 2}, SynthesisError, r"hardness_phase=2 must name one of the 2 phases"),
    ({"hardness_weight": -1.0}, SynthesisError, r"finite numbers >= 0 .*; got hardness_weight=-1.0"),
    ({"hardness_weight": float("nan")}, SynthesisError, r"finite numbers >= 0 .*; got hardness_weight=nan"),
    ({"hardness_weight": 1.0, "provisional": {"num_images": 8}}, ConfigError, r"\['num_images'\]"),
])
def test_bad_hardness_options_are_refused(option, error, message):
    with pytest.raises(error, match=message):
        get_synthesizer("dfq-vit", **FAST, **option)


def test_hardness_term_is_added_only_when_weighted_and_follows_its_phase():
    from optimum_dfq.synthesis import StepContext

    default_terms = plan_batch(get_synthesizer("dfq-vit", **FAST), tiny_vit(), [0]).terms
    assert "hardness" not in {term.name for term in default_terms}
    synthesizer = get_synthesizer("dfq-vit", iterations=(4, 4, 4), jitter=(1, 1, 1), warmup=0, local_phase=1,
                                  hardness_weight=2.0, hardness_phase=2, ramp_fraction=0.5)
    terms = {term.name: term for term in plan_batch(synthesizer, tiny_vit(), [0]).terms}

    def weight(name, phase, phase_step):
        return terms[name].weight_at(StepContext(0, phase, phase_step, 4, 12, None, None, None, None, None))

    assert [weight("hardness", phase, s) for phase in (0, 1) for s in range(4)] == [0.0] * 8
    assert [weight("hardness", 2, s) for s in range(4)] == pytest.approx([1.0, 2.0, 2.0, 2.0])
    assert weight("pse", 1, 3) == 1.0  # the local term keeps its own phase


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", ["vit", "deit", "swin"])
def test_hardness_records_the_disagreement_as_difficulty_and_the_class_loss_beside_it(family):
    model = BUILDERS[family](initializer_range=0.2)
    calib = get_synthesizer("dfq-vit", **FAST, hardness_weight=1.0).synthesize(model, 3, seed=0, **NORM)
    hardness = calib.metadata["loss_history"]["hardness"]
    steps = calib.metadata["loss_history"]["steps"]
    assert [hardness[i] is None for i, step in enumerate(steps)] == [step < 2 for step in steps]  # phase 2 only
    per_image = calib.metadata["per_image"]
    assert all(value > 0 for value in per_image["difficulty"]) and per_image["difficulty"] == sorted(
        per_image["difficulty"])
    with torch.no_grad():
        log_probs = F.log_softmax(model(pixel_values=calib.pixel_values).logits, dim=-1)
    torch.testing.assert_close(torch.tensor(per_image["class_loss"]), -(calib.soft_labels * log_probs).sum(-1),
                               rtol=1e-4, atol=1e-5)


def test_hardness_settings_enter_the_cache_key_only_when_the_term_is_on():
    from optimum_dfq.synthesis.engine import EngineConfig

    def resolved(**options):
        return get_synthesizer("dfq-vit", **FAST, **options).resolved_hyperparameters(EngineConfig(**FAST))

    assert resolved(hardness_weight=0.0, provisional={"bits": "w3a4"}) == resolved()
    assert not {"hardness_weight", "hardness_phase", "provisional"} & set(resolved())
    on = resolved(hardness_weight=1.0)
    assert (on["hardness_weight"], on["hardness_phase"], on["provisional"]) == (1.0, 1, {})
    assert resolved(hardness_weight=1.0, provisional={"bits": "w3a4"}) != on


@pytest.mark.parametrize("synthesizer", [("psaq", {}), ("sardfq", {}), ("dfq-vit", {}),
                                         ("dfq-vit", {"hardness_weight": 10})])
def test_synthesis_leaves_the_global_random_state_alone(synthesizer):
    # The provisional model's quantized layers are built like torch.nn layers, whose constructors draw their
    # (overwritten) initial weights from the global generator: the user's next random draws changed.
    name, kwargs = synthesizer
    model = tiny_vit()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    get_synthesizer(name, **FAST, **kwargs).synthesize(model, 2, **NORM)
    assert torch.equal(torch.get_rng_state(), before)



def test_defaults_are_the_documented_ones():
    synthesizer = get_synthesizer("dfq-vit")
    assert (synthesizer.class_loss, synthesizer.soft_label_range, synthesizer.order) == ("soft", (5.0, 10.0),
                                                                                         "easy_to_hard")
    assert (synthesizer.local_weight, synthesizer.local_phase, synthesizer.ramp_fraction) == (1.0, 1, 1.0)
    assert (synthesizer.hardness_weight, synthesizer.hardness_phase, synthesizer.provisional) == (0.0, 1, {})
    # PSAQ-ViT's TV prior and KDE (as PSAQSynthesizer)
    assert (synthesizer.tv_weight, synthesizer.tv_target, synthesizer.tv_reference) == (0.05, (2500.0, 3000.0),
                                                                                        (32, 224))
    assert (synthesizer.kde_bandwidth, synthesizer.kde_points, synthesizer.kde_floor) == (0.01, 10, 1e-4)
    assert get_synthesizer("dfq-vit", local_phase=0).hardness_phase == 0  # follows local_phase unless given


def test_a_negative_phase_is_refused():
    with pytest.raises(SynthesisError, match=r"local_phase=-1 must name one of the 2 phases"):
        get_synthesizer("dfq-vit", **FAST, local_phase=-1)
    with pytest.raises(SynthesisError, match=r"hardness_phase=-1 must name one of the 2 phases"):
        get_synthesizer("dfq-vit", **FAST, hardness_weight=1.0, hardness_phase=-1)


def test_tv_and_kde_options_reach_their_terms():
    synthesizer = get_synthesizer("dfq-vit", tv_weight=0.3, tv_target=(10.0, 20.0), tv_reference=(8, 64),
                                  kde_bandwidth=0.2, kde_points=7, kde_floor=1e-3)
    terms = {term.name: term for term in plan_batch(synthesizer, tiny_vit(), [0, 1]).terms}
    assert terms["tv"].weight == 0.3 and terms["tv"].scale == pytest.approx(32**0.5)  # sqrt(8 · 64² / 32²)
    assert bool(((terms["tv"].targets >= 10.0) & (terms["tv"].targets <= 20.0)).all())
    assert (terms["pse"].bandwidth, terms["pse"].num_points, terms["pse"].floor) == (0.2, 7, 1e-3)


def test_each_images_soft_label_comes_from_its_own_stream():
    from optimum_dfq.synthesis import stream_generator
    from optimum_dfq.synthesis.targets import soft_target

    plan = plan_batch(get_synthesizer("dfq-vit", **FAST), tiny_vit(), [3, 8])
    for row, index, label in zip(plan.soft_labels, [3, 8], plan.labels.tolist()):
        expected = soft_target([label], 10, stream_generator(0, index, "soft"), (5.0, 10.0))  # plan_batch's seed 0
        assert torch.equal(row, expected)


def _model_info(model):
    from optimum_dfq.models import get_adapter
    from optimum_dfq.synthesis.features import probe_attention_sites
    from optimum_dfq.synthesis.pixel_synthesizer import ModelInfo

    adapter = get_adapter(model)
    return ModelInfo(model, adapter, probe_attention_sites(model, adapter), (3, 32, 32), 10, torch.device("cpu"))


@pytest.mark.usefixtures("one_thread")
def test_hardness_difficulty_is_the_kl_from_the_float_to_the_quantized_prediction():
    from optimum_dfq.synthesis import DisagreementTerm

    model, stand_in = tiny_vit(), tiny_vit(initializer_range=0.5)  # the stand-in plays the provisional model
    info = _model_info(model)
    synthesizer = get_synthesizer("dfq-vit", **FAST, hardness_weight=1.0)
    plan = synthesizer.plan_batch(info, [0, 1, 2], seed=0)
    hardness = next(term for term in plan.terms if isinstance(term, DisagreementTerm))
    hardness.quantized_model = stand_in
    images = torch.randn(3, 3, 32, 32)
    recorded = synthesizer.finish_batch(info, plan, images)
    with torch.no_grad():
        log_p = F.log_softmax(model(pixel_values=images).logits, dim=-1)
        log_q = F.log_softmax(stand_in(pixel_values=images).logits, dim=-1)
    # KL(p_float ‖ p_quantized) = Σ p (log p − log q); its reverse differs for such different predictions
    expected = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    assert (expected - F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)).abs().min() > 1e-3
    torch.testing.assert_close(recorded["difficulty"], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(recorded["class_loss"], -(plan.soft_labels * log_p).sum(-1), rtol=1e-4, atol=1e-6)


def test_a_hardness_term_that_never_switched_on_is_refused_at_the_end_of_the_batch():
    info = _model_info(tiny_vit())
    synthesizer = get_synthesizer("dfq-vit", **FAST, hardness_weight=1.0)
    plan = synthesizer.plan_batch(info, [0, 1], seed=0)  # no step ran: no provisional model was built
    with pytest.raises(SynthesisError, match="hardness term never switched on.*check hardness_phase"):
        synthesizer.finish_batch(info, plan, torch.zeros(2, 3, 32, 32))


def test_easy_to_hard_order_lists_the_global_index_of_each_row():
    from optimum_dfq.calibration.data import CalibrationSet

    difficulty = [3.0, 1.0, 2.0, 0.5, 1.0]  # sorted: rows 3, 1, 4 (the tie kept in index order), 2, 0
    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 2, 2).contiguous()
    calib = CalibrationSet(images, labels=torch.arange(5), soft_labels=torch.eye(5),
                           metadata={"per_image": {"difficulty": difficulty}})
    ordered = get_synthesizer("dfq-vit", **FAST).finalize(calib)
    order = [3, 1, 4, 2, 0]  # not its own inverse ([4, 1, 3, 0, 2]), so a row -> index map is told from its inverse
    assert ordered.metadata["order"] == order
    assert ordered.pixel_values[:, 0, 0, 0].tolist() == [float(i) for i in order]
    assert ordered.labels.tolist() == order and torch.equal(ordered.soft_labels, torch.eye(5)[order])
    assert ordered.metadata["per_image"]["difficulty"] == [0.5, 1.0, 1.0, 2.0, 3.0]
    assert get_synthesizer("dfq-vit", **FAST, order="index").finalize(calib) is calib


@pytest.mark.parametrize("class_loss", ["soft", "hard"])
def test_each_image_gets_its_label_tv_target_and_noise_from_its_own_streams(class_loss):
    from optimum_dfq.synthesis.targets import initial_noise, random_labels, uniform_per_image

    indices, seed = [4, 0, 9], 0  # the seed plan_batch uses
    synthesizer = get_synthesizer("dfq-vit", **FAST, class_loss=class_loss, tv_target=(10.0, 20.0))
    plan = plan_batch(synthesizer, tiny_vit(), indices)
    terms = {term.name: term for term in plan.terms}
    labels = random_labels(indices, seed, 10)  # PSAQ-ViT's streams: the same images start alike in both
    assert torch.equal(plan.labels, labels)
    if class_loss == "hard":
        assert torch.equal(terms["ce"].labels, labels)
    else:
        assert plan.soft_labels.argmax(-1).tolist() == labels.tolist()
    assert torch.equal(terms["tv"].targets, uniform_per_image(indices, seed, "tv", 10.0, 20.0))
    assert torch.equal(plan.init, initial_noise(indices, seed, (3, 32, 32)))
