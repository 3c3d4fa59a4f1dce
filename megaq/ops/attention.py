"""Causal self-attention that keeps INT8 copies of q, k, v and its output for backward (issue 5).

`causal_attention(q, k, v, dropout_p, saves)` on `[B, h, T, d]` tensors:

- `saves="bf16"`: PyTorch's `F.scaled_dot_product_attention` (causal), which keeps q, k, v and the
  output in the activations' dtype for backward: 8 bytes per token x hidden unit in BF16, the largest
  part of what the INT8 data-flow block still keeps.
- `saves="int8"`: the same forward, computed by PyTorch's flash attention op called directly (so the
  output is the flash kernel's, bit for bit: SDPA picks that kernel for these inputs on CPU; on an
  H100 with torch 2.11 its default choice for BF16 differs); for backward it keeps q, k, v and the
  output as INT8 with one FP32 scale per (token, head) row of `d` values, nearest rounding
  (`megaq.kernels.quantize`: Triton on GPU), plus the FP32 logsumexp ([B, h, T]) and, on CUDA, the
  dropout's Philox seed and offset. About 4.25 bytes per token x hidden unit at d = 64. Backward
  dequantizes them to the activations' dtype and runs the flash backward op with the forward's exact
  logsumexp.

Numerics (tests/test_attention_saves.py; random data, head_dim 64, relative error of dq, dk, dv
against the "bf16" path): INT8 q and k give the recomputed logits an absolute error proportional to
|q| |k|, so the error grows with the logits: 0.013-0.015 at logit std 1, ~0.04 at std 4, ~0.15 at std
16 (the "bf16" path's own BF16 error against FP64: 0.004, 0.007, 0.026). Of that, v and the output
alone contribute 0.008, 0.017, 0.026: q and k are what peaked attention is sensitive to.

When q, k, v are the views `attend()` makes of one dense sequence-first `qkv [T, B, 3, h, d]`, that
buffer is quantized in one contiguous pass and the views are rebuilt in backward; other layouts are
quantized one tensor at a time. Where the flash op does not take the inputs (CUDA: head_dim not a
multiple of 8 or over the kernel's limit, FP32, an older GPU; CPU: dropout; other devices), the
"bf16" path runs instead, with a one-time warning naming the reason. Without gradients (eval) there is
nothing to save: the "bf16" path runs.

NaN/Inf: the forward output is the flash kernel's on the unquantized inputs, so a NaN reaches the
loss as in the "bf16" path. The INT8 copies cannot hold one (the quantizer maps it to a finite code),
so any non-finite output row is folded into its saved logsumexp (NaN): backward then yields NaN
gradients for it too, instead of finite ones from the sanitized copies. `check=True` (the recipe's
`check_finite`) raises `NonFiniteError` on non-finite q, k, v before anything is quantized.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .. import kernels
from ..quant import QuantizedTensor, check_finite

ATTENTION_SAVES = ("bf16", "int8")

_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_warned: set[str] = set()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                     saves: str = "bf16", check: bool = False) -> torch.Tensor:
    """Causal attention of `q, k, v [B, h, T, d]` -> `[B, h, T, d]` (scale 1/sqrt(d)); `saves`
    chooses what backward keeps ("bf16" or "int8", see the module doc)."""
    if saves not in ATTENTION_SAVES:
        raise ValueError(f"causal_attention: saves must be one of {ATTENTION_SAVES}, got {saves!r}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if saves == "int8" and needs_grad:
        reason = _flash_unavailable(q, k, v, dropout_p)
        if reason is None:
            return _Int8SavedAttention.apply(q, k, v, float(dropout_p), check)
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"attention saves 'int8' falls back to 'bf16' (BF16 q, k, v, output kept for "
                          f"backward): {reason}", stacklevel=2)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def split_heads(qkv: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`qkv [T, B, 3 * h * d]` (sequence-first, q | k | v) -> q, k, v `[B, h, T, d]` as views of it.

    The same views as `qkv.view(T, B, 3, h, d).permute(2, 1, 3, 0, 4).unbind(0)`, with a backward
    that writes ∇qkv in one pass: autograd's own (unbind -> stack along a new leading dim, then the
    view's reshape) stacks the three [B, h, T, d] gradients into a [3, B, h, T, d] buffer and copies
    that into qkv's layout, two transposing copies of the whole ∇qkv. Measured on an H100 at 1.3B:
    ~150 ms of an optimizer step's 2.2 s (docs/PERFORMANCE.md). Attention's kernels return
    gradients laid out like their inputs (sequence-first here), so stacking them along the q | k | v
    axis of the sequence-first layout is a contiguous copy."""
    return _SplitHeads.apply(qkv, n_head)


