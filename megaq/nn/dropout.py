"""Dropout that draws from the right random stream for where its input lives.

A tensor replicated over the TP ranks must get the same mask on every rank (the default stream,
seeded identically everywhere); a tensor sharded over them (this rank's heads, or this rank's
chunk of the sequence) must get independent masks (the per-rank stream of ``tp_rng_fork``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from megaq.parallel import tp_rng_fork


class ParallelDropout(nn.Module):
    def __init__(self, p: float, input_is_sharded: bool):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.input_is_sharded = input_is_sharded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        with tp_rng_fork() if self.input_is_sharded else contextlib.nullcontext():
            return F.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}, input_is_sharded={self.input_is_sharded}"
