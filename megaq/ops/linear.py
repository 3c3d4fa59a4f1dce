"""The quantized linear layer: `y = x Wᵀ + b` with each of its three GEMMs quantized as the recipe says.

Autograd uses the straight-through estimator through every quantizer: the backward computes the
gradients of the quantized product as if the quantizers were the identity, with the gradient GEMMs
themselves quantized (ALGORITHMS.md §1–2). GEMMs and quantizers go through `megaq.kernels`, which picks
the GPU kernel or the `megaq.quant` reference; this module never checks the device.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .. import kernels
from ..quant import DelayedAmax, QuantizedTensor, block_hadamard, check_finite, lsq_quantize, pad_to_multiple
from . import delayed_scaling, weight_cache
from .int4_linear import Int4QuantizedLinear
from .recipe import GemmSpec, OperandSpec, Recipe, get_recipe


def quantize_operand(x: torch.Tensor, spec: OperandSpec, check: bool, transpose: bool = False,
                     hadamard: int = 0, delayed: DelayedAmax | None = None) -> QuantizedTensor:
    """Quantize a GEMM operand `[rows, reduction]` (or `x.T` when `transpose`) per its spec, after a
    block Hadamard rotation of the reduction axis when `hadamard` > 0. A "delayed" spec takes its
    scales from (and updates) the prediction `delayed` (`wgrad_delayed_states`)."""
    if spec.scale == "delayed":
        if delayed is None:
            raise ValueError("an operand with scale 'delayed' needs its prediction state (wgrad_delayed_states)")
        return kernels.hadamard_quantize_delayed(x, hadamard, delayed, bits=spec.bits, rounding=spec.rounding,
                                                 check=check, transpose=transpose)
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


def quantize_gemm_operand(x: torch.Tensor, spec: GemmSpec, side: str, check: bool,
                          transpose: bool = False, delayed: DelayedAmax | None = None) -> QuantizedTensor:
    """Operand `side` ("a" or "b") of the quantized GEMM `spec`, `[rows, reduction]` (or `x.T` when
    `transpose`): quantized per its operand spec after the GEMM's reduction-axis rotation, if any
    (zero padded to whole Hadamard blocks, which leaves the product unchanged because both operands
    are padded alike; fused with the quantizer). `delayed`: the operand's prediction, for a "delayed" spec."""
    return quantize_operand(x, getattr(spec, side), check, transpose, hadamard=spec.hadamard, delayed=delayed)


def wgrad_delayed_states(weight: torch.Tensor, recipe: Recipe,
                         in_rows: int | None = None) -> tuple[DelayedAmax | None, DelayedAmax | None]:
    """The predictions of the wgrad operands ∇Yᵀ (one per output feature) and Xᵀ (one per input
    feature, or `in_rows` where the operand is padded) of the layer owning `weight` `[out, in]`, each
    None unless its spec is "delayed"."""
    wgrad = recipe.wgrad
    a = (delayed_scaling.state_for(weight, "wgrad.a", weight.shape[0], recipe.delayed_decay)
         if wgrad.a.scale == "delayed" else None)
    b = (delayed_scaling.state_for(weight, "wgrad.b", in_rows or weight.shape[1], recipe.delayed_decay)
         if wgrad.b.scale == "delayed" else None)
    return a, b


def weight_operand(weight: torch.Tensor, spec: GemmSpec, check: bool,
                   transpose: bool = False) -> torch.Tensor | QuantizedTensor:
    """Operand B of `spec` made from a weight (`weight.T` when `transpose`): the quantized operand,
    from the cache of `megaq.ops.weight_cache` when that is on (a repeat within one optimizer step),
    or the weight itself for an unquantized GEMM."""
    if not spec.is_quantized:
        return weight

    def quantize() -> QuantizedTensor:
        return quantize_gemm_operand(weight, spec, "b", check, transpose)
    cached = weight_cache.cached_weight(weight, spec.b, spec.hadamard, transpose, quantize)
    return cached if cached is not None else quantize()


def _requantize_weight(weight, spec, hadamard, transpose):
    return quantize_operand(weight, spec, False, transpose, hadamard)


