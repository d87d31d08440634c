"""Loss terms of the pixel optimisation.

A term is a small callable object: it holds its per-image targets (labels, priors, TV targets) for one batch and
returns one value per image (`[B]`), unweighted. The engine multiplies by the term's weight at that step, sums over
terms and images, and logs every term's mean. Per-image values (rather than batch means) keep an image's gradient
independent of the other images of its batch.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import SynthesisError
from .context import StepContext
from .features import ATTENTION_OUTPUTS, ATTENTION_PROBS
from .geometry import TokenGrid, roll_and_flip_maps
from .kde import patch_similarity_entropy

Weight = float | Callable[[StepContext], float]


class LossTerm(ABC):
    """Abstract base class of the terms of the synthesis loss.

    A subclass sets `name` (and `needs` if it reads attention features) and implements `__call__`, which returns
    the unweighted `[B]` per-image values at one step. The engine multiplies them by the weight at that step and
    sums over terms and images.

    Args:
        weight (`float` or `Callable[[StepContext], float]`, defaults to 1.0): constant weight, or a schedule such as
            [`PhaseRamp`]. Steps where the weight is 0 skip the term.

    Attributes:
        name (`str`): the key it is logged under in the loss history (should be unique within a plan).
        needs (`frozenset[str]`): features to capture (`"attention_outputs"`, `"attention_probs"`); empty by default.
        weight (`float` or `Callable[[StepContext], float]`): as passed.

    Example:

    ```python
    >>> from optimum_dfq.synthesis import LossTerm
    >>> class MeanSquare(LossTerm):
    ...     name = "l2"
    ...     def __call__(self, ctx):
    ...         return ctx.images.square().flatten(1).mean(dim=1)
    >>> term = MeanSquare(weight=0.1)
    >>> term.name, term.needs, term.weight
    ('l2', frozenset(), 0.1)
    ```
    """

    name: str = ""
    needs: frozenset[str] = frozenset()

    def __init__(self, weight: Weight = 1.0) -> None:
        self.weight = weight

    def weight_at(self, ctx: StepContext) -> float:
        """The weight at this step.

        Args:
            ctx (`StepContext`): the current step (only read by a callable weight).

        Returns:
            `float`
        """
        return float(self.weight(ctx)) if callable(self.weight) else float(self.weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the term has built up over the steps so far (kept in a batch's checkpoint); none by default.

        A term whose values at a step depend on earlier steps (not only on the step's context) returns here what
        [`LossTerm.load_state_dict`] needs to go on exactly as it would have. The engine reads it at the start of
        every step (a Ctrl-C lands mid-step, after the term may have run for the step that is then run again), so
        keep it cheap: return tensors that later steps replace rather than modify in place, without copying them
        to another device (the checkpoint does that).

        Returns:
            `dict[str, torch.Tensor]`
        """
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores [`LossTerm.state_dict`]'s output; `{}` resets the term to its state before the first step.

        Args:
            state (`dict[str, torch.Tensor]`): a `state_dict()` of a term of the same kind.

        Raises:
            `SynthesisError`: if `state` holds entries this term does not keep.
        """
        if state:
            raise SynthesisError(f"Loss term {self.name!r} ({type(self).__name__}) keeps no state, but was given "
                                 f"{sorted(state)}.")

    @abstractmethod
    def __call__(self, ctx: StepContext) -> torch.Tensor:
        """Returns the `[B]` unweighted per-image values of the term.

        Args:
            ctx (`StepContext`): the current step.

        Returns:
            `torch.Tensor`: `[B]`, differentiable w.r.t. `ctx.images`/`ctx.inputs`.
        """


class PhaseRamp:
    """A weight that is 0 before phase `phase`, then rises linearly to `max_weight` over `ramp_fraction` of it.

    Args:
        phase (`int`): the (0-based) phase in which the term switches on.
        max_weight (`float`): the weight reached at the end of the ramp (kept in later phases).
        ramp_fraction (`float`): fraction of the phase over which the weight ramps up (0 = no ramp).

    Example:
        >>> ramp = PhaseRamp(phase=1, max_weight=2.0, ramp_fraction=0.5)
    """

    def __init__(self, phase: int, max_weight: float = 1.0, ramp_fraction: float = 1.0) -> None:
        self.phase, self.max_weight, self.ramp_fraction = int(phase), float(max_weight), float(ramp_fraction)

    def __call__(self, ctx: StepContext) -> float:
        if ctx.phase < self.phase:
            return 0.0
        if ctx.phase > self.phase or self.ramp_fraction <= 0:
            return self.max_weight
        ramp_steps = max(self.ramp_fraction * ctx.phase_iterations, 1.0)
        return self.max_weight * min(1.0, (ctx.phase_step + 1) / ramp_steps)


class CrossEntropyTerm(LossTerm):
    """Cross-entropy of each image's logits to its hard label (PSAQ-ViT's `loss_oh`), logged as `"ce"`.

    Only the logits of the images themselves are used; rows of extra views (crops) are ignored.

    Args:
        labels (`torch.Tensor`): `[B]` class ids.
        weight (`float` or `Callable[[StepContext], float]`, defaults to 1.0): see [`LossTerm`].

    Example:

    ```python
    >>> import torch
    >>> from optimum_dfq.synthesis import CrossEntropyTerm, StepContext
    >>> images = torch.zeros(2, 3, 8, 8)
    >>> ctx = StepContext(0, 0, 0, 1, 1, images=images, inputs=images, logits=torch.zeros(2, 10),
    ...                   owners=torch.arange(2), features=None)
    >>> CrossEntropyTerm(torch.tensor([3, 7]))(ctx).shape
    torch.Size([2])
    ```
    """

    name = "ce"

    def __init__(self, labels: torch.Tensor, weight: Weight = 1.0) -> None:
        super().__init__(weight)
        self.labels = labels

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        logits = ctx.image_rows(ctx.logits)
        return F.cross_entropy(logits, self.labels.to(logits.device), reduction="none")


class SoftLabelTerm(LossTerm):
    """Soft cross-entropy `-Σ_k T_k log softmax(f(x))_k` of every input row (image and its crops) to its target.

    Logged as `"sl"`. A row's value goes to its parent image (`ctx.owners`), so an image with crops sums its own and
    its crops' terms (each crop counts like an independent image, as SARDFQ's MSR describes).

    Args:
        targets (`torch.Tensor`): `[R, num_labels]` target distributions, one per model input row.
        weight (`float` or `Callable[[StepContext], float]`, defaults to 1.0): see [`LossTerm`].

    Example:

    ```python
    >>> import torch
    >>> from optimum_dfq.synthesis import SoftLabelTerm, StepContext
    >>> inputs = torch.zeros(3, 3, 8, 8)  # two images, then one crop of image 0
    >>> ctx = StepContext(0, 0, 0, 1, 1, images=inputs[:2], inputs=inputs, logits=torch.zeros(3, 10),
    ...                   owners=torch.tensor([0, 1, 0]), features=None)
    >>> values = SoftLabelTerm(torch.full((3, 10), 0.1))(ctx)
    >>> (values / values[1]).round().tolist()  # image 0 also carries its crop's term
    [2.0, 1.0]
    ```
    """

    name = "sl"

    def __init__(self, targets: torch.Tensor, weight: Weight = 1.0) -> None:
        super().__init__(weight)
        self.targets = targets

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        targets = self.targets.to(ctx.logits.device)
        per_row = -(targets * F.log_softmax(ctx.logits.float(), dim=-1)).sum(-1)
        return ctx.per_image_sum(per_row)


def float_quantized_kl(float_logits: torch.Tensor, quantized_logits: torch.Tensor) -> torch.Tensor:
    """`KL(softmax(float_logits) ‖ softmax(quantized_logits))` of each row, in float32: `[N]`.

    Example:
        >>> import torch
        >>> logits = torch.randn(3, 10)
        >>> float_quantized_kl(logits, logits).abs().max() < 1e-6
        tensor(True)
    """
    float_log = F.log_softmax(float_logits.float(), dim=-1)
    quantized_log = F.log_softmax(quantized_logits.float(), dim=-1)
    return (float_log.exp() * (float_log - quantized_log)).sum(-1)


class DisagreementTerm(LossTerm):
    """Negated `KL(p_float ‖ p_quantized)` of each image: images on which a quantized model disagrees with the float
    one (DFQ-ViT's hard phase, our interpretation; see [`DFQViTSynthesizer`]). Logged as `"hardness"`.

    The quantized model does not exist before the images do: `build(images)` makes it on the term's first step with
    a nonzero weight, from that step's augmented images (detached), so it is calibrated on the batch as it stands
    when the term switches on; it is then kept, frozen, for the rest of the batch. Gradients reach the images
    through both models (the quantized one passes them straight through its rounding). Only the images' own rows
    are used (not crops).

    Args:
        build (`Callable[[torch.Tensor], nn.Module]`): makes the frozen quantized model from `[B, C, H, W]` images
            (e.g. [`provisional_quantized_model`] on a copy of the float model).
        weight (`float` or `Callable[[StepContext], float]`, defaults to 1.0): see [`LossTerm`].

    Attributes:
        quantized_model (`nn.Module` or `None`): the model built at the first active step.

    Example:

    ```python
    >>> import copy
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq.synthesis import DisagreementTerm, StepContext
    >>> from optimum_dfq.synthesis.provisional import provisional_config, provisional_quantized_model
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=64, num_labels=10)).eval()
    >>> term = DisagreementTerm(lambda x: provisional_quantized_model(copy.deepcopy(model), x, provisional_config()))
    >>> images = torch.randn(2, 3, 32, 32)
    >>> ctx = StepContext(0, 0, 0, 1, 1, images=images, inputs=images, logits=model(pixel_values=images).logits,
    ...                   owners=torch.arange(2), features=None)
    >>> values = term(ctx)
    >>> values.shape, bool((values <= 1e-6).all()), type(term.quantized_model.classifier).__name__
    (torch.Size([2]), True, 'QLinear')
    ```
    """

    name = "hardness"

    def __init__(self, build: Callable[[torch.Tensor], torch.nn.Module], weight: Weight = 1.0) -> None:
        super().__init__(weight)
        self.build = build
        self.quantized_model: torch.nn.Module | None = None
        self._built_from: torch.Tensor | None = None

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        if self.quantized_model is None:
            if self._built_from is None:  # else a resumed batch: rebuild from the images it was first built from
                self._built_from = ctx.images.detach().clone()
            self.quantized_model = self.build(self._built_from.to(ctx.images.device))
        quantized_logits = self.quantized_model(pixel_values=ctx.images).logits
        return -float_quantized_kl(ctx.image_rows(ctx.logits), quantized_logits)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The images the quantized model was built from (the build is deterministic), once it is built."""
        return {} if self._built_from is None else {"built_from": self._built_from}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = sorted(set(state) - {"built_from"})
        if unknown:
            raise SynthesisError(f"Loss term {self.name!r} keeps only 'built_from', but was given {unknown}.")
        self.quantized_model = None
        self._built_from = state.get("built_from")


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """PSAQ-ViT's image prior, per image: the sum of the L2 norms of the four neighbour differences.

    Differences are taken horizontally, vertically and along both diagonals, exactly as PSAQ-ViT's
    `get_image_prior_losses`, but each image's norms are its own. The backward is hand-written: it accumulates the
    four differences into one gradient buffer instead of autograd's eight zero-filled slice gradients.

    Args:
        images (`torch.Tensor`): `[B, C, H, W]`.

    Returns:
        `torch.Tensor`: `[B]`.

    Example:
        >>> float(total_variation(torch.zeros(1, 3, 4, 4)))
        0.0
    """
    return _TotalVariation.apply(images)


def _tv_slices():
    # (minuend, subtrahend) slices of PSAQ-ViT's diff1..diff4 on the last two dimensions.
    full, head, tail = slice(None), slice(None, -1), slice(1, None)
    return (
        ((full, head), (full, tail)),
        ((head, full), (tail, full)),
        ((tail, head), (head, tail)),
        ((head, head), (tail, tail)),
    )


class _TotalVariation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images: torch.Tensor) -> torch.Tensor:
        diffs = [images[..., a[0], a[1]] - images[..., b[0], b[1]] for a, b in _tv_slices()]
        norms = [torch.linalg.vector_norm(diff.flatten(1), dim=1) for diff in diffs]
        ctx.save_for_backward(images, *diffs, *norms)
        return torch.stack(norms).sum(0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        images, *saved = ctx.saved_tensors
        diffs, norms = saved[:4], saved[4:]
        grad = torch.zeros_like(images)
        for (a, b), diff, norm in zip(_tv_slices(), diffs, norms):
            scale = torch.where(norm > 0, grad_output / norm, torch.zeros_like(norm)).view(-1, 1, 1, 1)
            weighted = diff * scale
            grad[..., a[0], a[1]] += weighted
            grad[..., b[0], b[1]] -= weighted
        return grad


class TotalVariationTerm(LossTerm):
    """`|scale · TV(x) - τ|` per image, PSAQ-ViT's `||TV(x̃) - τ||` brought to one image.

    PSAQ-ViT takes the norms over a whole batch of 32 images of 224×224 pixels, with `τ ~ U(2500, 3000)` and the
    other terms averaged over the batch. For similar images a batch norm is `sqrt(32)` times an image's, and a norm
    over pixels grows with `sqrt(H·W)`. With `scale = sqrt(reference_batch · reference_size² / (H · W))`, this
    per-image term (summed over images, like every other term) gives each image the same gradient relative to its
    other terms as the original batch term does, at any image size.

    Logged as `"tv"`; computed on `ctx.images` (not on crops).

    Args:
        targets (`torch.Tensor`): `[B]` per-image `τ`.
        scale (`float`, *optional*, defaults to 1.0): the factor applied to the image's TV (see
            [`~TotalVariationTerm.reference_scale`]).
        weight (`float` or `Callable[[StepContext], float]`, defaults to 0.05): see [`LossTerm`] (PSAQ-ViT: 0.05).

    Example:

    ```python
    >>> import torch
    >>> from optimum_dfq.synthesis import StepContext, TotalVariationTerm
    >>> images = torch.zeros(2, 3, 8, 8)
    >>> ctx = StepContext(0, 0, 0, 1, 1, images=images, inputs=images, logits=torch.zeros(2, 10),
    ...                   owners=torch.arange(2), features=None)
    >>> TotalVariationTerm(torch.tensor([2500.0, 3000.0]))(ctx).tolist()  # flat images have TV 0
    [2500.0, 3000.0]
    >>> TotalVariationTerm.reference_scale((224, 224), (4, 224))
    2.0
    ```
    """

    name = "tv"

    def __init__(self, targets: torch.Tensor, scale: float = 1.0, weight: Weight = 0.05) -> None:
        super().__init__(weight)
        self.targets = targets
        self.scale = float(scale)

    @staticmethod
    def reference_scale(image_size: tuple[int, int], reference: tuple[int, int] | None) -> float:
        """`scale` for images of `image_size` `(H, W)` given a `(batch, side)` reference.

        Args:
            image_size (`tuple[int, int]`): `(H, W)` of the images.
            reference (`tuple[int, int]`, *optional*): `(batch size, image side)` at which the TV target was set;
                `None` gives 1.

        Returns:
            `float`: `sqrt(batch · side² / (H · W))`.
        """
        if reference is None:
            return 1.0
        batch, side = reference
        return math.sqrt(batch * side * side / (image_size[0] * image_size[1]))

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        return (self.scale * total_variation(ctx.images) - self.targets.to(ctx.images.device)).abs()


def kde_options(bandwidth: float, num_points: int, floor: float) -> tuple[float, int, float]:
    """Checks the options of the patch-similarity entropy's KDE (see [`patch_similarity_entropy`]).

    Args:
        bandwidth (`float`): kernel bandwidth, finite and > 0.
        num_points (`int`): evaluation points, a whole number >= 2.
        floor (`float`): added density, finite and > 0 (the entropy takes its logarithm).

    Returns:
        `tuple[float, int, float]`: the three options as `float`, `int`, `float`.

    Raises:
        `SynthesisError`: naming the options and PSAQ-ViT's values when one is out of range.

    Example:
        >>> kde_options(0.01, 10, 1e-4)
        (0.01, 10, 0.0001)
    """
    numbers_given = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (bandwidth, num_points, floor))
    valid = numbers_given and (math.isfinite(bandwidth) and bandwidth > 0 and float(num_points).is_integer()
                               and num_points >= 2 and math.isfinite(floor) and floor > 0)
    if not valid:
        raise SynthesisError(f"The patch-similarity entropy needs a finite kde_bandwidth > 0, a whole kde_points >= 2 "
                             f"and a finite kde_floor > 0; got {bandwidth!r}, {num_points!r}, {floor!r} (PSAQ-ViT: "
                             "0.01, 10, 1e-4).")
    return float(bandwidth), int(num_points), float(floor)


