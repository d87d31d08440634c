import math

import pytest
import torch

from optimum_dfq import CalibrationError, DataFreeViTQuantizer, DFQConfig
from optimum_dfq.calibration import iter_quantizers
from optimum_dfq.quantizers import QUANTIZER_REGISTRY, TanQuantizer, tanq_codebook

from ..conftest import TINY_MODELS

pytestmark = pytest.mark.usefixtures("single_thread")


def attention_like(rows=64, keys=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, keys, generator=generator) * 3, dim=-1)


def calibrated(quantizer, probs, value=None):
    quantizer.set_mode("observe")
    if value is not None:
        quantizer.observe_value(value)
    quantizer(probs)
    quantizer.calibrate()
    quantizer.set_mode("quantize")
    return quantizer


def test_spec_codebooks_are_reproduced():
    # spec 10.3, b=3 and b=4 with kappa=0.9 (symmetric form)
    torch.testing.assert_close(
        tanq_codebook(3, 0.9), torch.tensor([0, .0216, .0696, .2404, .7596, .9304, .9784, 1], dtype=torch.float64),
        atol=6e-5, rtol=0)
    expected4 = [0, .0084, .0197, .0357, .0602, .1013, .1813, .3591, .6409, .8187, .8987, .9398, .9643, .9803, .9916, 1]
    torch.testing.assert_close(tanq_codebook(4, 0.9), torch.tensor(expected4, dtype=torch.float64), atol=6e-5, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kappa", [0.5, 0.9, 0.95])
def test_symmetric_codebook_shape(bits, kappa):
    levels = tanq_codebook(bits, kappa)
    assert levels.numel() == 2**bits
    assert (levels[1:] > levels[:-1]).all()  # strictly monotone: 2^b distinct values
    assert levels[0] == 0 and levels[-1] == 1
    torch.testing.assert_close(levels + levels.flip(0), torch.ones_like(levels))  # symmetric about 1/2
    gaps = levels[1:] - levels[:-1]
    middle = gaps[gaps.numel() // 2]
    assert gaps[0] < middle and gaps[-1] < middle  # denser near 0 and near 1 than in the middle


def test_asymmetric_centre_moves_resolution_to_the_far_end():
    toward_zero, toward_one = tanq_codebook(4, 0.9, centre=0.8), tanq_codebook(4, 0.9, centre=0.2)
    for levels in (toward_zero, toward_one):
        assert levels.numel() == 16 and levels[0] == 0 and levels[-1] == 1 and (levels[1:] > levels[:-1]).all()
    assert toward_zero[1] < tanq_codebook(4, 0.9)[1] < toward_one[1]  # finer first step when c is far from 0
    torch.testing.assert_close(toward_zero, 1 - toward_one.flip(0))


def test_fake_quant_outputs_levels_monotonically_and_keeps_the_ends():
    q = calibrated(TanQuantizer(bits=3), attention_like())
    x = torch.linspace(0, 1, 1001)
    out = q(x)
    levels = q.levels()
    assert set(out.tolist()) <= set(levels.tolist())
    assert (out[1:] >= out[:-1]).all()
    assert out[0] == 0 and out[-1] == 1
    torch.testing.assert_close(q.dequantize(q.codes(x)), out)  # look-up-table path = fake quant


def test_straight_through_gradient():
    q = calibrated(TanQuantizer(bits=4), attention_like())
    x = attention_like().requires_grad_(True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def brute_force(probs, value, bits, kappas, centres):
    best = None
    for kappa in kappas:
        for centre in centres:
            fixed = TanQuantizer(bits, kappas=[kappa], centres=[centre])
            fixed.kappa.fill_(kappa)
            fixed.centre.fill_(centre)
            diff = probs - fixed.fake_quant(probs)
            err = float((diff @ value).pow(2).sum()) if value is not None else float(diff.pow(2).sum())
            if best is None or err < best[0]:
                best = (err, kappa, centre)
    return best[1:]


def test_calibration_minimises_the_attention_output_error_with_v_and_the_probability_error_without():
    probs = attention_like(rows=2 * 4 * 16, keys=16).reshape(2, 4, 16, 16)
    generator = torch.Generator().manual_seed(1)
    value = torch.randn(2, 4, 16, 8, generator=generator)
    value[..., :2, :] *= 50  # a few tokens with large values: the A·V objective differs from the probability MSE
    kappas, centres = (0.5, 0.7, 0.9, 0.95), (0.2, 0.5, 0.8)
    with_v = calibrated(TanQuantizer(3, kappas, centres), probs, value)
    without_v = calibrated(TanQuantizer(3, kappas, centres), probs)
    expected_with = brute_force(probs, value, 3, kappas, centres)
    expected_without = brute_force(probs, None, 3, kappas, centres)
    assert expected_with != expected_without  # the case really tells the two objectives apart
    assert (float(with_v.kappa), float(with_v.centre)) == pytest.approx(expected_with)
    assert (float(without_v.kappa), float(without_v.centre)) == pytest.approx(expected_without)


def test_subsampled_search_spans_the_whole_batch_not_its_leading_entries():
    # A difficulty-sorted calibration set (dfq-vit returns easy -> hard) puts flat attention first and peaked attention
    # last. When the search subsamples, it must look at both ends, not only at the leading (easiest) images.
    generator = torch.Generator().manual_seed(0)
    easy = torch.softmax(torch.randn(4, 2, 16, 16, generator=generator) * 0.3, dim=-1)
    hard = torch.softmax(torch.randn(4, 2, 16, 16, generator=generator) * 6.0, dim=-1)
    probs, value = torch.cat([easy, hard]), torch.randn(8, 2, 16, 4, generator=generator)
    subsampled = calibrated(TanQuantizer(3, max_search_elements=probs.numel() // 2), probs, value)
    spread = torch.tensor([0, 2, 4, 6])
    expected = calibrated(TanQuantizer(3), probs[spread], value[spread])
    leading = calibrated(TanQuantizer(3), probs[:4], value[:4])
    assert (float(leading.kappa), float(leading.centre)) != (float(expected.kappa), float(expected.centre))
    assert (float(subsampled.kappa), float(subsampled.centre)) == (float(expected.kappa), float(expected.centre))


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_selectable_from_the_config_and_sees_v(family, monkeypatch):
    seen = []
    original = TanQuantizer.observe_value
    monkeypatch.setattr(TanQuantizer, "observe_value", lambda self, v: (seen.append(self.site), original(self, v)))
    assert QUANTIZER_REGISTRY["tanq"] is TanQuantizer
    model = TINY_MODELS[family]()
    qmodel = DataFreeViTQuantizer().quantize(model, config=DFQConfig(bits="w4a4", post_softmax="tanq"),
                                            synthesizer="gaussian", num_images=4)
    probs = [(n, q) for n, q in iter_quantizers(qmodel) if n.endswith("dfq_attention.probs")]
    assert probs and all(isinstance(q, TanQuantizer) and bool(q.calibrated) for _, q in probs)
    assert sorted(set(seen)) == sorted(q.site for _, q in probs)  # every probs quantizer calibrated on A·V
    state = qmodel.state_dict()
    assert all(f"{n}.kappa" in state and f"{n}.centre" in state for n, _ in probs)
    assert all(q.levels().numel() == 16 for _, q in probs)


@pytest.mark.parametrize("kwargs,message", [
    ({"kappas": [0.9, 1.0]}, r"kappa must be in \(0, 1\), got 1.0"),
    ({"kappas": [0.0]}, r"kappa must be in \(0, 1\), got 0.0"),
    ({"centres": [0.5, 1.2]}, r"centre must be in \(0, 1\), got 1.2"),
    ({"centres": [0.0]}, r"centre must be in \(0, 1\), got 0.0"),
    ({"kappas": []}, "at least one candidate kappa and one centre"),
    ({"centres": ()}, "at least one candidate kappa and one centre"),
])
def test_invalid_search_grids_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TanQuantizer(4, **kwargs)


def test_reset_forgets_the_observed_values():
    probs = attention_like(rows=2 * 4 * 16, keys=16).reshape(2, 4, 16, 16)
    value = torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(1))
    value[..., :2, :] *= 50  # as above: the A·V and probability-MSE objectives pick different shapes
    kappas, centres = (0.5, 0.7, 0.9, 0.95), (0.2, 0.5, 0.8)
    quantizer = TanQuantizer(3, kappas, centres)
    quantizer.observe_value(value)  # a stale V, e.g. from an aborted calibration
    quantizer.reset()
    calibrated(quantizer, probs)
    expected = brute_force(probs, None, 3, kappas, centres)
    assert expected != brute_force(probs, value, 3, kappas, centres)
    assert (float(quantizer.kappa), float(quantizer.centre)) == pytest.approx(expected)
    assert f"kappa={expected[0]:.3g}, centre={expected[1]:.3g}" in repr(quantizer)  # the calibrated shape is shown


def test_changing_an_observed_value_in_place_does_not_change_the_calibration():
    probs = attention_like(rows=2 * 4 * 16, keys=16).reshape(2, 4, 16, 16)
    value = torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(1))
    value[..., :2, :] *= 50
    kappas, centres = (0.5, 0.7, 0.9, 0.95), (0.2, 0.5, 0.8)
    expected = brute_force(probs, value, 3, kappas, centres)
    assert expected != brute_force(probs, None, 3, kappas, centres)  # V matters to the chosen shape
    quantizer = TanQuantizer(3, kappas, centres)
    quantizer.set_mode("observe")
    quantizer.observe_value(value)
    quantizer(probs)
    value.fill_(1.0)  # e.g. the model reusing the V buffer before calibrate()
    quantizer.calibrate()
    assert (float(quantizer.kappa), float(quantizer.centre)) == pytest.approx(expected)


def test_the_search_uses_evenly_spaced_rows_beyond_max_search_elements():
    # every 8th row is near-uniform, the others peaked: searching all rows and searching every 8th one differ
    probs = torch.softmax(torch.randn(64, 16, generator=torch.Generator().manual_seed(3)) * 6, dim=-1)
    probs[::8] = torch.softmax(torch.randn(8, 16, generator=torch.Generator().manual_seed(2)) * 0.3, dim=-1)
    kappas, centres = (0.5, 0.7, 0.9, 0.95), (0.2, 0.5, 0.8)
    subset = probs[::8]  # 8 of 64 rows, evenly spaced
    assert brute_force(subset, None, 3, kappas, centres) != brute_force(probs, None, 3, kappas, centres)
    bounded = calibrated(TanQuantizer(3, kappas, centres, max_search_elements=8 * 16), probs)
    assert (float(bounded.kappa), float(bounded.centre)) == pytest.approx(brute_force(subset, None, 3, kappas, centres))
    full = calibrated(TanQuantizer(3, kappas, centres), probs)
    assert (float(full.kappa), float(full.centre)) == pytest.approx(brute_force(probs, None, 3, kappas, centres))


def test_ends_are_exact_levels_and_inputs_outside_zero_one_are_clamped():
    quantizer = TanQuantizer(3, kappas=[0.9], centres=[0.3])
    quantizer.kappa.fill_(0.9)
    quantizer.centre.fill_(0.3)
    quantizer.calibrated.fill_(True)
    levels = quantizer.levels()
    assert float(levels[0]) == 0.0 and float(levels[-1]) == 1.0
    for kappa, centre in [(0.95, 0.1), (0.7, 0.8)]:  # shapes whose arctan round-off misses 0 or 1 in float64
        codebook = tanq_codebook(3, kappa, centre)
        assert codebook.dtype == torch.float64 and codebook[0].item() == 0.0 and codebook[-1].item() == 1.0
    x = torch.tensor([0.0, 1.0, -0.5, 1.7, 3.0, 9.0])
    assert quantizer(x).tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0]


def test_a_nan_probability_stays_nan_like_in_every_other_quantizer():
    # NaN has no code: it was cast to the int64 minimum and indexed the codebook ("index -9223372036854775808 is out
    # of bounds"), so one NaN image (e.g. from broken preprocessing) crashed the whole batch of a W8A8 model, while
    # the float model and the other post-softmax quantizers give NaN logits for that image only
    quantizer = calibrated(TanQuantizer(8), attention_like())
    probs = attention_like(seed=1)
    with_nan = probs.clone()
    with_nan[0, 0] = float("nan")
    out = quantizer(with_nan)
    assert torch.isnan(out[0, 0]) and int(torch.isnan(out).sum()) == 1
    assert torch.equal(out[1:], quantizer(probs)[1:]) and torch.equal(out[0, 1:], quantizer(probs)[0, 1:])

    model = TINY_MODELS["vit"]()
    qmodel = DataFreeViTQuantizer().quantize(model, config=DFQConfig(bits="w8a8", post_softmax="tanq"),
                                             synthesizer="gaussian", num_images=2)
    pixels = torch.randn(2, 3, 32, 32)
    pixels[0, 0, 0, 0] = float("nan")
    logits = qmodel(pixel_values=pixels).logits
    assert torch.isnan(logits[0]).all() and torch.isfinite(logits[1]).all()


@pytest.mark.parametrize("bits,kappa,centre", [(3, 0.9, 0.5), (4, 0.7, 0.8), (4, 0.95, 0.2), (2, 0.5, 0.3)])
def test_fake_quant_is_the_documented_compander_formula(bits, kappa, centre):
    # TanQuantizer's docstring, computed here in float64 with math only:
    # u(a) = (tan(h(a - c)) - tan(-hc)) / (tan(h(1 - c)) - tan(-hc)), h = κ(π/2) / max(c, 1 - c),
    # â = levels[round(u(a)·(2^b - 1))], levels_k = c + arctan(tan(-hc) + k/(2^b - 1)·(tan(h(1 - c)) - tan(-hc))) / h
    quantizer = TanQuantizer(bits, kappas=[kappa], centres=[centre])
    quantizer.kappa.fill_(kappa)
    quantizer.centre.fill_(centre)
    quantizer.calibrated.fill_(True)
    h = kappa * (math.pi / 2) / max(centre, 1 - centre)
    low, high = math.tan(-h * centre), math.tan(h * (1 - centre))
    top = 2**bits - 1
    levels = [centre + math.atan(low + k / top * (high - low)) / h for k in range(top + 1)]
    expected_levels = torch.tensor(levels, dtype=torch.float64)
    torch.testing.assert_close(quantizer.levels().double(), expected_levels, atol=1e-6, rtol=0)
    probs = torch.rand(4000, generator=torch.Generator().manual_seed(0)) ** 3  # many small probabilities, some large
    codes = [round((math.tan(h * (a - centre)) - low) / (high - low) * top) for a in probs.double().tolist()]
    expected = torch.tensor([levels[k] for k in codes], dtype=torch.float64)
    out = quantizer(probs).double()
    # float32 arithmetic can move an input that sits within ~1e-6 of a rounding boundary to the next level
    assert float((out - expected).abs().le(1e-6).double().mean()) > 0.998
    assert len(set(codes)) == top + 1  # every level is reached: the whole codebook is checked


def test_a_second_calibration_uses_its_own_values():
    # calibrating again (observe, calibrate) must pair the new probabilities with the new V, not with the V of the
    # first calibration; stale values would silently switch the search to the probability MSE
    probs = attention_like(rows=2 * 4 * 16, keys=16).reshape(2, 4, 16, 16)
    value = torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(1))
    value[..., :2, :] *= 50  # as above: the A·V and probability-MSE objectives pick different shapes
    kappas, centres = (0.5, 0.7, 0.9, 0.95), (0.2, 0.5, 0.8)
    expected = brute_force(probs, value, 3, kappas, centres)
    assert expected != brute_force(probs, None, 3, kappas, centres)
    quantizer = calibrated(TanQuantizer(3, kappas, centres), attention_like(rows=2 * 4 * 16, keys=16, seed=5)
                           .reshape(2, 4, 16, 16), torch.randn(2, 4, 16, 8))
    calibrated(quantizer, probs, value)
    assert (float(quantizer.kappa), float(quantizer.centre)) == pytest.approx(expected)


@pytest.mark.parametrize("values", ["wrong_keys", "missing_one"])
def test_values_that_do_not_pair_with_the_probabilities_are_refused_not_ignored(values):
    probs = attention_like(rows=2 * 4 * 16, keys=16).reshape(2, 4, 16, 16)
    quantizer = TanQuantizer(3)
    quantizer.site = "vit.encoder.layer.0.attention.probs"
    quantizer.set_mode("observe")
    if values == "wrong_keys":
        quantizer.observe_value(torch.randn(2, 4, 15, 8))  # 15 keys for probabilities over 16
        quantizer(probs)
    else:
        quantizer.observe_value(torch.randn(2, 4, 16, 8))
        quantizer(probs)
        quantizer(probs)  # a second call without its V
    with pytest.raises(CalibrationError, match=r"vit\.encoder\.layer\.0\.attention\.probs observed .* do not pair up"):
        quantizer.calibrate()
