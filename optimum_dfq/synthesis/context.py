"""The data passed between a synthesizer, the pixel-optimisation engine and the loss terms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .features import AttentionSite, FeatureCapture
    from .losses import LossTerm


@dataclass
class BatchPlan:
    """What a synthesizer asks the engine to optimise for one batch of images.

    Returned by [`PixelSynthesizer.plan_batch`] and consumed by [`optimize_batch`].

    Args:
        indices (`list[int]`): global indices of the batch's `B` images.
        init (`torch.Tensor`): `[B, C, H, W]` initial pixels (normalised space).
        terms (`list[LossTerm]`): the loss terms, holding their per-image targets.
        labels (`torch.Tensor`, *optional*): `[B]` hard labels stored in the calibration set.
        soft_labels (`torch.Tensor`, *optional*): `[B, num_labels]` soft targets stored in the calibration set.
        views (`Callable[[torch.Tensor], torch.Tensor]`, *optional*): maps the `[B, C, H, W]` images to the
            `[R, C, H, W]` model inputs (the first `B` rows must be the images themselves, e.g. followed by crops).
            Identity if `None`.
        owners (`torch.Tensor`, *optional*): `[R]` position in the batch of the image each input row comes from.
            Defaults to `torch.arange(B)`, which only fits when `views` adds no rows; set it whenever it does.

    Example:

    ```python
    >>> import torch
    >>> from optimum_dfq.synthesis import BatchPlan, CrossEntropyTerm
    >>> labels = torch.tensor([3, 7])
    >>> plan = BatchPlan([10, 11], torch.randn(2, 3, 32, 32), [CrossEntropyTerm(labels)], labels=labels)
    >>> plan.owners
    tensor([0, 1])
    ```
    """

    indices: list[int]
    init: torch.Tensor
    terms: list[LossTerm]
    labels: torch.Tensor | None = None
    soft_labels: torch.Tensor | None = None
    views: Callable[[torch.Tensor], torch.Tensor] | None = None
    owners: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.owners is None:
            self.owners = torch.arange(len(self.indices))


@dataclass
class StepContext:
    """Everything a loss term may read at one optimisation step.

    Built by [`optimize_batch`] once per step and passed to every loss term and weight schedule.

    Attributes:
        step (`int`): global step (0-based) over all phases.
        phase (`int`): phase index (0-based).
        phase_step (`int`): step within the phase (0-based).
        phase_iterations (`int`): length of the current phase.
        total_steps (`int`): steps over all phases.
        images (`torch.Tensor`): `[B, C, H, W]` augmented images, i.e. the first `B` rows of `inputs` (the loss is
            computed on these, not on the un-augmented pixels).
        inputs (`torch.Tensor`): `[R, C, H, W]` augmented model inputs (`images` first, then any extra views).
        logits (`torch.Tensor`): `[R, num_labels]` model outputs for `inputs`.
        owners (`torch.Tensor`): `[R]` batch position of each input row's image (on the images' device).
        features (`FeatureCapture`): captured attention outputs / probabilities of this forward pass.
        sites (`list[AttentionSite]`, defaults to `[]`): the model's attention modules.
        num_prefix_tokens (`int`, defaults to 0): CLS (+ distillation) tokens before the patch tokens.
        offsets (`torch.Tensor`, *optional*): `[B]` this step's roll offset of each image, in pixels (`None`: the
            step's augmentation is unknown, e.g. a context built outside [`optimize_batch`]).
        flips (`torch.Tensor`, *optional*): `[B]` whether each image is flipped horizontally at this step.
    """

    step: int
    phase: int
    phase_step: int
    phase_iterations: int
    total_steps: int
    images: torch.Tensor
    inputs: torch.Tensor
    logits: torch.Tensor
    owners: torch.Tensor
    features: FeatureCapture
    sites: list[AttentionSite] = field(default_factory=list)
    num_prefix_tokens: int = 0
    offsets: torch.Tensor | None = None
    flips: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        """`B`, the number of images of the batch (input rows of extra views not counted)."""
        return self.images.shape[0]

    def image_rows(self, tensor: torch.Tensor, windows: int = 1) -> torch.Tensor:
        """The leading `B · windows` rows of a per-input-row tensor: those of the images, not of extra views."""
        rows = self.num_images * windows
        return tensor if tensor.shape[0] == rows else tensor[:rows]

    def per_image_sum(self, row_values: torch.Tensor) -> torch.Tensor:
        """Sums `[R]` per-row values into `[B]` per-image values (rows of crops go to their parent image)."""
        out = row_values.new_zeros(self.num_images)
        return out.index_add(0, self.owners.to(row_values.device), row_values)


@dataclass
class BatchRecord:
    """A finished batch: what is cached per batch and gathered across processes.

    Passed to the `on_batch_end` callback of [`PixelSynthesizer.synthesize`]. All tensors are on CPU.

    Attributes:
        start (`int`): global index of the batch's first image.
        stop (`int`): one past the global index of its last image (the batch holds `start..stop-1`).
        pixel_values (`torch.Tensor`): `[B, C, H, W]` final images.
        labels (`torch.Tensor`, *optional*): `[B]` hard labels of the batch's plan ([`BatchPlan`]).
        soft_labels (`torch.Tensor`, *optional*): `[B, num_labels]` soft labels of the batch's plan.
        extras (`dict[str, torch.Tensor]`, defaults to `{}`): other `[B]` per-image values returned by
            [`PixelSynthesizer.finish_batch`], e.g. DFQ-ViT's `"difficulty"`.
        history (`dict[str, list[float | None]]`, defaults to `{}`): per-step loss history of the batch (see
            [`BatchResult`]).
    """

    start: int
    stop: int
    pixel_values: torch.Tensor
    labels: torch.Tensor | None = None
    soft_labels: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    history: dict[str, list[float | None]] = field(default_factory=dict)
