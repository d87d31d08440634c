"""The pixel-optimisation engine shared by every optimisation-based synthesizer.

One batch of images, initialised N(0, 1) in the model's normalised input space, is optimised with Adam against the
frozen float model. Each phase has its own cosine learning-rate cycle with linear warm-up and its own jitter range;
each step rolls and flips every image (per image, from the image's own generator), evaluates the loss terms on the
augmented copy, takes one Adam step on the un-augmented pixels and clamps them into the valid range. Defaults are
PSAQ-ViT's (`generate_data.py`): Adam β = (0.5, 0.9), 2 phases × 500 steps, 100 warm-up steps, jitter 15 then 30
pixels, 50 % flips.

A batch can be checkpointed between steps ([`EngineState`], written by a [`BatchCheckpointer`] such as the synthesis
cache's): every `checkpoint.every` steps and when the run is interrupted (Ctrl-C), so that a resumed batch goes on
from the step it had reached and ends with exactly the images of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..errors import SynthesisError
from .augment import JitterFlip
from .context import BatchPlan, StepContext
from .features import AttentionSite, FeatureCapture
from .schedule import phase_learning_rate
from .seeding import stream_generator

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Optimisation settings of the engine.

    Args:
        lr (`float`, defaults to 0.2): peak learning rate (PSAQ-ViT: 0.2 for ViT/DeiT, 0.25 for Swin).
        betas (`tuple[float, float]`, defaults to `(0.5, 0.9)`): Adam betas.
        eps (`float`, defaults to 1e-8): Adam epsilon.
        iterations (`tuple[int, ...]`, defaults to `(500, 500)`): steps of each phase.
        warmup (`int`, defaults to 100): linear warm-up steps at the start of each phase.
        jitter (`tuple[int, ...]`, defaults to `(15, 30)`): maximum roll offset (pixels) of each phase; one value is
            used for every phase.
        flip_prob (`float`, defaults to 0.5): probability of a horizontal flip at each step.
        log_every (`int`, defaults to 50): log the loss terms at INFO level every this many steps.

    Example:
        >>> EngineConfig(iterations=(3, 3), warmup=1).total_steps
        6
    """

    lr: float = 0.2
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = 1e-8
    iterations: tuple[int, ...] = (500, 500)
    warmup: int = 100
    jitter: tuple[int, ...] = (15, 30)
    flip_prob: float = 0.5
    log_every: int = 50

    def __post_init__(self) -> None:
        self.iterations = tuple(int(n) for n in _as_sequence(self.iterations))
        self.jitter = tuple(int(j) for j in _as_sequence(self.jitter))
        self.betas = tuple(float(b) for b in self.betas)
        if not self.iterations or any(n < 1 for n in self.iterations):
            raise SynthesisError(f"iterations={self.iterations} must be one or more positive step counts per phase.")
        if len(self.jitter) == 1:
            self.jitter = self.jitter * len(self.iterations)
        if len(self.jitter) != len(self.iterations) or any(j < 0 for j in self.jitter):
            raise SynthesisError(
                f"jitter={self.jitter} must give one non-negative offset per phase (iterations={self.iterations}): "
                f"give as many jitter values as phases, or one step count per phase in iterations (e.g. "
                f"iterations={tuple(max(1, sum(self.iterations) // len(self.jitter)) for _ in self.jitter)})."
            )
        if not (math.isfinite(self.lr) and self.lr > 0) or self.warmup < 0 or self.log_every < 1:
            raise SynthesisError(f"Need a finite lr > 0, warmup >= 0 and log_every >= 1; got {self.lr}, {self.warmup}, "
                                 f"{self.log_every}.")
        if not 0.0 <= self.flip_prob <= 1.0 or len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SynthesisError(f"Need 0 <= flip_prob <= 1 and two betas in [0, 1); got {self.flip_prob}, "
                                 f"{self.betas}.")

    @property
    def total_steps(self) -> int:
        return sum(self.iterations)


