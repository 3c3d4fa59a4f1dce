"""Rounding modes used by the quantizers.

Nearest rounds half to even (`torch.round`), which is what the GPU kernels' `rint` does too.
Stochastic rounding returns floor(v + u) with u ~ U[0, 1): P(round up) equals the fractional part,
so E[round(v)] = v — the property that keeps quantized gradients unbiased.
"""

from __future__ import annotations

import torch

ROUNDING_MODES = ("nearest", "stochastic")


def round_nearest(v: torch.Tensor) -> torch.Tensor:
    return torch.round(v)


def round_stochastic(v: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unbiased stochastic rounding; reproducible when `generator` is given (same device as `v`)."""
    u = torch.rand(v.shape, dtype=torch.float32, device=v.device, generator=generator)
    return torch.floor(v.float() + u)


def apply_rounding(v: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    if mode == "nearest":
        return round_nearest(v)
    if mode == "stochastic":
        return round_stochastic(v, generator)
    raise ValueError(f"rounding must be one of {ROUNDING_MODES}; got {mode!r}")
