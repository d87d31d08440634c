"""Conversion to quantized modules: which modules are kept float, the image-input levels, the quantizer choices."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from optimum_dfq import DFQConfig
from optimum_dfq.calibration import resolve_input_range
from optimum_dfq.calibration.convert import check_convertible, input_quantizer, probs_quantizer
from optimum_dfq.errors import ConfigError
from optimum_dfq.models import get_adapter
from optimum_dfq.quantizers import PixelGridQuantizer, UniformQuantizer

from ..conftest import tiny_vit


def processor(**overrides) -> SimpleNamespace:
    """The attributes of an image processor that `resolve_input_range` reads (8-bit pixels, ImageNet normalisation)."""
    attributes = {"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                  "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    return SimpleNamespace(**{**attributes, **overrides})


def pixel_grid(normalization) -> torch.Tensor:
    """Every raw 8-bit pixel value, normalised per channel: `[3, 256]`."""
    mean, std = (torch.as_tensor(v, dtype=torch.float32).flatten().expand(3)[:, None] for v in normalization)
    return (torch.arange(256, dtype=torch.float32) / 255 - mean) / std


def test_regular_expression_entries_match_whole_names_only():
    model = tiny_vit()
    with pytest.raises(ConfigError, match=r"entries \['re:vit\\\\.layers\\\\.0'\] match no"):
        check_convertible(model, get_adapter(model), [r"re:vit\.layers\.0"])  # a prefix of layer 0's Linears only
    check_convertible(model, get_adapter(model), [r"re:vit\.layers\.0\..*"])


def test_an_already_quantized_patch_embedding_is_refused_before_calibration():
    from optimum_dfq.nn import quantized_class_for

    model = tiny_vit()
    (name, conv), = get_adapter(model).patch_embeddings(model)
    quantized = quantized_class_for(conv, name).from_float(conv, UniformQuantizer(bits=8, channels=conv.out_channels,
                                                                                  axis=0), None, name)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, quantized)
    with pytest.raises(ConfigError, match=rf"{name} is already quantized \(QConv2d\)"):
        check_convertible(model, get_adapter(model), [])


@pytest.mark.parametrize("factor", [1 / 256, 1 / 127.5])
def test_a_processor_that_does_not_map_8_bit_pixels_gets_a_calibrated_input_range(factor):
    config, normalization = resolve_input_range(DFQConfig(bits="w8a8"), processor(rescale_factor=factor))
    assert (config.input_range, normalization) == ("calibrated", None)
    with pytest.raises(ConfigError, match=r"rescale_factor is .*, not 1/255"):
        resolve_input_range(DFQConfig(bits="w8a8", input_range="pixels"), processor(rescale_factor=factor))


def test_processor_without_a_rescale_flag_or_normalisation_values_gets_a_calibrated_input_range():
    for unusable, reason in [(processor(do_rescale=None), "does not rescale"),
                             (processor(image_mean=None), "no image_mean/image_std")]:
        assert resolve_input_range(DFQConfig(bits="w8a8"), unusable) == (DFQConfig(bits="w8a8",
                                                                                   input_range="calibrated"), None)
        with pytest.raises(ConfigError, match=reason):
            resolve_input_range(DFQConfig(bits="w8a8", input_range="pixels"), unusable)


def test_an_unnormalising_processor_gives_the_grid_of_rescaled_pixels():
    config, normalization = resolve_input_range(DFQConfig(bits="w8a8"), processor(do_normalize=False))
    assert config.input_range == "pixels"
    quantizer = input_quantizer(config, 3, normalization)
    levels = torch.arange(256, dtype=torch.float32) / 255
    torch.testing.assert_close(quantizer(levels.expand(1, 3, 1, 256)), levels.expand(1, 3, 1, 256))


def test_a_single_normalisation_value_applies_to_every_channel():
    config = DFQConfig(bits="w8a8", input_range="pixels")
    quantizer = input_quantizer(config, 3, ([0.5], [0.25]))
    grid = pixel_grid(([0.5], [0.25]))[None, :, None, :]
    torch.testing.assert_close(quantizer(grid), grid)
    off_grid = grid + 0.3 / 255 / 0.25  # 0.3 of a pixel step above each level
    torch.testing.assert_close(quantizer(off_grid), grid)


def test_weight_only_configs_keep_their_input_range():
    config = DFQConfig(bits="w4a16")
    assert resolve_input_range(config, processor()) == (config, None)


def test_a_stored_auto_input_range_is_a_calibrated_range():
    """Checkpoints written before `input_range` existed store "auto" and were calibrated per tensor."""
    quantizer = input_quantizer(DFQConfig(bits="w8a8"), 3, None)
    assert isinstance(quantizer, UniformQuantizer) and not quantizer.per_channel
    assert isinstance(input_quantizer(DFQConfig(bits="w8a8", input_range="pixels"), 3, None), PixelGridQuantizer)


@pytest.mark.parametrize("observer", ["minmax", "percentile_mse"])
def test_a_uniform_softmax_quantizer_starts_at_zero_and_uses_the_activation_estimator(observer):
    quantizer = probs_quantizer(DFQConfig(bits="w4a4", post_softmax="uniform", activation_observer=observer))
    assert isinstance(quantizer, UniformQuantizer) and quantizer.observer == observer
    probabilities = torch.softmax(torch.randn(64, 64), dim=-1) * 0.5 + 0.25  # all within [0.25, 0.75]
    quantizer.set_mode("observe")
    quantizer(probabilities)
    quantizer.calibrate()
    quantizer.set_mode("quantize")
    assert float(quantizer(torch.zeros(1))) == 0.0  # 0 is a level though no probability was near it


def test_float_linears_leave_the_layer_norms_they_read_in_float():
    from optimum_dfq.calibration import convert_model
    from optimum_dfq.models import find_layernorm_consumers
    from optimum_dfq.nn import QLayerNorm

    model = tiny_vit()
    consumers = find_layernorm_consumers(model, torch.zeros(1, 3, 32, 32))
    kept = [r"re:.*\.layers\.0\.attention\.q_proj"]
    plan = convert_model(model, DFQConfig(bits="w4a4", input_range="calibrated", modules_to_not_convert=kept),
                         get_adapter(model), consumers)
    float_norms = [name for name, module in model.named_modules()
                   if isinstance(module, nn.LayerNorm) and not isinstance(module, QLayerNorm)]
    qkv_norm = next(name for name, linears in consumers.items() if "vit.layers.0.attention.q_proj" in linears)
    assert qkv_norm in float_norms and qkv_norm not in plan.layernorm_consumers
    assert plan.skipped == ["vit.layers.0.attention.q_proj"] and isinstance(model.vit.layers[0].attention.q_proj,
                                                                             nn.Linear)
    k_proj = model.get_submodule(qkv_norm.rpartition(".")[0] + ".attention.k_proj")
    assert k_proj.input_quantizer is not None  # reads the float LayerNorm output: quantizes its own input


@pytest.mark.parametrize("quantize_attention", [True, False])
def test_attention_quantizers_follow_quantize_attention(quantize_attention):
    from optimum_dfq.calibration import convert_model
    from optimum_dfq.nn import AttentionQuantizers

    model = tiny_vit()
    adapter = get_adapter(model)
    config = DFQConfig(bits="w4a4", input_range="calibrated", quantize_attention=quantize_attention)
    convert_model(model, config, adapter, layernorm_consumers={})
    attached = [m for m in model.modules() if isinstance(m, AttentionQuantizers)]
    assert len(attached) == (len(adapter.attention_modules(model)) if quantize_attention else 0)
