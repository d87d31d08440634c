import pytest
import torch

from optimum_dfq.quantizers import tail_quantiles
from optimum_dfq.quantizers.stats import check_percentiles


@pytest.mark.parametrize("n", [7, 1000, 12345])
def test_matches_torch_quantile(n):
    torch.manual_seed(0)
    x = torch.randn(n)
    percentiles = [0.9, 0.999, 0.99999]
    upper, lower = tail_quantiles(x, percentiles)
    for p, hi, lo in zip(percentiles, upper, lower):
        # float64 reference: torch.quantile computes the position in the input dtype
        torch.testing.assert_close(hi.double(), torch.quantile(x.double(), p), rtol=0, atol=1e-6)
        torch.testing.assert_close(lo.double(), torch.quantile(x.double(), 1 - p), rtol=0, atol=1e-6)


def test_per_channel_matches_torch_quantile():
    x = torch.randn(4, 501)
    upper, lower = tail_quantiles(x, [0.99], dim=1)
    torch.testing.assert_close(upper[0], torch.quantile(x, 0.99, dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(lower[0], torch.quantile(x, 0.01, dim=1), rtol=0, atol=1e-6)


def test_beyond_torch_quantile_size_limit():
    x = torch.rand(2**24 + 10)
    with pytest.raises(RuntimeError):
        torch.quantile(x, 0.999)  # the limit this helper exists to avoid
    upper, lower = tail_quantiles(x, [0.999])
    assert abs(float(upper[0]) - 0.999) < 1e-3 and abs(float(lower[0]) - 0.001) < 1e-3


def test_results_follow_the_order_of_the_percentiles_given():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    percentiles = [0.99999, 0.9, 0.999]  # not sorted
    upper, lower = tail_quantiles(x, percentiles)
    for p, hi, lo in zip(percentiles, upper, lower):
        torch.testing.assert_close(hi.double(), torch.quantile(x.double(), p), rtol=0, atol=1e-6)
        torch.testing.assert_close(lo.double(), torch.quantile(x.double(), 1 - p), rtol=0, atol=1e-6)


def test_percentile_1_is_the_maximum_and_is_accepted_by_quantizers():
    x = torch.randn(500, generator=torch.Generator().manual_seed(0))
    upper, lower = tail_quantiles(x, [1.0])
    assert float(upper[0]) == float(x.max()) and float(lower[0]) == float(x.min())
    assert check_percentiles([1.0], "UniformQuantizer") == [1.0]
    assert check_percentiles((1, 0.5 + 1e-9), "Log2Quantizer", above=0.0) == [1.0, 0.5 + 1e-9]


def test_half_precision_input_is_interpolated_in_float32():
    # 0.999 of [0, 1] is 0.999; float16 arithmetic would round it to 0.99902
    upper, lower = tail_quantiles(torch.tensor([0.0, 1.0], dtype=torch.float16), [0.999])
    assert upper[0].dtype == torch.float32
    torch.testing.assert_close(upper[0], torch.tensor(0.999), rtol=0, atol=1e-7)
    torch.testing.assert_close(lower[0], torch.tensor(0.001), rtol=0, atol=1e-7)


@pytest.mark.parametrize(("shape", "dim"), [((0,), None), ((3, 0), 1)])
def test_an_empty_tensor_is_refused(shape, dim):
    with pytest.raises(ValueError, match="non-empty tensor"):
        tail_quantiles(torch.zeros(shape), [0.99], dim=dim)
