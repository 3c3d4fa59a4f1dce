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

import math
from typing import NamedTuple

import torch

from .. import kernels
from ..quant import QuantizedTensor, check_finite

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


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
def layernorm_backward(x_in: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                       weight: torch.Tensor | None, grad: torch.Tensor):
    """LayerNorm gradients from an input `x_in [R, C]` and its per-row `mean`, `rstd` `[R]`, for the
    output gradient `grad [R, C]`, all in `grad`'s dtype. Returns `(dx, dweight, dbias)` (`dweight`
    None when `weight` is None). Linear in `grad`, so an unbiased `grad` gives unbiased gradients."""
    xhat = (x_in - mean[:, None]) * rstd[:, None]
    gw = grad * weight if weight is not None else grad
    c1 = (gw * xhat).mean(dim=1, keepdim=True)
    c2 = gw.mean(dim=1, keepdim=True)
    dx = (gw - xhat * c1 - c2) * rstd[:, None]
    dweight = (grad * xhat).sum(0) if weight is not None else None
    return dx, dweight, grad.sum(0)


class _Int8LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, block, check, quantize_grad_input, generator, out_box):
        C = x.shape[-1]
        x2d = x.reshape(-1, C)
        if check:
            check_finite(x2d, "int8_layernorm input")
        xf = x2d.float()
        var, mean = torch.var_mean(xf, dim=1, unbiased=False)
        rstd = torch.rsqrt(var + eps)
        y = (xf - mean[:, None]) * rstd[:, None]
        if weight is not None:
            y = y * weight.float()
        if bias is not None:
            y = y + bias.float()
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
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(_GELU_K * (x + _GELU_C * x * x * x)))


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of `gelu_tanh`."""
    t = torch.tanh(_GELU_K * (x + _GELU_C * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_K * (1.0 + 3.0 * _GELU_C * x * x)


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
