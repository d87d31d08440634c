import pytest
import torch

from optimum_dfq.quantizers import tail_quantiles


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
