"""Dense packing of 1..8-bit weight codes."""

import math

import pytest
import torch

from optimum_dfq.formats import pack_codes, packed_shape, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(5, 7), (3, 2, 4, 4), (16, 1), (4, 64)])
def test_round_trip_every_width(bits, shape):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == packed_shape(shape, bits) == (shape[0], math.ceil(math.prod(shape[1:]) * bits / 8))
    unpacked = unpack_codes(packed, bits, shape)
    assert unpacked.dtype == torch.uint8 and torch.equal(unpacked, codes.to(torch.uint8))


def test_dense_layout_little_endian_bit_stream():
    # 2-bit codes 1, 2, 3, 0 -> 0b00_11_10_01
    assert pack_codes(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    # 3-bit codes straddle bytes: 8 codes -> exactly 3 bytes, no padding between codes
    codes = torch.tensor([[7, 0, 7, 0, 7, 0, 7, 0]])
    bits = sum(7 << (6 * i) for i in range(4))  # code 2i at bit 6i
    assert pack_codes(codes, 3).tolist() == [[bits & 0xFF, (bits >> 8) & 0xFF, bits >> 16]]


def test_errors():
    with pytest.raises(ValueError, match="0..15"):
        pack_codes(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="0..15"):
        pack_codes(torch.tensor([[-1]]), 4)
    with pytest.raises(TypeError, match="integer tensor"):
        pack_codes(torch.tensor([[1.0]]), 4)
    with pytest.raises(ValueError, match="1..8-bit"):
        pack_codes(torch.tensor([[1]]), 9)
    with pytest.raises(ValueError, match=r"uint8 tensor of shape \[4, 2\]"):
        unpack_codes(torch.zeros(4, 3, dtype=torch.uint8), 4, (4, 4))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint64])
def test_codes_too_large_for_int32_are_refused_not_wrapped(dtype):
    # 2^32 + 3 narrowed to int32 is 3, a valid 4-bit code
    with pytest.raises(ValueError, match=r"0\.\.15 for 4-bit packing, got range \[1, 4294967299\]"):
        pack_codes(torch.tensor([[2**32 + 3, 1]], dtype=dtype), 4)


def test_bits_given_as_a_bool_are_refused():
    with pytest.raises(ValueError, match="got bits=True"):
        packed_shape([4, 3], True)


def test_ill_formed_inputs_are_refused_with_a_message():
    with pytest.raises(ValueError, match="got bits=4.0"):
        pack_codes(torch.tensor([[1, 2]]), 4.0)
    with pytest.raises(ValueError, match="got bits=4.0"):
        packed_shape([4, 3], 4.0)
    with pytest.raises(TypeError, match="integer tensor, got torch.bool"):
        pack_codes(torch.tensor([[True, False]]), 1)
    with pytest.raises(ValueError, match="at least one dim"):
        pack_codes(torch.tensor(3), 4)
    with pytest.raises(ValueError, match=r"0\.\.255 for 8-bit packing, got range \[1, 256\]"):
        pack_codes(torch.tensor([[256, 1]]), 8)  # a uint8 cast would wrap 256 to 0
    packed = pack_codes(torch.tensor([[1, 2, 3, 0]]), 2)
    with pytest.raises(ValueError, match=r"uint8 tensor of shape \[1, 1\], got torch.int32 \[1, 1\]"):
        unpack_codes(packed.to(torch.int32), 2, (1, 4))
