"""Two INT4 values per byte.

Convention (shared with the CUDA kernels in csrc/): element 2i goes to the low nibble and element
2i+1 to the high nibble of byte i, each as 4-bit two's complement. An odd column count is padded with
a zero nibble. megaq's INT4 range is [-7, 7] (symmetric); -8 is representable but never produced.
"""

from __future__ import annotations

import torch


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int8 `[..., C]` with values in [-8, 7] -> uint8 `[..., ceil(C/2)]`."""
    if values.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 values; got {values.dtype}")
    if values.numel() and (int(values.min()) < -8 or int(values.max()) > 7):
        raise ValueError("pack_int4: values outside the 4-bit range [-8, 7]")
    if values.shape[-1] % 2:
        values = torch.nn.functional.pad(values, (0, 1))
    nibbles = values.to(torch.uint8) & 0x0F
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 `[..., ceil(cols/2)]` -> int8 `[..., cols]` (sign-extended)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8 packed data; got {packed.dtype}")
    low = (packed & 0x0F).to(torch.int16)
    high = ((packed >> 4) & 0x0F).to(torch.int16)
    both = torch.stack((low, high), dim=-1).flatten(-2)[..., :cols]
    return torch.where(both >= 8, both - 16, both).to(torch.int8)
