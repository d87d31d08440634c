"""On-disk formats of quantized models: dense bit packing of weight codes (`packing`), the native checkpoint
layout and its integrity checks (`checkpoint`), and the compressed-tensors export (`compressed_tensors`)."""

from .packing import pack_codes, packed_shape, unpack_codes

__all__ = ["pack_codes", "packed_shape", "unpack_codes"]
