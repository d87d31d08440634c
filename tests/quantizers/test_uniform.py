import pytest
import torch

from optimum_dfq.errors import CalibrationError, DFQError
from optimum_dfq.quantizers import UniformQuantizer, round_ste


def calibrated(x, **kwargs):
    q = UniformQuantizer(**kwargs)
    q.set_mode("observe")
    q(x)
    q.calibrate()
    q.set_mode("quantize")
    return q


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_codebook_has_exactly_2_pow_bits_levels(bits, symmetric):
    x = torch.randn(1000)
    q = calibrated(x, bits=bits, symmetric=symmetric)
    levels = q.levels()
    assert levels.numel() == 2**bits
    assert torch.unique(levels).numel() == 2**bits
    assert torch.unique(q(x)).numel() <= 2**bits
    assert set(torch.unique(q(x)).tolist()) <= set(levels.tolist())


def test_per_channel_levels_and_independent_ranges():
    x = torch.randn(200, 3) * torch.tensor([1.0, 10.0, 100.0])
    q = calibrated(x, bits=4, channels=3, axis=-1)
    assert q.levels().shape == (3, 16)
    ranges = q.levels().amax(1) - q.levels().amin(1)
    assert ranges[0] < ranges[1] < ranges[2]
    for c in range(3):
        assert set(torch.unique(q(x)[:, c]).tolist()) <= set(q.levels()[c].tolist())


def test_percentile_range_ignores_a_single_outlier():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    x[0] = 1000.0
    clipped = calibrated(x, bits=4, observer="percentile_mse")
    minmax = calibrated(x, bits=4, observer="minmax")
    assert clipped.scale < minmax.scale / 10
    bulk = x[1:]
    assert (clipped(bulk) - bulk).pow(2).mean() < (minmax(bulk) - bulk).pow(2).mean() / 10


def test_percentile_mse_keeps_the_best_candidate():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((20_000,))
    chosen = calibrated(x, bits=4, percentiles=[0.99, 0.999, 0.9999])
    for p in (0.99, 0.999, 0.9999):
        single = calibrated(x, bits=4, percentiles=[p])
        assert (chosen(x) - x).pow(2).mean() <= (single(x) - x).pow(2).mean() + 1e-7


def test_minmax_covers_the_range_and_zero():
    x = torch.rand(100) + 1.0  # strictly positive
    q = calibrated(x, bits=8, observer="minmax")
    assert (q(x) - x).abs().max() <= q.scale / 2 + 1e-6
    assert 0.0 in q.levels().tolist()


@pytest.mark.parametrize(("low", "high"), [(-3.0, 5.0), (-6.0, 2.0)])  # the bound is max(|low|, |high|)
def test_symmetric_zero_point_and_signed_range(low, high):
    q = calibrated(torch.linspace(low, high, 101), bits=4, symmetric=True, observer="minmax")
    assert float(q.zero_point) == 8
    torch.testing.assert_close(q.scale, torch.tensor(max(-low, high) / 7.5))


def test_codes_round_trip():
    x = torch.randn(8, 5)
    q = calibrated(x, bits=3, channels=8, axis=0)
    codes = q.codes(x)
    assert codes.min() >= 0 and codes.max() <= 7
    torch.testing.assert_close(q.dequantize(codes), q(x))


def test_straight_through_gradient():
    x = torch.randn(50, requires_grad=True)
    q = calibrated(x.detach(), bits=4)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(50))


def test_use_before_calibration_is_an_error():
    with pytest.raises(CalibrationError, match="before calibrate"):
        UniformQuantizer(bits=4)(torch.randn(3))


def test_calibrate_without_data_is_an_error():
    with pytest.raises(CalibrationError, match="observed nothing"):
        UniformQuantizer(bits=4).calibrate()


def test_nan_input_is_named():
    q = UniformQuantizer(bits=4)
    q.site = "encoder.fc1.input"
    q.set_mode("observe")
    with pytest.raises(CalibrationError, match="encoder.fc1.input"):
        q(torch.tensor([1.0, float("nan")]))


def test_calibrate_mode_switches_to_quantize():
    q = UniformQuantizer(bits=4)
    q.set_mode("calibrate")
    x = torch.randn(100)
    out = q(x)
    assert q.mode == "quantize" and bool(q.calibrated)
    assert torch.unique(out).numel() <= 16


