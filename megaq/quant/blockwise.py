"""Symmetric block quantization of 2-D tensors (ALGORITHMS.md §1).

A block shape `(br, bc)` tiles a `[R, C]` tensor; `-1` means the whole extent, so per-row is `(1, -1)`,
per-column `(-1, 1)` and per-tensor `(-1, -1)`. Each block gets one FP32 scale `amax / qmax` (qmax = 127
for INT8, 7 for INT4) and integer payload `round(x / scale)` clamped to `[-qmax, qmax]`.

Tails: when R or C is not a multiple of the block, the last block along that axis is partial. Its
scale comes from the elements that exist (we pad with zeros, which never raise an abs-max), and the
payload keeps the logical shape — padding is never stored.

A block whose abs-max is 0 gets scale 1.0 and zero payload, never 0/0.
"""

from __future__ import annotations

import math

import torch

from .checks import check_2d, check_finite
from .packing import pack_int4
from .rounding import apply_rounding
from .tensor import QuantizedTensor

SUPPORTED_BITS = (8, 4)


def qmax_for_bits(bits: int) -> int:
    if bits == 8:
        return 127
    if bits == 4:
        return 7
    raise ValueError(f"bits must be one of {SUPPORTED_BITS}; got {bits}")


def resolve_block(block: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int]:
    """Replace -1 by the full extent and validate."""
    if len(block) != 2:
        raise ValueError(f"block must be (rows, cols); got {block!r}")
    resolved = []
    for b, n, axis in zip(block, shape, ("rows", "cols")):
        if b == -1:
            resolved.append(max(n, 1))
        elif isinstance(b, int) and b > 0:
            resolved.append(b)
        else:
            raise ValueError(f"block {axis} must be a positive int or -1; got {b!r} in {block!r}")
    return resolved[0], resolved[1]


def _blocked_view(x: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    """Zero-pad `x` to whole blocks and view it as `[nR, br, nC, bc]`."""
    rows, cols = x.shape
    n_r, n_c = math.ceil(rows / br), math.ceil(cols / bc)
    pad_r, pad_c = n_r * br - rows, n_c * bc - cols
    if pad_r or pad_c:
        x = torch.nn.functional.pad(x, (0, pad_c, 0, pad_r))
    return x.reshape(n_r, br, n_c, bc)


def block_absmax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP32 abs-max of every block, shape `[ceil(R/br), ceil(C/bc)]`."""
    check_2d(x, "block_absmax input")
    br, bc = resolve_block(block, tuple(x.shape))
    return _blocked_view(x.float().abs(), br, bc).amax(dim=(1, 3))


def scales_from_absmax(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], bits: int = 8,
                        rounding: str = "nearest",
                        generator: torch.Generator | None = None) -> QuantizedTensor:
    """Quantize `x` with given per-block scales (e.g. an LSQ step): values beyond qmax*scale clip."""
    check_2d(x, "quantize input")
    qmax = qmax_for_bits(bits)
    rows, cols = x.shape
    br, bc = resolve_block(block, (rows, cols))
    expanded = scale.float().repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    q = apply_rounding(x.float() / expanded, rounding, generator)
    q = q.clamp_(-qmax, qmax).to(torch.int8)
    data = pack_int4(q) if bits == 4 else q
    return QuantizedTensor(data, scale.float().contiguous(), (br, bc), bits, (rows, cols))


def quantize_blockwise(x: torch.Tensor, block: tuple[int, int] = (1, 128), bits: int = 8,
                       rounding: str = "nearest", generator: torch.Generator | None = None,
                       check: bool = True) -> QuantizedTensor:
    """Symmetric per-block quantization of a 2-D tensor (see module docstring)."""
    check_2d(x, "quantize_blockwise input")
    if check:
        check_finite(x, "quantize_blockwise input")
    qmax = qmax_for_bits(bits)
    br, bc = resolve_block(block, tuple(x.shape))
    scale = scales_from_absmax(block_absmax(x, (br, bc)), qmax)
    return quantize_with_scale(x, scale, (br, bc), bits, rounding, generator)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return qt.dequantize(dtype)


def fake_quantize(x: torch.Tensor, block: tuple[int, int] = (1, 128), bits: int = 8,
                  rounding: str = "nearest", generator: torch.Generator | None = None,
                  check: bool = True) -> torch.Tensor:
    """Quantize then dequantize, returning `x`'s dtype and shape (any leading dims, blocks over the
    last two after flattening leading dims into rows)."""
    flat = x.reshape(-1, x.shape[-1])
    qt = quantize_blockwise(flat, block, bits, rounding, generator, check)
    return qt.dequantize(x.dtype).reshape(x.shape)
