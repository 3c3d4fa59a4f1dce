"""LayerNorm whose parameters stay correct under sequence parallelism.

Under sequence parallelism each TP rank normalizes only its chunk of the tokens, so the gradient of
the (replicated) weight and bias on one rank is a partial sum; ``copy_to_tp_region`` on the
parameters all-reduces it in the backward pass. Doing it inside autograd (rather than after the
backward pass) keeps it correct whatever DeepSpeed does with gradients once they are computed.

The normalization is ``megaq.ops.layer_norm`` / ``add_layernorm``: on GPUs one Triton kernel forward and
one backward, with the pre-LayerNorm block's residual add fused in (``forward(x, residual)``); the
torch composition elsewhere. (The INT8 LayerNorm of the INT8 data flow lives in ``megaq.ops`` too.)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megaq.ops.layernorm import add_layernorm, layer_norm
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

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, carry: bool = False):
        """LayerNorm(x); with `residual`: (x + residual, LayerNorm(x + residual)), the add fused in;
        with `carry` (and no residual): (x, LayerNorm(x)), x's later gradient fused into this backward."""
        weight, bias = self.weight, self.bias
        if self.sequence_parallel:
            weight = copy_to_tp_region(weight)
            bias = copy_to_tp_region(bias) if bias is not None else None
        if residual is None and not carry:
            return layer_norm(x, weight, bias, self.eps)
        return add_layernorm(x, residual, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.dim}, eps={self.eps}, bias={self.bias is not None}, "
                f"sequence_parallel={self.sequence_parallel}")