def test_include_zero_keeps_zero_exact_and_the_zero_point_in_range():
    probs = torch.softmax(torch.randn(64, 32) * 3, dim=-1) + 0.2  # bounded away from 0
    plain, with_zero = UniformQuantizer(bits=8), UniformQuantizer(bits=8, include_zero=True)
    for quantizer in (plain, with_zero):
        quantizer.set_mode("observe")
        quantizer(probs)
        quantizer.calibrate()
        quantizer.set_mode("quantize")
    assert plain.zero_point < 0  # the lower percentile is positive: 0 is outside the plain range
    assert with_zero.zero_point == 0 and with_zero(torch.zeros(3)).eq(0).all()


@pytest.mark.parametrize("observer", ["minmax", "percentile_mse"])
def test_a_constant_channel_gets_a_range_through_zero_not_a_huge_zero_point(observer):
    x = torch.randn(256, 5)
    x[:, 1] = 0.5  # e.g. a LayerNorm output channel with gamma = 0 and beta = 0.5
    x[:, 2] = 0.0
    x[:, 3] = -0.5
    q = UniformQuantizer(bits=4, channels=5, axis=-1, observer=observer)
    q.set_mode("observe")
    q(x)
    q.calibrate()
    q.set_mode("quantize")
    assert bool(((q.zero_point >= 0) & (q.zero_point <= q.qmax)).all()), q.zero_point
    out = q(x)
    assert torch.equal(out[:, 1:4], x[:, 1:4])  # the constants are exact levels


@pytest.mark.parametrize("symmetric", [False, True])
def test_the_gradient_path_quantizes_like_the_inference_path(symmetric):
    # inputs that require grad take the straight-through branch, the others an in-place fast path: same values
    x = torch.randn(40, 6) * 3
    q = calibrated(x[:20] * 0.5, bits=3, channels=6, axis=-1, symmetric=symmetric, observer="minmax")
    with_grad = q(x.clone().requires_grad_(True))
    # (the straight-through x + (x̂ - x).detach() may differ from x̂ by float round-off, never by a level)
    torch.testing.assert_close(with_grad.detach(), q(x), rtol=0, atol=1e-5)


def test_minmax_asymmetric_parameters_are_the_rounded_affine_map():
    # range [-1, 2.2] at 4 bits: s = 3.2 / 15, -lo / s = 4.6875 -> the zero point is round(4.6875) = 5
    q = calibrated(torch.tensor([-1.0, 0.3, 2.2]), bits=4, observer="minmax")
    torch.testing.assert_close(q.scale, torch.tensor(3.2 / 15))
    assert float(q.zero_point) == 5.0
    assert q.codes(torch.tensor([-1.0, 0.0, 2.2])).tolist() == [0, 5, 15]


def test_percentile_mse_keeps_the_scale_and_zero_point_of_the_same_candidate():
    # per channel, the chosen (scale, zero point) is one candidate's pair, also when the best one is not the last
    torch.manual_seed(0)
    skewed = torch.rand(4000)
    skewed[:2] = -30.0  # two far outliers: only the widest candidate covers them
    x = torch.stack([torch.randn(4000), skewed], dim=1)
    percentiles = [0.99, 0.999, 0.99999]
    chosen = calibrated(x, bits=3, channels=2, axis=-1, percentiles=percentiles)
    singles = [calibrated(x, bits=3, channels=2, axis=-1, percentiles=[p]) for p in percentiles]
    for c in range(2):
        pairs = [(float(s.scale[c]), float(s.zero_point[c])) for s in singles]
        errors = [float((s(x)[:, c] - x[:, c]).pow(2).mean()) for s in singles]
        assert (float(chosen.scale[c]), float(chosen.zero_point[c])) == pairs[errors.index(min(errors))]
    gaussian = [(float(s.scale[0]), float(s.zero_point[0])) for s in singles]
    best = min(range(3), key=lambda i: float((singles[i](x)[:, 0] - x[:, 0]).pow(2).mean()))
    assert best != 2 and gaussian[best][1] != gaussian[2][1]  # the case tells a mixed-up zero point apart


def test_calibrate_forgets_and_reset_drops_the_observations():
    q = UniformQuantizer(bits=4, observer="minmax")
    q.set_mode("observe")
    q(torch.tensor([-10.0, 10.0]))
    q.calibrate()
    assert q.num_observed == 0
    q(torch.tensor([-1.0, 1.0]))  # a second calibration sees only what was observed since the first
    q.calibrate()
    torch.testing.assert_close(q.scale, torch.tensor(2.0 / 15))
    q(torch.tensor([-5.0, 5.0]))
    q.reset()
    assert q.num_observed == 0 and not bool(q.calibrated)
    with pytest.raises(CalibrationError, match="observed nothing"):
        q.calibrate()


