"""The model's normalisation statistics and its valid pixel range, from the image processor or explicit values."""

from __future__ import annotations

import pytest
import torch
from synth_helpers import FAST, tiny_vit
from transformers import ViTImageProcessor

from optimum_dfq.errors import SynthesisError
from optimum_dfq.synthesis import get_synthesizer
from optimum_dfq.synthesis.normalization import normalization_stats, valid_pixel_range


def test_processor_without_normalisation_means_raw_pixels_in_zero_one():
    processor = ViTImageProcessor(do_normalize=False, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2])
    mean, std = normalization_stats(processor)
    assert (mean, std) == ([0.0] * 3, [1.0] * 3)  # the processor's unused mean/std are ignored
    low, high = valid_pixel_range(mean, std)
    assert torch.equal(low, torch.zeros(1, 3, 1, 1)) and torch.equal(high, torch.ones(1, 3, 1, 1))


def test_synthesized_images_stay_in_zero_one_for_a_processor_without_normalisation():
    processor = ViTImageProcessor(do_normalize=False, size={"height": 32, "width": 32})  # the model's size
    calib = get_synthesizer("psaq", **FAST).synthesize(tiny_vit(), 2, seed=0, image_processor=processor)
    assert calib.pixel_values.min() >= 0 and calib.pixel_values.max() <= 1


def test_processor_without_statistics_names_it_and_the_fix():
    class BareProcessor:
        do_normalize = True

    with pytest.raises(SynthesisError, match=r"BareProcessor has no image_mean/image_std; pass explicit `image_mean"):
        normalization_stats(BareProcessor())


def test_single_values_are_broadcast_to_every_channel():
    assert normalization_stats(image_mean=0.5, image_std=[0.25], num_channels=4) == ([0.5] * 4, [0.25] * 4)


@pytest.mark.parametrize("mean,std,num_channels,message", [
    ([0.5, 0.5], [0.5, 0.5], 3,
     "image_mean has 2 values but the model has 3 input channels; pass one value per channel, or a single"),
    ([0.5] * 3, [0.5, 0.5, 0.5, 0.5], 3, "image_std has 4 values but the model has 3 input channels"),
    ([0.5] * 3, [0.5, 0.0, 0.5], 3, r"image_std must be positive, got \[0.5, 0.0, 0.5\]"),
])
def test_bad_explicit_statistics_are_refused(mean, std, num_channels, message):
    with pytest.raises(SynthesisError, match=message):
        normalization_stats(image_mean=mean, image_std=std, num_channels=num_channels)
