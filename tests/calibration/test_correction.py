"""Activation correction (our interpretation of DFQ-ViT's ACM): fits, folding, and its effect on held-out images."""

import copy

import pytest
import torch

from optimum_dfq import ConfigError, DFQConfig
from optimum_dfq.calibration import (
    RidgeCorrection,
    calibration_set_from_dataset,
    fold_correction,
    linear_roles,
    quantize_model,
    set_quantizer_modes,
)
from optimum_dfq.calibration.capture import capture_matmul_inputs
from optimum_dfq.calibration.correction import attach_corrections, correction_groups, fit_affine, fit_ridge
from optimum_dfq.calibration.engine import float_reference
from optimum_dfq.models import get_adapter
from optimum_dfq.nn import QLinear

from ..conftest import tiny_vit

pytestmark = pytest.mark.usefixtures("single_thread")


def test_affine_fits_recover_a_planted_per_channel_map():
    generator = torch.Generator().manual_seed(0)
    x_q = torch.randn(4000, 8, generator=generator) * torch.linspace(0.5, 3, 8) + 1.0
    a, c = torch.linspace(0.7, 1.3, 8), torch.linspace(-0.2, 0.2, 8)
    x_fp = x_q * a + c
    for method in ("least_squares", "moments"):
        fitted = fit_affine(x_q, x_fp, method)
        torch.testing.assert_close(fitted.scale, a, atol=1e-4, rtol=0)
        torch.testing.assert_close(fitted.shift, c, atol=1e-4, rtol=0)
    noisy = x_fp + 0.3 * torch.randn(x_fp.shape, generator=generator)
    least_squares = fit_affine(x_q, noisy, "least_squares")
    moments = fit_affine(x_q, noisy, "moments")
    assert (least_squares(x_q) - noisy).pow(2).mean() <= (moments(x_q) - noisy).pow(2).mean()


def test_ridge_fit_recovers_a_planted_matrix_and_shrinks_to_identity():
    generator = torch.Generator().manual_seed(0)
    x_q = torch.randn(4000, 6, generator=generator)
    matrix = torch.eye(6) + 0.2 * torch.randn(6, 6, generator=generator)
    x_fp = x_q @ matrix + 0.5
    fitted = fit_ridge(x_q, x_fp, ridge_lambda=1e-8)
    torch.testing.assert_close(fitted.matrix, matrix, atol=1e-4, rtol=0)
    torch.testing.assert_close(fitted.bias, torch.full((6,), 0.5), atol=1e-4, rtol=0)
    strong = fit_ridge(x_q, x_fp, ridge_lambda=1e6)
    torch.testing.assert_close(strong.matrix, torch.eye(6), atol=1e-4, rtol=0)