@pytest.mark.parametrize("percentiles", [[], [0.2], [1.5], [float("nan")]])
def test_percentiles_outside_the_upper_tail_are_refused_when_built(percentiles):
    with pytest.raises(ValueError, match=r"percentiles=.* must be a non-empty list of values in \(0\.5, 1\]"):
        UniformQuantizer(bits=4, percentiles=percentiles)


def test_round_ste_rounds_ties_to_even_like_the_inference_path():
    # exact ties: torch.round (and the in-place round_ of the inference path) rounds half to even
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5], requires_grad=True)
    assert round_ste(x).tolist() == [-2.0, -2.0, 0.0, 0.0, 2.0, 2.0]
    q = UniformQuantizer(bits=4)
    q.set_params(torch.tensor(0.5), torch.tensor(8.0))
    ties = x.detach() * 0.5  # x / s lands exactly on the ties
    assert torch.equal(q(ties.clone().requires_grad_(True)).detach(), q(ties))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_a_fractional_zero_point_quantizes_by_the_documented_formula(requires_grad):
    # re-parameterisation with round_zero_point=False sets a fractional zero point: round x / s first, then add z
    scale, zero_point = 0.25, 2.5
    q = UniformQuantizer(bits=3)
    q.set_params(torch.tensor(scale), torch.tensor(zero_point))
    x = torch.linspace(-1.5, 2.0, 57, dtype=torch.float64)
    expected = ((x / scale).round() + zero_point).clamp(0, 7).sub(zero_point).mul(scale)
    out = q(x.float().requires_grad_(requires_grad)).detach()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)


def test_codes_refuse_a_fractional_zero_point():
    # round_zero_point=False leaves an activation zero point fractional: round(x / s) + z is then no integer code,
    # and truncating it would dequantize to other values than fake quantization gives
    q = UniformQuantizer(bits=3)
    q.site = "blocks.0.fc1.input"
    q.set_params(torch.tensor(0.25), torch.tensor(2.5))
    with pytest.raises(DFQError, match=r"blocks\.0\.fc1\.input has a fractional zero point"):
        q.codes(torch.zeros(3))
    q.set_params(torch.tensor(0.25), torch.tensor(3.0))
    assert q.codes(torch.tensor([0.0, 0.25])).tolist() == [3, 4]


@pytest.mark.parametrize("observer", ["minmax", "percentile_mse"])
@pytest.mark.parametrize(("shape", "axis"), [((6, 40), 0), ((5, 7, 30), 1), ((9, 4), -1)])
def test_each_channel_gets_the_parameters_of_its_own_slice(observer, shape, axis):
    # per-channel calibration on `axis` equals a per-tensor calibration of every slice on its own
    torch.manual_seed(0)
    channels = shape[axis]
    x = torch.randn(shape) * torch.linspace(0.5, 4.0, channels).view([-1 if d == axis % len(shape) else 1
                                                                      for d in range(len(shape))])
    q = calibrated(x, bits=4, channels=channels, axis=axis, observer=observer)
    for c in range(channels):
        single = calibrated(x.select(axis, c), bits=4, observer=observer)
        assert float(q.scale[c]) == float(single.scale) and float(q.zero_point[c]) == float(single.zero_point)
        assert torch.equal(q(x).select(axis, c), single(x.select(axis, c)))


def test_a_wrong_number_of_channels_is_named():
    q = UniformQuantizer(bits=4, channels=4, axis=-1)
    q.site = "blocks.0.fc1.input"
    q.set_mode("observe")
    q(torch.randn(10, 3))
    with pytest.raises(CalibrationError, match=r"blocks\.0\.fc1\.input expects 4 channels on axis -1, got 3"):
        q.calibrate()


def test_codes_are_int32_for_every_bit_width():
    # quantizers take up to 16 bits: codes above 255 must not wrap
    q = calibrated(torch.linspace(0, 1, 5000), bits=10, observer="minmax")
    codes = q.codes(torch.linspace(0, 1, 5000))
    assert codes.dtype == torch.int32 and int(codes.min()) == 0 and int(codes.max()) == 1023


@pytest.mark.parametrize("channels", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_quantization_keeps_the_input_dtype(dtype, channels):
    q = UniformQuantizer(bits=4, channels=channels)
    q.set_params(torch.full((channels or 1,), 0.25), torch.full((channels or 1,), 8.0))
    levels = (torch.arange(-8, 8) * 0.25)[:, None].expand(16, 3)  # exactly representable in every float dtype
    out = q(levels.to(dtype))
    assert out.dtype == dtype and torch.equal(out, levels.to(dtype))
