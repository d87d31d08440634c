"""The image-input quantizer whose levels are the model's own pixel values.

A model's input is `(p / 255 - mean_c) / std_c` for 8-bit pixel values `p ∈ {0, ..., 255}`. Its valid range is
therefore known before any calibration image is seen, channel by channel, from the image processor alone. A
calibrated per-tensor 8-bit quantizer spreads 256 levels over the union of the three channel ranges, off the pixel
grid, so every input value moves by up to half a step; on real 8-bit images this quantizer's levels *are* the
pixel values, so it changes nothing. With `b < 8` bits it keeps `2^b` evenly spaced pixel values per channel.

Its zero point, `255 · mean_c` for 8 bits, is not an integer; ONNX export runs it as float ops.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..errors import CalibrationError
from .base import Quantizer

logger = logging.getLogger(__name__)

#: Pixel values are 8-bit integers scaled to [0, 1] by the image processor (`rescale_factor = 1/255`).
PIXEL_MAX = 255


class PixelGridQuantizer(Quantizer):
    """Per-channel quantizer of normalised images whose levels are normalised pixel values.

    `x̂ = (clamp(round(x / scale_c + offset_c), 0, 2^b - 1) - offset_c) · scale_c` with
    `scale_c = 1 / ((2^b - 1) · std_c)` and `offset_c = (2^b - 1) · mean_c`, i.e. the level `k` of channel `c` is the
    normalised value of the raw pixel `k / (2^b - 1)`. The parameters come from the image processor's normalisation
    ([`set_normalization`]); calibration images do not move them, and calibration only reports how much of the
    observed input lies outside the pixel range (synthetic images may; real images cannot).

    Args:
        bits (`int`, defaults to 8): bit width (8 = the full 8-bit pixel grid).
        channels (`int`, defaults to 3): image channels.
        axis (`int`, defaults to 1): channel axis of the input (`[N, C, H, W]`).

    Example:
        >>> q = PixelGridQuantizer(bits=8)
        >>> q.set_normalization(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
        >>> pixels = torch.tensor([0.0, 1.0, 128.0, 255.0]) / 255
        >>> x = ((pixels - 0.5) / 0.5).view(1, 1, 1, 4).expand(1, 3, 1, 4)
        >>> bool(torch.allclose(q(x), x, atol=1e-6))
        True
    """

    kind = "pixel_grid"

    def __init__(self, bits: int = 8, channels: int = 3, axis: int = 1) -> None:
        super().__init__(bits)
        self.channels = channels
        self.axis = axis
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("offset", torch.zeros(channels))

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Sets the grid from the image processor's per-channel `image_mean` and `image_std` (raw pixels in [0, 1]).

        Args:
            mean (`Sequence[float]`), std (`Sequence[float]`): one value per channel.
        """
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.numel() != self.channels or std_t.numel() != self.channels:
            raise CalibrationError(
                f"Pixel-grid input quantizer at {self.site or 'the patch embedding'} has {self.channels} channels but "
                f"the image processor normalises {mean_t.numel()} (image_mean) / {std_t.numel()} (image_std)."
            )
        if bool((std_t <= 0).any()):
            raise CalibrationError(f"image_std must be positive, got {std_t.tolist()}.")
        self.scale = (1.0 / (self.qmax * std_t)).to(self.scale.device)
        self.offset = (self.qmax * mean_t).to(self.offset.device)
        self.calibrated.fill_(True)

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return self.scale.view(shape), self.offset.view(shape)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        scale, offset = self._params(x)
        codes = torch.clamp(torch.round(x / scale + offset), 0, self.qmax)
        return ((codes - offset) * scale).to(x.dtype)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes `0 .. 2^b - 1` of `x` (for 8 bits: the raw pixel values)."""
        scale, offset = self._params(x)
        return torch.clamp(torch.round(x / scale + offset), 0, self.qmax).to(torch.int32)

    def levels(self) -> torch.Tensor:
        """`[channels, 2^b]`: the normalised value of every level of every channel."""
        k = torch.arange(self.qmax + 1, dtype=torch.float32, device=self.scale.device)
        return (k[None, :] - self.offset[:, None]) * self.scale[:, None]

    def _calibrate_from(self, observed: list[torch.Tensor]) -> None:
        if not bool(self.calibrated):
            raise CalibrationError(
                f"Pixel-grid input quantizer at {self.site or 'the patch embedding'} has no normalisation: its levels "
                "come from the image processor. Pass `image_processor=AutoImageProcessor.from_pretrained(...)` to "
                "quantize(), or set `DFQConfig(input_range='calibrated')`."
            )
        outside = total = 0
        for x in observed:
            codes_float = x / self._params(x)[0] + self._params(x)[1]
            outside += int(((codes_float < -0.5) | (codes_float > self.qmax + 0.5)).sum())
            total += x.numel()
        if outside:
            logger.info(
                "%s: %.2f%% of the calibration input lies outside the pixel range and is clipped to it (real images "
                "never do; synthetic ones may).", self.site or "pixel-grid input quantizer", 100.0 * outside / total
            )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channels={self.channels}"
