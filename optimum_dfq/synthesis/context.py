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

    Args:
        indices (`list[int]`): global indices of the batch's images.
        init (`torch.Tensor`): `[B, C, H, W]` initial pixels (normalised space).
        terms (`list[LossTerm]`): the loss terms, holding their per-image targets.
        labels (`torch.Tensor`, *optional*): `[B]` hard labels stored in the calibration set.
        soft_labels (`torch.Tensor`, *optional*): `[B, num_labels]` soft targets stored in the calibration set.
        views (`Callable`, *optional*): maps the `[B, C, H, W]` images to the `[R, C, H, W]` model inputs (the first
            `B` rows must be the images themselves, e.g. followed by crops). Identity if `None`.
        owners (`torch.Tensor`, *optional*): `[R]` position in the batch of the image each input row comes from.
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

    Attributes:
        step (`int`): global step (0-based) over all phases.
        phase (`int`): phase index (0-based).
        phase_step (`int`): step within the phase.
        phase_iterations (`int`): length of the current phase.
        total_steps (`int`): steps over all phases.
        images (`torch.Tensor`): `[B, C, H, W]` augmented images (the loss is computed on these).
        inputs (`torch.Tensor`): `[R, C, H, W]` augmented model inputs (`images` first, then any extra views).
        logits (`torch.Tensor`): `[R, num_labels]`.
        owners (`torch.Tensor`): `[R]` batch position of each input row's image.
        features (`FeatureCapture`): captured attention outputs / probabilities of this forward pass.
        sites (`list[AttentionSite]`): the model's attention modules.
        num_prefix_tokens (`int`): CLS (+ distillation) tokens before the patch tokens.
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

    @property
    def num_images(self) -> int:
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

    Attributes:
        start (`int`), stop (`int`): the batch holds global indices `start..stop-1`.
        pixel_values (`torch.Tensor`): `[B, C, H, W]` final images (CPU).
        labels (`torch.Tensor`, *optional*), soft_labels (`torch.Tensor`, *optional*): the plan's labels.
        extras (`dict[str, torch.Tensor]`): other per-image values (`[B]`), e.g. DFQ-ViT's difficulty.
        history (`dict[str, list[float | None]]`): per-step loss history of the batch.
    """

    start: int
    stop: int
    pixel_values: torch.Tensor
    labels: torch.Tensor | None = None
    soft_labels: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    history: dict[str, list[float | None]] = field(default_factory=dict)
