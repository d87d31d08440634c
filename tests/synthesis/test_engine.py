"""Building blocks of the pixel-optimisation engine."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from synth_helpers import FAST, NORM, one_thread, tiny_deit, tiny_swin, tiny_vit  # noqa: F401

from optimum_dfq.errors import SynthesisError
from optimum_dfq.models import get_adapter
from optimum_dfq.synthesis import BatchPlan, EngineConfig, LossTerm, get_synthesizer, optimize_batch
from optimum_dfq.synthesis.augment import JitterFlip
from optimum_dfq.synthesis.features import FeatureCapture, probe_attention_sites
from optimum_dfq.synthesis.kde import patch_similarity_entropy
from optimum_dfq.synthesis.normalization import normalization_stats, valid_pixel_range
from optimum_dfq.synthesis.priors import gaussian_mixture_maps
from optimum_dfq.synthesis.schedule import phase_learning_rate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_jitter_flip_matches_roll_then_flip():
    images = torch.randn(3, 3, 8, 8)
    offsets, flips = torch.tensor([2, -3, 0]), torch.tensor([True, False, True])
    out = JitterFlip.apply(images, offsets, flips)
    for b in range(3):
        expected = torch.roll(images[b], (int(offsets[b]),) * 2, dims=(1, 2))
        expected = expected.flip(-1) if flips[b] else expected
        assert torch.equal(out[b], expected)


def test_jitter_draws_depend_only_on_the_image_generator():
    def draws(seeds):
        aug = JitterFlip([torch.Generator().manual_seed(s) for s in seeds])
        return [aug.draw(5) for _ in range(4)]

    alone = draws([7])
    together = draws([3, 7, 9])
    for (o1, f1), (o3, f3) in zip(alone, together):
        assert o1[0] == o3[1] and f1[0] == f3[1]


def test_phase_learning_rate_warmup_then_cosine():
    assert phase_learning_rate(0.2, 0, 500, 100) == pytest.approx(0.002)
    assert phase_learning_rate(0.2, 99, 500, 100) == pytest.approx(0.2)
    assert phase_learning_rate(0.2, 300, 500, 100) == pytest.approx(0.1)
    assert phase_learning_rate(0.2, 499, 500, 100) < 1e-4


def test_normalization_comes_from_the_processor_or_explicit_values(image_processor):
    assert normalization_stats(image_processor) == (list(map(float, image_processor.image_mean)),
                                                   list(map(float, image_processor.image_std)))
    with pytest.raises(SynthesisError, match="image_processor"):
        normalization_stats(None)
    with pytest.raises(SynthesisError, match="both"):
        normalization_stats(None, image_mean=[0.5, 0.5, 0.5])
    low, high = valid_pixel_range([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert torch.equal(low.flatten(), torch.full((3,), -2.0)) and torch.equal(high.flatten(), torch.full((3,), 2.0))


def test_engine_config_rejects_mismatched_phases():
    with pytest.raises(SynthesisError, match="jitter"):
        EngineConfig(iterations=(10, 10, 10), jitter=(1, 2))
    # a single step count for a two-phase method: the message shows the iterations that would fit
    with pytest.raises(SynthesisError, match=r"one step count per phase in iterations \(e\.g\. iterations=\(2, 2\)\)"):
        EngineConfig(iterations=(5,), jitter=(15, 30))
    assert EngineConfig(iterations=(3, 4), jitter=5).jitter == (5, 5)


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), float("inf")])
def test_engine_config_rejects_a_learning_rate_that_is_not_finite_and_positive(lr):
    with pytest.raises(SynthesisError, match="finite lr > 0"):
        EngineConfig(iterations=(3,), jitter=1, lr=lr)


@pytest.mark.parametrize("name", ["psaq", "dfq-vit"])
@pytest.mark.parametrize("option", [{"kde_bandwidth": 0.0}, {"kde_bandwidth": float("nan")}, {"kde_points": 1},
                                    {"kde_points": 2.5}, {"kde_points": True}, {"kde_floor": 0.0}])
def test_patch_similarity_entropy_options_are_checked_when_the_synthesizer_is_built(name, option):
    # at construction, so that no process of a multi-process run starts synthesizing before one of them fails
    with pytest.raises(SynthesisError, match="kde_bandwidth > 0, a whole kde_points >= 2"):
        get_synthesizer(name, **FAST, **option)
    assert get_synthesizer(name, **FAST, kde_points=7.0).kde_points == 7


def _psaq_reference_entropy(tokens: torch.Tensor) -> torch.Tensor:
    """PSAQ-ViT's generate_data.py + utils/kde.py, one image at a time (the grid spans that image's range)."""
    sims = torch.cosine_similarity(tokens.unsqueeze(1), tokens.unsqueeze(2), dim=3)
    out = []
    for b in range(tokens.shape[0]):
        samples = sims[b].reshape(1, -1)
        grid = torch.linspace(sims[b].min().item(), sims[b].max().item(), steps=10)[None]
        var = 0.01**2
        kernel = torch.exp(-(grid.view(1, 10, 1) - samples.view(1, 1, -1)).pow(2) / (2 * var))
        density = (kernel / math.sqrt(2 * math.pi * var)).mean(-1) + 1e-4
        out.append(torch.trapz(-density * torch.log(density), grid, dim=-1))
    return torch.cat(out)


def test_patch_similarity_entropy_matches_psaq_reference_values_and_gradients():
    torch.manual_seed(0)
    tokens = torch.randn(3, 20, 8)
    ours_in, ref_in = tokens.clone().requires_grad_(), tokens.clone().requires_grad_()
    ours, ref = patch_similarity_entropy(ours_in), _psaq_reference_entropy(ref_in)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6)
    ours.sum().backward()
    ref.sum().backward()
    assert torch.allclose(ours_in.grad, ref_in.grad, rtol=1e-3, atol=1e-4 * ref_in.grad.abs().max())


def test_gaussian_mixture_priors_are_distributions():
    maps = gaussian_mixture_maps(torch.Generator().manual_seed(0), 6, (4, 5), max_components=5)
    assert maps.shape == (6, 20)
    assert torch.allclose(maps.sum(-1), torch.ones(6)) and bool((maps >= 0).all())
    assert not torch.allclose(maps[0], maps[1])


@pytest.mark.parametrize("builder", [tiny_vit, tiny_deit, tiny_swin])
def test_captured_attention_output_is_the_input_of_the_output_projection(builder):
    model = builder()
    sites = probe_attention_sites(model, get_adapter(model))
    assert len(sites) == 2 + 2 * (builder is tiny_swin)
    outputs = {}
    handles = [site.module.register_forward_hook(lambda m, a, o, i=site.index: outputs.__setitem__(i, o[0]))
               for site in sites]
    with torch.no_grad(), FeatureCapture(model, sites, {"attention_outputs", "attention_probs"}) as capture:
        model(pixel_values=torch.randn(2, 3, 32, 32))
        for site in sites:
            av = capture.attention_output(site.index)
            assert av.shape[-2] == site.heads
            projected = site.output_projection(av.flatten(-2))
            assert torch.allclose(projected, outputs[site.index], atol=1e-6)
            probs = capture.attention_probs(site.index)
            assert probs.shape == (2 * site.windows, site.heads, site.tokens, site.tokens)
    for handle in handles:
        handle.remove()


class _NaNTerm(LossTerm):
    name = "broken"

    def __call__(self, ctx):
        return ctx.logits[: ctx.num_images].sum(-1) * float("nan")


def test_non_finite_loss_names_the_term():
    model = tiny_vit()
    sites = probe_attention_sites(model, get_adapter(model))
    plan = BatchPlan([0, 1], torch.randn(2, 3, 32, 32), [_NaNTerm()])
    bounds = valid_pixel_range(NORM["image_mean"], NORM["image_std"])
    with pytest.raises(SynthesisError, match="broken"):
        optimize_batch(model, plan, EngineConfig(iterations=(2,), jitter=(1,), warmup=0), bounds=bounds, sites=sites,
                       num_prefix_tokens=1, seed=0)


class _HugeTerm(LossTerm):
    name = "huge"

    def __call__(self, ctx):
        return ctx.logits[: ctx.num_images].softmax(-1).amax(-1)  # finite, in (0, 1]


def test_an_overflowing_weighted_sum_is_told_apart_from_a_non_finite_term():
    model = tiny_vit()
    sites = probe_attention_sites(model, get_adapter(model))
    plan = BatchPlan([0, 1], torch.randn(2, 3, 32, 32), [_HugeTerm(weight=1e39)])  # above float32 max
    bounds = valid_pixel_range(NORM["image_mean"], NORM["image_std"])
    with pytest.raises(SynthesisError, match="every loss term is finite, but their weighted sum overflowed") as err:
        optimize_batch(model, plan, EngineConfig(iterations=(2,), jitter=(1,), warmup=0), bounds=bounds, sites=sites,
                       num_prefix_tokens=1, seed=0)
    assert "1e+39" in str(err.value)
    plan = BatchPlan([0, 1], torch.randn(2, 3, 32, 32), [_HugeTerm(weight=lambda ctx: float("nan"))])
    with pytest.raises(SynthesisError, match=r"the weight of loss term\(s\) \{'huge': nan\} is NaN/inf"):
        optimize_batch(model, plan, EngineConfig(iterations=(2,), jitter=(1,), warmup=0), bounds=bounds, sites=sites,
                       num_prefix_tokens=1, seed=0)


def test_a_finite_loss_with_a_non_finite_gradient_is_caught_at_its_own_step():
    # Logits near float32's maximum: the loss is finite but its backward pass overflows. The pixels used to become
    # NaN silently, and the next step blamed every term (the TV prior too, which reads only the pixels).
    model = tiny_vit()
    with torch.no_grad():
        model.classifier.weight.mul_(1e38)
    with pytest.raises(SynthesisError, match=r"At step 0 .*loss is finite but its gradient .* pixels is NaN/inf"):
        get_synthesizer("psaq", **FAST).synthesize(model, 2, **NORM)


def test_model_is_left_unchanged():
    model = tiny_vit().train()
    model.classifier.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    implementation = model.config._attn_implementation
    get_synthesizer("sardfq", **FAST).synthesize(model, 2, seed=0, **NORM)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.config._attn_implementation == implementation
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())



def test_swin_window_sizes_are_left_unchanged():
    # transformers' Swin blocks shrink their window and drop their shift in place on a forward pass at a size no
    # larger than the window (here stage 2: a 4x4 map, window 4); synthesis runs such passes on the user's model
    from transformers.models.swin.modeling_swin import SwinLayer

    model = tiny_swin()
    sizes = [(m.window_size, m.shift_size) for m in model.modules() if isinstance(m, SwinLayer)]
    assert (4, 2) in sizes  # the shifted block of stage 2, which the first native-size pass clamps
    get_synthesizer("psaq", **FAST).synthesize(model, 2, seed=0, **NORM)
    assert [(m.window_size, m.shift_size) for m in model.modules() if isinstance(m, SwinLayer)] == sizes

def _run(plan: BatchPlan) -> None:
    model = tiny_vit()
    optimize_batch(model, plan, EngineConfig(iterations=(1,), jitter=(0,), warmup=0),
                   bounds=valid_pixel_range(NORM["image_mean"], NORM["image_std"]),
                   sites=probe_attention_sites(model, get_adapter(model)), num_prefix_tokens=1, seed=0)


class _MeanLogit(LossTerm):
    name = "mean"

    def __call__(self, ctx):
        return ctx.logits[: ctx.num_images].mean(-1)


def test_views_that_add_rows_need_owners():
    plan = BatchPlan([0, 1], torch.randn(2, 3, 32, 32), [_MeanLogit()], views=lambda x: torch.cat([x, x[:1]]))
    with pytest.raises(SynthesisError, match="views give 3 model inputs but BatchPlan.owners has 2 entries"):
        _run(plan)
    plan.owners = torch.tensor([0, 1, 0])
    _run(plan)


def test_loss_terms_with_the_same_name_are_refused():
    with pytest.raises(SynthesisError, match=r"Loss terms \['mean'\] appear more than once"):
        _run(BatchPlan([0], torch.randn(1, 3, 32, 32), [_MeanLogit(), _MeanLogit()]))



class _Recorder(LossTerm):
    """Records what the model received at every step; its value pulls the pixels somewhere."""

    name = "recorder"

    def __init__(self):
        super().__init__()
        self.inputs = []

    def __call__(self, ctx):
        self.inputs.append(ctx.inputs.detach().clone())
        return ctx.logits[: ctx.num_images].logsumexp(-1)


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_flip_prob_decides_the_horizontal_flip_of_the_model_input(flip_prob):
    model = tiny_vit()
    init = torch.randn(4, 3, 32, 32).clamp(-1.5, 1.5)
    recorder = _Recorder()
    optimize_batch(model, BatchPlan([0, 1, 2, 3], init, [recorder]),
                   EngineConfig(iterations=(1,), jitter=(0,), warmup=0, flip_prob=flip_prob),
                   bounds=valid_pixel_range(NORM["image_mean"], NORM["image_std"]),
                   sites=probe_attention_sites(model, get_adapter(model)), num_prefix_tokens=1, seed=0)
    assert torch.equal(recorder.inputs[0], init.flip(-1) if flip_prob else init)


def test_adam_runs_with_the_configured_betas_eps_and_phase_learning_rates(monkeypatch):
    seen = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        group = self.param_groups[0]
        seen.append((group["lr"], group["betas"], group["eps"]))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    model = tiny_vit()
    config = EngineConfig(iterations=(3, 4), jitter=(0, 0), warmup=2, lr=0.1, betas=(0.3, 0.7), eps=1e-4)
    result = optimize_batch(model, BatchPlan([0], torch.zeros(1, 3, 32, 32), [_MeanLogit()]), config,
                            bounds=valid_pixel_range(NORM["image_mean"], NORM["image_std"]),
                            sites=probe_attention_sites(model, get_adapter(model)), num_prefix_tokens=1, seed=0)
    expected = [phase_learning_rate(0.1, s, n, 2) for n in (3, 4) for s in range(n)]
    assert [lr for lr, _, _ in seen] == pytest.approx(expected) == result.history["lr"]
    assert expected[0] < expected[1] and expected[3] < expected[2]  # each phase warms up again
    assert {(betas, eps) for _, betas, eps in seen} == {((0.3, 0.7), 1e-4)}


class _MemoryCheckpoint:
    """A [`BatchCheckpointer`] kept in memory: the states saved, the reasons of rejections."""

    def __init__(self, every=None):
        self.every, self.saved, self.rejected = every, [], []

    def load(self):
        return self.saved[-1] if self.saved else None

    def save(self, state):
        self.saved.append(state)

    def reject(self, reason):
        self.rejected.append(reason)
        self.saved.clear()


class _StopAt:
    """A progress bar that raises `error` once `steps` steps are done; counts the steps it sees."""

    def __init__(self, steps=None, error=KeyboardInterrupt):
        self.steps, self.error, self.done, self.updates = steps, error, 0, []

    def update(self, count):
        self.updates.append(count)
        self.done += count
        if self.done == self.steps:
            raise self.error("stopped")


def _checkpointed_run(name, checkpoint, progress, **overrides):
    """One batch of 2 images through `name`'s plan (2 phases x 4 steps), as `PixelSynthesizer` runs it."""
    from synth_helpers import bounds, plan_batch

    settings = {"iterations": (4, 4), "warmup": 1, "jitter": (2, 4)} | overrides
    synthesizer = get_synthesizer(name, **settings)
    model = tiny_vit()
    plan = plan_batch(synthesizer, model, [0, 1])
    return optimize_batch(model, plan, synthesizer.engine_config(False), bounds=bounds(),
                          sites=probe_attention_sites(model, get_adapter(model)), num_prefix_tokens=1, seed=0,
                          progress=progress, checkpoint=checkpoint)


