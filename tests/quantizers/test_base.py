"""The observe → calibrate → quantize life cycle shared by every quantizer (tested through UniformQuantizer)."""

import pytest
import torch

from optimum_dfq.errors import CalibrationError
from optimum_dfq.quantizers import UniformQuantizer


@pytest.mark.parametrize("bits", [0, 17])
def test_bits_outside_1_to_16_are_refused(bits):
    with pytest.raises(ValueError, match=f"bits must be in 1..16, got {bits}"):
        UniformQuantizer(bits=bits)


@pytest.mark.parametrize("bits", [1, 16])
def test_the_ends_of_the_bit_range_are_accepted(bits):
    assert UniformQuantizer(bits=bits).levels().numel() == 2**bits


def test_an_unknown_mode_is_refused():
    q = UniformQuantizer(bits=4)
    with pytest.raises(ValueError, match="Unknown quantizer mode 'train'"):
        q.set_mode("train")
    assert q.mode == "quantize"


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_each_kind_of_non_finite_value_is_refused_while_observing(value):
    q = UniformQuantizer(bits=4)
    q.site = "blocks.0.fc1.input"
    q.set_mode("observe")
    with pytest.raises(CalibrationError, match=r"1 non-finite value\(s\) \(NaN/inf\) reached the quantizer at blocks"):
        q(torch.tensor([0.5, value, -0.5]))
    assert q.num_observed == 0


def test_the_error_counts_every_non_finite_value():
    q = UniformQuantizer(bits=4)
    q.set_mode("observe")
    with pytest.raises(CalibrationError, match=r"^3 non-finite value\(s\)"):
        q(torch.tensor([float("inf"), 1.0, float("-inf"), float("nan")]))


def test_observations_are_detached_and_counted_in_elements():
    q = UniformQuantizer(bits=4)
    q.set_mode("observe")
    x = torch.randn(2, 3, requires_grad=True)
    assert torch.equal(q(x), x)
    q(torch.randn(4))
    assert q.num_observed == 10
    assert not any(t.requires_grad for t in q._observed)  # no autograd graph is kept alive by calibration data


def test_changing_an_observed_tensor_in_place_does_not_change_the_calibration():
    x = torch.linspace(-1.0, 1.0, 11)
    reference = UniformQuantizer(bits=4, observer="minmax")
    reference.set_mode("observe")
    reference(x.clone())
    reference.calibrate()
    q = UniformQuantizer(bits=4, observer="minmax")
    q.set_mode("observe")
    q(x)
    x.mul_(10.0)  # e.g. a later in-place op of the model on the same activation, before calibrate()
    q.calibrate()
    assert torch.equal(q.scale, reference.scale) and torch.equal(q.zero_point, reference.zero_point)


def test_an_observed_view_does_not_hold_its_base_tensor():
    q = UniformQuantizer(bits=4)
    q.set_mode("observe")
    base = torch.randn(1000, 8)
    q(base[:2])
    assert q._observed[0].untyped_storage().nbytes() == 2 * 8 * base.element_size()


def test_off_is_the_identity_also_when_calibrated():
    q = UniformQuantizer(bits=2, observer="minmax")
    q.set_mode("calibrate")
    x = torch.linspace(-1, 1, 11)
    assert not torch.equal(q(x), x)  # calibrated: 2 bits cannot represent these 11 values
    q.set_mode("off")
    assert torch.equal(q(x), x)
