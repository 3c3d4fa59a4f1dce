"""Helpers the kernel test files share: the relative error they bound, and the random test inputs."""

from __future__ import annotations

import torch


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ‖a − b‖ / ‖b‖ in FP64 (on the CPU, autograd detached)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def random_input(shape, device, dtype=torch.float32, seed=0, outliers: float = 0.0) -> torch.Tensor:
    """2·N(0, 1) from a seeded CPU generator (the same values on every device); with `outliers`, every
    37th column multiplied by it (outlier channels, what the per-block and rotated scalings are for)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0
    if outliers:
        x[:, ::37] *= outliers
    return x.to(device=device, dtype=dtype)