def fused_bias_sum_buffer(grad_y: torch.Tensor, wgrad: GemmSpec, wanted: bool) -> torch.Tensor | None:
    """An FP32 `[out]` buffer for the bias gradient ∇Y.sum(0) when the quantizer of the wgrad operand ∇Yᵀ
    can sum it in the same pass (`FUSE_BIAS_GRAD`, an INT8 Hadamard wgrad), else None (a torch sum).
    16-bit ∇Y only: the in-kernel sum was checked on the GPU for BF16 inputs (tools/bench_kernels.py
    bias_sum_fusion, H100); FP32 inputs keep the torch sum until the GPU tests have run on them."""
    if not (FUSE_BIAS_GRAD and wanted and grad_y.dtype in (torch.bfloat16, torch.float16)
            and wgrad.is_quantized and wgrad.hadamard and wgrad.a.scale != "lsq"):
        return None
    return torch.empty(grad_y.shape[1], dtype=torch.float32, device=grad_y.device)


def quantize_grad_y_t(grad_y: torch.Tensor, wgrad: GemmSpec, check: bool,
                      bias_sum: torch.Tensor, delayed: DelayedAmax | None = None) -> QuantizedTensor:
    """The wgrad operand ∇Yᵀ (what quantized_gemm would make), its pass also summing ∇Y's columns into
    `bias_sum` (from `fused_bias_sum_buffer`). `delayed`: its prediction, for a "delayed" spec."""
    if wgrad.a.scale == "delayed":
        return kernels.hadamard_quantize_delayed(grad_y, wgrad.hadamard, delayed, bits=wgrad.a.bits,
                                                 rounding=wgrad.a.rounding, check=check, transpose=True,
                                                 column_sums_out=bias_sum)
    return kernels.hadamard_quantize(grad_y, wgrad.hadamard, wgrad.a.block, bits=wgrad.a.bits,
                                     rounding=wgrad.a.rounding, check=check, transpose=True,
                                     column_sums_out=bias_sum)


def refresh_cached_weights() -> int:
    """Bring every stale cached weight operand up to date in place (before a CUDA graph replay)."""
    return weight_cache.refresh_stale(_requantize_weight)


def requantize_all_cached_weights() -> int:
    """Requantize every cached weight operand in place, epochs untouched (what a CUDA graph captures)."""
    return weight_cache.requantize_all(_requantize_weight)


def quantized_gemm(a: torch.Tensor | QuantizedTensor, b: torch.Tensor | QuantizedTensor, spec: GemmSpec,
                   check: bool = True, transpose_a: bool = False, transpose_b: bool = False,
                   out_dtype: torch.dtype = torch.float32,
                   bias: torch.Tensor | None = None, delayed_a: DelayedAmax | None = None,
                   delayed_b: DelayedAmax | None = None,
                   gelu_grad_of: QuantizedTensor | None = None) -> torch.Tensor:
    """`A · Bᵀ (+ bias)` in `out_dtype` (bf16 specs: in the inputs' dtype), both operands
    `[rows, reduction]`; the output conversion and the bias run in the GEMM's epilogue.

    `transpose_a/b` say the operand is given as its transpose `[reduction, rows]`, which lets the
    quantizer write the reduction-major layout in the same pass instead of a separate transpose.
    An operand may arrive already quantized for this GEMM (`quantize_gemm_operand`). `delayed_a/b`:
    the operands' predictions where their specs are "delayed" (`wgrad_delayed_states`).
    `gelu_grad_of`: the product times GELU' of this INT8 GELU input (`kernels.scaled_mm`)."""
    if not spec.is_quantized:
        a = a.t() if transpose_a else a
        b = b.t() if transpose_b else b
        out = F.linear(a, b, bias)
        if gelu_grad_of is not None:
            from ..kernels.dataflow import gelu_backward
            out = gelu_backward(gelu_grad_of, out)
        return out
    qa = a if isinstance(a, QuantizedTensor) else quantize_gemm_operand(a, spec, "a", check, transpose_a, delayed_a)
    qb = b if isinstance(b, QuantizedTensor) else quantize_gemm_operand(b, spec, "b", check, transpose_b, delayed_b)
    return kernels.scaled_mm(qa, qb, out_dtype=out_dtype, bias=bias, gelu_grad_of=gelu_grad_of)


