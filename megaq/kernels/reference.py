"""The reference implementations behind `megaq.kernels`' dispatch: `megaq.quant` on any device.

They define what every GPU kernel must compute; dispatch falls back to them on the CPU, for
unsupported shapes, or when `MEGAQ_KERNELS=reference`.
"""

from __future__ import annotations

import torch

from ..quant import (DelayedAmax, QuantizedTensor, block_hadamard, check_finite, pad_to_multiple,
                     quantize_blockwise, quantize_rows_delayed)


def quantize(x: torch.Tensor, block: tuple[int, int], bits: int = 8, rounding: str = "nearest",
             generator: torch.Generator | None = None, check: bool = True,
             transpose: bool = False) -> QuantizedTensor:
    """Block-quantize `x` (or `x.T` when `transpose`)."""
    return quantize_blockwise(x.t() if transpose else x, block, bits, rounding, generator, check)


def hadamard_quantize_delayed(x: torch.Tensor, hadamard: int, state: DelayedAmax, bits: int = 8,
                              rounding: str = "nearest", generator: torch.Generator | None = None,
                              check: bool = True, transpose: bool = False) -> QuantizedTensor:
    """Rotate the rows of `x` (of `x.T` when `transpose`), zero padded to whole Hadamard blocks, then
    quantize them per row with delayed scaling."""
    view = x.t() if transpose else x
    if check:
        check_finite(view, "hadamard_quantize_delayed input")
    rotated = block_hadamard(pad_to_multiple(view.float(), hadamard), hadamard)
    return quantize_rows_delayed(rotated, state, bits, rounding, generator)


def scaled_mm(a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype = torch.float32,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """`A · Bᵀ` for operands quantized along their shared reduction axis (the last dim).

    Mathematically Σ_kb s_a[m, kb] s_b[n, kb] Σ_{k∈kb} a[m, k] b[n, k]; computed here as the product of
    the dequantized operands in FP32, which is the same sum up to FP32 rounding."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"scaled_mm: reduction sizes differ: A {a.shape} vs B {b.shape}")
    out = a.dequantize(torch.float32) @ b.dequantize(torch.float32).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
