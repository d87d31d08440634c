"""Gaussian-noise calibration: the weakest data-free baseline every paper reports."""

from __future__ import annotations

import hashlib
import math

import torch

from ..calibration.data import CalibrationSet, expected_image_shape
from ..errors import SynthesisError
from .base import Synthesizer, check_synthesis_arguments, register_synthesizer

# Indices below this keep the linear seed formula that earlier releases (and their synthesis caches) used.
_LINEAR_STREAMS = 1_000_003


def image_generator(seed: int, index: int) -> torch.Generator:
    """A CPU random generator seeded by `(run seed, global image index)`.

    Drawing image `i` from its own generator makes it the same however the images are split into batches or
    processes. For the first 1,000,003 images of a run the generator's seed is `(seed * 1_000_003 + index) mod
    (2**63 - 1)`, so no two (seed, index) pairs of nearby seeds share a stream; from index 1,000,003 on (where that
    formula would repeat the streams of seed + 1) it is a SHA-256 hash of the pair.

    Args:
        seed (`int`): the run's seed.
        index (`int`): the image's global index.

    Returns:
        `torch.Generator`: a new CPU generator.

    Raises:
        `ValueError`: when `index` is negative.

    Example:

    ```python
    >>> import torch
    >>> from optimum_dfq.synthesis import image_generator
    >>> first = torch.randn(3, generator=image_generator(0, 7))
    >>> torch.equal(first, torch.randn(3, generator=image_generator(0, 7)))
    True
    >>> torch.equal(first, torch.randn(3, generator=image_generator(1, 7)))
    False
    ```
    """
    if index < 0:
        raise ValueError(f"image index must be >= 0, got {index}.")
    if index < _LINEAR_STREAMS:
        stream_seed = (seed * _LINEAR_STREAMS + index) % (2**63 - 1)
    else:
        digest = hashlib.sha256(f"image/{int(seed)}/{int(index)}".encode()).digest()
        stream_seed = int.from_bytes(digest[:7], "little")
    generator = torch.Generator()
    generator.manual_seed(stream_seed)
    return generator


@register_synthesizer("gaussian")
class GaussianSynthesizer(Synthesizer):
    """Images drawn from N(mean, std²) in the model's *normalised* input space (standard normal by default).

    This is the "Gaussian noise" row of PSAQ-ViT, SARDFQ and SMI: `torch.randn(32, 3, H, W)` fed to the same
    calibration as real images.

    Args:
        mean (`float`, defaults to 0.0), std (`float`, defaults to 1.0): parameters of the noise (finite, std > 0).

    Raises:
        `SynthesisError`: for a NaN/inf mean or std, or std <= 0.

    Example:
        >>> calib = GaussianSynthesizer().synthesize(model, 32, seed=0)  # doctest: +SKIP
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if not (math.isfinite(float(mean)) and math.isfinite(float(std)) and float(std) > 0):
            raise SynthesisError(f"The Gaussian noise needs a finite mean and a finite std > 0 (std=0 gives identical "
                                 f"images); got mean={mean!r}, std={std!r}.")
        self.mean = float(mean)
        self.std = float(std)

    def synthesize(self, model, num_images: int, *, seed: int = 0, image_processor=None) -> CalibrationSet:
        check_synthesis_arguments(num_images, seed)
        shape = expected_image_shape(model)
        images = [torch.randn(shape, generator=image_generator(seed, i)) for i in range(num_images)]
        pixel_values = torch.stack(images) * self.std + self.mean if images else torch.empty(0, *shape)
        return CalibrationSet(
            pixel_values=pixel_values,
            metadata={"source": "synthetic", "synthesizer": self.name, "hyperparameters": self.hyperparameters(),
                      "seed": seed, "num_images": num_images},
        )
