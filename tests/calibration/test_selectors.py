"""Scale selectors of RepQ re-parameterisation, measured on the consumers' output error (not on the chosen scale)."""

import copy

import pytest
import torch
from torch import nn

from optimum_dfq import DFQConfig
from optimum_dfq.calibration import SCALE_SELECTOR_REGISTRY, quantization_disabled, quantize_model
from optimum_dfq.calibration.convert import activation_quantizer, weight_quantizer
from optimum_dfq.calibration.data import CalibrationSet
from optimum_dfq.calibration.reparam import SelectorContext, consumer_output_error, reparameterize_layernorm
from optimum_dfq.nn import QLayerNorm, QLinear

from ..conftest import tiny_swin, tiny_vit

pytestmark = pytest.mark.usefixtures("single_thread")

CHANNELS, OUTPUTS = 64, 48


def planted_outlier_pair(seed=0):
    """A LayerNorm with three outlier channels (gain 30, shifted) feeding q, k and v-like Linears."""
    generator = torch.Generator().manual_seed(seed)
    norm = nn.LayerNorm(CHANNELS)
    linears = [nn.Linear(CHANNELS, OUTPUTS) for _ in range(3)]
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(CHANNELS, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(CHANNELS, generator=generator))
        for c in (3, 17, 40):
            norm.weight[c], norm.bias[c] = 30.0, 60.0
        for linear in linears:
            linear.weight.copy_(torch.randn(OUTPUTS, CHANNELS, generator=generator) / CHANNELS**0.5)
            linear.bias.copy_(0.1 * torch.randn(OUTPUTS, generator=generator))
    calibration = torch.randn(512, CHANNELS, generator=generator)
    held_out = torch.randn(2048, CHANNELS, generator=generator)
    return norm, linears, calibration, held_out


def quantized_pair(norm, linears, calibration, config):
    qnorm = QLayerNorm.from_float(norm, activation_quantizer(config, channels=CHANNELS), "norm")
    qlinears = [QLinear.from_float(linear, weight_quantizer(config, OUTPUTS), None, f"linear{i}")
                for i, linear in enumerate(linears)]
    for qlinear in qlinears:
        qlinear.calibrate_weights()
    qnorm.output_quantizer.set_mode("observe")
    with torch.no_grad():
        qnorm(calibration)
    qnorm.output_quantizer.calibrate()
    qnorm.output_quantizer.set_mode("quantize")
    return qnorm, qlinears


def float_norm_output(norm, x):
    with torch.no_grad():
        return norm(x)


def held_out_error(selector, monkeypatch=None, replacement=None):
    """Consumer-output MSE on held-out inputs after re-parameterising with `selector` (and the choice made)."""
    norm, linears, calibration, held_out = planted_outlier_pair()
    config = DFQConfig(bits="w4a4", scale_selector=selector)
    qnorm, qlinears = quantized_pair(norm, linears, calibration, config)
    if replacement is not None:
        monkeypatch.setitem(SCALE_SELECTOR_REGISTRY, selector, replacement)
    reparameterize_layernorm(qnorm, qlinears, config, activations=float_norm_output(norm, calibration))
    with torch.no_grad():
        x = qnorm(held_out)
        error = sum(float((q(x) - f(norm(held_out))).pow(2).mean()) for q, f in zip(qlinears, linears))
    return error, float(qnorm.output_quantizer.scale), float(qnorm.output_quantizer.zero_point)


def test_layer_scale_is_a_gauge_only_the_zero_point_matters(monkeypatch):
    """With integer zero points the consumer output does not depend on the layer-wise scale (reparam.py docstring):
    a selector returning 3x the median scale with the median's zero point gives the median's output exactly."""
    median = SCALE_SELECTOR_REGISTRY["median"]
    error_median, scale_median, zero_median = held_out_error("median")

    def tripled(scale, zero_point):
        s, z = median(scale, zero_point)
        return 3 * s, torch.round(z)

    error_tripled, scale_tripled, zero_tripled = held_out_error("mean", monkeypatch, tripled)
    assert scale_tripled == pytest.approx(3 * scale_median) and zero_tripled == zero_median
    assert error_tripled == pytest.approx(error_median, rel=1e-4)


def test_search_beats_or_ties_every_fixed_selector_on_the_consumer_output_error():
    norm, linears, calibration, _ = planted_outlier_pair()
    config = DFQConfig(bits="w4a4")
    qnorm, qlinears = quantized_pair(norm, linears, calibration, config)
    scale, zero = qnorm.output_quantizer.scale.double(), qnorm.output_quantizer.zero_point.double()
    assert scale.max() > 20 * scale.median()  # the planted outliers really dominate the mean scale
    context = SelectorContext(float_norm_output(norm, calibration), qlinears, 4, round_zero_point=True)
    errors = {
        name: consumer_output_error(scale, zero, *SCALE_SELECTOR_REGISTRY[name](scale, zero), context)
        for name in ("mean", "median", "mad")
    }
    searched = consumer_output_error(scale, zero, *SCALE_SELECTOR_REGISTRY["search"](scale, zero, context=context),
                                     context)
    assert searched <= min(errors.values()) * (1 + 1e-9)
    # the measurement is the real thing: it matches the error of the re-parameterised modules on the same data
    for name in ("mean", "median"):
        held = copy.deepcopy((qnorm, qlinears))
        reparameterize_layernorm(held[0], held[1], DFQConfig(bits="w4a4", scale_selector=name))
        with torch.no_grad():
            x = held[0](calibration)
            real = sum(float((q(x) - f(norm(calibration))).pow(2).mean()) for q, f in zip(held[1], linears))
        assert real == pytest.approx(errors[name], rel=1e-3)


