"""Rounding modes used by the quantizers.

Nearest rounds half to even (`torch.round`), which is what the GPU kernels' `rint` does too.
Stochastic rounding rounds v up with probability equal to its fractional part, so E[round(v)] = v —
the property that keeps quantized gradients unbiased. It is computed as floor(v) + (u < v − floor(v))
with u ~ U[0, 1), not as floor(v + u): in FP32, v + u can round up to the next integer when v is
already an integer, a bias of about one ulp per draw that the GPU kernels avoid the same way.
"""

from __future__ import annotations

import torch

ROUNDING_MODES = ("nearest", "stochastic")


def round_nearest(v: torch.Tensor) -> torch.Tensor:
    return torch.round(v)


def round_stochastic(v: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unbiased stochastic rounding; reproducible when `generator` is given (same device as `v`)."""
    u = torch.rand(v.shape, dtype=torch.float32, device=v.device, generator=generator)
    v = v.float()
    low = torch.floor(v)
    return low + (u < v - low).float()


def apply_rounding(v: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    if mode == "nearest":
        return round_nearest(v)
    if mode == "stochastic":
        return round_stochastic(v, generator)
    raise ValueError(f"rounding must be one of {ROUNDING_MODES}; got {mode!r}")
