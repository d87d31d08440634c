"""Calibration-image synthesizers (data-free calibration sources), selectable by name."""

from .base import SYNTHESIZERS, Synthesizer, get_synthesizer, register_synthesizer
from .gaussian import GaussianSynthesizer, image_generator

__all__ = [
    "SYNTHESIZERS",
    "GaussianSynthesizer",
    "Synthesizer",
    "get_synthesizer",
    "image_generator",
    "register_synthesizer",
]
