import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTImageProcessor

from optimum_dfq import DataFreeViTQuantizer, DFQConfig
from optimum_dfq.calibration import resolve_input_range
from optimum_dfq.errors import CalibrationError, ConfigError
from optimum_dfq.quantizers import QUANTIZER_REGISTRY, PixelGridQuantizer

from ..conftest import CIFAR_MEAN, CIFAR_STD, tiny_vit

pytestmark = pytest.mark.usefixtures("single_thread")


def grid(bits=8, mean=CIFAR_MEAN, std=CIFAR_STD) -> PixelGridQuantizer:
    quantizer = PixelGridQuantizer(bits=bits)
    quantizer.set_normalization(mean, std)
    return quantizer


def every_pixel_value(image_processor) -> torch.Tensor:
    """The processor's output for a 16x16 image holding every 8-bit value in every channel: `[3, 256]`."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([values] * 3, axis=-1))
    processor = ViTImageProcessor(do_resize=False, image_mean=image_processor.image_mean,
                                  image_std=image_processor.image_std)
    return processor(images=image, return_tensors="pt")["pixel_values"][0].reshape(3, -1)


def test_levels_are_the_processors_values_of_every_pixel(image_processor):
    processed = every_pixel_value(image_processor)
    torch.testing.assert_close(grid().levels(), processed, atol=2e-6, rtol=0)


def test_real_images_pass_unchanged_and_codes_are_the_pixels(cifar_test, cifar_test_pixels):
    quantizer = grid()
    torch.testing.assert_close(quantizer(cifar_test_pixels), cifar_test_pixels, atol=2e-6, rtol=0)
    raw = torch.from_numpy(np.array(cifar_test["img"][0].convert("RGB"))).permute(2, 0, 1).to(torch.int32)
    assert torch.equal(quantizer.codes(cifar_test_pixels[:1])[0], raw)


def test_fewer_bits_keep_evenly_spaced_pixels_and_clip_outside_the_pixel_range(cifar_test_pixels):
    quantizer = grid(bits=4)
    levels = quantizer.levels()
    assert levels.shape == (3, 16)
    raw = (levels * torch.tensor(CIFAR_STD)[:, None] + torch.tensor(CIFAR_MEAN)[:, None]) * 255
    torch.testing.assert_close(raw, torch.arange(0, 256, 17, dtype=torch.float32).expand(3, 16), atol=1e-4, rtol=0)
    out = quantizer(cifar_test_pixels)
    for channel in range(3):
        on_grid = torch.isclose(out[:, channel].reshape(-1, 1), levels[channel][None, :], atol=1e-5).any(-1)
        assert on_grid.all()
    far = torch.full((1, 3, 1, 1), 100.0)
    torch.testing.assert_close(quantizer(far).flatten(), levels[:, -1])


def test_calibration_keeps_the_grid_and_reports_clipping(caplog):
    quantizer = grid()
    before = quantizer.levels().clone()
    quantizer.site = "patch.input"
    quantizer.set_mode("observe")
    quantizer(torch.randn(2, 3, 8, 8) * 3)  # noise: much of it outside the pixel range
    with caplog.at_level(logging.INFO, logger="optimum_dfq.quantizers.pixel"):
        quantizer.calibrate()
    assert torch.equal(quantizer.levels(), before)
    assert "patch.input" in caplog.text and "outside the pixel range" in caplog.text


def test_without_normalization_calibration_names_the_fix():
    quantizer = PixelGridQuantizer()
    quantizer.set_mode("observe")
    quantizer(torch.zeros(1, 3, 2, 2))
    with pytest.raises(CalibrationError, match="image_processor=AutoImageProcessor"):
        quantizer.calibrate()
    with pytest.raises(CalibrationError, match="3 channels"):
        quantizer.set_normalization([0.5], [0.5])


def test_registered():
    assert QUANTIZER_REGISTRY["pixel_grid"] is PixelGridQuantizer


def test_auto_resolves_from_the_image_processor(image_processor):
    config = DFQConfig(bits="w8a8")
    assert config.input_range == "auto"
    resolved, normalization = resolve_input_range(config, image_processor)
    assert resolved.input_range == "pixels" and list(normalization[0]) == list(image_processor.image_mean)
    assert resolve_input_range(config, None) == (DFQConfig(bits="w8a8", input_range="calibrated"), None)
    not_rescaled = ViTImageProcessor(do_rescale=False, image_mean=CIFAR_MEAN, image_std=CIFAR_STD)
    assert resolve_input_range(config, not_rescaled)[0].input_range == "calibrated"
    assert resolve_input_range(DFQConfig(bits="w8a8", input_range="calibrated"), image_processor)[1] is None


def test_pixels_without_an_image_processor_names_the_fix():
    with pytest.raises(ConfigError, match="input_range='calibrated'"):
        DataFreeViTQuantizer().quantize(tiny_vit(), config=DFQConfig(bits="w8a8", input_range="pixels"),
                                        synthesizer="gaussian", num_images=2)
    with pytest.raises(ConfigError, match="input_range"):
        DFQConfig(input_range="exact")


def test_quantized_model_uses_and_stores_the_resolved_grid(image_processor, cifar_test_pixels, tmp_path):
    from transformers import AutoModelForImageClassification

    qmodel = DataFreeViTQuantizer(tiny_vit(), image_processor).quantize(bits="w8a8", synthesizer="gaussian",
                                                                       num_images=4)
    assert qmodel.config.quantization_config.input_range == "pixels"
    image_input = qmodel.vit.embeddings.patch_embeddings.projection.input_quantizer
    assert isinstance(image_input, PixelGridQuantizer)
    torch.testing.assert_close(image_input(cifar_test_pixels), cifar_test_pixels, atol=2e-6, rtol=0)
    qmodel.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config.input_range == "pixels"
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=cifar_test_pixels[:8]).logits,
                           qmodel(pixel_values=cifar_test_pixels[:8]).logits)


def test_scalar_processor_statistics_build_the_same_grid_as_per_channel_ones():
    def image_input(image_mean, image_std):
        processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=image_mean, image_std=image_std)
        qmodel = DataFreeViTQuantizer(tiny_vit(), processor).quantize(bits="w8a8", synthesizer="gaussian",
                                                                     num_images=2)
        return qmodel.vit.embeddings.patch_embeddings.projection.input_quantizer

    scalar, per_channel = image_input(0.5, 0.25), image_input([0.5] * 3, [0.25] * 3)
    assert isinstance(scalar, PixelGridQuantizer)
    assert torch.equal(scalar.levels(), per_channel.levels())


def test_input_bits_set_the_width_of_the_model_s_pixel_grid(image_processor):
    config = DFQConfig(bits="w8a8", input_bits=5, synthesizer="gaussian")
    qmodel = DataFreeViTQuantizer(tiny_vit(), image_processor).quantize(config=config, num_images=2)
    image_input = qmodel.vit.embeddings.patch_embeddings.projection.input_quantizer
    assert isinstance(image_input, PixelGridQuantizer) and image_input.bits == 5
    assert image_input.levels().shape[-1] == 32  # 2^5 levels per channel, as grid(bits=5) has
    torch.testing.assert_close(image_input.levels(), grid(bits=5).levels())