class PatchSimilarityEntropyTerm(LossTerm):
    """PSAQ-ViT's patch-similarity entropy, negated: `-Σ_l H_l` over attention modules `l`.

    At each attention module, `A·V` (before the output projection) is averaged over heads, prefix tokens (CLS, DeiT's
    distillation token) are dropped, and [`patch_similarity_entropy`] is taken per image. For windowed attention
    (Swin) it is taken per window and averaged over the image's windows: each window's tokens form one similarity
    distribution (PSAQ-ViT's code instead drops the first token of every window and pools all windows' similarities
    into one KDE, which we do not reproduce).

    Logged as `"pse"`; reads the `"attention_outputs"` features of the images (not of crops). Minimising it
    maximises the entropy.

    Args:
        sites (`list[int]`, *optional*): indices of the attention modules to use (all if `None`).
        bandwidth (`float`, *optional*, defaults to 0.01): KDE bandwidth.
        num_points (`int`, *optional*, defaults to 10): KDE evaluation points.
        floor (`float`, *optional*, defaults to 1e-4): added to the density before the entropy.
        weight (`float` or `Callable[[StepContext], float]`, defaults to 1.0): see [`LossTerm`].

    Example:

    ```python
    >>> from optimum_dfq.synthesis import PatchSimilarityEntropyTerm, PhaseRamp
    >>> term = PatchSimilarityEntropyTerm(sites=[0, 1], weight=PhaseRamp(phase=1))  # on from the second phase
    >>> term.name, sorted(term.needs)
    ('pse', ['attention_outputs'])
    ```
    """

    name = "pse"
    needs = frozenset({ATTENTION_OUTPUTS})

    def __init__(
        self,
        sites: list[int] | None = None,
        bandwidth: float = 0.01,
        num_points: int = 10,
        floor: float = 1e-4,
        weight: Weight = 1.0,
    ) -> None:
        super().__init__(weight)
        self.sites = sites
        self.bandwidth, self.num_points, self.floor = kde_options(bandwidth, num_points, floor)

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        batch = ctx.num_images
        groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for site in ctx.sites:
            if self.sites is not None and site.index not in self.sites:
                continue
            output = ctx.image_rows(ctx.features.attention_output(site.index), site.windows).mean(dim=2)
            if site.windows == 1:
                output = output[:, ctx.num_prefix_tokens :]
            groups.setdefault((site.windows, *output.shape), []).append(output)
        total = ctx.images.new_zeros(batch)
        for (windows, *_), outputs in groups.items():
            # All modules of one shape in one call: a dozen small ops instead of a dozen per module.
            entropy = patch_similarity_entropy(torch.cat(outputs), self.bandwidth, self.num_points, self.floor)
            total = total - entropy.view(len(outputs), batch, windows).mean(dim=2).sum(dim=0)
        return total