# dfq-vit with its hardness term from phase 1: the term's quantized model, built at step 4, is part of the state
RESUMABLE = {"psaq": {}, "sardfq": {}, "dfq-vit": {"hardness_weight": 1.0, "hardness_phase": 1}}


@pytest.mark.parametrize("stop_at", [3, 6])
@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_a_batch_interrupted_by_ctrl_c_resumes_from_its_step_to_the_uninterrupted_result(name, stop_at):
    reference = _checkpointed_run(name, None, None, **RESUMABLE[name])
    checkpoint = _MemoryCheckpoint()
    with pytest.raises(KeyboardInterrupt):
        _checkpointed_run(name, checkpoint, _StopAt(stop_at), **RESUMABLE[name])
    assert [state.step for state in checkpoint.saved] == [stop_at]
    if name == "dfq-vit":
        assert ("hardness" in checkpoint.saved[0].terms) == (stop_at > 4)

    progress = _StopAt()
    resumed = _checkpointed_run(name, checkpoint, progress, **RESUMABLE[name])
    assert progress.updates == [stop_at] + [1] * (8 - stop_at)  # the saved steps at once, then only the rest ran
    assert progress.done == 8 and not checkpoint.rejected
    assert torch.equal(resumed.images, reference.images)
    assert resumed.history == reference.history


