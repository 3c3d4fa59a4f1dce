"""The quantized-tensor container every megaq quantizer returns and every GEMM consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack_int4, unpack_int4


@dataclass
class QuantizedTensor:
    """A 2-D tensor stored as integers plus FP32 block scales.

    data:  int8 `[R, C]` for 8-bit, or packed uint8 `[R, ceil(C/2)]` for 4-bit (two values per byte,
           see `megaq.quant.packing`).
    scale: FP32 `[ceil(R/br), ceil(C/bc)]`, one per block; value = int * scale.
    block: `(br, bc)` actually used (never -1: per-row of a 2-D `[R, C]` tensor is stored as `(1, C)`).
    bits:  8 or 4.
    shape: the logical `(R, C)`.
    """

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]
    bits: int
    shape: tuple[int, int]

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 7

    @property
    def device(self) -> torch.device:
        return self.data.device

    def int_values(self) -> torch.Tensor:
        """The integer payload as int8 `[R, C]` (unpacks 4-bit)."""
        if self.bits == 4:
            return unpack_int4(self.data, self.shape[1])
        return self.data

    def expanded_scale(self) -> torch.Tensor:
        """Scales broadcast to `[R, C]` (tail blocks cut to the logical shape)."""
        br, bc = self.block
        rows, cols = self.shape
        return self.scale.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.int_values().float() * self.expanded_scale()).to(dtype)

    def t(self) -> "QuantizedTensor":
        """The transpose: payload and scale grid swap axes, so a square-block copy serves both
        orientations without requantizing (Jetfire's reason for square blocks)."""
        values = self.int_values().t().contiguous()
        data = pack_int4(values) if self.bits == 4 else values
        return QuantizedTensor(data, self.scale.t().contiguous(), (self.block[1], self.block[0]),
                               self.bits, (self.shape[1], self.shape[0]))

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * 4

    def __repr__(self) -> str:
        return (f"QuantizedTensor(int{self.bits}, shape={self.shape}, block={self.block}, "
                f"scale_grid={tuple(self.scale.shape)}, device={self.device})")