class AttentionPriorTerm(LossTerm):
    """SARDFQ's Attention Priors Alignment: `Σ_l (l/L) Σ_h MSE(A^c_{l,h}, prior_{l,h})` per image.

    `A^c` is, for ViT/DeiT, the CLS query's attention row over the patch tokens (prefix-token columns removed, the
    rest renormalised to sum 1); for windowed attention (Swin), the attention averaged over the queries of each window
    (the MSE is then averaged over windows too).

    Logged as `"apa"`; reads the `"attention_probs"` features of the images (not of crops). Only the sites that
    have a prior are used.

    Args:
        priors (`dict[int, torch.Tensor]`): attention-site index → `[B, windows, heads, tokens]` target maps, where
            `tokens` is the number of patch tokens (ViT/DeiT, `windows = 1`) or of tokens per window (Swin).
        depth_weights (`dict[int, float]`): attention-site index → weight (SARDFQ: `l / L`); needs every key of
            `priors`.
        weight (`float` or `Callable[[StepContext], float]`, defaults to 1.0): see [`LossTerm`] (SARDFQ's `α1`).
        grids (`dict[int, TokenGrid]`, *optional*): attention-site index → where its tokens lie in the image
            ([`probe_token_grids`]). When given, the priors are in the frame of the un-augmented image and follow
            the step's roll and flip (`StepContext.offsets` / `flips`; see [`roll_and_flip_maps`]; each window's map
            is renormalised to sum 1 after the move); when `None`, they are fixed in the frame of the model's input.

    Example:

    ```python
    >>> import torch
    >>> from optimum_dfq.synthesis import AttentionPriorTerm
    >>> priors = {1: torch.full((2, 1, 2, 16), 1 / 16)}  # 2 images, 1 window, 2 heads, a 4×4 patch grid
    >>> term = AttentionPriorTerm(priors, depth_weights={1: 1.0}, weight=1000.0)
    >>> term.name, sorted(term.needs)
    ('apa', ['attention_probs'])
    ```
    """

    name = "apa"
    needs = frozenset({ATTENTION_PROBS})

    def __init__(
        self,
        priors: dict[int, torch.Tensor],
        depth_weights: dict[int, float],
        weight: Weight = 1.0,
        grids: dict[int, TokenGrid] | None = None,
    ) -> None:
        super().__init__(weight)
        self.priors, self.depth_weights, self.grids = priors, depth_weights, grids
        if grids is not None and not set(priors) <= set(grids):
            raise SynthesisError(f"Attention priors for modules {sorted(set(priors) - set(grids))} have no token grid "
                                 "(probe_token_grids); pass grids for every prior, or grids=None.")
        self._image_frame_maps = {} if grids is None else {
            index: _scatter_to_grid(prior, grids[index]) for index, prior in priors.items()
        }
        # per site: where each (window, token) slot reads the moved map, and which slots are image tokens (not padding)
        self._slot_sources = {} if grids is None else {
            index: (grids[index].positions.clamp_min(0), grids[index].positions >= 0) for index in priors
        }

    def prior_at(self, index: int, ctx: StepContext) -> torch.Tensor:
        """The prior of site `index` in the frame of this step's augmented images: `[B, windows, heads, tokens]`."""
        if self.grids is None or ctx.offsets is None:
            return self.priors[index]
        grid = self.grids[index]
        moved = roll_and_flip_maps(self._image_frame_maps[index], ctx.offsets, ctx.flips, grid.pixels)
        sources, real = self._slot_sources[index]
        per_window = moved.flatten(-2)[..., sources] * real  # padding slots: no mass
        per_window = per_window.permute(0, 2, 1, 3)
        return per_window / per_window.sum(dim=-1, keepdim=True).clamp_min(1e-30)

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        batch = ctx.num_images
        total = ctx.images.new_zeros(batch)
        for site in ctx.sites:
            if site.index not in self.priors:
                continue
            probs = ctx.image_rows(ctx.features.attention_probs(site.index), site.windows).float()
            attention = aligned_attention(probs, batch, site.windows, ctx.num_prefix_tokens)
            prior = self.prior_at(site.index, ctx).to(attention.device)
            mse = (attention - prior).square().mean(dim=(1, 3)).sum(dim=1)
            total = total + self.depth_weights[site.index] * mse
        return total


