"""The INT8 data flow's linear layer: it reads an activation that already is its GEMM operand, keeps
that INT8 operand (not the BF16 input) for backward, and can write its output as INT8.

Design: which scales travel between operators (ALGORITHMS.md §1, issue 5)
-------------------------------------------------------------------------
The producers write exactly the forward GEMM's A operand of the recipe, so the consuming linear has
no X quantize pass. For the default `int8` recipe that is INT8 in Hadamard-128 space along the hidden
axis with one FP32 scale per token (row); for `int8_block128` it is (1, 128) tiles, unrotated.
The scales that cross an operator boundary, forward:

    residual x (BF16) --[add +] LayerNorm--> X̃ = Q(LN(x)·H), per token ---------> QKV / fc1 GEMM
    QKV GEMM --> BF16 q, k, v --> SDPA (BF16) --> out ------ quantize once ------> out-proj GEMM
    fc1 GEMM --epilogue--> INT8 (1, 128) blocks --GELU (FP32 inside)--> Q(GELU·H) per token --> fc2

- fc1's GEMM requantizes its FP32 accumulator per (1, 128) block in its epilogue (bias included);
  the GELU kernel reads that, so no BF16 copy of fc1's output is ever written. (1, 128) rather than
  per row, because the epilogue sees one 128-column tile of a row at a time.
- Saved for backward: each linear's X̃ (INT8, per-token scale), the LayerNorm's INT8 (1, 128) input
  copy + mean/rstd, the GELU's INT8 input. fc2's X̃ is not kept but rebuilt in backward from the
  GELU's input by the GELU kernel itself (`RECOMPUTE_GELU_OPERAND`, bit-identical: nearest
  rounding); with `FUSED_GELU_BACKWARD` fc2's dgrad GEMM runs the GELU's backward in its epilogue
  (∇h = ∇y · GELU'(h) from the GELU's INT8 input, which fc2 keeps anyway) and hands ∇h to the GELU
  through a `GeluGradSlot`: no BF16 ∇y is written and read back, and no GELU backward kernel runs.
  No BF16 activation is saved by the block except SDPA's own q, k, v, output (attention stays BF16).

Backward: an autograd edge carries a dense gradient of the output's shape. Each linear quantizes its
∇Y as the recipe's dgrad and wgrad specs say (stochastic rounding), exactly as `megaq.ops.linear`.
The LayerNorm and GELU backward kernels read their INT8 saved inputs; they write a BF16 gradient:
the LayerNorm's is summed into the high-precision residual gradient (issue 5: "the residual kept in
BF16/FP32"; a quantized residual gradient would only add noise where the block keeps full precision
on purpose), the GELU's is requantized by fc1's backward in its own (rotated) layouts anyway.

With `megaq.ops.dataflow.INT8_LAYERNORM_GRAD` (off by default, see there) the LayerNorm's incoming
gradient is INT8: the linear that consumed the LayerNorm's operand (QKV after ln_1, fc1 after ln_2)
has its dgrad GEMM write ∇X as INT8 per (1, 128) block with FP32 scales, stochastically rounded
(unbiased) in the epilogue, and leaves it in the operand's `grad_slot`; autograd carries a zero-stride
zero placeholder in its place, and the LayerNorm kernel reads INT8 + scales instead of BF16 (the slot
adds the INT8 values to whatever else autograd delivers when the operand had other consumers:
`Int8GradSlot`). Bytes per element of ∇X: 2 (the epilogue writes 1, the LayerNorm reads 1) against
the BF16 path's 4. (The first version handed autograd a dequantized dense copy, 5 bytes: measured
15-17% slower per block on an H100; the placeholder version is not yet measured on a GPU.)
The GELU's incoming gradient (fc2's dgrad) stays BF16.

wgrad from the saved operand. `∇W = ∇Yᵀ X` reduces over tokens, but X̃ holds X·H (rotated along
`in`, padded to C' columns). H is symmetric, orthonormal and block diagonal, so X = X̃·H: the wgrad
operand's quantizer rotates each tile of X̃ back as it loads it (`ROTATE_WGRAD_OPERAND`, the default:
INT8 values times ±1 on the tensor cores, exact, then the scale) and requantizes it along tokens (the
recipe's wgrad spec, e.g. its own Hadamard over tokens); the GEMM writes ∇W in the weight's dtype,
cut to `in` columns. (Before, and with the switch off: `∇Yᵀ X = (∇Yᵀ (X H)) H` — the GEMM reduced
over X̃ itself and its `[out, C']` result, written in the weight's 16-bit dtype, was rotated back and
cut to `in` columns in one more pass, `dataflow.rotate_back`.) For the per-row Hadamard
wgrad specs the quantizer's kernels dequantize each tile of X̃ as they load it
(`kernels.requantize_transposed`): bit for bit dequantize + quantize, without writing and reading
back the BF16 copy. (An earlier kernel that rotated the dequantized values in FP32, three BF16
products per tile, measured 1.4-1.6× slower than the two passes on the H100, session 7; this one
rotates the BF16 values with the quantizer's one product.)
Straight-through estimator through every quantizer, as
`megaq.ops.linear`: the gradients are those of the quantized product.

Alternatives weighed: per-(1, 128) producers (Jetfire-like) would make the default GEMM a
per-K-block one, measured at 0.69× the per-row × per-column GEMM on the H100 (docs/PERFORMANCE.md);
handing INT8 gradients between operators without any dense copy would need the whole
LN→fc1→GELU→fc2 chain in one autograd function — a further step, the kernels' formats allow it.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels import dataflow as dataflow_kernels
from ..quant import QuantizedTensor
from .dataflow import GeluGradSlot, Int8GradSlot, Int8Operand, carrier_like, zero_placeholder
from .linear import (fused_bias_sum_buffer, quantize_gemm_operand, quantize_grad_y_t, quantize_operand,
                     quantized_gemm, weight_operand, wgrad_delayed_states)
from .recipe import Recipe, get_recipe

INT8_OUTPUT_BLOCK = (1, 128)


def data_flow_format(recipe: Recipe | str | dict) -> tuple[int, tuple[int, int]]:
    """`(hadamard, block)`: the forward A-operand layout producers must write for `recipe`.
    Raises ValueError when the recipe cannot run the INT8 data flow, naming why."""
    recipe = get_recipe(recipe)
    fwd = recipe.forward
    if recipe.int4_backward is not None or fwd.a.fmt != "int8" or fwd.b.fmt != "int8":
        raise ValueError(f"the INT8 data flow needs an INT8 forward GEMM; recipe {recipe.name!r} has "
                         f"forward operands {fwd.a.fmt}/{fwd.b.fmt}"
                         + (" with the INT4 backward" if recipe.int4_backward is not None else ""))
    if fwd.a.scale != "max" or fwd.a.rounding != "nearest":
        raise ValueError(f"the INT8 data flow needs max-scaled, nearest-rounded activations; recipe "
                         f"{recipe.name!r} has forward.a scale={fwd.a.scale!r}, rounding={fwd.a.rounding!r}")
    block = tuple(fwd.a.block)
    if fwd.hadamard:
        if block != (1, -1):
            raise ValueError(f"the INT8 data flow with a Hadamard forward needs one scale per token "
                             f"(forward.a.block [1, -1]); recipe {recipe.name!r} has {list(block)}")
    elif block[0] != 1 or block[1] == -1:
        raise ValueError(f"the INT8 data flow without a Hadamard forward needs (1, k) activation tiles "
                         f"(forward.a.block [1, k]); recipe {recipe.name!r} has {list(block)}")
    return fwd.hadamard, block


# True (default): the wgrad GEMM reads X itself, not X̃ = X·H: its operand quantizer rotates each tile
# of the saved X̃ back as it loads it (`kernels.requantize_transposed(..., rotate_back=True)`: the INT8
# values times ±1 on the tensor cores, exact), so ∇W comes out of the GEMM in the weight's dtype, with
# no rotation pass over it and one rounding. False: the GEMM reduces over X̃ into ∇W̃ and
# `dataflow.rotate_back` takes the result back (the design described above). Read in backward.
ROTATE_WGRAD_OPERAND = True


def _wgrad_input_operand(xq: QuantizedTensor, recipe: Recipe, dtype: torch.dtype, delayed_b,
                         rotate_back: int = 0):
    """The wgrad GEMM's operand Xᵀ from the saved X̃ (read as its dequantization to `dtype`; with
    `rotate_back` the dequantization's rows rotated by that Hadamard block, i.e. X): quantized
    straight from the INT8 payload (`kernels.requantize_transposed`, no dequantized copy written) where
    the wgrad's B spec is the per-row Hadamard INT8 one that computes (with `rotate_back`: over the
    same block size); otherwise the dequantized (rotated) X̃, which `quantized_gemm` quantizes per its
    spec."""
    wgrad = recipe.wgrad
    b = wgrad.b
    if (wgrad.is_quantized and wgrad.hadamard and b.fmt == "int8" and tuple(b.block) == (1, -1)
            and b.scale in ("max", "delayed") and rotate_back in (0, wgrad.hadamard)):
        return kernels.requantize_transposed(xq, wgrad.hadamard, dtype, state=delayed_b if b.scale == "delayed"
                                             else None, rounding=b.rounding, check=recipe.check_finite,
                                             rotate_back=bool(rotate_back))
    if rotate_back:
        from ..quant import block_hadamard
        return block_hadamard(kernels.dequantize(xq, torch.float32), rotate_back).to(dtype)
    return kernels.dequantize(xq, dtype)


class _DataFlowLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xq, hadamard, weight, bias, recipe: Recipe, int8_output, box,
                grad_slot: Int8GradSlot | None, source: QuantizedTensor | None, gelu_slot: GeluGradSlot | None,
                source_round_to: torch.dtype | None):
        in_features = weight.shape[1]
        spec = recipe.forward
        if xq is None:
            # a BF16 input (the attention output): quantized once, and only the INT8 copy is kept
            xq = quantize_operand(x.reshape(-1, in_features), spec.a, recipe.check_finite,
                                  hadamard=spec.hadamard)
        wq = weight_operand(weight, spec, recipe.check_finite)
        out_shape = (*x.shape[:-1], weight.shape[0])
        if int8_output:
            box.append(kernels.scaled_mm(xq, wq, out_dtype=torch.int8, bias=bias,
                                         out_block=INT8_OUTPUT_BLOCK))
            y = carrier_like(out_shape, x.dtype, x.device)
        else:
            y = kernels.scaled_mm(xq, wq, out_dtype=x.dtype, bias=bias).view(out_shape)
        # wgrad reads X̃; where X̃ is recomputable from a tensor its producer keeps anyway (the GELU's
        # INT8 input, `Int8Operand.source`), keep that one instead and rebuild X̃ in backward
        kept = source if source is not None else xq
        ctx.save_for_backward(kept.data, kept.scale, weight)
        ctx.xq_meta = (kept.block, kept.bits, kept.shape)
        ctx.rebuild_format = (hadamard, xq.block, source_round_to) if source is not None else None
        ctx.gelu_slot = gelu_slot if source is not None else None
        ctx.recipe, ctx.hadamard, ctx.has_bias = recipe, hadamard, bias is not None
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        # INT8 ∇X only where the dgrad GEMM is an integer one
        ctx.grad_slot = grad_slot if recipe.dgrad.is_quantized else None
        # delayed scaling: the wgrad operands' predictions (Xᵀ's rows: X̃'s padded features)
        ctx.delayed = wgrad_delayed_states(weight, recipe, in_rows=xq.shape[1]) if ctx.needs_input_grad[3] \
            else (None, None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        data, scale, weight = ctx.saved_tensors
        recipe: Recipe = ctx.recipe
        in_features = weight.shape[1]
        grad_y = grad_y.reshape(-1, weight.shape[0]).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # dgrad: ∇X = ∇Y · W, operands ∇Y [tokens, out] and Wᵀ [in, out]
            w_operand = weight_operand(weight, recipe.dgrad, recipe.check_finite, transpose=True)
            if ctx.grad_slot is None:
                # the activation dtype from the GEMM's epilogue (the same rounding as a cast of its FP32
                # output, without writing FP32 and reading it back)
                if ctx.gelu_slot is None:
                    grad_x = quantized_gemm(grad_y, w_operand, recipe.dgrad, recipe.check_finite,
                                            transpose_b=True, out_dtype=ctx.x_dtype).view(ctx.x_shape)
                else:
                    # the GELU's backward too, in the dgrad GEMM's epilogue (∇h = ∇y · GELU'(h), h the
                    # GELU's INT8 input that fc2 keeps as its `source`): autograd carries a zero
                    # placeholder to the GELU, whose backward takes ∇h from the slot
                    dh = quantized_gemm(grad_y, w_operand, recipe.dgrad, recipe.check_finite, transpose_b=True,
                                        out_dtype=ctx.x_dtype,
                                        gelu_grad_of=QuantizedTensor(data, scale, *ctx.xq_meta))
                    grad_x = zero_placeholder(ctx.x_shape, ctx.x_dtype, grad_y.device)
                    ctx.gelu_slot.put(dh, grad_x)
            else:
                # INT8 ∇X from the epilogue, for the LayerNorm's backward through the slot; autograd
                # carries a zero placeholder (no memory), which the slot accounts for (Int8GradSlot)
                g_operand = quantize_gemm_operand(grad_y, recipe.dgrad, "a", recipe.check_finite)
                grad_q = kernels.scaled_mm(g_operand, w_operand, out_dtype=torch.int8,
                                           out_block=INT8_OUTPUT_BLOCK, out_rounding="stochastic")
                grad_x = zero_placeholder(ctx.x_shape, ctx.x_dtype, grad_y.device)
                ctx.grad_slot.put(grad_q, grad_x)
        bias_sum = None   # FP32 ∇Y.sum(0), from the pass that quantizes ∇Yᵀ for the wgrad (as megaq.ops.linear)
        if ctx.needs_input_grad[3]:
            # wgrad from the saved operand: ∇Yᵀ · X̃ over tokens, then H back on the [out, C'] result
            xq = QuantizedTensor(data, scale, *ctx.xq_meta)
            if ctx.rebuild_format is not None:
                xq = dataflow_kernels.gelu_quantize(xq, *ctx.rebuild_format)
            wgrad = recipe.wgrad
            bias_sum = fused_bias_sum_buffer(grad_y, wgrad, ctx.has_bias and ctx.needs_input_grad[4])
            delayed_a, delayed_b = ctx.delayed
            gy_cols = grad_y if bias_sum is None else quantize_grad_y_t(grad_y, wgrad, recipe.check_finite, bias_sum,
                                                                        delayed_a)
            rotate_operand = ctx.hadamard if ROTATE_WGRAD_OPERAND else 0
            operand = _wgrad_input_operand(xq, recipe, ctx.x_dtype, delayed_b, rotate_operand)
            # ∇W (or, rotated after, ∇W̃) in the weight's dtype from the GEMM's epilogue. ∇W̃'s 16-bit
            # rounding before the rotation halves the bytes the rotation moves; it makes ∇W's error 1.4x
            # that of one BF16 rounding (relative Frobenius, 2.3e-3 against 1.7e-3 on heavy-tailed
            # inputs), far below the INT8 product's own.
            grad_w = quantized_gemm(gy_cols, operand, wgrad, recipe.check_finite, transpose_a=True, transpose_b=True,
                                    out_dtype=weight.dtype, delayed_a=delayed_a, delayed_b=delayed_b)
            if ctx.hadamard and not rotate_operand:
                grad_w = dataflow_kernels.rotate_back(grad_w, ctx.hadamard, in_features, weight.dtype)
            elif grad_w.shape[1] != in_features:
                grad_w = grad_w[:, :in_features].contiguous()   # the Hadamard padding's columns
        if ctx.has_bias and ctx.needs_input_grad[4]:
            if bias_sum is None:
                bias_sum = grad_y.sum(0, dtype=torch.float32)   # FP32 sums, no FP32 copy of ∇Y
            grad_b = bias_sum.to(grad_y.dtype)
        return grad_x, None, None, grad_w, grad_b, None, None, None, None, None, None, None


def dataflow_linear(x: torch.Tensor | Int8Operand, weight: torch.Tensor, bias: torch.Tensor | None,
                    recipe: Recipe | str | dict, *, int8_output: bool = False):
    """`x · weightᵀ + bias` under an INT8 `recipe` (one `data_flow_format` accepts), saving only the
    INT8 operand of `x` for backward.

    `x` is an `Int8Operand` in the recipe's operand format (a LayerNorm or GELU producer's output:
    no quantize pass here) or a plain tensor (quantized here, once). Returns a tensor in the
    activation dtype, or with `int8_output` an unrotated `Int8Operand` of INT8 (1, 128) blocks
    written by the GEMM's epilogue (fc1 feeding the GELU). When `x` carries a `grad_slot` (a
    LayerNorm producer's), the dgrad GEMM writes ∇X as INT8 (1, 128) blocks, stochastically rounded,
    into it as well (see the module doc)."""
    recipe = get_recipe(recipe)
    hadamard, block = data_flow_format(recipe)
    if isinstance(x, Int8Operand):
        expected = (1, x.q.shape[1]) if block == (1, -1) else block
        if x.hadamard != hadamard or x.q.block != expected or x.q.bits != 8:
            raise ValueError(f"dataflow_linear: the input operand (hadamard={x.hadamard}, block="
                             f"{x.q.block}, bits={x.q.bits}) is not recipe {recipe.name!r}'s forward "
                             f"operand (hadamard={hadamard}, block={expected}, bits=8)")
        value, xq, grad_slot, source, gelu_slot = x.carrier, x.q, x.grad_slot, x.source, x.gelu_slot
        source_round_to = x.source_round_to
    else:
        value, xq, grad_slot, source, gelu_slot, source_round_to = x, None, None, None, None, None
    if value.shape[-1] != weight.shape[1]:
        raise ValueError(f"dataflow_linear: input features {value.shape[-1]} != weight in_features "
                         f"{weight.shape[1]} (weight shape {tuple(weight.shape)})")
    box: list = []
    y = _DataFlowLinear.apply(value, xq, hadamard, weight, bias, recipe, bool(int8_output), box,
                              grad_slot, source, gelu_slot, source_round_to)
    return Int8Operand(y, box[0], 0) if int8_output else y
