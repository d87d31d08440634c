"""The pixel-optimisation engine shared by every optimisation-based synthesizer.

One batch of images, initialised N(0, 1) in the model's normalised input space, is optimised with Adam against the
frozen float model. Each phase has its own cosine learning-rate cycle with linear warm-up and its own jitter range;
each step rolls and flips every image (per image, from the image's own generator), evaluates the loss terms on the
augmented copy, takes one Adam step on the un-augmented pixels and clamps them into the valid range. Defaults are
PSAQ-ViT's (`generate_data.py`): Adam β = (0.5, 0.9), 2 phases × 500 steps, 100 warm-up steps, jitter 15 then 30
pixels, 50 % flips.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

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
    step = 0
    with FeatureCapture(model, sites, needs) as capture:
        for phase, (iterations, max_offset) in enumerate(zip(config.iterations, config.jitter)):
            for phase_step in range(iterations):
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
                optimizer.step()
                with torch.no_grad():
                    for channel, (low, high) in enumerate(channel_bounds):
                        images[:, channel].clamp_(low, high)
                _record(history, values, loss, lr, batch)
                if log and (step % config.log_every == 0 or step == config.total_steps - 1):
                    _log_step(history, step, config.total_steps, plan.indices)
                if progress is not None:
                    progress.update(1)
                step += 1
    return BatchResult(images.detach().cpu(), history)


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