def test_search_without_activations_falls_back_to_the_median():
    scale = torch.tensor([0.1, 0.2, 0.3, 5.0], dtype=torch.float64)
    zero = torch.tensor([8.0, 7.0, 8.0, 2.0], dtype=torch.float64)
    s, z = SCALE_SELECTOR_REGISTRY["search"](scale, zero)
    s_median, z_median = SCALE_SELECTOR_REGISTRY["median"](scale, zero)
    assert float(s) == float(s_median) and float(z) == float(z_median)


@pytest.mark.parametrize("factory", [tiny_vit, tiny_swin])
def test_search_in_the_pipeline_measures_layernorm_outputs_and_keeps_the_float_function(factory, monkeypatch):
    contexts = []
    search = SCALE_SELECTOR_REGISTRY["search"]

    def spy(scale, zero_point, context=None):
        contexts.append(context)
        return search(scale, zero_point, context=context)

    spy.needs_context = True
    monkeypatch.setitem(SCALE_SELECTOR_REGISTRY, "search", spy)
    model = factory()
    pixels = torch.randn(6, 3, 32, 32)
    config = DFQConfig(bits="w4a4", scale_selector="search")
    qmodel, plan = quantize_model(copy.deepcopy(model), CalibrationSet(pixels), config)
    assert len(contexts) == len(plan.layernorm_consumers) > 0
    for context in contexts:
        assert context is not None and context.activations.dim() == 2 and context.activations.shape[0] > 0
        assert context.activations.shape[1] == context.consumers[0].in_features
    with quantization_disabled(qmodel):
        torch.testing.assert_close(qmodel(pixel_values=pixels).logits, model(pixel_values=pixels).logits,
                                   atol=1e-4, rtol=1e-4)


def test_a_registered_selector_is_selectable_by_name_and_its_name_is_protected(tmp_path):
    from optimum_dfq import DataFreeViTQuantizer
    from optimum_dfq.calibration import register_scale_selector
    from optimum_dfq.errors import ConfigError

    from ..integrations.conftest import run_python

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration images were requested before the selector was checked")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DataFreeViTQuantizer, "calibration_set", no_calibration)
        with pytest.raises(ConfigError, match="Unknown scale selector 'test_first'.*register_scale_selector"):
            DataFreeViTQuantizer().quantize(tiny_vit(), config=DFQConfig(bits="w4a4", scale_selector="test_first"))
    calls = []

    @register_scale_selector("test_first")
    def first_channel(scale, zero_point):
        calls.append(scale.numel())
        return scale[0], zero_point[0]

    try:
        config = DFQConfig(bits="w4a4", synthesizer="gaussian", scale_selector="test_first")
        qmodel = DataFreeViTQuantizer().quantize(tiny_vit(), config=config, num_images=4)
        assert calls and set(calls) == {32}  # one call per post-LayerNorm site, over the hidden channels
        qmodel.save_pretrained(tmp_path)
        with pytest.raises(ConfigError, match="'test_first' is already registered"):
            register_scale_selector("test_first")(lambda scale, zero_point: (scale[1], zero_point[1]))
        with pytest.raises(ConfigError, match="'mean' is already registered"):
            register_scale_selector("mean")(first_channel)
    finally:
        del SCALE_SELECTOR_REGISTRY["test_first"]

    # A process that never registered the selector loads the checkpoint: its effect is folded into the weights.
    loaded = run_python(f"""
        import optimum_dfq, torch
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(tmp_path)!r})
        print(model.config.quantization_config.scale_selector)
    """)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip().endswith("test_first")


@pytest.mark.parametrize("selector", ["mean", "mad", "median"])
def test_a_constant_layernorm_channel_does_not_wreck_the_layer_zero_point(selector):
    from optimum_dfq import DataFreeViTQuantizer

    def quantized_error(dead_channel: bool) -> tuple[float, torch.Tensor]:
        model = tiny_vit()
        norm = model.vit.layers[0].layernorm_after
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(1)))
            if dead_channel:  # gamma = 0: the channel is the constant beta, as in a pruned model
                norm.weight[3], norm.bias[3] = 0.0, 0.5
        config = DFQConfig(bits="w4a4", synthesizer="gaussian", num_images=16, scale_selector=selector)
        qmodel = DataFreeViTQuantizer().quantize(model, config=config)
        pixels = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            error = float((qmodel(pixel_values=pixels).logits - model(pixel_values=pixels).logits).pow(2).mean())
        return error, qmodel.vit.layers[0].layernorm_after.output_quantizer.zero_point

    normal, _ = quantized_error(dead_channel=False)
    dead, zero_point = quantized_error(dead_channel=True)
    assert 0 <= float(zero_point) <= 15
    assert dead < 3 * normal, (dead, normal)


