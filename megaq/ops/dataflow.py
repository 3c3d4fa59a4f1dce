"""INT8 data flow between the memory-bound operators (ALGORITHMS.md §1, issue 5): LayerNorm and GELU
that write INT8 per block and keep only INT8 copies of their inputs for backward.

This is the reference (any device, quantizers through `megaq.kernels`); the fused GPU kernels of issue 5
are to be tested against it.

Values that cross an operator boundary are `Int8Activation(value, q)`:

- `q` is the truth: a `QuantizedTensor` `[rows, C]` (rows = all leading dims flattened), INT8 payload
  plus FP32 block scales, rounded to nearest. A following quantized linear (or `int8_gelu`) may consume
  it directly instead of requantizing.
- `value` is `q.dequantize()` in the input's dtype and shape, attached to autograd: it is what carries
  gradients back into the operator. In BF16 it may differ from `q` by BF16 rounding (an INT8 value
  times an FP32 scale is not always a BF16 number); consumers that read `q` see the exact values.

Both are produced by the same forward; `value` is a plain tensor, so the pair also works with any
unquantized consumer (`y.value`).

Backward, both operators: the incoming gradient is quantized to INT8 per block with stochastic rounding
(unbiased, ALGORITHMS.md §1) before use; the math runs in FP32 on the dequantized saved INT8 input.
The gradient they return is not quantized by default (`quantize_grad_input=False`): the LayerNorm's
flows into the high-precision residual gradient, and the GELU's into fc1's backward, whose recipe
requantizes it in its own layout (per block or after a Hadamard rotation) anyway — quantizing twice
adds noise and buys nothing in the reference. With `quantize_grad_input=True` it is SR-quantized
per block too (what a kernel writing an INT8 gradient computes).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import kernels
from ..kernels import dataflow as dataflow_kernels
from ..kernels.dataflow import gelu_tanh, gelu_tanh_grad
from ..kernels.dataflow import layernorm_backward_math as layernorm_backward
from ..kernels.dataflow import layernorm_forward_math
from ..quant import QuantizedTensor, check_finite


class Int8Activation(NamedTuple):
    """An activation in the INT8 data flow: `value` (autograd, dequantized, input's shape and dtype)
    and `q` (the INT8 payload + FP32 block scales `[rows, C]` the value came from)."""

    value: torch.Tensor
    q: QuantizedTensor


def _quantize(x2d: torch.Tensor, block, rounding: str, generator, check: bool) -> QuantizedTensor:
    return kernels.quantize(x2d, tuple(block), bits=8, rounding=rounding, generator=generator,
                            check=check)


def _sr_grad(grad: torch.Tensor, block, generator, check: bool, name: str) -> torch.Tensor:
    """The incoming gradient as the INT8 kernel sees it: SR-quantized per block, FP32 `[rows, C]`."""
    g2d = grad.reshape(-1, grad.shape[-1])
    if check:
        check_finite(g2d, name)
    return _quantize(g2d.contiguous(), block, "stochastic", generator, False).dequantize(torch.float32)


def _maybe_quantize_grad_input(g: torch.Tensor, quantize: bool, block, generator) -> torch.Tensor:
    if not quantize:
        return g
    return _quantize(g, block, "stochastic", generator, False).dequantize(torch.float32)


# --------------------------------------------------------------------------------------------------
# LayerNorm
class _Int8LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, block, check, quantize_grad_input, generator, out_box):
        C = x.shape[-1]
        x2d = x.reshape(-1, C)
        if check:
            check_finite(x2d, "int8_layernorm input")
        y, mean, rstd = layernorm_forward_math(x2d, weight, bias, eps)
        qy = _quantize(y, block, "nearest", None, check)
        # Saved for backward: the INT8 copy of the input (not the BF16/FP32 input) + per-row stats.
        xq = _quantize(x2d.contiguous(), block, "nearest", None, False)
        w = weight if weight is not None else torch.empty(0, device=x.device)
        ctx.save_for_backward(xq.data, xq.scale, mean, rstd, w)
        ctx.xq_meta = (xq.block, xq.shape)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.block, ctx.check, ctx.generator = block, check, generator
        ctx.quantize_grad_input = quantize_grad_input
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.w_dtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else None)
        out_box.append(qy)
        return qy.dequantize(x.dtype).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        data, scale, mean, rstd, w = ctx.saved_tensors
        block_used, shape = ctx.xq_meta
        x_hat = QuantizedTensor(data, scale, block_used, 8, shape).dequantize(torch.float32)
        g = _sr_grad(grad_out, ctx.block, ctx.generator, ctx.check,
                     "output gradient of int8_layernorm")
        dx, dw, db = layernorm_backward(x_hat, mean, rstd, w.float() if ctx.has_weight else None, g)
        dx = _maybe_quantize_grad_input(dx, ctx.quantize_grad_input, ctx.block, ctx.generator)
        grad_x = dx.to(ctx.x_dtype).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = dw.to(ctx.w_dtype) if ctx.has_weight and ctx.needs_input_grad[1] else None
        grad_b = db.to(ctx.w_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def int8_layernorm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, block: tuple[int, int] = (1, 128), check: bool = True,
                   quantize_grad_input: bool = False,
                   generator: torch.Generator | None = None) -> Int8Activation:
    """LayerNorm over the last dim of `x` (BF16/FP32, the high-precision residual) computed in FP32,
    output quantized to INT8 per `block` (nearest) over `[rows, C]`.

    Saves for backward only the INT8 copy of `x` (same block, nearest) and per-row FP32 mean/rstd.
    Backward: the incoming gradient SR-quantized per block, the LayerNorm gradient computed from the
    dequantized saved input with the saved statistics. `generator` drives the stochastic rounding
    (reproducible draws). NaN/Inf in `x` (or in the incoming gradient) raises `NonFiniteError`."""
    box: list = []
    value = _Int8LayerNorm.apply(x, weight, bias, float(eps), tuple(block), check,
                                 quantize_grad_input, generator, box)
    return Int8Activation(value, box[0])


# --------------------------------------------------------------------------------------------------
# GELU (tanh approximation, GPT-2)
class _Int8Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, xq_data, xq_scale, meta, block, check, quantize_grad_input, generator,
                out_box):
        xq = QuantizedTensor(xq_data, xq_scale, *meta)
        y = gelu_tanh(xq.dequantize(torch.float32))
        qy = _quantize(y, block, "nearest", None, False)   # finite: GELU of finite INT8 values
        ctx.save_for_backward(xq_data, xq_scale)           # only the INT8 input
        ctx.meta, ctx.block, ctx.check, ctx.generator = meta, block, check, generator
        ctx.quantize_grad_input = quantize_grad_input
        ctx.shape, ctx.dtype = value.shape, value.dtype
        out_box.append(qy)
        return qy.dequantize(value.dtype).reshape(value.shape)

    @staticmethod
    def backward(ctx, grad_out):
        data, scale = ctx.saved_tensors
        x_hat = QuantizedTensor(data, scale, *ctx.meta).dequantize(torch.float32)
        g = _sr_grad(grad_out, ctx.block, ctx.generator, ctx.check, "output gradient of int8_gelu")
        dx = _maybe_quantize_grad_input(gelu_tanh_grad(x_hat) * g, ctx.quantize_grad_input,
                                        ctx.block, ctx.generator)
        return (dx.to(ctx.dtype).reshape(ctx.shape), None, None, None, None, None, None, None, None)


def int8_gelu(x: Int8Activation | torch.Tensor, block: tuple[int, int] = (1, 128), check: bool = True,
              quantize_grad_input: bool = False,
              generator: torch.Generator | None = None) -> Int8Activation:
    """GELU (tanh approximation) reading INT8, computing in FP32, writing INT8 per `block` (nearest).

    `x` is an `Int8Activation` (its `q` is read as is, no requantization; gradients flow to its
    `value`) or a plain tensor, quantized here per `block` (nearest; NaN/Inf raises `NonFiniteError`).
    Saves only the INT8 input; backward is `GELU'(dequantized input) · SR-quantized incoming
    gradient`."""
    if isinstance(x, Int8Activation):
        value, xq = x.value, x.q
        if xq.bits != 8 or xq.shape != (value.reshape(-1, value.shape[-1]).shape):
            raise ValueError(f"int8_gelu: Int8Activation payload {xq!r} does not match its value of "
                             f"shape {tuple(value.shape)}")
    else:
        value = x
        x2d = x.reshape(-1, x.shape[-1])
        if check:
            check_finite(x2d, "int8_gelu input")
        xq = _quantize(x2d.contiguous(), block, "nearest", None, False)
    box: list = []
    out = _Int8Gelu.apply(value, xq.data, xq.scale, (xq.block, xq.bits, xq.shape), tuple(block),
                          check, quantize_grad_input, generator, box)
    return Int8Activation(out, box[0])


# --------------------------------------------------------------------------------------------------
# Producers of GEMM operands (the model's data flow; design in megaq/ops/dataflow_linear.py)

# True: the LayerNorm backward reads the INT8 gradient that the consuming linear's dgrad GEMM wrote
# from its epilogue (issue 5: "LayerNorm backward reading the INT8 saved input and INT8 incoming
# gradient"). False (default): the BF16-gradient path (the dgrad GEMM writes BF16, the LayerNorm
# reads it). Off by default: its first version (a dense dequantized copy for autograd beside the INT8
# one) measured slower and larger on an H100 (tools/bench_block.py, one block fwd+bwd, 16384 tokens:
# 16.8 vs 14.4 ms, peak memory 1.37× vs 1.24× BF16 at width 1600; 47.9 vs 42.2 ms at 4096); the
# current one hands autograd a zero placeholder instead (`Int8GradSlot`) and awaits its GPU
# measurement. Read when the LayerNorm's forward runs.
INT8_LAYERNORM_GRAD = False


# True (default): fc2 does not keep its INT8 input (the GELU output, 1 byte per MLP hidden unit and
# token) for its wgrad; its backward recomputes it from the GELU's saved INT8 input with the forward's
# own kernel, bit for bit (`Int8Operand.source`). It costs one GELU forward kernel per block in the
# backward (0.52 ms at width 4096 × 16,384 tokens on an H100, ~1.4% of the block) and saves 4 of the
# data flow's ~21 saved bytes per token and hidden unit. False: fc2 keeps its INT8 input. Read when
# the GELU's forward runs.
RECOMPUTE_GELU_OPERAND = True


# True (default): with BF16 activations the GELU's output is rounded to BF16 before it is rotated and
# quantized for fc2 — what a BF16 model's GELU writes and the per-linear int8 recipe quantizes — which
# the kernel then rotates exactly with one BF16 tensor-core product instead of two (hi + lo parts of
# the FP32 value). False: the FP32 GELU output is rotated (two products). Read when the GELU's forward
# runs; fc2's rebuild in backward uses the forward's choice (`Int8Operand.source_round_to`).
GELU_OUTPUT_BF16 = True
# The same for the LayerNorm's output (qkv's and fc1's operand): True (default) rounds it to BF16
# before the rotation, with BF16 activations, as a BF16 model's LayerNorm writes it. Read when the
# LayerNorm's forward runs.
LAYERNORM_OUTPUT_BF16 = True

# True (default, with RECOMPUTE_GELU_OPERAND): fc2's backward computes the GELU's backward as well, in
# its dgrad GEMM's epilogue (`kernels.scaled_mm(..., gelu_grad_of=h)`: the GELU's INT8 input h, which
# fc2 keeps anyway, read there), and hands the result to the GELU's backward through a `GeluGradSlot`:
# the BF16 gradient of the GELU's output is never written, and no GELU backward kernel runs. (A first
# version fused the GELU's backward into the Triton kernel that rebuilds fc2's operand instead:
# slower than the two kernels on an H100, 1.21-1.36 ms against 0.97 at 16384 x 16384.) Read when the
# GELU's forward runs.
FUSED_GELU_BACKWARD = True


def _is_placeholder(grad: torch.Tensor, placeholder: torch.Tensor | None, version: int | None) -> bool:
    """Whether autograd delivered exactly `placeholder` (same storage, shape, strides, dtype and
    version counter), i.e. nothing was added to it or written into it on the way."""
    return (placeholder is not None and grad.data_ptr() == placeholder.data_ptr()
            and grad.shape == placeholder.shape and grad.stride() == placeholder.stride()
            and grad.dtype == placeholder.dtype and grad._version == version)


def zero_placeholder(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero gradient of `shape` that takes no memory (one zero, zero strides): what a backward hands
    autograd where the real gradient travels through a slot."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


class GeluGradSlot:
    """Hands the GELU's input gradient from fc2's backward to the GELU's backward
    (`FUSED_GELU_BACKWARD`). fc2 computes ∇h = GELU'(h)·∇y itself, in its dgrad GEMM's epilogue (it
    keeps the GELU's INT8 input h anyway), `put`s ∇h here and hands autograd a zero placeholder for ∇y
    (no memory: ∇y is never written). The GELU's backward then `take`s the slot's ∇h,
    plus GELU'(h)·(whatever else autograd delivered) when it is not the untouched placeholder (other
    consumers of the GELU's output: the backward is linear in ∇y). As `Int8GradSlot`: not valid
    where something between fc2 and the GELU scales gradients; one slot per GELU forward call."""

    __slots__ = ("_dh", "_placeholder", "_version")

    def __init__(self):
        self._dh = self._placeholder = self._version = None

    def put(self, dh: torch.Tensor, placeholder: torch.Tensor) -> None:
        if self._dh is not None:
            raise RuntimeError("GeluGradSlot: a second gradient for one GELU output (one consumer per slot)")
        self._dh, self._placeholder, self._version = dh, placeholder, placeholder._version

    def take(self, grad: torch.Tensor, h_q: QuantizedTensor) -> torch.Tensor:
        """The GELU's input gradient `[rows, N]` for the incoming `grad`."""
        dh, placeholder, version = self._dh, self._placeholder, self._version
        self._dh = self._placeholder = self._version = None
        grad2d = grad.reshape(-1, grad.shape[-1])
        if dh is None:
            return dataflow_kernels.gelu_backward(h_q, grad2d)
        if _is_placeholder(grad, placeholder, version):
            return dh
        return dh + dataflow_kernels.gelu_backward(h_q, grad2d.to(dh.dtype))


class Int8GradSlot:
    """Hands INT8 gradients from data-flow linears' backwards to the backward of the LayerNorm whose
    operand they consumed — autograd edges carry dense tensors only.

    One slot per LayerNorm forward call, referenced by that call's autograd node and by the
    `Int8Operand` it returns (so a slot never outlives or crosses micro batches or blocks). A linear
    `put`s its ∇X as INT8 (1, 128) blocks + FP32 scales (stochastically rounded in the dgrad GEMM's
    epilogue) and hands autograd a zero placeholder instead of the dense values: a zero-stride
    tensor, no memory, no traffic. Whatever autograd delivers to the LayerNorm is then the sum of the
    operand's other gradients (none, usually) and zeros, so `take` returns exactly the incoming
    gradient: the INT8 ∇X itself when what arrives *is* the one placeholder, unchanged (same storage,
    shape, strides, version counter) — the LayerNorm kernel reads INT8; otherwise (a second consumer,
    a hook's replacement) the arriving dense gradient plus the INT8 parts' values. The slot is
    emptied either way. Not valid where something between the linear and the LayerNorm scales or
    mixes gradients non-additively (a TP all-reduce of per-rank parts): the model drops the slot there
    (`megaq.models.transformer`)."""

    __slots__ = ("_parts", "_placeholder", "_version")

    def __init__(self):
        self._parts: list[QuantizedTensor] = []
        self._placeholder = self._version = None

    def put(self, q: QuantizedTensor, placeholder: torch.Tensor) -> None:
        self._parts.append(q)
        self._placeholder, self._version = placeholder, placeholder._version

    def take(self, grad: torch.Tensor) -> QuantizedTensor | torch.Tensor:
        """The LayerNorm's incoming gradient `[rows, C]`: the INT8 ∇X, or a dense FP32 tensor."""
        parts, placeholder, version = self._parts, self._placeholder, self._version
        self._parts, self._placeholder, self._version = [], None, None
        if len(parts) == 1 and _is_placeholder(grad, placeholder, version):
            return parts[0]
        dense = grad.reshape(-1, grad.shape[-1])
        if not parts:
            return dense
        dense = dense.float()
        for q in parts:
            dense = dense + kernels.dequantize(q, torch.float32)
        return dense


class Int8Operand(NamedTuple):
    """An activation that exists only as INT8, in the layout its consuming GEMM reads.

    `q` `[rows, C']`: INT8 payload + FP32 scales. With `hadamard` > 0 each row of the activation was
    zero-padded to whole Hadamard blocks (C' ≥ C) and rotated by the orthonormal block Hadamard
    before quantization (the default recipe's forward A operand, one scale per token); with
    `hadamard` 0 the values are unrotated, C' = C (e.g. fc1's (1, 128)-block GEMM epilogue output).

    `carrier` has the activation's logical shape and dtype and is attached to autograd: consumers
    take it as an input so that the activation's gradient flows back to the producer. It holds no
    data (one NaN broadcast over the shape, so any accidental use as a value is loud, never silently
    wrong); `dequantize()` gives the values.

    `grad_slot`: set by a LayerNorm producer (with `INT8_LAYERNORM_GRAD`) — where the consuming
    data-flow linear leaves its INT8 ∇X for the LayerNorm's backward (`Int8GradSlot`).

    `source`: set by the GELU producer (with `RECOMPUTE_GELU_OPERAND`) — the INT8 input `q` is a
    deterministic function of (`gelu_quantize(source, hadamard, block)`, nearest rounding). The
    consuming linear then keeps `source` for its wgrad instead of `q` and rebuilds `q` in backward:
    the GELU keeps `source` anyway, so fc2 saves no bytes of its own.

    `gelu_slot`: set with `source` (with `FUSED_GELU_BACKWARD`) — where the consuming linear leaves
    the GELU's input gradient, computed in its dgrad GEMM (`GeluGradSlot`).

    `source_round_to`: with `source`, the `round_to` of that `gelu_quantize` (`GELU_OUTPUT_BF16`)."""

    carrier: torch.Tensor
    q: QuantizedTensor
    hadamard: int
    grad_slot: Int8GradSlot | None = None
    source: QuantizedTensor | None = None
    gelu_slot: GeluGradSlot | None = None
    source_round_to: torch.dtype | None = None

    @property
    def features(self) -> int:
        return self.carrier.shape[-1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The activation's values `[..., C]` (rotated back when `hadamard`)."""
        from ..quant import block_hadamard
        v = self.q.dequantize(torch.float32)
        if self.hadamard:
            v = block_hadamard(v, self.hadamard)
        return v[:, :self.features].reshape(self.carrier.shape).to(dtype)


def carrier_like(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The autograd handle of an `Int8Operand`: no storage beyond one NaN."""
    return torch.full((), float("nan"), dtype=dtype, device=device).expand(shape)


def _qt_meta(q: QuantizedTensor):
    return q.block, q.bits, q.shape


class _LayerNormOperand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, hadamard, block, check, box, grad_slot, carry):
        C = x.shape[-1]
        round_to = torch.bfloat16 if LAYERNORM_OUTPUT_BF16 and x.dtype == torch.bfloat16 else None
        out = dataflow_kernels.layernorm_quantize(
            x.reshape(-1, C), weight, bias, eps, hadamard, block,
            residual=residual.reshape(-1, C) if residual is not None else None, check=check, round_to=round_to)
        w = weight if weight is not None else x.new_empty(0)
        ctx.save_for_backward(out.x_q.data, out.x_q.scale, out.mean, out.rstd, w)
        ctx.x_meta = _qt_meta(out.x_q)
        ctx.has_residual, ctx.has_weight, ctx.has_bias = residual is not None, weight is not None, bias is not None
        ctx.shape, ctx.x_dtype = x.shape, x.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        ctx.grad_slot = grad_slot
        ctx.stream_out = residual is not None or carry
        box.append(out.y_q)
        carrier = carrier_like(x.shape, x.dtype, x.device)
        if not ctx.stream_out:
            return carrier
        # the residual stream goes on from here: x + residual, or x itself (`carry`)
        return (out.x_sum.view(x.shape) if residual is not None else x), carrier

    @staticmethod
    def backward(ctx, *grads):
        data, scale, mean, rstd, w = ctx.saved_tensors
        x_q = QuantizedTensor(data, scale, *ctx.x_meta)
        C = ctx.shape[-1]
        grad_sum = grads[0].reshape(-1, C) if ctx.stream_out else None
        grad_y = ctx.grad_slot.take(grads[-1]) if ctx.grad_slot is not None else grads[-1].reshape(-1, C)
        dx, dw, db = dataflow_kernels.layernorm_backward(x_q, mean, rstd, w if ctx.has_weight else None,
                                                         grad_y, grad_sum, out_dtype=ctx.x_dtype)
        dx = dx.view(ctx.shape)
        grad_w = dw.to(w.dtype) if ctx.has_weight and ctx.needs_input_grad[2] else None
        grad_b = db.to(ctx.b_dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, dx if ctx.has_residual else None, grad_w, grad_b, None, None, None, None, None, None, None


def layernorm_operand(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      eps: float, hadamard: int, block: tuple[int, int], *,
                      residual: torch.Tensor | None = None, carry: bool = False, check: bool = True):
    """LayerNorm of `x` (the BF16/FP32 residual stream; `x + residual` when `residual` is given,
    fused) written straight into the consuming GEMM's INT8 operand format `(hadamard, block)`.

    Returns the `Int8Operand`, or `(x + residual, Int8Operand)` with a residual, or `(x, Int8Operand)`
    with `carry` (no residual): the residual stream carried on through this op, so that its later
    gradient is added inside the LayerNorm's backward kernel instead of by autograd after it (one
    pass over the stream's gradient fewer). Saved for backward:
    the INT8 (1, 128) copy of the LayerNorm input and per-row FP32 mean/rstd only. Backward: the
    LayerNorm gradient from the dequantized saved input (FP32 inside), with the residual stream's
    gradient added in the same pass; it is returned to both `x` and `residual`, in `x`'s dtype.
    The incoming gradient is read as INT8 + scales when the consuming data-flow linear left it in
    the operand's `grad_slot` (`INT8_LAYERNORM_GRAD`), else as the dense gradient autograd brings."""
    box: list = []
    slot = Int8GradSlot() if INT8_LAYERNORM_GRAD else None
    out = _LayerNormOperand.apply(x, residual, weight, bias, float(eps), int(hadamard), tuple(block),
                                  bool(check), box, slot, bool(carry))
    if residual is None and not carry:
        return Int8Operand(out, box[0], int(hadamard), slot)
    x_sum, carrier = out
    return x_sum, Int8Operand(carrier, box[0], int(hadamard), slot)


class _GeluOperand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, carrier, h_data, h_scale, h_meta, hadamard, block, box, slot, round_to):
        h_q = QuantizedTensor(h_data, h_scale, *h_meta)
        box.append(dataflow_kernels.gelu_quantize(h_q, hadamard, block, round_to))
        ctx.save_for_backward(h_data, h_scale)       # only the INT8 input
        ctx.h_meta, ctx.shape, ctx.slot = h_meta, carrier.shape, slot
        return carrier_like(carrier.shape, carrier.dtype, carrier.device)

    @staticmethod
    def backward(ctx, grad):
        data, scale = ctx.saved_tensors
        h_q = QuantizedTensor(data, scale, *ctx.h_meta)
        if ctx.slot is not None:
            dh = ctx.slot.take(grad, h_q)
        else:
            dh = dataflow_kernels.gelu_backward(h_q, grad.reshape(-1, ctx.shape[-1]))
        return dh.view(ctx.shape), None, None, None, None, None, None, None, None


def gelu_operand(h: Int8Operand, hadamard: int, block: tuple[int, int]) -> Int8Operand:
    """GELU (tanh) of an unrotated INT8 (1, 128)-block activation (fc1's INT8 epilogue output), FP32
    inside, written straight into fc2's INT8 operand format `(hadamard, block)`. Saves only its INT8
    input; backward is GELU'(dequantized input) · incoming gradient."""
    if not isinstance(h, Int8Operand) or h.hadamard or h.q.bits != 8:
        raise ValueError("gelu_operand: input must be an unrotated INT8 Int8Operand (fc1's INT8 output); "
                         f"got {type(h).__name__}" + (f" with hadamard={h.hadamard}, bits={h.q.bits}"
                                                      if isinstance(h, Int8Operand) else ""))
    box: list = []
    slot = GeluGradSlot() if RECOMPUTE_GELU_OPERAND and FUSED_GELU_BACKWARD else None
    round_to = torch.bfloat16 if GELU_OUTPUT_BF16 and h.carrier.dtype == torch.bfloat16 else None
    carrier = _GeluOperand.apply(h.carrier, h.q.data, h.q.scale, _qt_meta(h.q), int(hadamard),
                                 tuple(block), box, slot, round_to)
    recompute = RECOMPUTE_GELU_OPERAND
    return Int8Operand(carrier, box[0], int(hadamard), source=h.q if recompute else None, gelu_slot=slot,
                       source_round_to=round_to if recompute else None)