class _SplitHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, n_head):
        seq, batch, width = qkv.shape
        if width % (3 * n_head):
            raise ValueError(f"split_heads: the last dim {width} of qkv is not 3 x {n_head} heads x head_dim")
        ctx.shape = qkv.shape
        q, k, v = qkv.view(seq, batch, 3, n_head, width // (3 * n_head)).permute(2, 1, 3, 0, 4).unbind(0)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        seq, batch, width = ctx.shape
        parts = [g.permute(2, 0, 1, 3) if g is not None else None for g in (dq, dk, dv)]
        like = next(p for p in parts if p is not None)
        parts = [p if p is not None else torch.zeros_like(like) for p in parts]
        return torch.stack(parts, dim=2).view(seq, batch, width), None


def _flash_unavailable(q, k, v, dropout_p: float) -> str | None:
    """Why PyTorch's flash attention op cannot run these inputs, or None when it can."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        return f"q, k, v must share one [B, h, T, d] shape, got {tuple(q.shape)}, {tuple(k.shape)}, " \
               f"{tuple(v.shape)}"
    d = q.shape[-1]
    if q.device.type == "cuda":
        if d % 8:
            return f"head_dim {d} is not a multiple of 8 (the flash op needs it; SDPA pads instead)"
        params = torch.backends.cuda.SDPAParams(q, k, v, None, dropout_p, True, False)
        if not torch.backends.cuda.can_use_flash_attention(params):
            return (f"PyTorch's flash attention does not take head_dim {d}, dtype {q.dtype} on "
                    f"{torch.cuda.get_device_name(q.device)} (torch.backends.cuda.can_use_flash_attention)")
        return None
    if q.device.type == "cpu":
        if dropout_p > 0.0:
            return "the CPU flash attention op has no dropout"
        if q.dtype not in _CPU_FLASH_DTYPES:
            return f"the CPU flash attention op does not take dtype {q.dtype}"
        return None
    return f"no flash attention op is used on device type {q.device.type!r}"


def _fused_qkv_rows(q, k, v) -> torch.Tensor | None:
    """`[T*B*3*h, d]` over the dense `qkv [T, B, 3, h, d]` buffer that q, k, v are the `[B, h, T, d]`
    views of (attend()'s layout), or None when they are not."""
    B, h, T, d = q.shape
    stride = (3 * h * d, d, B * 3 * h * d, 1)
    same_storage = q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() \
        == v.untyped_storage().data_ptr()
    offset = q.storage_offset()
    if not same_storage or any(t.stride() != stride for t in (q, k, v)) \
            or (k.storage_offset(), v.storage_offset()) != (offset + h * d, offset + 2 * h * d):
        return None
    return q.as_strided((T * B * 3 * h, d), (d, 1), offset)


def _rows_quantize(rows: torch.Tensor) -> QuantizedTensor:
    # nearest rounding, one FP32 scale per row; non-finite values are handled by the caller
    return kernels.quantize(rows, (1, -1), bits=8, rounding="nearest", check=False)


def _dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows, cols = data.shape
    return kernels.dequantize(QuantizedTensor(data, scale, (1, cols), 8, (rows, cols)), dtype)


class _Int8SavedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, dropout_p, check):
        B, h, T, d = q.shape
        if check:
            for name, t in (("q", q), ("k", k), ("v", v)):
                check_finite(t, f"causal_attention {name}")
        if q.is_cuda:
            out, lse, cum_q, cum_k, max_q, max_k, rng_a, rng_b, _ = \
                torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, True)
            # philox seed / offset (torch < 2.10) or the RNG state and an unused tensor (later):
            # the backward op takes them back in the same positions
            aux = (cum_q, cum_k, rng_a, rng_b)
            ctx.max_qk = (max_q, max_k)
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
            aux = ()
        # A non-finite output row becomes a NaN logsumexp: the INT8 copies below cannot carry it.
        nonfinite = torch.linalg.vector_norm(out, math.inf, dim=-1, dtype=torch.float32) * 0.0
        lse.narrow(-1, 0, T).add_(nonfinite)
        fused = _fused_qkv_rows(q, k, v)
        if fused is not None:
            qkv_q = _rows_quantize(fused)
            inputs = (qkv_q.data, qkv_q.scale)
        else:
            parts = [_rows_quantize(t.reshape(-1, d)) for t in (q, k, v)]
            inputs = tuple(x for p in parts for x in (p.data, p.scale))
        # the flash op writes its output [B, T, h, d]-contiguous: quantized in that order, no copy
        out_q = _rows_quantize(out.transpose(1, 2).reshape(-1, d))
        ctx.save_for_backward(*inputs, out_q.data, out_q.scale, lse, *aux)
        ctx.fused, ctx.shape, ctx.dtype, ctx.dropout_p = fused is not None, (B, h, T, d), q.dtype, dropout_p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        B, h, T, d = ctx.shape
        saved = ctx.saved_tensors
        n_in = 2 if ctx.fused else 6
        inputs, (out_data, out_scale, lse), aux = saved[:n_in], saved[n_in:n_in + 3], saved[n_in + 3:]
        if ctx.fused:
            qkv = _dequantize(*inputs, ctx.dtype).view(T, B, 3, h, d)
            q, k, v = qkv.permute(2, 1, 3, 0, 4).unbind(0)
        else:
            q, k, v = (_dequantize(inputs[i], inputs[i + 1], ctx.dtype).view(B, h, T, d) for i in (0, 2, 4))
        out = _dequantize(out_data, out_scale, ctx.dtype).view(B, T, h, d).transpose(1, 2)
        if grad_out.is_cuda:
            cum_q, cum_k, rng_a, rng_b = aux
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                grad_out, q, k, v, out, lse, cum_q, cum_k, *ctx.max_qk, ctx.dropout_p, True, rng_a, rng_b)
        else:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out, q, k, v, out, lse, 0.0, True)
        return dq, dk, dv, None, None
