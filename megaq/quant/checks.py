"""Input validation shared by every quantizer.

The finite check costs one reduction over the tensor; the hot path can switch it off
(`check=False`) once the training loop guards the loss and gradients itself.
"""

from __future__ import annotations

import torch


class NonFiniteError(ValueError):
    """A tensor handed to a quantizer holds NaN or Inf."""


def check_finite(x: torch.Tensor, name: str = "tensor") -> None:
    """Raise `NonFiniteError` naming `name` if `x` holds NaN or Inf."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise NonFiniteError(
            f"{name} of shape {tuple(x.shape)} holds {n_nan} NaN and {n_inf} Inf values; "
            "quantizing it would silently produce garbage"
        )


def check_2d(x: torch.Tensor, name: str = "tensor") -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, cols]; got shape {tuple(x.shape)} "
                         "(flatten leading dimensions first)")
