import math

import pytest
import torch

from optimum_dfq.quantizers import Log2Quantizer, LogSqrt2Quantizer


def attention_like(n=4096):
    torch.manual_seed(0)
    return torch.softmax(torch.randn(n // 64, 64) * 3, dim=-1).reshape(-1)


def calibrated(cls, x, bits):
    q = cls(bits=bits)
    q.set_mode("observe")
    q(x)
    q.calibrate()
    q.set_mode("quantize")
    return q


def repq_log_sqrt2(x, delta, n_bits):
    """RepQ-ViT's LogSqrt2Quantizer.quantize, transcribed as a reference."""
    x_int = torch.round(-1 * (x / delta).log2() * 2)
    mask = x_int >= 2**n_bits
    x_quant = torch.clamp(x_int, 0, 2**n_bits - 1)
    odd_mask = (x_quant % 2) * (math.sqrt(2) - 1) + 1
    x_float_q = 2 ** (-1 * torch.ceil(x_quant / 2)) * odd_mask * delta
    x_float_q[mask] = 0
    return x_float_q


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_log_sqrt2_matches_repq_and_has_a_zero_level(bits):
    x = attention_like()
    q = calibrated(LogSqrt2Quantizer, x, bits)
    torch.testing.assert_close(q(x), repq_log_sqrt2(x, q.scale, bits), rtol=0, atol=0)
    levels = q.levels()
    assert levels.numel() == 2**bits + 1  # 2^b powers of sqrt(2) plus the exact zero
    assert levels[0] == 0
    assert set(torch.unique(q(x)).tolist()) <= set(levels.tolist())
    assert q(torch.zeros(3)).eq(0).all()


@pytest.mark.parametrize("bits", [3, 4])
def test_log2_codebook(bits):
    x = attention_like()
    q = calibrated(Log2Quantizer, x, bits)
    levels = q.levels()
    assert levels.numel() == 2**bits
    ratios = levels[1:] / levels[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 2.0))
    assert set(torch.unique(q(x)).tolist()) <= set(levels.tolist())


def test_log_sqrt2_is_finer_than_log2_on_attention():
    x = attention_like()
    err2 = (calibrated(Log2Quantizer, x, 4)(x) - x).pow(2).mean()
    err_sqrt2 = (calibrated(LogSqrt2Quantizer, x, 4)(x) - x).pow(2).mean()
    assert err_sqrt2 < err2


@pytest.mark.parametrize("cls", [Log2Quantizer, LogSqrt2Quantizer])
def test_calibration_keeps_the_candidate_with_the_smallest_error(cls):
    x = attention_like()
    percentiles = [0.5, 0.99, 0.99999]  # the median is a poor scale: the first candidate is not the best
    chosen = cls(bits=4, percentiles=percentiles)
    chosen.set_mode("observe")
    chosen(x)
    chosen.calibrate()
    chosen.set_mode("quantize")
    singles = []
    for p in percentiles:
        single = cls(bits=4, percentiles=[p])
        single.set_mode("observe")
        single(x)
        single.calibrate()
        single.set_mode("quantize")
        singles.append(single)
    errors = [float((s(x) - x).pow(2).mean()) for s in singles]
    assert errors.index(min(errors)) != 0
    assert float(chosen.scale) == float(singles[errors.index(min(errors))].scale)


@pytest.mark.parametrize("cls", [Log2Quantizer, LogSqrt2Quantizer])
def test_all_zero_calibration_keeps_a_positive_scale_and_finite_outputs(cls):
    # e.g. a head whose probabilities were all masked out in the observed batch
    q = calibrated(cls, torch.zeros(64), 4)
    assert float(q.scale) > 0
    out = q(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.isfinite(out).all() and float(out[0]) <= float(q.levels()[1])


@pytest.mark.parametrize("cls", [Log2Quantizer, LogSqrt2Quantizer])
@pytest.mark.parametrize("percentiles", [[], [0.0], [1.5]])
def test_percentiles_outside_0_to_1_are_refused_when_built(cls, percentiles):
    with pytest.raises(ValueError, match=r"percentiles=.* must be a non-empty list of values in \(0, 1\]"):
        cls(bits=4, percentiles=percentiles)


def test_log2_quantization_by_hand():
    # Δ = 0.5, 2 bits: levels 0.5 · 2^-k for k = 0..3; k = clamp(round(-log2(a / Δ)), 0, 3)
    q = Log2Quantizer(bits=2)
    q.scale.fill_(0.5)
    q.calibrated.fill_(True)
    a = torch.tensor([0.0, 0.03, 0.1, 0.2, 0.3, 0.5, 0.9, 4.0])
    # -log2(a / Δ):     inf, 4.06, 2.32, 1.32, 0.74, 0, -0.85, -3  ->  k = 3, 3, 2, 1, 1, 0, 0, 0
    assert q(a).tolist() == [0.0625, 0.0625, 0.125, 0.25, 0.25, 0.5, 0.5, 0.5]


@pytest.mark.parametrize("cls", [Log2Quantizer, LogSqrt2Quantizer])
def test_calibration_uses_every_observed_batch(cls):
    first, second = attention_like(), attention_like() * 0.01  # the second batch alone would give a tiny Δ
    pooled, together = cls(bits=4), cls(bits=4)
    pooled.set_mode("observe")
    pooled(first)
    pooled(second)
    pooled.calibrate()
    together.set_mode("calibrate")
    together(torch.cat([first, second]))
    last_only = calibrated(cls, second, 4)
    assert float(pooled.scale) == float(together.scale) != float(last_only.scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls", [Log2Quantizer, LogSqrt2Quantizer])
def test_every_output_is_one_of_the_levels_and_every_level_is_reached(cls, dtype):
    q = calibrated(cls, attention_like(), 3).to(dtype)
    a = torch.logspace(-6, 0.2, 4000, base=2.0, dtype=dtype) * q.scale  # from far below to above Δ
    out = q(torch.cat([a, a.new_zeros(1)]))
    assert out.dtype == dtype
    assert torch.equal(torch.unique(out), q.levels())