def test_search_returns_the_candidate_with_the_smallest_consumer_output_error():
    # spread gains and offsets give the candidates different rounded zero points; the first one is not the best
    from optimum_dfq.calibration.reparam import SEARCH_QUANTILES

    generator = torch.Generator().manual_seed(1)
    norm, linears, calibration, _ = planted_outlier_pair(1)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(CHANNELS, generator=generator) * 3 + 0.2)
        norm.bias.copy_(torch.randn(CHANNELS, generator=generator) * 2)
    qnorm, qlinears = quantized_pair(norm, linears, calibration, DFQConfig(bits="w4a4"))
    scale, zero = qnorm.output_quantizer.scale.double(), qnorm.output_quantizer.zero_point.double()
    context = SelectorContext(float_norm_output(norm, calibration), qlinears, 4, round_zero_point=True)
    # the candidates as the docstring describes them: quantiles of the scales with the median lower bound, and mean
    lower = (-zero * scale).median()
    thresholds = torch.quantile(scale, torch.tensor(SEARCH_QUANTILES, dtype=torch.float64))
    candidates = [(t, -lower / t) for t in thresholds] + [(scale.mean(), zero.mean())]
    errors = [consumer_output_error(scale, zero, s, z, context) for s, z in candidates]
    assert min(errors) < errors[0] * 0.99 and min(errors) < max(errors) * 0.9  # the choice matters here
    chosen = SCALE_SELECTOR_REGISTRY["search"](scale, zero, context=context)
    assert consumer_output_error(scale, zero, *chosen, context) == pytest.approx(min(errors), rel=1e-12)


def test_search_tries_the_documented_candidates(monkeypatch):
    # the docstring's candidates: s̃ on the 0.5, 0.55, ..., 1.0 quantiles of the scales with the median lower bound,
    # plus RepQ-ViT's means; each is measured once
    from optimum_dfq.calibration import reparam

    norm, linears, calibration, _ = planted_outlier_pair()
    qnorm, qlinears = quantized_pair(norm, linears, calibration, DFQConfig(bits="w4a4"))
    scale, zero = qnorm.output_quantizer.scale.double(), qnorm.output_quantizer.zero_point.double()
    measured = []

    def spy(scale, zero_point, layer_scale, layer_zero, *args, **kwargs):
        measured.append((float(layer_scale), float(layer_zero)))
        return consumer_output_error(scale, zero_point, layer_scale, layer_zero, *args, **kwargs)

    monkeypatch.setattr(reparam, "consumer_output_error", spy)
    context = SelectorContext(float_norm_output(norm, calibration), qlinears, 4, round_zero_point=True)
    SCALE_SELECTOR_REGISTRY["search"](scale, zero, context=context)
    lower = float(torch.sort(-zero * scale).values[(CHANNELS - 1) // 2])  # the lower middle value (64 channels)
    thresholds = torch.quantile(scale, torch.linspace(0.5, 1.0, 11, dtype=torch.float64)).tolist()
    expected = [(t, -lower / t) for t in thresholds] + [(float(scale.mean()), float(zero.mean()))]
    assert len(set(thresholds)) == 11  # the quantiles are distinct here: each candidate is a different one
    assert measured == [pytest.approx(pair, rel=1e-9) for pair in expected]


def test_the_search_context_carries_the_quantizer_bits_and_the_round_zero_point_option(monkeypatch):
    contexts = []

    def spy(scale, zero_point, context=None):
        contexts.append(context)
        return scale.median(), zero_point.median()

    spy.needs_context = True
    monkeypatch.setitem(SCALE_SELECTOR_REGISTRY, "search", spy)
    norm, linears, calibration, _ = planted_outlier_pair()
    config = DFQConfig(bits="w4a4", scale_selector="search", round_zero_point=False)
    qnorm = QLayerNorm.from_float(norm, activation_quantizer(config, bits=6, channels=CHANNELS), "norm")
    qlinears = [QLinear.from_float(linear, weight_quantizer(config, OUTPUTS), None, "fc") for linear in linears]
    qnorm.output_quantizer.set_mode("observe")
    with torch.no_grad():
        qnorm(calibration)
    qnorm.output_quantizer.calibrate()
    reparameterize_layernorm(qnorm, qlinears, config, activations=float_norm_output(norm, calibration))
    (context,) = contexts
    assert context.bits == 6 and context.round_zero_point is False and context.consumers == qlinears


def test_a_misspelt_selector_is_named_with_the_closest_registered_one():
    from optimum_dfq.calibration.reparam import get_scale_selector
    from optimum_dfq.errors import ConfigError

    with pytest.raises(ConfigError, match=r"Unknown scale selector 'medain' \(did you mean 'median'\?\); registered"):
        get_scale_selector("medain")
