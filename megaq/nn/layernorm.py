"""LayerNorm whose parameters stay correct under sequence parallelism.

Under sequence parallelism each TP rank normalizes only its chunk of the tokens, so the gradient of
the (replicated) weight and bias on one rank is a partial sum; ``copy_to_tp_region`` on the
parameters all-reduces it in the backward pass. Doing it inside autograd (rather than after the
backward pass) keeps it correct whatever DeepSpeed does with gradients once they are computed.

The normalization itself is ``torch.nn.functional.layer_norm``, already one fused kernel on GPUs.
(The INT8 LayerNorm of the INT8 data flow lives in ``megaq.ops``.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaq.parallel import copy_to_tp_region, mark_sequence_parallel


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True,
                 sequence_parallel: bool = False):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        for p in (self.weight, self.bias):
            if p is not None and sequence_parallel:
                mark_sequence_parallel(p)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.sequence_parallel:
            weight = copy_to_tp_region(weight)
            bias = copy_to_tp_region(bias) if bias is not None else None
        return F.layer_norm(x, (self.dim,), weight, bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.dim}, eps={self.eps}, bias={self.bias is not None}, "
                f"sequence_parallel={self.sequence_parallel}")
