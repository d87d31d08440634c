"""Per-image random streams: every random draw of image `i` comes from generators seeded by `(seed, i)`."""

from __future__ import annotations

import hashlib

import torch

from .gaussian import image_generator


def stream_seed(seed: int, stream: str) -> int:
    """A run seed for one named random stream (`"labels"`, `"augment"`, ...), derived from the run's `seed`."""
    digest = hashlib.sha256(f"{int(seed)}/{stream}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def stream_generator(seed: int, index: int, stream: str) -> torch.Generator:
    """The generator of image `index` for one named stream.

    The initial noise of an image uses [`image_generator`] directly (so it equals the `"gaussian"` synthesizer's
    image); every other kind of draw (labels, priors, crops, augmentation) has its own stream, so adding draws of one
    kind never shifts another.

    Args:
        seed (`int`): the run's seed.
        index (`int`): the image's global index.
        stream (`str`): the name of the stream.

    Returns:
        `torch.Generator` (CPU).

    Example:
        >>> a = torch.rand(2, generator=stream_generator(0, 5, "labels"))
        >>> torch.equal(a, torch.rand(2, generator=stream_generator(0, 5, "labels")))
        True
    """
    return image_generator(stream_seed(seed, stream), index)