def test_a_crashed_batch_resumes_from_its_last_periodic_checkpoint():
    reference = _checkpointed_run("psaq", None, None)
    checkpoint = _MemoryCheckpoint(every=2)
    with pytest.raises(RuntimeError):  # not an interrupt: nothing is saved at the crash, as after SIGKILL
        _checkpointed_run("psaq", checkpoint, _StopAt(5, RuntimeError))
    assert [state.step for state in checkpoint.saved] == [2, 4]
    progress = _StopAt()
    resumed = _checkpointed_run("psaq", checkpoint, progress)
    assert torch.equal(resumed.images, reference.images) and resumed.history == reference.history
    assert [state.step for state in checkpoint.saved] == [2, 4, 6]  # the final step is never saved


def test_ctrl_c_inside_a_steps_update_keeps_the_previous_checkpoint(monkeypatch):
    reference = _checkpointed_run("psaq", None, None)
    adam_step, calls = torch.optim.Adam.step, []

    def interrupted_on_the_fourth_update(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return adam_step(self, *args, **kwargs)

    checkpoint = _MemoryCheckpoint(every=2)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(torch.optim.Adam, "step", interrupted_on_the_fourth_update)
        _checkpointed_run("psaq", checkpoint, None)
    assert [state.step for state in checkpoint.saved] == [2]  # not a half-updated step 3
    resumed = _checkpointed_run("psaq", checkpoint, None)
    assert torch.equal(resumed.images, reference.images) and resumed.history == reference.history


@pytest.mark.parametrize("damage", ["step", "images", "history", "term"])
def test_a_checkpoint_that_does_not_fit_the_batch_is_rejected_and_the_batch_starts_again(damage):
    reference = _checkpointed_run("psaq", None, None)
    checkpoint = _MemoryCheckpoint()
    with pytest.raises(KeyboardInterrupt):
        _checkpointed_run("psaq", checkpoint, _StopAt(3))
    state = checkpoint.saved[-1]
    if damage == "step":
        state.step = 8
    elif damage == "images":
        state.images = state.images[:1]
    elif damage == "history":
        state.history["ce"] = state.history["ce"][:1]
    else:
        state.terms["ce"] = {"labels": torch.zeros(2)}
    progress = _StopAt()
    resumed = _checkpointed_run("psaq", checkpoint, progress)
    assert len(checkpoint.rejected) == 1
    assert progress.done == 8
    assert torch.equal(resumed.images, reference.images) and resumed.history == reference.history


def test_a_second_ctrl_c_during_the_interrupt_save_does_not_cut_it_short():
    # torchrun and accelerate launch forward the terminal's SIGINT to workers that already got it (and an impatient
    # user presses Ctrl-C twice): the save made for the first interrupt must still complete
    import signal

    class SecondCtrlC(_MemoryCheckpoint):
        def save(self, state):
            signal.raise_signal(signal.SIGINT)
            super().save(state)

    reference = _checkpointed_run("psaq", None, None)
    checkpoint = SecondCtrlC()
    with pytest.raises(KeyboardInterrupt):
        _checkpointed_run("psaq", checkpoint, _StopAt(3))
    assert [state.step for state in checkpoint.saved] == [3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again afterwards
    resumed = _checkpointed_run("psaq", checkpoint, None)
    assert torch.equal(resumed.images, reference.images)


class _SignalAt(_StopAt):
    """A progress bar that sends this process `signal_number` once `steps` steps are done."""

    def __init__(self, steps, signal_number):
        super().__init__(steps)
        self.signal_number = signal_number

    def update(self, count):
        self.updates.append(count)
        self.done += count
        if self.done == self.steps:
            import signal

            signal.raise_signal(self.signal_number)


@pytest.fixture
def default_sigterm():
    """SIGTERM with its default action during the test (as in a fresh process), whatever the test runner set."""
    import signal

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.usefixtures("default_sigterm")
def test_sigterm_during_a_checkpointed_batch_saves_it_like_ctrl_c():
    # a scheduler preempting the job (SLURM), or torchrun stopping the other workers after one failed, sends SIGTERM
    import signal

    from optimum_dfq.synthesis.engine import SynthesisTerminated

    reference = _checkpointed_run("psaq", None, None)
    checkpoint = _MemoryCheckpoint()
    with pytest.raises(SynthesisTerminated, match="SIGTERM"):
        _checkpointed_run("psaq", checkpoint, _SignalAt(3, signal.SIGTERM))
    assert [state.step for state in checkpoint.saved] == [3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the default action is back afterwards
    progress = _StopAt()
    resumed = _checkpointed_run("psaq", checkpoint, progress)
    assert progress.updates[0] == 3
    assert torch.equal(resumed.images, reference.images) and resumed.history == reference.history


@pytest.mark.usefixtures("default_sigterm")
def test_an_application_s_own_sigterm_handler_is_left_alone():
    import signal

    received = []

    def handler(signum, frame):
        received.append(signum)

    signal.signal(signal.SIGTERM, handler)
    checkpoint = _MemoryCheckpoint()
    result = _checkpointed_run("psaq", checkpoint, _SignalAt(3, signal.SIGTERM))  # runs to the end
    assert received == [signal.SIGTERM] and checkpoint.saved == [] and len(result.history["total"]) == 8
    assert signal.getsignal(signal.SIGTERM) is handler


class _Running(LossTerm):
    """A stateful term: a running mean of the logits over the steps so far (its value depends on earlier steps)."""

    name = "running"

    def __init__(self):
        super().__init__()
        self.mean, self.count = None, 0

    def __call__(self, ctx):
        logits = ctx.logits[: ctx.num_images].detach().mean(-1)
        self.count += 1
        self.mean = logits if self.mean is None else self.mean + (logits - self.mean) / self.count
        return (ctx.logits[: ctx.num_images].mean(-1) - self.mean).square()

    def state_dict(self):
        return {} if self.mean is None else {"mean": self.mean.clone(), "count": torch.tensor(self.count)}

    def load_state_dict(self, state):
        self.mean, self.count = state.get("mean"), int(state.get("count", 0))


class _CtrlCAtCall(LossTerm):
    """A term that raises KeyboardInterrupt at its `at`-th call: Ctrl-C in the middle of a step's forward pass."""

    name = "ctrl_c"

    def __init__(self, at=None):
        super().__init__()
        self.at, self.calls = at, 0

    def __call__(self, ctx):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return ctx.logits[: ctx.num_images].mean(-1) * 0


def test_ctrl_c_after_a_stateful_term_ran_in_a_step_resumes_with_its_state_from_before_that_step():
    model = tiny_vit()

    def run(checkpoint, at=None):
        plan = BatchPlan([0, 1], torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                         [_Running(), _CtrlCAtCall(at)])
        return optimize_batch(model, plan, EngineConfig(iterations=(3, 3), warmup=1, jitter=(2, 4)),
                              bounds=valid_pixel_range(NORM["image_mean"], NORM["image_std"]), sites=[],
                              num_prefix_tokens=1, seed=0, checkpoint=checkpoint)

    reference = run(None)
    checkpoint = _MemoryCheckpoint()
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint, at=4)  # inside step 3, after the running mean took in that step's logits
    assert [state.step for state in checkpoint.saved] == [3]
    assert int(checkpoint.saved[0].terms["running"]["count"]) == 3
    resumed = run(checkpoint)
    assert torch.equal(resumed.images, reference.images) and resumed.history == reference.history


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_synthesized_in_float32_and_left_in_its_dtype(dtype):
    # transformers 5 keeps a float16 checkpoint (the bundled reference models) in float16: Swin failed with a raw
    # dtype error, and ViT/DeiT images were optimised through the half-precision model
    model = tiny_swin().to(dtype)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    synthesized = get_synthesizer("psaq", **FAST).synthesize(model, 2, seed=0, **NORM)
    reference = get_synthesizer("psaq", **FAST).synthesize(tiny_swin().to(dtype).float(), 2, seed=0, **NORM)
    assert torch.equal(synthesized.pixel_values, reference.pixel_values)
    after = model.state_dict()
    assert all(after[name].dtype == value.dtype and torch.equal(after[name], value) for name, value in before.items())


def test_a_model_mixing_parameter_dtypes_is_refused():
    model = tiny_vit()
    model.classifier.half()
    with pytest.raises(SynthesisError, match=r"mix dtypes \['torch.float16', 'torch.float32'\].*model.float\(\)"):
        get_synthesizer("psaq", **FAST).synthesize(model, 2, seed=0, **NORM)


def test_a_float64_model_is_synthesized_in_float32_and_given_back_its_own_weights():
    # the float32 round trip rounded every float64 weight of the caller's model
    model = tiny_vit().double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1e-12)  # not representable in float32
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    synthesized = get_synthesizer("psaq", **FAST).synthesize(model, 2, seed=0, **NORM)
    reference = get_synthesizer("psaq", **FAST).synthesize(copy.deepcopy(model).float(), 2, seed=0, **NORM)
    assert torch.equal(synthesized.pixel_values, reference.pixel_values)
    after = model.state_dict()
    assert all(after[name].dtype == value.dtype and torch.equal(after[name], value) for name, value in before.items())
