import pytest
import torch

from optimum_dfq.errors import CalibrationError
from optimum_dfq.quantizers import UniformQuantizer


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


def test_symmetric_zero_point_and_signed_range():
    q = calibrated(torch.linspace(-3, 5, 101), bits=4, symmetric=True, observer="minmax")
    assert float(q.zero_point) == 8
    torch.testing.assert_close(q.scale, torch.tensor(5 / 7.5))


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
    x = torch.randn(256, 4)
    x[:, 1] = 0.5  # e.g. a LayerNorm output channel with gamma = 0 and beta = 0.5
    x[:, 2] = 0.0
    q = UniformQuantizer(bits=4, channels=4, axis=-1, observer=observer)
    q.set_mode("observe")
    q(x)
    q.calibrate()
    q.set_mode("quantize")
    assert bool(((q.zero_point >= 0) & (q.zero_point <= q.qmax)).all()), q.zero_point
    out = q(x)
    assert torch.equal(out[:, 1], x[:, 1]) and torch.equal(out[:, 2], x[:, 2])  # the constants are exact levels
