"""PSAQ-ViT (Li et al., ECCV 2022): patch-similarity-aware synthesis, as in the official `generate_data.py`."""

from __future__ import annotations

from collections.abc import Sequence

from .base import register_synthesizer
from .context import BatchPlan
from .losses import CrossEntropyTerm, PatchSimilarityEntropyTerm, TotalVariationTerm, kde_options, loss_weights
from .pixel_synthesizer import ModelInfo, PixelSynthesizer
from .targets import initial_noise, random_labels, uniform_per_image


@register_synthesizer("psaq")
class PSAQSynthesizer(PixelSynthesizer):
    """PSAQ-ViT v1 synthesis: `L = -Σ_l H(Γ_l) + CE(f(x̃), y) + 0.05 · |TV(x̃) - τ|`.

    `H(Γ_l)` is the differential entropy of the patch-similarity distribution at attention module `l` (every module;
    `A·V` averaged over heads, prefix tokens dropped, Gaussian KDE with bandwidth 0.01 on 10 points, `+1e-4`,
    trapezoid rule); `y` is a random class per image; `τ ~ U(2500, 3000)`. Optimisation as in the official code:
    N(0, 1) init, Adam β = (0.5, 0.9), lr 0.2 (0.25 for Swin), 2 × 500 steps with cosine schedules and 100 warm-up
    steps, roll jitter 15 then 30 px and 50 % flips, clamping to the valid pixel range after each step.

    Differences from the official code, all needed to make image `i` independent of its batch-mates' draws and
    losses (it depends on `(seed, i)` and, through floating-point results, on its batch of the fixed grid; see
    [`PixelSynthesizer.synthesize`]) or to use the model's own normalisation:

    * every loss term is per image (the official TV norm runs over the whole batch; see [`TotalVariationTerm`] for
      the equivalent per-image form and how `τ` carries over to other image sizes), each image draws its own `τ`
      (the official code draws one per run), each image's KDE grid spans its own similarity range (not the
      batch's), and jitter/flip are drawn per image (officially one draw per step for the whole batch);
    * the clamp uses the model's image-processor mean/std (the official code always uses ImageNet's);
    * for Swin the similarity distribution is per window (see [`PatchSimilarityEntropyTerm`]).

    Args:
        pse_weight (`float`, defaults to 1.0), ce_weight (`float`, defaults to 1.0), tv_weight (`float`, defaults to
            0.05): term weights.
        tv_target (`tuple[float, float]`, defaults to `(2500, 3000)`): range of `τ`.
        tv_reference (`tuple[int, int]`, *optional*, defaults to `(32, 224)`): `(batch size, image side)` at which
            `tv_target` holds (PSAQ-ViT's); `None` compares each image's own TV with `τ` directly.
        kde_bandwidth (`float`, defaults to 0.01), kde_points (`int`, defaults to 10), kde_floor (`float`, defaults
            to 1e-4): KDE settings.
        **engine_kwargs: optimisation settings of [`PixelSynthesizer`] (`lr`, `iterations`, `warmup`, ...).

    Example:
        >>> synth = PSAQSynthesizer(iterations=(50, 50), warmup=10)
        >>> calib = synth.synthesize(model, 32, seed=0, image_processor=processor)  # doctest: +SKIP
    """

    class_conditional = True

    def __init__(
        self,
        *,
        pse_weight: float = 1.0,
        ce_weight: float = 1.0,
        tv_weight: float = 0.05,
        tv_target: Sequence[float] = (2500.0, 3000.0),
        tv_reference: Sequence[int] | None = (32, 224),
        kde_bandwidth: float = 0.01,
        kde_points: int = 10,
        kde_floor: float = 1e-4,
        **engine_kwargs,
    ) -> None:
        super().__init__(**engine_kwargs)
        self.pse_weight, self.ce_weight, self.tv_weight = loss_weights(
            pse_weight=pse_weight, ce_weight=ce_weight, tv_weight=tv_weight
        )
        self.tv_target = tuple(float(t) for t in tv_target)
        self.tv_reference = None if tv_reference is None else tuple(int(r) for r in tv_reference)
        self.kde_bandwidth, self.kde_points, self.kde_floor = kde_options(kde_bandwidth, kde_points, kde_floor)

    def plan_batch(self, info: ModelInfo, indices: list[int], seed: int) -> BatchPlan:
        labels = random_labels(indices, seed, info.num_labels)
        tv_scale = TotalVariationTerm.reference_scale(info.image_shape[1:], self.tv_reference)
        terms = [
            PatchSimilarityEntropyTerm(bandwidth=self.kde_bandwidth, num_points=self.kde_points, floor=self.kde_floor,
                                       weight=self.pse_weight),
            CrossEntropyTerm(labels.to(info.device), weight=self.ce_weight),
            TotalVariationTerm(uniform_per_image(indices, seed, "tv", *self.tv_target).to(info.device), tv_scale,
                               weight=self.tv_weight),
        ]
        return BatchPlan(indices, initial_noise(indices, seed, info.image_shape), terms, labels=labels)
