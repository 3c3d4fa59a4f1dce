"""The quantized linear layer: `y = x Wᵀ + b` with each of its three GEMMs quantized as the recipe says.

Autograd uses the straight-through estimator through every quantizer: the backward computes the
gradients of the quantized product as if the quantizers were the identity, with the gradient GEMMs
themselves quantized (ALGORITHMS.md §1–2). GEMMs and quantizers go through `megaq.kernels`, which picks
the GPU kernel or the `megaq.quant` reference; this module never checks the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..quant import (QuantizedTensor, bit_split, block_hadamard, check_finite,
                     leverage_score_weights, leverage_scores, lsq_quantize, pad_to_multiple)
from .recipe import GemmSpec, OperandSpec, Recipe, get_recipe


def quantize_operand(x: torch.Tensor, spec: OperandSpec, check: bool, transpose: bool = False,
                     hadamard: int = 0) -> QuantizedTensor:
    """Quantize a GEMM operand `[rows, reduction]` (or `x.T` when `transpose`) per its spec, after a
    block Hadamard rotation of the reduction axis when `hadamard` > 0."""
    if spec.scale == "lsq":
        src = x.t() if transpose else x
        if check:
            check_finite(src, "quantized linear operand")
        if hadamard:
            src = block_hadamard(pad_to_multiple(src.float(), hadamard), hadamard)
        return lsq_quantize(src, spec.bits, spec.rounding)
    if hadamard:
        return kernels.hadamard_quantize(x, hadamard, spec.block, bits=spec.bits,
                                         rounding=spec.rounding, check=check, transpose=transpose)
    return kernels.quantize(x, spec.block, bits=spec.bits, rounding=spec.rounding, check=check,
                            transpose=transpose)


def quantized_gemm(a: torch.Tensor, b: torch.Tensor, spec: GemmSpec, check: bool = True,
                   transpose_a: bool = False, transpose_b: bool = False) -> torch.Tensor:
    """`A · Bᵀ` in FP32 (bf16 specs: in the inputs' dtype), both operands `[rows, reduction]`.

    `transpose_a/b` say the operand is given as its transpose `[reduction, rows]`, which lets the
    quantizer write the reduction-major layout in the same pass instead of a separate transpose."""
    if not spec.is_quantized:
        a = a.t() if transpose_a else a
        b = b.t() if transpose_b else b
        return a @ b.t()
    if spec.hadamard:
        # The rotation acts on the reduction axis (zero-padded to whole Hadamard blocks, which leaves
        # the product unchanged because both operands are padded alike); fused with the quantizer.
        qa = quantize_operand(a, spec.a, check, transpose_a, hadamard=spec.hadamard)
        qb = quantize_operand(b, spec.b, check, transpose_b, hadamard=spec.hadamard)
        return kernels.scaled_mm(qa, qb, out_dtype=torch.float32)
    qa = quantize_operand(a, spec.a, check, transpose_a)
    qb = quantize_operand(b, spec.b, check, transpose_b)
    return kernels.scaled_mm(qa, qb, out_dtype=torch.float32)


class _PerGemmQuantizedLinear(torch.autograd.Function):
    """INT8-style recipes: every GEMM requantizes its operands from the high-precision tensors."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, recipe: Recipe):
        y = quantized_gemm(x2d, weight, recipe.forward, recipe.check_finite)
        if bias is not None:
            y = y + bias.float()
        ctx.recipe = recipe
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2d, weight)
        return y.to(x2d.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x2d, weight = ctx.saved_tensors
        recipe: Recipe = ctx.recipe
        grad_y = grad_y.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # dgrad: ∇X = ∇Y · W, operands ∇Y [tokens, out] and Wᵀ [in, out]
            grad_x = quantized_gemm(grad_y, weight, recipe.dgrad, recipe.check_finite,
                                    transpose_b=True).to(x2d.dtype)
        if ctx.needs_input_grad[1]:
            # wgrad: ∇W = ∇Yᵀ · X, operands ∇Yᵀ [out, tokens] and Xᵀ [in, tokens]
            grad_w = quantized_gemm(grad_y, x2d, recipe.wgrad, recipe.check_finite,
                                    transpose_a=True, transpose_b=True).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.float().sum(0).to(grad_y.dtype)
        return grad_x, grad_w, grad_b, None


class _Int4QuantizedLinear(torch.autograd.Function):
    """The INT4 paper's linear: HQ forward; backward from the saved INT4 operands with a bit-split
    gradient and leverage score sampling, then the inverse Hadamard transform."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, recipe: Recipe):
        spec = recipe.forward
        # the Hadamard quantizer (HQ) of both operands: INT4 in Hadamard space
        xq = quantize_operand(x2d, spec.a, recipe.check_finite, hadamard=spec.hadamard)
        wq = quantize_operand(weight, spec.b, recipe.check_finite, hadamard=spec.hadamard)
        y = kernels.scaled_mm(xq, wq, out_dtype=torch.float32)
        if bias is not None:
            y = y + bias.float()
        # Only the packed INT4 operands are kept for backward: this is the activation-memory saving.
        ctx.recipe, ctx.xq, ctx.wq = recipe, xq, wq
        ctx.in_features, ctx.has_bias = x2d.shape[1], bias is not None
        ctx.x_dtype, ctx.w_dtype = x2d.dtype, weight.dtype
        return y.to(x2d.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        recipe: Recipe = ctx.recipe
        lss = recipe.int4_backward
        h = recipe.forward.hadamard
        if recipe.check_finite:
            check_finite(grad_y, "output gradient of an int4 linear")
        tokens = grad_y.shape[0]
        high, low = bit_split(grad_y.float(), check=False)
        # The 2N rows of the bit-split gradient: each is one rank-1 term of both gradient GEMMs.
        split_rows = torch.cat((high.dequantize(), low.dequantize()), 0)
        # The products run in the activations' dtype (BF16 on GPUs: tensor cores): the INT4 operands
        # and the bit-split rows are exact there up to their FP32 scales' rounding (2^-9 relative).
        compute = ctx.x_dtype
        x_hat, w_hat = ctx.xq.dequantize(compute), ctx.wq.dequantize(compute)

        def sampled_gradient(scores: torch.Tensor) -> torch.Tensor:
            weights = leverage_score_weights(scores, lss.keep_ratio, lss.lss)
            sampled = split_rows * weights[:, None]
            return (sampled[:tokens] + sampled[tokens:]).to(compute)  # fold high and low terms per token

        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            g = sampled_gradient(leverage_scores(split_rows))
            grad_x = block_hadamard(g @ w_hat, h)[:, :ctx.in_features].to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x_norms = x_hat.float().norm(dim=1)
            g = sampled_gradient(split_rows.norm(dim=1) * torch.cat((x_norms, x_norms)))
            grad_w = block_hadamard(g.t() @ x_hat, h)[:, :ctx.in_features].to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.float().sum(0).to(grad_y.dtype)
        return grad_x, grad_w, grad_b, None


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     recipe: Recipe | str) -> torch.Tensor:
    """`x [..., in] · weight[out, in]ᵀ + bias` under `recipe`; the `bf16` recipe is `F.linear` itself."""
    recipe = get_recipe(recipe)
    if not recipe.is_quantized:
        return F.linear(x, weight, bias)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"quantized_linear: input features {x.shape[-1]} != weight in_features "
                         f"{weight.shape[1]} (weight shape {tuple(weight.shape)})")
    x2d = x.reshape(-1, x.shape[-1])
    fn = _Int4QuantizedLinear if recipe.int4_backward is not None else _PerGemmQuantizedLinear
    y = fn.apply(x2d, weight, bias, recipe)
    return y.reshape(*x.shape[:-1], weight.shape[0])
