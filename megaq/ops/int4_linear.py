"""The INT4 paper's linear layer (ALGORITHMS.md §2) as an autograd function.

Forward: the Hadamard quantizer (HQ) of both operands — `X̂ = Q4(X H)` per token, `Ŵ = Q4(W H)` per
output channel (or one LSQ step per tensor) — and `Y = X̂ Ŵᵀ (+ b)` on integer tensor cores. Only the
packed INT4 operands (+ scales, + Σq² per token row) are kept for backward.

Backward (straight-through through the quantizers), from the saved operands in Hadamard space:
  1. bit-split ∇Y into a nearest INT4 high part and a stochastic INT4 low part (2T rows);
  2. leverage scores of the 2T rows — ‖row‖ for dgrad, ‖row‖·‖X̂_t‖ for wgrad — and independent
     draws of the 1/p sampling weights for each GEMM (`megaq.quant.leverage_score_weights`:
     `keep_ratio`·2T rows expected, or every non-zero row in `drop_zero` mode);
  3. ∇X = H · (G_d Ŵ), ∇W = H · (G_wᵀ X̂) with G the sampled, reweighted rows folded per token,
     cropped to the unpadded input features.
Its expectation is the exact straight-through gradient. `megaq.kernels.int4` runs each step as fused
Triton kernels on INT8 tensor cores (and documents where that differs numerically) or as the
`megaq.quant` reference on CPU.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..quant import leverage_score_weights
from .recipe import Recipe


class Int4QuantizedLinear(torch.autograd.Function):
    """`y = x2d · weightᵀ + bias` under an INT4 recipe (one with `int4_backward`)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, recipe: Recipe):
        spec = recipe.forward
        h = spec.hadamard
        xq, x_values, x_norm_sq = kernels.hq_quantize_int4(x2d, h, _scale_mode(spec.a), recipe.check_finite)
        wq, w_values, _ = kernels.hq_quantize_int4(weight, h, _scale_mode(spec.b), recipe.check_finite)
        y = kernels.int4_mm(xq, wq, x_values, w_values, out_dtype=x2d.dtype, bias=bias)
        # Only the packed INT4 operands are kept for backward: this is the activation-memory saving.
        ctx.recipe, ctx.xq, ctx.wq, ctx.x_norm_sq = recipe, xq, wq, x_norm_sq
        ctx.in_features, ctx.has_bias = x2d.shape[1], bias is not None
        ctx.x_dtype, ctx.w_dtype = x2d.dtype, weight.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        recipe: Recipe = ctx.recipe
        lss = recipe.int4_backward
        grad_y = grad_y.contiguous()
        split = kernels.bit_split_int4(grad_y, check=recipe.check_finite)
        split_norms = split.row_norms()   # ‖row‖ of the 2T split rows, high rows first
        dgrad_weights = wgrad_weights = None
        if ctx.needs_input_grad[0]:
            dgrad_weights = leverage_score_weights(split_norms, lss.keep_ratio, lss.lss)
        if ctx.needs_input_grad[1]:
            x_norms = ctx.xq.scale.reshape(-1) * ctx.x_norm_sq.sqrt()   # ‖X̂_t‖ (per-row or per-tensor scale)
            wgrad_weights = leverage_score_weights(split_norms * torch.cat((x_norms, x_norms)),
                                                   lss.keep_ratio, lss.lss)
        grad_x, grad_w = kernels.int4_sampled_gradients(
            split, dgrad_weights, wgrad_weights, ctx.xq, ctx.wq, recipe.forward.hadamard, ctx.in_features,
            ctx.x_dtype, ctx.w_dtype)
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum(0, dtype=torch.float32).to(grad_y.dtype)
        return grad_x, grad_w, grad_b, None


def _scale_mode(operand) -> str:
    """The HQ scale of a recipe operand: "lsq" (per-tensor step) or "row" (the recipe's "max")."""
    return "lsq" if operand.scale == "lsq" else "row"