def test_direct_ridge_fit_is_the_spec_formula_and_shrinks_to_zero():
    from optimum_dfq.calibration.correction import fit_correction

    generator = torch.Generator().manual_seed(0)
    x_q = torch.randn(300, 5, generator=generator) + 0.3
    x_fp = x_q @ (torch.eye(5) + 0.3 * torch.randn(5, 5, generator=generator)) + 0.1 * torch.randn(300, 5,
                                                                                                 generator=generator)
    options = DFQConfig(correction={"kind": "ridge", "ridge_fit": "direct", "ridge_lambda": 0.5}).correction
    fitted = fit_correction(x_q, x_fp, options)
    x, y = x_q.double(), x_fp.double()
    lam = 0.5 * (x.T @ x).trace() / 5  # λ relative to the mean input energy, as for the residual fit
    expected = torch.linalg.inv(x.T @ x + lam * torch.eye(5, dtype=torch.float64)) @ x.T @ y  # (XᵀX + λI)⁻¹XᵀY
    torch.testing.assert_close(fitted.matrix, expected.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(fitted.bias, torch.zeros(5))  # no bias in the spec's form
    assert not torch.allclose(fitted.matrix, fit_ridge(x_q, x_fp, 0.5).matrix, atol=1e-2)  # the default differs
    strong = fit_correction(x_q, x_fp, {**options, "ridge_lambda": 1e8})
    assert strong.matrix.abs().max() < 1e-6  # towards 0, not towards the identity


def test_unknown_ridge_fit_is_refused():
    with pytest.raises(ConfigError, match=r"ridge_fit.*'residual'.*'direct'"):
        DFQConfig(correction={"kind": "ridge", "ridge_fit": "spec"})


def test_roles_are_found_from_structure(tiny_model):
    adapter = get_adapter(tiny_model)
    roles = linear_roles(tiny_model, adapter, torch.randn(1, 3, 32, 32))
    blocks = len(adapter.blocks(tiny_model))
    counts = {role: list(roles.values()).count(role) for role in set(roles.values())}
    assert counts["qkv"] == 3 * blocks and counts["o_proj"] == counts["fc1"] == counts["fc2"] == blocks
    assert counts.get("reduction", 0) == (1 if adapter.family == "swin" else 0)
    assert counts["classifier"] == (2 if type(tiny_model).__name__.endswith("WithTeacher") else 1)
    # the last Linear called inside each attention module is its output projection
    for name, _ in adapter.attention_modules(tiny_model):
        inside = [n for n in roles if n.startswith(name + ".")]
        assert [roles[n] for n in inside] == ["qkv", "qkv", "qkv", "o_proj"]


@pytest.fixture(scope="module")
def calibration(cifar_train, image_processor):
    return calibration_set_from_dataset(cifar_train, image_processor, num_images=32, seed=0)


def quantized(config, calibration, factory=tiny_vit):
    model, _ = quantize_model(factory(), calibration, config)
    return model


def attached(model):
    """Linear name → kind of its attached (unfolded) correction module."""
    return {n: m.input_correction.kind for n, m in model.named_modules()
            if isinstance(m, QLinear) and m.input_correction is not None}


def test_folded_affine_correction_gives_the_logits_of_the_unfolded_one(calibration, cifar_test_pixels):
    config = DFQConfig(bits="w3a8", correction={"kind": "affine", "fold": False})
    unfolded, plan = quantize_model(tiny_vit(), calibration, config)
    layout = attached(unfolded)
    assert layout and layout == plan.corrections and set(layout.values()) == {"affine"}
    folded = copy.deepcopy(unfolded)
    for name in layout:
        linear = folded.get_submodule(name)
        fold_correction(linear, linear.input_correction, recalibrate_weights=False)
        linear.input_correction = None
    assert not attached(folded)
    pixels = cifar_test_pixels[:32]
    with torch.no_grad():
        for model in (unfolded, folded):  # activations stay quantized; weights in float so that only the fold differs
            set_quantizer_modes(model, weights="off")
        difference = (unfolded(pixel_values=pixels).logits - folded(pixel_values=pixels).logits).abs().max()
        corrected = unfolded(pixel_values=pixels).logits
        for name in layout:
            unfolded.get_submodule(name).input_correction = None
        uncorrected = unfolded(pixel_values=pixels).logits
    assert difference < 1e-5
    assert (corrected - uncorrected).abs().max() > 1e-3  # the corrections really change the output


@pytest.mark.parametrize("kind", ["affine", "ridge"])
def test_correction_reduces_held_out_activation_error_at_the_corrected_sites(kind, calibration, cifar_test_pixels):
    baseline = quantized(DFQConfig(bits="w3a8"), calibration)
    reference = float_reference(baseline)  # same re-parameterised coordinates as the corrected sites
    corrected = quantized(DFQConfig(bits="w3a8", correction={"kind": kind, "fold": False}), calibration)
    groups = correction_groups(corrected, ["qkv", "o_proj", "fc1", "fc2"], cifar_test_pixels[:1])
    sites = [group.names[0] for group in groups]
    assert len(sites) == 8 and all(corrected.get_submodule(s).input_correction is not None for s in sites)
    batches = [cifar_test_pixels[:128]]
    target = capture_matmul_inputs(reference, sites, batches, max_rows=10**6)
    before = capture_matmul_inputs(baseline, sites, batches, max_rows=10**6)
    after = capture_matmul_inputs(corrected, sites, batches, max_rows=10**6)
    mse_before = torch.stack([(before[s] - target[s]).pow(2).mean() for s in sites])
    mse_after = torch.stack([(after[s] - target[s]).pow(2).mean() for s in sites])
    assert mse_after.sum() < 0.9 * mse_before.sum()
    assert (mse_after < mse_before).float().mean() >= 0.75


def test_default_affine_correction_is_folded_and_ridge_stays_a_saved_module(calibration):
    plain = quantized(DFQConfig(bits="w3a8"), calibration)
    folded, plan = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w3a8", correction={"sites": ["fc1", "fc2"]}))
    assert not attached(folded)
    assert plan.corrections == {f"vit.layers.{i}.mlp.{fc}": "folded" for i in range(2) for fc in ("fc1", "fc2")}
    for name, module in folded.named_modules():
        if isinstance(module, QLinear):
            changed = not torch.equal(module.weight, plain.get_submodule(name).weight)
            assert changed == name.endswith(("fc1", "fc2")), name  # only the corrected sites' weights moved
    ridge, plan = quantize_model(tiny_vit(), calibration,
                                 DFQConfig(bits="w3a8", correction={"kind": "ridge", "sites": ["o_proj"]}))
    layout = attached(ridge)
    assert len(layout) == 2 and layout == plan.corrections and set(layout.values()) == {"ridge"}
    state = ridge.state_dict()
    for name in layout:
        module = ridge.get_submodule(name).input_correction
        assert isinstance(module, RidgeCorrection)
        assert not torch.equal(module.matrix, torch.eye(module.matrix.shape[0]))
        torch.testing.assert_close(state[f"{name}.input_correction.matrix"], module.matrix)


@pytest.mark.parametrize(
    "options, fragment",
    [({"knd": "affine"}, "'knd'"), ({"sites": ["qkv", "attn"]}, "'attn'"), ({"kind": "matrix"}, "'matrix'"),
     ({"ridge_lambda": 0}, "ridge_lambda"), ({"fold": "yes"}, "fold")],
)
def test_bad_correction_options_are_named(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        DFQConfig(correction=options)


def test_attach_corrections_rebuilds_the_layout_for_loading(calibration):
    config = DFQConfig(bits="w3a8", correction={"kind": "ridge", "sites": ["qkv", "fc2"]})
    model, plan = quantize_model(tiny_vit(), calibration, config)
    skeleton, _ = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w3a8"))
    attach_corrections(skeleton, plan.corrections)
    assert attached(skeleton) == attached(model)
    assert set(skeleton.state_dict()) == set(model.state_dict())
    skeleton.load_state_dict(model.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(skeleton(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


def test_a_constant_input_channel_keeps_a_unit_scale_and_a_finite_fit():
    generator = torch.Generator().manual_seed(0)
    x_q = torch.randn(500, 4, generator=generator)
    x_q[:, 2] = 0.25  # e.g. a channel the quantizer collapsed to one level
    x_fp = x_q * 2.0 + 1.0
    x_fp[:, 2] = torch.randn(500, generator=generator) * 0.01 + 3.0
    for method in ("least_squares", "moments"):
        fitted = fit_affine(x_q, x_fp, method)
        assert torch.isfinite(fitted.scale).all() and torch.isfinite(fitted.shift).all()
        assert float(fitted.scale[2]) == 1.0
        # the shift alone matches the means: 0.25 + shift = mean of the float channel
        assert float(fitted.shift[2]) == pytest.approx(float(x_fp[:, 2].double().mean()) - 0.25, abs=1e-6)
        torch.testing.assert_close(fitted.scale[[0, 1, 3]], torch.full((3,), 2.0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["affine", "ridge"])
def test_folding_a_correction_equals_applying_it_before_the_linear(kind):
    generator = torch.Generator().manual_seed(0)
    from optimum_dfq.calibration import AffineCorrection
    from optimum_dfq.quantizers import build_quantizer

    correction = AffineCorrection(6) if kind == "affine" else RidgeCorrection(6)
    with torch.no_grad():
        if kind == "affine":
            correction.scale.copy_(torch.rand(6, generator=generator) + 0.5)
            correction.shift.copy_(torch.randn(6, generator=generator))
        else:  # a non-symmetric matrix: folding must use its transpose
            correction.matrix.copy_(torch.eye(6) + 0.3 * torch.randn(6, 6, generator=generator))
            correction.bias.copy_(torch.randn(6, generator=generator))
    float_linear = torch.nn.Linear(6, 5, bias=False)
    linear = QLinear.from_float(float_linear, build_quantizer("uniform", bits=8, channels=5, axis=0), None, "fc")
    x = torch.randn(7, 6, generator=generator)
    with torch.no_grad():
        expected = torch.nn.functional.linear(correction(x), float_linear.weight)  # correction, then the matmul
        fold_correction(linear, correction, recalibrate_weights=False)
        linear.weight_quantizer.set_mode("off")
        torch.testing.assert_close(linear(x), expected, atol=1e-5, rtol=1e-5)


def test_max_tokens_bounds_the_rows_each_site_is_fitted_on(calibration, monkeypatch):
    import optimum_dfq.calibration.correction as correction_module

    seen = []
    original = correction_module.fit_correction
    monkeypatch.setattr(correction_module, "fit_correction",
                        lambda x_q, x_fp, options: (seen.append((x_q.shape[0], x_fp.shape[0])),
                                                    original(x_q, x_fp, options))[1])
    rows = {}
    for max_tokens in (40, 4000):
        seen.clear()
        quantize_model(tiny_vit(), calibration,
                       DFQConfig(bits="w4a8", correction={"sites": ["fc1"], "max_tokens": max_tokens}))
        assert seen and all(q == f for q, f in seen)  # quantized and float rows stay aligned
        rows[max_tokens] = max(q for q, _ in seen)
    assert rows[40] <= 40 < rows[4000] <= 4000


def test_the_affine_fit_option_chooses_the_fit():
    from optimum_dfq.calibration.correction import fit_correction

    generator = torch.Generator().manual_seed(0)
    x_q = torch.randn(2000, 5, generator=generator)
    x_fp = 1.5 * x_q + 0.8 * torch.randn(2000, 5, generator=generator)  # noisy: the two fits differ
    fits = {}
    for method in ("least_squares", "moments"):
        options = DFQConfig(correction={"kind": "affine", "affine_fit": method}).correction
        fitted = fit_correction(x_q, x_fp, options)
        expected = fit_affine(x_q, x_fp, method)
        torch.testing.assert_close(fitted.scale, expected.scale)
        torch.testing.assert_close(fitted.shift, expected.shift)
        fits[method] = fitted.scale
    # moments match the standard deviation (sqrt(1.5² + 0.8²) = 1.7), least squares the regression slope (1.5)
    torch.testing.assert_close(fits["moments"], torch.full((5,), 1.7), atol=0.08, rtol=0)
    torch.testing.assert_close(fits["least_squares"], torch.full((5,), 1.5), atol=0.08, rtol=0)


def test_the_ridge_lambda_option_sets_the_shrinkage():
    from optimum_dfq.calibration.correction import fit_correction

    generator = torch.Generator().manual_seed(0)
    x_q = torch.randn(500, 4, generator=generator)
    x_fp = x_q @ (torch.eye(4) + 0.5 * torch.randn(4, 4, generator=generator))
    for ridge_lambda in (1e-6, 10.0):
        options = DFQConfig(correction={"kind": "ridge", "ridge_lambda": ridge_lambda}).correction
        fitted = fit_correction(x_q, x_fp, options)
        torch.testing.assert_close(fitted.matrix, fit_ridge(x_q, x_fp, ridge_lambda).matrix)
    default = DFQConfig(correction={"kind": "ridge"}).correction["ridge_lambda"]
    assert not torch.allclose(fit_ridge(x_q, x_fp, 10.0).matrix, fit_ridge(x_q, x_fp, default).matrix, atol=1e-3)
    assert not torch.allclose(fit_ridge(x_q, x_fp, 1e-6).matrix, fit_ridge(x_q, x_fp, default).matrix, atol=1e-3)


def test_the_records_measure_the_fit_rows_before_and_after_the_correction(calibration, monkeypatch):
    import optimum_dfq.calibration.correction as correction_module

    fits = []
    original = correction_module.fit_correction

    def recording(x_q, x_fp, options):
        fits.append((x_q, x_fp, original(x_q, x_fp, options)))
        return fits[-1][-1]

    monkeypatch.setattr(correction_module, "fit_correction", recording)
    model, _ = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w3a8"))
    config = DFQConfig(bits="w3a8", correction={"kind": "affine", "sites": ["fc1", "fc2"], "fold": False})
    records = correction_module.correct_activations(model, float_reference(model), calibration, config)
    assert len(records) == len(fits) == 4
    for record, (x_q, x_fp, fitted) in zip(records, fits):
        with torch.no_grad():
            before = float((x_q.double() - x_fp.double()).pow(2).mean())
            after = float((fitted(x_q).double() - x_fp.double()).pow(2).mean())
        assert record.mse_before == pytest.approx(before, rel=1e-4)
        assert record.mse_after == pytest.approx(after, rel=1e-4)
        assert record.mse_after < record.mse_before  # the least-squares fit beats the identity on its own rows


def test_a_folded_correction_leaves_the_weight_quantizer_calibrated_on_the_folded_weight(calibration):
    # the documented fold order: fold into the float weight, then re-calibrate the weight quantizer on it
    model, plan = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w3a8", correction={"sites": ["fc1"]}))
    assert set(plan.corrections.values()) == {"folded"}
    for name in plan.corrections:
        linear = model.get_submodule(name)
        with torch.no_grad():
            quantized = linear.weight_quantizer(linear.weight)
            assert not torch.equal(quantized, linear.weight)  # the quantizer is on: the comparison means something
            linear.calibrate_weights()
            torch.testing.assert_close(linear.weight_quantizer(linear.weight), quantized, atol=0, rtol=0)


def test_attach_corrections_gives_a_folded_linear_without_bias_the_zero_bias_its_checkpoint_holds():
    from optimum_dfq.calibration import AffineCorrection
    from optimum_dfq.quantizers import build_quantizer

    def skeleton():
        layer = torch.nn.Linear(6, 5, bias=False)
        torch.nn.init.normal_(layer.weight, generator=torch.Generator().manual_seed(0))
        return torch.nn.ModuleDict(
            {"fc": QLinear.from_float(layer, build_quantizer("uniform", bits=8, channels=5, axis=0), None, "fc")}
        )

    saved = skeleton()
    correction = AffineCorrection(6)
    correction.shift.fill_(0.5)
    fold_correction(saved["fc"], correction)
    assert "fc.bias" in saved.state_dict()
    loaded = skeleton()
    attach_corrections(loaded, {"fc": "folded"})
    assert loaded["fc"].bias is not None and torch.equal(loaded["fc"].bias, torch.zeros(5))  # identity values
    loaded.load_state_dict(saved.state_dict())
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded["fc"](x), saved["fc"](x))