# Quantize a tensor once for both GEMMs that read it (X: forward and wgrad; ∇Y: dgrad and wgrad)
# when both operand specs allow it (`_dual_hadamard`): one fused two-kernel call instead of two
# calls of two kernels. Measured on an H100 (docs/PERFORMANCE.md, sessions 3 and 9): the eager int8
# linear step's host time falls from 2.46 to 1.52 ms, but the dual kernels' GPU time is 1.06-1.45x the
# two single calls' (16384 rows, `tools/sweep_quantizers.py --orientations dual`, commit 6da4186). So it
# is used where host time is what costs, and not while a CUDA graph is being captured
# (train.cuda_graphs), where only GPU time remains. False: never (one quantizer call per GEMM operand,
# for benchmarking the difference).
DUAL_QUANTIZE = True
# The dual call inside CUDA graph captures too (and in graph_warmup()): off, since it measured slower
# (H100, 1.3B, micro batch 16: 62,625 tokens/s against 64,709 with the single calls, commit 6da4186).
DUAL_IN_GRAPHS = False
# The bias gradient ∇Y.sum(0) summed by the quantizer pass that reads ∇Y for the wgrad operand ∇Yᵀ
# (`kernels.hadamard_quantize(..., column_sums_out=)`, dual or single, eager or graphed) instead of a
# torch sum reading ∇Y once more. False: the torch sum (for benchmarking the difference).
FUSE_BIAS_GRAD = True
_GRAPH_WARMUP = False   # inside graph_warmup(): choose the kernels a capture would


@contextlib.contextmanager
def graph_warmup():
    """Run the quantized linears with the kernels a CUDA graph capture will launch (no dual
    quantizer), for the eager warm-up before a capture: every Triton kernel the capture needs is then
    compiled and loaded before it starts (compiling one inside a capture breaks the capture)."""
    global _GRAPH_WARMUP
    old, _GRAPH_WARMUP = _GRAPH_WARMUP, True
    try:
        yield
    finally:
        _GRAPH_WARMUP = old


def _capturing(x: torch.Tensor) -> bool:
    return _GRAPH_WARMUP or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _dual_hadamard(x: torch.Tensor, gemm: GemmSpec, side: str, gemm_t: GemmSpec, side_t: str) -> int:
    """The Hadamard block size when operand `side` of `gemm` (rows of a tensor) and operand `side_t`
    of `gemm_t` (rows of its transpose) can come from one `kernels.hadamard_quantize_dual` call: the
    same INT8 per-row max-scaled spec and rounding, the same reduction-axis rotation. Else 0."""
    spec = getattr(gemm, side)
    if (DUAL_QUANTIZE and (DUAL_IN_GRAPHS or not _capturing(x)) and gemm.hadamard and gemm.hadamard == gemm_t.hadamard and spec.fmt == "int8"
            and spec.block == (1, -1) and spec.scale == "max" and spec == getattr(gemm_t, side_t)):
        return gemm.hadamard
    return 0