def _scatter_to_grid(prior: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """`[B, windows, heads, tokens]` per-window maps → `[B, heads, rows, cols]` maps over the image's token grid."""
    batch, windows, heads, tokens = prior.shape
    if tuple(grid.positions.shape) != (windows, tokens):
        raise SynthesisError(f"Attention priors of shape {tuple(prior.shape)} do not match the module's token grid "
                             f"({tuple(grid.positions.shape)} windows x tokens).")
    maps = prior.new_zeros(batch, heads, grid.rows * grid.cols)
    positions = grid.positions.flatten()
    real = positions >= 0  # padding slots hold no image content
    flat = prior.permute(0, 2, 1, 3).reshape(batch, heads, windows * tokens)
    maps[:, :, positions[real]] = flat[:, :, real]
    return maps.view(batch, heads, grid.rows, grid.cols)


def aligned_attention(probs: torch.Tensor, batch: int, windows: int, num_prefix_tokens: int) -> torch.Tensor:
    """The attention maps APA aligns: `[B, windows, heads, patch tokens]`, each summing to 1.

    Args:
        probs (`torch.Tensor`): `[B·windows, heads, queries, keys]` attention probabilities of the batch's images.
        batch (`int`), windows (`int`): images and windows per image.
        num_prefix_tokens (`int`): prefix tokens of global attention (ignored for windowed attention).

    Returns:
        `torch.Tensor`
    """
    if windows == 1 and num_prefix_tokens > 0:
        row = probs[:, :, 0, num_prefix_tokens:]
        row = row / row.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return row.view(batch, 1, *row.shape[1:])
    averaged = probs.mean(dim=2)
    return averaged.view(batch, windows, *averaged.shape[1:])


def loss_weights(**weights: float) -> tuple[float, ...]:
    """Checks the weights of a synthesizer's loss terms: each a finite number >= 0 (0 turns its term off).

    A negative weight would turn a term the method minimises into one it maximises (a TV prior rewarding noise), so
    it is refused instead of run.

    Args:
        **weights (`float`): the weights by keyword name (the name is used in the error).

    Returns:
        `tuple[float, ...]`: the weights as `float`s, in the order given.

    Raises:
        `SynthesisError`: naming each weight that is negative, NaN/inf or not a number.

    Example:
        >>> loss_weights(ce_weight=1, tv_weight=0.05)
        (1.0, 0.05)
    """
    bad = {name: value for name, value in weights.items() if isinstance(value, bool)
           or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0)}
    if bad:
        shown = ", ".join(f"{name}={value!r}" for name, value in bad.items())
        raise SynthesisError(f"Loss-term weights must be finite numbers >= 0 (0 turns a term off); got {shown}.")
    return tuple(float(value) for value in weights.values())
