"""Block-diagonal Hadamard transform along the last dimension (ALGORITHMS.md §2).

`H_n` is the Sylvester Hadamard matrix scaled by 1/sqrt(n): symmetric and orthonormal, so H·H = I and
the transform is its own inverse. Applied to both GEMM operands along the reduction axis it leaves the
product unchanged, `(X H)(W H)ᵀ = X Wᵀ`, while spreading a few outlier channels over the block.
"""

from __future__ import annotations

import functools
import math

import torch

SUPPORTED_HADAMARD_BLOCKS = tuple(2 ** k for k in range(2, 9))  # 4 .. 256


@functools.lru_cache(maxsize=64)
def _hadamard_cached(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of size n (a power of two, 4..256)."""
    if n not in SUPPORTED_HADAMARD_BLOCKS:
        raise ValueError(f"Hadamard block must be one of {SUPPORTED_HADAMARD_BLOCKS}; got {n}")
    return _hadamard_cached(n, dtype, str(torch.device(device)))


def block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """Apply `H_block` to each consecutive group of `block` elements of the last dim (in FP32, or FP64 for
    FP64 input; returned in `x`'s dtype). The last dim must be a multiple of `block`: callers zero-pad the reduction axis,
    which does not change a product of two equally padded operands."""
    if x.shape[-1] % block:
        raise ValueError(f"block_hadamard: last dim {x.shape[-1]} is not a multiple of the Hadamard "
                         f"block {block}; zero-pad the reduction axis first")
    compute = torch.promote_types(x.dtype, torch.float32)
    h = hadamard_matrix(block, compute, x.device)
    grouped = x.to(compute).reshape(*x.shape[:-1], x.shape[-1] // block, block)
    return (grouped @ h).reshape(x.shape).to(x.dtype)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dim up to a multiple of `multiple`."""
    extra = (-x.shape[-1]) % multiple
    return torch.nn.functional.pad(x, (0, extra)) if extra else x