class _PerGemmQuantizedLinear(torch.autograd.Function):
    """INT8-style recipes: every GEMM quantizes its operands from the high-precision tensors.

    The input is needed again only as the wgrad GEMM's B operand (`Xᵀ`, reduced over tokens), so
    the forward quantizes it for that GEMM right away and keeps only the INT8 copy: the activation
    memory of a quantized linear is its INT8 operand, not the BF16 input (and the backward has one
    quantize pass less). Where two GEMMs read the same tensor (X, or ∇Y) under the same per-row
    Hadamard spec, one dual quantizer call writes both orientations (`DUAL_QUANTIZE`)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, recipe: Recipe):
        x_operand, qx = x2d, None
        had = _dual_hadamard(x2d, recipe.forward, "a", recipe.wgrad, "b") if ctx.needs_input_grad[1] else 0
        if had:  # X for the forward GEMM and Xᵀ for wgrad from one quantizer pass over X
            spec = recipe.forward.a
            x_operand, qx = kernels.hadamard_quantize_dual(x2d, had, bits=spec.bits,
                                                           rounding=spec.rounding, check=recipe.check_finite)
        y = quantized_gemm(x_operand, weight_operand(weight, recipe.forward, recipe.check_finite),
                           recipe.forward, recipe.check_finite, out_dtype=x2d.dtype, bias=bias)
        ctx.recipe = recipe
        ctx.has_bias = bias is not None
        ctx.x_dtype = x2d.dtype
        saved_x = None
        # delayed scaling: the backward gets ∇Yᵀ's prediction from here, where `weight` is the layer's own
        ctx.delayed_a = None
        if ctx.needs_input_grad[1]:
            ctx.delayed_a, delayed_b = wgrad_delayed_states(weight, recipe)
            if recipe.wgrad.is_quantized:
                # wgrad: ∇W = ∇Yᵀ · X, operand Xᵀ [in, tokens]
                if qx is None:
                    qx = quantize_gemm_operand(x2d, recipe.wgrad, "b", recipe.check_finite, transpose=True,
                                               delayed=delayed_b)
                ctx.qx_meta = (qx.block, qx.bits, qx.shape)
                saved_x = (qx.data, qx.scale)
            else:
                saved_x = (x2d,)
        ctx.n_saved_x = 0 if saved_x is None else len(saved_x)
        ctx.save_for_backward(weight, *(saved_x or ()))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, *saved_x = ctx.saved_tensors
        recipe: Recipe = ctx.recipe
        grad_y = grad_y.contiguous()
        grad_x = grad_w = grad_b = None
        gy_rows = gy_cols = grad_y
        both = ctx.needs_input_grad[0] and ctx.needs_input_grad[1]
        had = _dual_hadamard(grad_y, recipe.dgrad, "a", recipe.wgrad, "a") if both else 0
        wgrad = recipe.wgrad
        # FP32 ∇Y.sum(0), filled by the quantizer of ∇Yᵀ
        bias_sum = fused_bias_sum_buffer(grad_y, wgrad, ctx.has_bias and ctx.needs_input_grad[2]
                                         and ctx.needs_input_grad[1])
        if had:  # ∇Y for dgrad and ∇Yᵀ for wgrad from one quantizer pass over ∇Y
            spec = recipe.dgrad.a
            gy_rows, gy_cols = kernels.hadamard_quantize_dual(
                grad_y, had, bits=spec.bits, rounding=spec.rounding, check=recipe.check_finite,
                column_sums_out=bias_sum)
        if ctx.needs_input_grad[0]:
            # dgrad: ∇X = ∇Y · W, operands ∇Y [tokens, out] and Wᵀ [in, out]
            w_operand = weight_operand(weight, recipe.dgrad, recipe.check_finite, transpose=True)
            grad_x = quantized_gemm(gy_rows, w_operand, recipe.dgrad, recipe.check_finite,
                                    transpose_b=True, out_dtype=ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            # wgrad: ∇W = ∇Yᵀ · X, operands ∇Yᵀ [out, tokens] and Xᵀ [in, tokens]
            x_operand = QuantizedTensor(*saved_x, *ctx.qx_meta) if len(saved_x) == 2 else saved_x[0]
            if bias_sum is not None and not had:
                gy_cols = quantize_grad_y_t(grad_y, wgrad, recipe.check_finite, bias_sum, ctx.delayed_a)
            grad_w = quantized_gemm(gy_cols, x_operand, recipe.wgrad, recipe.check_finite,
                                    transpose_a=True, transpose_b=True,
                                    out_dtype=weight.dtype, delayed_a=ctx.delayed_a).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            if bias_sum is None:
                bias_sum = grad_y.sum(0, dtype=torch.float32)
            grad_b = bias_sum.to(grad_y.dtype)
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
    if not torch.is_grad_enabled():
        # inside an autograd Function, needs_input_grad follows requires_grad even under no_grad: without
        # this the forward would quantize Xᵀ for a wgrad that never comes (and move delayed predictions)
        weight = weight.detach()
    fn = Int4QuantizedLinear if recipe.int4_backward is not None else _PerGemmQuantizedLinear
    y = fn.apply(x2d, weight, bias, recipe)
    return y.reshape(*x.shape[:-1], weight.shape[0])
