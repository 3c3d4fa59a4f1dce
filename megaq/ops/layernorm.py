"""LayerNorm with the residual add fused in, in the activations' dtype (the BF16 data flow's LayerNorms).

    y = layer_norm(x, w, b, eps)                  F.layer_norm(x, ...)
    s, y = add_layernorm(x, r, w, b, eps)         s = x + r; y = F.layer_norm(s, ...)

The pre-LayerNorm block adds each branch's output to the residual stream and normalizes the sum for
the next branch: eagerly that is an add kernel, a LayerNorm kernel, and in backward the LayerNorm's
input-gradient and weight-gradient kernels plus an add of the stream's two gradients. On the GPU
(`megaq.kernels.layernorm`: Triton, CUDA graph safe) the add is part of the LayerNorm's read and the
stream's incoming gradient part of its backward's write: two kernels per LayerNorm, fwd and bwd.
Elsewhere (CPU, widths over `megaq.kernels.layernorm.MAX_WIDTH`, inside torch.compile, whose
inductor fuses the composition with its neighbours, and under autocast) the torch composition runs, with the same results
up to FP32 summation order.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels import layernorm as ln_kernels


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """`F.layer_norm` over the last dim, by the fused kernels where they run."""
    if not _use_kernels(x):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return _AddLayerNorm.apply(x, None, weight, bias, eps, False)


def add_layernorm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                  bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y) = (x + residual, layer_norm(x + residual)); x and residual of one shape and dtype.

    residual None: (x, layer_norm(x)), where the returned x carries the residual stream on. Its
    gradient then enters the LayerNorm's backward kernel, instead of an add of the stream's two
    gradients after it."""
    if residual is not None and (x.shape != residual.shape or x.dtype != residual.dtype):
        raise ValueError(f"add_layernorm: x and residual must match; got {x.dtype} {tuple(x.shape)} and "
                         f"{residual.dtype} {tuple(residual.shape)}")
    if not _use_kernels(x):
        s = x + residual if residual is not None else x
        return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return _AddLayerNorm.apply(x, residual, weight, bias, eps, True)


def _use_kernels(x: torch.Tensor) -> bool:
    # under torch.compile the torch composition: inductor fuses it with its neighbours itself; under
    # autocast too, whose LayerNorm runs in FP32 (the kernels return x's dtype)
    return (ln_kernels.kernels_supported(x) and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled(x.device.type))


class _AddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, return_sum):
        shape, n = x.shape, x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        r2 = residual.reshape(-1, n).contiguous() if residual is not None else None
        s, y, mean, rstd = ln_kernels.add_layernorm_forward(x2, r2, weight.contiguous(),
                                                            bias.contiguous() if bias is not None else None, eps)
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.has_residual, ctx.has_bias, ctx.shape, ctx.return_sum = residual is not None, bias is not None, shape, \
            return_sum
        if not return_sum:
            return y.view(shape)
        return (s.view(shape) if residual is not None else x), y.view(shape)

    @staticmethod
    def backward(ctx, *grads):
        s, weight, mean, rstd = ctx.saved_tensors
        n = s.shape[-1]
        # outputs (s, y) or y: s's gradient comes from the residual stream
        ds_in, dy = grads if ctx.return_sum else (None, grads[0])
        dy = dy.reshape(-1, n).contiguous() if dy is not None else torch.zeros_like(s)
        ds_in = ds_in.reshape(-1, n).contiguous() if ds_in is not None else None
        ds, dw, db = ln_kernels.add_layernorm_backward(dy, s, weight.contiguous(), mean, rstd, ds_in, ctx.has_bias)
        ds = ds.view(ctx.shape)
        # s = x + residual: both get ∇s (the same tensor, as autograd's own add backward returns)
        return ds, ds if ctx.has_residual else None, dw, db, None, None
