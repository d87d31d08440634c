"""Dense bit packing of integer weight codes (2..8 bits) into `uint8` rows.

Layout (one row per output channel, the remaining dims flattened to `K` codes): code `i` of a row occupies bits
`[i·b, (i+1)·b)` of the row's little-endian bit stream, and byte `j` of the packed row holds bits `[8j, 8j+8)`,
least significant bit first. A row therefore takes `ceil(K·b / 8)` bytes, with no padding between codes (3-bit codes
straddle byte boundaries). It is the bit order of compressed-tensors' dense `pack_to_int32`, stored in bytes so that
any `K` and any width packs without waste.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MIN_PACK_BITS, MAX_PACK_BITS = 1, 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_PACK_BITS <= bits <= MAX_PACK_BITS:
        raise ValueError(f"Packing supports {MIN_PACK_BITS}..{MAX_PACK_BITS}-bit codes, got bits={bits!r}.")


def packed_shape(shape: Sequence[int], bits: int) -> tuple[int, int]:
    """Shape of the packed `uint8` tensor for a weight of `shape`.

    Args:
        shape (`Sequence[int]`): the weight shape, output channels first (`[out, in]` or `[out, c, kh, kw]`).
        bits (`int`): bits per code.

    Returns:
        `tuple[int, int]`: `(out, ceil(K * bits / 8))` with `K = prod(shape[1:])`.

    Example:
        >>> packed_shape([384, 384], 4)
        (384, 192)
        >>> packed_shape([8, 3], 3)  # 9 bits per row -> 2 bytes
        (8, 2)
    """
    _check_bits(bits)
    rows, per_row = int(shape[0]), math.prod(int(s) for s in shape[1:])
    return rows, math.ceil(per_row * bits / 8)


def _bit_positions(per_row: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(per_row, device=device, dtype=torch.int64) * bits
    return start // 8, (start % 8).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs integer codes in `0 .. 2^bits - 1` densely, row by row (see the module docstring for the layout).

    Args:
        codes (`torch.Tensor`): integer tensor, output channels first; every dim after the first is flattened.
        bits (`int`): bits per code (1..8).

    Returns:
        `torch.Tensor`: `uint8` tensor of [`packed_shape`]`(codes.shape, bits)`.

    Example:
        >>> pack_codes(torch.tensor([[1, 2, 3, 0]]), 2)  # 0b00_11_10_01
        tensor([[57]], dtype=torch.uint8)
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"pack_codes expects an integer tensor, got {codes.dtype}.")
    if codes.dim() < 1:
        raise ValueError("pack_codes expects at least one dim (the output channels).")
    rows = codes.shape[0]
    flat = codes.reshape(rows, -1).to(torch.int64)  # checked before narrowing: int32 would wrap large codes
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(
            f"Codes must lie in 0..{2**bits - 1} for {bits}-bit packing, got range "
            f"[{int(flat.min())}, {int(flat.max())}]."
        )
    flat = flat.to(torch.int32)
    per_row = flat.shape[1]
    _, num_bytes = packed_shape(codes.shape, bits)
    byte_index, offset = _bit_positions(per_row, bits, codes.device)
    shifted = flat << offset  # at most 15 bits: spans the code's first byte and the next one
    out = torch.zeros(rows, num_bytes + 1, dtype=torch.int32, device=codes.device)
    out.index_add_(1, byte_index, shifted & 0xFF)  # bits never overlap, so adding is OR-ing
    out.index_add_(1, byte_index + 1, shifted >> 8)
    return out[:, :num_bytes].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of [`pack_codes`].

    Args:
        packed (`torch.Tensor`): `uint8` tensor from [`pack_codes`].
        bits (`int`): bits per code.
        shape (`Sequence[int]`): the shape of the codes (the weight shape).

    Returns:
        `torch.Tensor`: `uint8` codes of `shape`.

    Example:
        >>> codes = torch.randint(0, 8, (4, 11))
        >>> torch.equal(unpack_codes(pack_codes(codes, 3), 3, codes.shape), codes.to(torch.uint8))
        True
    """
    expected = packed_shape(shape, bits)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
        raise ValueError(
            f"Packed {bits}-bit codes of a {list(shape)} weight must be a uint8 tensor of shape {list(expected)}, "
            f"got {packed.dtype} {list(packed.shape)}."
        )
    rows = expected[0]
    per_row = math.prod(int(s) for s in shape[1:])
    mask = 2**bits - 1
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: codes never straddle bytes (about 5x faster, it runs in every forward)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = ((packed.unsqueeze(-1) >> shifts) & mask).reshape(rows, -1)[:, :per_row]
    else:
        byte_index, offset = _bit_positions(per_row, bits, packed.device)
        padded = torch.nn.functional.pad(packed.to(torch.int32), (0, 1))
        window = padded[:, byte_index] | (padded[:, byte_index + 1] << 8)
        codes = ((window >> offset) & mask).to(torch.uint8)
    return codes.reshape(rows, *[int(s) for s in shape[1:]])