@dataclass
class BatchResult:
    """The optimised images of one batch and the per-step history of its loss terms.

    Attributes:
        images (`torch.Tensor`): `[B, C, H, W]` final (un-augmented, clamped) pixels, detached, on CPU.
        history (`dict[str, list[float | None]]`, defaults to `{}`): one value per step under each term's `name`
            (its unweighted mean over the batch's images, `None` at steps where its weight was 0), under `"total"`
            (the weighted loss summed over terms, averaged over images) and under `"lr"` (the learning rate).
    """

    images: torch.Tensor
    history: dict[str, list[float | None]] = field(default_factory=dict)


@dataclass
class EngineState:
    """A batch's optimisation as it stands between two steps: everything resuming it needs.

    Attributes:
        step (`int`): steps done (the next step to run), `1 <= step < total_steps`.
        images (`torch.Tensor`): `[B, C, H, W]` pixels after `step` steps (CPU).
        optimizer (`dict[str, torch.Tensor]`): Adam's state of the pixels (`step`, `exp_avg`, `exp_avg_sq`; CPU).
        augment (`torch.Tensor`): `[B, L]` uint8 states of the images' augmentation generators.
        history (`dict[str, list[float | None]]`): the loss history of the first `step` steps.
        terms (`dict[str, dict[str, torch.Tensor]]`): each stateful loss term's `state_dict()` as it was before step
            `step` ran, by term name (CPU).
    """

    step: int
    images: torch.Tensor
    optimizer: dict[str, torch.Tensor]
    augment: torch.Tensor
    history: dict[str, list[float | None]]
    terms: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class BatchCheckpointer(Protocol):
    """Where [`optimize_batch`] keeps and finds the state of one batch (the synthesis cache's `BatchCheckpoint`).

    Attributes:
        every (`int` or `None`): save every this many steps (`None` or 0: only when interrupted).
    """

    every: int | None

    def load(self) -> EngineState | None:
        """The saved state of the batch, or `None` if there is none."""

    def save(self, state: EngineState) -> None:
        """Keeps `state`, replacing any earlier one (atomically: an interrupted save leaves the earlier one)."""

    def reject(self, reason: str) -> None:
        """Drops the saved state, which cannot resume this batch (`reason` says why)."""


def optimize_batch(
    model: nn.Module,
    plan: BatchPlan,
    config: EngineConfig,
    *,
    bounds: tuple[torch.Tensor, torch.Tensor],
    sites: list[AttentionSite],
    num_prefix_tokens: int,
    seed: int,
    progress=None,
    log: bool = False,
    checkpoint: BatchCheckpointer | None = None,
) -> BatchResult:
    """Optimises the pixels of one batch with Adam against a frozen model (the engine behind [`PixelSynthesizer`]).

    At each step every image is rolled and flipped (its own random draw), the model is run on the augmented inputs,
    the weighted loss terms are summed over terms and images, one Adam step updates the un-augmented pixels, and the
    pixels are clamped into `bounds`. The model is used as given: freeze it first (eval mode, no parameter
    gradients; [`PixelSynthesizer.synthesize`] does this) and put it on the device of `plan.init`.

    Args:
        model (`nn.Module`): the frozen float model, called as `model(pixel_values=...).logits`.
        plan (`BatchPlan`): initial images, loss terms and views of the batch; `plan.init` is not modified.
        config (`EngineConfig`): optimisation settings.
        bounds (`tuple[torch.Tensor, torch.Tensor]`): `[1, C, 1, 1]` per-channel low/high pixel bounds.
        sites (`list[AttentionSite]`): the model's attention modules (may be empty when no term reads attention
            features).
        num_prefix_tokens (`int`): CLS/distillation tokens of the model.
        seed (`int`): the run's seed (augmentation streams are seeded by `(seed, global index)`).
        progress (*optional*): a tqdm-like bar; its `update(1)` is called once per step.
        log (`bool`, *optional*, defaults to `False`): log the loss terms at INFO level every `config.log_every`
            steps and at the last step.
        checkpoint (`BatchCheckpointer`, *optional*): where the batch's state is kept. A saved state is resumed
            from (pixels, Adam's moments, the augmentation generators, the loss history and stateful terms such as
            [`DisagreementTerm`]'s quantized model: the result is bit-identical to an uninterrupted run); a state
            that does not fit this batch is rejected and the batch starts again. The state is saved every
            `checkpoint.every` steps and on `KeyboardInterrupt` or SIGTERM (raised as [`SynthesisTerminated`] while
            SIGTERM has its default action; unless the interrupt lands inside a step's update, where the previous
            saved state is kept); further Ctrl-C presses and SIGTERMs are ignored while that save runs.

    Returns:
        `BatchResult`: the final images and the per-step loss history.

    Raises:
        `SynthesisError`: if the loss or its gradient with respect to the pixels becomes NaN/inf, or if every term
            has weight 0 at some step.

    Example:

    ```python
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq.synthesis import BatchPlan, CrossEntropyTerm, EngineConfig, optimize_batch
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=64, num_labels=10)).eval().requires_grad_(False)
    >>> plan = BatchPlan([0, 1], torch.randn(2, 3, 32, 32), [CrossEntropyTerm(torch.tensor([3, 7]))])
    >>> result = optimize_batch(model, plan, EngineConfig(iterations=(2, 2), warmup=1, jitter=(2, 4)),
    ...     bounds=(-torch.ones(1, 3, 1, 1), torch.ones(1, 3, 1, 1)), sites=[], num_prefix_tokens=1, seed=0)
    >>> result.images.shape, sorted(result.history), len(result.history["total"])
    (torch.Size([2, 3, 32, 32]), ['ce', 'lr', 'total'], 4)
    ```
    """
    device = plan.init.device
    images = plan.init.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([images], lr=config.lr, betas=config.betas, eps=config.eps)
    augment = JitterFlip([stream_generator(seed, i, "augment") for i in plan.indices], config.flip_prob)
    owners = plan.owners.cpu()
    owners_on_device = plan.owners.to(device)
    batch = len(plan.indices)
    channel_bounds = list(zip(bounds[0].flatten().tolist(), bounds[1].flatten().tolist()))
    needs = set().union(*(term.needs for term in plan.terms))
    names = [term.name for term in plan.terms]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SynthesisError(f"Loss terms {repeated} appear more than once in the batch plan; their histories would "
                             "overwrite each other. Give each term a distinct `name`.")
    history: dict[str, list[float | None]] = {term.name: [] for term in plan.terms}
    history.update(total=[], lr=[])
    schedule = [(phase, phase_step, iterations, max_offset)
                for phase, (iterations, max_offset) in enumerate(zip(config.iterations, config.jitter))
                for phase_step in range(iterations)]
    step = 0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        problem = _restore(saved, images, optimizer, augment, history, plan, config)
        if problem is None:
            step = saved.step
            logger.info("images %d-%d: resuming from their checkpoint at step %d", plan.indices[0], plan.indices[-1],
                        step)
        else:  # nothing but the terms and the generators may have been loaded: reset those
            checkpoint.reject(problem)
            augment = JitterFlip([stream_generator(seed, i, "augment") for i in plan.indices], config.flip_prob)
            for term in plan.terms:
                term.load_state_dict({})
    if progress is not None and step:
        progress.update(step)
    # the generators and the terms as they were when the current step began (a Ctrl-C mid-step lands after some
    # of them ran); kept only for a checkpoint
    augment_at_step = augment.get_states() if checkpoint is not None else None
    terms_at_step = _term_states(plan) if checkpoint is not None else None
    updating = False  # inside a step's update: the state is half-written and cannot be saved
    try:
        with _terminate_as_interrupt(checkpoint is not None), FeatureCapture(model, sites, needs) as capture:
            while step < config.total_steps:
                phase, phase_step, iterations, max_offset = schedule[step]
                lr = phase_learning_rate(config.lr, phase_step, iterations, config.warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                offsets, flips = augment.draw(max_offset)
                inputs = plan.views(images) if plan.views is not None else images
                if inputs.shape[0] != owners.numel():
                    raise SynthesisError(
                        f"The batch's views give {inputs.shape[0]} model inputs but BatchPlan.owners has "
                        f"{owners.numel()} entries; set owners to the batch position of each input row's image."
                    )
                inputs = JitterFlip.apply(inputs, offsets[owners], flips[owners])
                capture.clear()
                logits = model(pixel_values=inputs).logits
                augmented = inputs if inputs.shape[0] == batch else inputs[:batch]
                ctx = StepContext(step, phase, phase_step, iterations, config.total_steps, augmented, inputs, logits,
                                  owners_on_device, capture, sites, num_prefix_tokens, offsets, flips)
                loss, values = _total_loss(plan, ctx)
                if not bool(torch.isfinite(loss)):
                    _raise_non_finite(values, plan, ctx)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if not bool(torch.isfinite(images.grad).all()):  # else Adam turns the pixels to NaN silently
                    _raise_non_finite_gradient(plan, ctx)
                updating = True
                optimizer.step()
                with torch.no_grad():
                    for channel, (low, high) in enumerate(channel_bounds):
                        images[:, channel].clamp_(low, high)
                _record(history, values, loss, lr, batch)
                step += 1
                if checkpoint is not None:
                    augment_at_step, terms_at_step = augment.get_states(), _term_states(plan)
                updating = False
                if log and ((step - 1) % config.log_every == 0 or step == config.total_steps):
                    _log_step(history, step - 1, config.total_steps, plan.indices)
                if progress is not None:
                    progress.update(1)
                if checkpoint is not None and checkpoint.every and step % checkpoint.every == 0 \
                        and step < config.total_steps:
                    checkpoint.save(_state(step, images, optimizer, augment_at_step, history, terms_at_step))
    except KeyboardInterrupt:
        if checkpoint is not None and not updating and 0 < step < config.total_steps:
            with _ctrl_c_held():
                checkpoint.save(_state(step, images, optimizer, augment_at_step, history, terms_at_step))
        raise
    return BatchResult(images.detach().cpu(), history)


class SynthesisTerminated(KeyboardInterrupt):
    """SIGTERM received while a checkpointed batch was being optimised (a scheduler preempting the job, torchrun
    stopping the other workers after one failed): handled like Ctrl-C, so the batch is saved before the process ends.
    """


@contextlib.contextmanager
def _terminate_as_interrupt(active: bool) -> Iterator[None]:
    """Turns SIGTERM into [`SynthesisTerminated`] inside the block, when `active` and SIGTERM still has its default
    action (a handler of the application's own is left alone) and this is the main thread (the only one that can)."""
    if not active or threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminated(signum, frame):
        raise SynthesisTerminated("SIGTERM received: the batch being optimised is checkpointed, the run stops")

    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Ignores SIGINT and SIGTERM inside the block (the save made on an interrupt): torchrun and `accelerate launch`
    forward the terminal's Ctrl-C to workers that already got it, and a second signal would cut the save short."""
    if threading.current_thread() is not threading.main_thread():  # not ours to change
        yield
        return
    held = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    held = {number: handler for number, handler in held.items() if handler is not None}
    for number in held:
        signal.signal(number, signal.SIG_IGN)
    try:
        yield
    finally:
        for number, handler in held.items():
            signal.signal(number, handler)


def _term_states(plan: BatchPlan) -> dict[str, dict[str, torch.Tensor]]:
    return {term.name: state for term in plan.terms if (state := term.state_dict())}


def _state(step: int, images: torch.Tensor, optimizer: torch.optim.Optimizer, augment_states: torch.Tensor,
           history: dict[str, list[float | None]], terms: dict[str, dict[str, torch.Tensor]]) -> EngineState:
    moments = {key: value.detach().cpu().clone() for key, value in optimizer.state[images].items()}
    terms = {name: {key: value.detach().cpu() for key, value in state.items()} for name, state in terms.items()}
    return EngineState(step, images.detach().cpu().clone(), moments, augment_states.clone(),
                       {name: list(values) for name, values in history.items()}, terms)


def _restore(saved: EngineState, images: torch.Tensor, optimizer: torch.optim.Optimizer, augment: JitterFlip,
             history: dict[str, list[float | None]], plan: BatchPlan, config: EngineConfig) -> str | None:
    """Loads `saved` into the optimisation's objects; returns why it does not fit this batch instead, if it does not."""
    if not 0 < saved.step < config.total_steps:
        return f"it is at step {saved.step}, outside the run's 1..{config.total_steps - 1}"
    if saved.images.shape != images.shape or saved.images.dtype != images.dtype:
        return f"its images are {tuple(saved.images.shape)} {saved.images.dtype}, not {tuple(images.shape)} " \
               f"{images.dtype}"
    if sorted(saved.history) != sorted(history) or any(len(v) != saved.step for v in saved.history.values()):
        return f"its loss history ({sorted(saved.history)}) does not match this batch's terms ({sorted(history)})"
    if saved.augment.shape[0] != len(augment.generators):
        return f"it holds {saved.augment.shape[0]} augmentation streams for {len(augment.generators)} images"
    unknown = sorted(set(saved.terms) - {term.name for term in plan.terms})
    if unknown or {"step", "exp_avg", "exp_avg_sq"} - set(saved.optimizer):
        return f"it holds state of unknown terms {unknown} or lacks Adam's moments ({sorted(saved.optimizer)})"
    if any(value.shape != images.shape for key, value in saved.optimizer.items() if key != "step"):
        return "its Adam moments do not have the images' shape"
    try:
        for term in plan.terms:
            term.load_state_dict(saved.terms.get(term.name, {}))
        augment.set_states(saved.augment)
    except (SynthesisError, RuntimeError, ValueError) as err:
        return str(err)
    with torch.no_grad():
        images.copy_(saved.images.to(images.device))
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": {0: dict(saved.optimizer)}, "param_groups": groups})
    for name in history:
        history[name] = list(saved.history[name])
    return None


def _total_loss(plan: BatchPlan, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    total, values = None, {}
    for term in plan.terms:
        weight = term.weight_at(ctx)
        if weight == 0:
            values[term.name] = None
            continue
        value = term(ctx)
        values[term.name] = value
        total = weight * value if total is None else total + weight * value
    if total is None:
        raise SynthesisError(f"Every loss term has weight 0 at step {ctx.step}; nothing to optimise.")
    return total.sum(), values


def _record(history, values, loss: torch.Tensor, lr: float, batch: int) -> None:
    for name, value in values.items():
        history[name].append(None if value is None else float(value.detach().mean()))
    history["total"].append(float(loss.detach()) / batch)
    history["lr"].append(lr)


def _log_step(history, step: int, total_steps: int, indices: Sequence[int]) -> None:
    terms = ", ".join(
        f"{name}={values[-1]:.4g}" for name, values in history.items() if name != "lr" and values[-1] is not None
    )
    logger.info("images %d-%d step %d/%d lr=%.4g %s", indices[0], indices[-1], step + 1, total_steps,
                history["lr"][-1], terms)


def _raise_non_finite(values: dict[str, torch.Tensor | None], plan: BatchPlan, ctx: StepContext) -> None:
    where = f"The synthesis loss became non-finite at step {ctx.step} for images {plan.indices[0]}..{plan.indices[-1]}"
    culprits = [name for name, value in values.items() if value is not None and not bool(torch.isfinite(value).all())]
    if culprits:
        raise SynthesisError(f"{where}: loss term(s) {culprits} returned NaN/inf. Lower the learning rate or the "
                             "term's weight, or check the model's outputs on these images.")
    weights = {term.name: term.weight_at(ctx) for term in plan.terms}
    bad_weights = {name: weight for name, weight in weights.items() if not math.isfinite(float(weight))}
    if bad_weights:
        raise SynthesisError(f"{where}: the weight of loss term(s) {bad_weights} is NaN/inf at this step. Give finite "
                             "weights (check the weight schedule).")
    raise SynthesisError(f"{where}: every loss term is finite, but their weighted sum overflowed (weights at this "
                         f"step: {weights}). Lower the largest weight.")


def _raise_non_finite_gradient(plan: BatchPlan, ctx: StepContext) -> None:
    raise SynthesisError(
        f"At step {ctx.step} for images {plan.indices[0]}..{plan.indices[-1]} the synthesis loss is finite but its "
        "gradient with respect to the pixels is NaN/inf: the model's backward pass overflows on these images. Check "
        "the model's outputs (logits far beyond the usual range point at broken or rescaled weights; run it in "
        "float32), or lower the loss terms' weights."
    )


def _as_sequence(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)
