"""The INT8 data flow's memory-bound operators (ALGORITHMS.md §1), chosen per device like `dispatch`:
the Triton kernels of `triton_dataflow` on CUDA (and under `MEGAQ_KERNELS=triton` + TRITON_INTERPRET=1),
the reference below (plain PyTorch on `megaq.quant`) elsewhere or for formats the kernels do not cover.

Every function takes and returns 2-D tensors `[rows, C]` and `QuantizedTensor`s; autograd lives in
`megaq.ops.dataflow`. The *operand format* `(hadamard, block)` is the forward GEMM's A-operand layout
that a producer writes so that the consuming linear skips its quantize pass: `hadamard` > 0 means
each row is zero-padded to whole Hadamard blocks and rotated by the orthonormal block Hadamard, then
quantized with `block` (the default recipe: `(128, (1, -1))`, one scale per token); `hadamard` 0 means
plain `block` tiles (`(0, (1, 128))` for `int8_block128`).

    layernorm_quantize(x2d, weight, bias, eps, hadamard, block, residual=None)
        -> LayerNormQuantized(x_sum, y_q, x_q, mean, rstd)
    layernorm_backward(x_q, mean, rstd, weight, grad2d, grad_residual=None, out_dtype=None)
        -> (dx, dweight, dbias)             grad2d: a BF16/FP32 tensor or an INT8 QuantizedTensor
    gelu_quantize(h_q, hadamard, block) -> y_q
    gelu_backward(h_q, grad2d) -> dh
    rotate_back(x2d, hadamard, cols, dtype) -> the rows of x2d out of Hadamard space, cut to cols

Numerics (the reference defines them; the kernels match it up to FP32 summation order):
- LayerNorm in FP32 on `x_sum = x + residual` rounded to the input dtype (the residual stream is
  BF16/FP32; the sum is what the block carries on). Output `y_q` in the operand format (nearest);
  `x_q` = INT8 copy of `x_sum` per `SAVE_BLOCK` (nearest) — the only copy of the input kept for
  backward — and per-row FP32 `mean`, `rstd`.
- LayerNorm backward from the dequantized `x_q` and the saved statistics, FP32 inside; the incoming
  gradient is read as given: a BF16/FP32 tensor, or INT8 per (1, 128) block with FP32 scales (the
  consuming linear's dgrad epilogue output, stochastically rounded there), dequantized on load.
  `grad_residual` (the residual stream's gradient) is added to `dx`, so the add of the residual's
  backward costs no pass of its own. Weight and bias gradients FP32. `dx` is written in high
  precision (the residual stream's dtype) also when the incoming gradient is INT8: it is the
  residual stream's gradient, and issue 5 keeps "the residual kept in BF16/FP32" — Jetfire keeps a
  high-precision residual beside its INT8 copies (ALGORITHMS.md §1); quantizing it would add SR noise
  to every block's gradient on its way down the stream, to save one pass that is summed anyway.
- GELU (tanh approximation, as GPT-2) of an INT8 `(1, 128)`-block input (fc1's INT8 GEMM epilogue),
  FP32 inside, output in the operand format (fc2's A operand). Backward: GELU'(dequantized input) ·
  incoming gradient, in the gradient's dtype.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import torch

from ..quant import (QuantizedTensor, block_hadamard, check_finite, pad_to_multiple,
                     quantize_blockwise)
from .dispatch import _hadamard_pm1, _interpreting, _next_pow2, _rint_libdevice, _use_triton

SAVE_BLOCK = (1, 128)      # block of the INT8 copies saved for backward (LayerNorm input, GELU input)
_CHUNK = 128               # columns per kernel step: one Hadamard block, one saved (1, 128) block
_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


class LayerNormQuantized(NamedTuple):
    x_sum: torch.Tensor | None   # x + residual in x's dtype (None without a residual)
    y_q: QuantizedTensor         # LayerNorm output in the operand format
    x_q: QuantizedTensor         # INT8 copy of the LayerNorm input per SAVE_BLOCK (for backward)
    mean: torch.Tensor           # [rows] FP32
    rstd: torch.Tensor           # [rows] FP32


# --------------------------------------------------------------------------------------------------
# the math (FP32), shared by the reference and the tests
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (GPT-2), as `x · sigmoid(2z)` (= 0.5 x (1 + tanh z)), z = √(2/π)(x +
    0.044715 x³): the sigmoid form has no cancellation where tanh z is near -1."""
    return x * torch.sigmoid(2.0 * _GELU_K * (x + _GELU_C * x * x * x))


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of `gelu_tanh`: σ(2z) + x · 2σ(2z)σ(-2z) · z'."""
    z2 = 2.0 * _GELU_K * (x + _GELU_C * x * x * x)
    return torch.sigmoid(z2) + x * torch.sigmoid(z2) * torch.sigmoid(-z2) * 2.0 * _GELU_K * (
        1.0 + 3.0 * _GELU_C * x * x)


def layernorm_forward_math(x2d: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of `x2d [R, C]` in FP32: `(y, mean [R], rstd [R])`."""
    xf = x2d.float()
    var, mean = torch.var_mean(xf, dim=1, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    y = (xf - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y, mean, rstd


def layernorm_backward_math(x_in: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
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


def quantize_operand_reference(y: torch.Tensor, hadamard: int, block: tuple[int, int]) -> QuantizedTensor:
    """`y [R, C]` (FP32) in the operand format: zero-padded + rotated when `hadamard`, then block
    quantized (nearest)."""
    if hadamard:
        y = block_hadamard(pad_to_multiple(y, hadamard), hadamard)
    return quantize_blockwise(y, block, 8, "nearest", check=False)


# --------------------------------------------------------------------------------------------------
# which path
def _kernel_format(hadamard: int, block: tuple[int, int], cols: int) -> bool:
    """The Triton kernels write per-row INT8 after a 128-Hadamard, or (1, 128) blocks unrotated."""
    if hadamard:
        return hadamard == _CHUNK and block[0] == 1 and (block[1] == -1 or block[1] >= cols)
    return tuple(block) == (1, _CHUNK)


def _check_format(hadamard: int, block: tuple[int, int]) -> None:
    from ..quant import SUPPORTED_HADAMARD_BLOCKS
    if hadamard and hadamard not in SUPPORTED_HADAMARD_BLOCKS:
        raise ValueError(f"operand Hadamard block must be 0 or one of {SUPPORTED_HADAMARD_BLOCKS}; "
                         f"got {hadamard}")
    if len(block) != 2 or block[0] != 1:
        raise ValueError(f"operand block must be (1, k) or (1, -1) (one row per token); got {block!r}")


def _check_round_to(round_to: torch.dtype | None, who: str) -> None:
    """The output rounding the GELU and LayerNorm kernels take: none, or to BF16."""
    if round_to not in (None, torch.bfloat16):
        raise ValueError(f"{who}: round_to must be None or torch.bfloat16; got {round_to}")


def _padded(cols: int, hadamard: int) -> int:
    return math.ceil(cols / hadamard) * hadamard if hadamard else cols


def _triton():
    from . import triton_dataflow
    return triton_dataflow


# --------------------------------------------------------------------------------------------------
# LayerNorm
def layernorm_quantize(x2d: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float, hadamard: int, block: tuple[int, int], *,
                       residual: torch.Tensor | None = None, check: bool = True,
                       round_to: torch.dtype | None = None) -> LayerNormQuantized:
    """[Residual add +] LayerNorm of `x2d` `[R, C]` writing the next GEMM's INT8 operand (see the
    module doc). NaN/Inf in the (summed) input raises `NonFiniteError` when `check`. `round_to`
    (torch.bfloat16 or None): the LayerNorm output is first rounded to that dtype, as a BF16 model's
    LayerNorm writes it — which the kernel then rotates exactly with one BF16 product instead of two."""
    _check_format(hadamard, block)
    _check_round_to(round_to, "layernorm_quantize")
    if x2d.dim() != 2:
        raise ValueError(f"layernorm_quantize: input must be 2-D; got shape {tuple(x2d.shape)}")
    if residual is not None and residual.shape != x2d.shape:
        raise ValueError(f"layernorm_quantize: residual shape {tuple(residual.shape)} != input "
                         f"shape {tuple(x2d.shape)}")
    tensors = [t for t in (x2d, residual, weight, bias) if t is not None]
    if _use_triton(*tensors) and _kernel_format(hadamard, block, _padded(x2d.shape[1], hadamard)) \
            and x2d.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return _launch_layernorm(x2d, weight, bias, eps, hadamard, residual, check, round_to is not None)
    x_sum = x2d + residual if residual is not None else None
    xs = x_sum if x_sum is not None else x2d
    if check:
        check_finite(xs, "LayerNorm input")
    y, mean, rstd = layernorm_forward_math(xs, weight, bias, eps)
    if round_to is not None:
        y = y.to(round_to).float()
    y_q = quantize_operand_reference(y, hadamard, block)
    x_q = quantize_blockwise(xs, SAVE_BLOCK, 8, "nearest", check=False)
    return LayerNormQuantized(x_sum, y_q, x_q, mean, rstd)


def layernorm_backward(x_q: QuantizedTensor, mean: torch.Tensor, rstd: torch.Tensor,
                       weight: torch.Tensor | None, grad2d: torch.Tensor | QuantizedTensor,
                       grad_residual: torch.Tensor | None = None, *,
                       out_dtype: torch.dtype | None = None):
    """`(dx, dweight, dbias)` of the LayerNorm whose input was saved as `x_q`, for the incoming
    gradient `grad2d` `[R, C]`: a tensor, or an INT8 `QuantizedTensor` (the kernel reads (1, 128)
    blocks; other blocks take the reference). `dx` has `grad_residual` added and is written in
    `out_dtype` — by default `grad2d`'s dtype; an INT8 gradient needs it given (the residual stream's
    dtype). `dweight` (None without weight) and `dbias` FP32 `[C]`."""
    int8_grad = isinstance(grad2d, QuantizedTensor)
    if grad2d.shape != tuple(x_q.shape):
        raise ValueError(f"layernorm_backward: gradient shape {tuple(grad2d.shape)} != saved input "
                         f"shape {tuple(x_q.shape)}")
    if int8_grad and (grad2d.bits != 8 or out_dtype is None):
        raise ValueError("layernorm_backward: a quantized incoming gradient must be INT8 and needs "
                         f"out_dtype (the residual stream's dtype); got bits={grad2d.bits}, "
                         f"out_dtype={out_dtype}")
    out_dtype = out_dtype or grad2d.dtype
    g_data = grad2d.data if int8_grad else grad2d
    tensors = [t for t in (x_q.data, g_data, grad_residual, weight) if t is not None]
    if _use_triton(*tensors) and x_q.block == SAVE_BLOCK and x_q.bits == 8 \
            and (not int8_grad or grad2d.block == SAVE_BLOCK):
        return _launch_layernorm_backward(x_q, mean, rstd, weight, grad2d, grad_residual, out_dtype)
    g = grad2d.dequantize(torch.float32) if int8_grad else grad2d.float()
    dx, dw, db = layernorm_backward_math(x_q.dequantize(torch.float32), mean, rstd,
                                         weight.float() if weight is not None else None, g)
    if grad_residual is not None:
        dx = dx + grad_residual.float()
    return dx.to(out_dtype), dw, db


# --------------------------------------------------------------------------------------------------
# GELU
def gelu_quantize(h_q: QuantizedTensor, hadamard: int, block: tuple[int, int],
                  round_to: torch.dtype | None = None) -> QuantizedTensor:
    """GELU of the INT8 `h_q` (FP32 inside) written in the operand format (nearest). `round_to`
    (torch.bfloat16 or None): the GELU output is first rounded to that dtype, as a BF16 model's GELU
    writes it — which the kernel then rotates exactly with one BF16 product instead of two."""
    _check_format(hadamard, block)
    _check_round_to(round_to, "gelu_quantize")
    if _use_triton(h_q.data) and h_q.bits == 8 and h_q.block == SAVE_BLOCK \
            and _kernel_format(hadamard, block, _padded(h_q.shape[1], hadamard)):
        return _launch_gelu(h_q, hadamard, round_to is not None)
    y = gelu_tanh(h_q.dequantize(torch.float32))
    if round_to is not None:
        y = y.to(round_to).float()
    return quantize_operand_reference(y, hadamard, block)


def gelu_backward(h_q: QuantizedTensor, grad2d: torch.Tensor) -> torch.Tensor:
    """GELU'(dequantized `h_q`) · `grad2d`, FP32 inside, in `grad2d`'s dtype."""
    if grad2d.shape != tuple(h_q.shape):
        raise ValueError(f"gelu_backward: gradient shape {tuple(grad2d.shape)} != saved input shape "
                         f"{tuple(h_q.shape)}")
    if _use_triton(h_q.data, grad2d) and h_q.bits == 8 and h_q.block == SAVE_BLOCK:
        return _launch_gelu_backward(h_q, grad2d)
    return (gelu_tanh_grad(h_q.dequantize(torch.float32)) * grad2d.float()).to(grad2d.dtype)


# --------------------------------------------------------------------------------------------------
# the weight gradient out of Hadamard space
def rotate_back(x2d: torch.Tensor, hadamard: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """`block_hadamard(x2d.float(), hadamard)[:, :cols].to(dtype)`: the rows of `x2d` [R, C'] rotated
    by the orthonormal block Hadamard (its own inverse: H is symmetric) and cut to `cols` columns —
    the data flow's weight gradient ∇W = (∇Yᵀ X̃) H from the wgrad GEMM's output. The kernel reads
    the rows (FP32, BF16 or FP16) once and writes `dtype` (the reference: an FP32 product, a copy and
    a cast), the rotation on the tensor cores with FP32 split in two BF16 parts (each input within
    2^-16 of itself, before the FP32 sums and the output's rounding)."""
    R, Cp = x2d.shape
    if hadamard <= 0 or Cp % hadamard or not 0 < cols <= Cp:
        raise ValueError(f"rotate_back: {Cp} columns are not whole Hadamard blocks of {hadamard}, or cols="
                         f"{cols} is not in (0, {Cp}]")
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if not (_use_triton(x2d) and x2d.dtype in floats and 16 <= hadamard <= 128 and dtype in floats):
        return block_hadamard(x2d.float(), hadamard)[:, :cols].to(dtype)
    x2d = x2d.contiguous()
    out = torch.empty((R, cols), dtype=dtype, device=x2d.device)
    h, inv_sqrt = _hadamard_arg(hadamard, x2d.device)
    br = 64
    _triton()._rotate_rows_kernel[(math.ceil(cols / hadamard), math.ceil(R / br))](
        x2d, out, R, Cp, cols, h, inv_sqrt, BR=br, HAD=hadamard, UPCAST=_interpreting(), num_warps=4)
    return out


# --------------------------------------------------------------------------------------------------
# launch plans
ROWS = 16   # rows per program of the chunked kernels (>= 16: the Hadamard rotation is a tl.dot)
# The row-resident kernels hold whole rows in registers: up to this many 128-column chunks per row
# (rounded up to a power of two), else the chunked kernels. The LayerNorm backward also keeps two
# row-sized FP32 accumulators (the weight and bias gradients) per program. Measured up to 32 chunks
# (LayerNorm) and 128 (GELU); a LayerNorm row of 64 or 128 chunks fills the same tile shapes as the
# GELU's measured ones.
RESIDENT_MAX_CHUNKS = {"layernorm": 128, "layernorm_residual": 128, "gelu": 128, "layernorm_backward": 64}
# Resident launch plans, from tools/bench_dataflow_kernels.py --sweep on an H100 at 16,384 tokens,
# widths 1600 and 4096 (GELU 6400 and 16384): TILE = rows BR·NCH of the [BR·NCH, 128] tile (the
# LayerNorm backward: rows BR of its [BR, NCH, 128] tile), PER_SM = persistent programs per SM (the
# grid is capped at SMs × PER_SM). One warpgroup per program, two programs per SM, is fastest: the
# LayerNorm forward on 64-row tiles (0.19 ms at 4096 against 0.25 with 128 rows and 8 warps), its
# residual variant on 32 (0.26 ms; 64 rows: 0.37), the GELU on 64 rows (0.22 ms at 6400
# against 0.29 with 128 rows and 8 warps) or on one 128-chunk row (0.52 ms at 16384, against 0.58
# with 8 warps); one program per SM or one per tile is slower (GELU at 6400: 0.37 / 0.28 ms). The
# LayerNorm backward is fastest one row per tile, 4 warps and 4 programs per SM up to 16 chunks
# (0.087 ms at 1600), 8 warps and 2 per SM at 32 (0.16 ms at 4096): as many as its registers let
# run at once (64 chunks: 16 warps, not measured).
_PLANS = {"layernorm": {"TILE": 64, "WARPS": 4, "PER_SM": 2},
          "layernorm_residual": {"TILE": 32, "WARPS": 4, "PER_SM": 2},
          "gelu": {"TILE": 64, "WARPS": 4, "PER_SM": 2}, "layernorm_backward": {"TILE": 1}}
GELU_BACKWARD_TILE = (32, 1, 4)     # rows, 128-column blocks, warps (every plan swept within 3%)
_OVERRIDE: dict | None = None


@contextlib.contextmanager
def config_override(**cfg):
    """Force the launch plans (tests: the chunked kernels, small persistent grids under the
    interpreter; tools/bench_dataflow_kernels.py: sweeps). Keys: KERNEL ("resident" or "chunked"),
    TILE, WARPS, PER_SM, PROGRAMS (a fixed cap on the persistent grid), MAXNREG (registers per
    thread), GELU_BWD_ROWS, GELU_BWD_BLOCKS, GELU_BWD_WARPS."""
    global _OVERRIDE
    old = _OVERRIDE
    _OVERRIDE = dict(cfg)
    try:
        yield
    finally:
        _OVERRIDE = old


@functools.lru_cache(maxsize=None)
def _sm_count(device: str) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _plan(op: str, cols: int, R: int, device: torch.device) -> dict | None:
    """The resident kernel's launch plan for `op` ("layernorm", "layernorm_residual", "gelu",
    "layernorm_backward") on rows of `cols` columns, None for the chunked kernel: BR rows per tile,
    NCH chunks per row, warps, tiles, (persistent) programs and launch options."""
    ov = dict(_PLANS[op], **(_OVERRIDE or {}))
    nch = _next_pow2(math.ceil(cols / _CHUNK))
    kernel = ov.get("KERNEL", "resident")
    if kernel not in ("resident", "chunked"):
        raise ValueError(f"KERNEL must be 'resident' or 'chunked'; got {kernel!r}")
    if kernel == "chunked" or nch > RESIDENT_MAX_CHUNKS[op]:
        return None
    if op == "layernorm_backward":
        br = ov["TILE"]
        warps = ov.get("WARPS", 4 if nch <= 16 else 8 if nch <= 32 else 16)
        per_sm = ov.get("PER_SM", 4 if nch <= 16 else 2)
    else:
        br = max(1, ov["TILE"] // nch)
        warps, per_sm = ov["WARPS"], ov["PER_SM"]
    tiles = math.ceil(R / br)
    if "PROGRAMS" in ov:
        cap = ov["PROGRAMS"]
    elif device.type == "cuda":
        cap = _sm_count(str(device)) * per_sm
    else:
        cap = tiles
    options = {"num_warps": warps} | ({"maxnreg": ov["MAXNREG"]} if ov.get("MAXNREG") else {})
    return {"BR": br, "NCH": nch, "tiles": tiles, "programs": max(1, min(tiles, cap)), "options": options}


def _hadamard_arg(hadamard: int, device: torch.device):
    if not hadamard:
        return torch.empty(1, dtype=torch.float32, device=device), 1.0
    dtype = torch.float32 if _interpreting() else torch.bfloat16
    return _hadamard_pm1(hadamard, dtype, str(device)), 1.0 / math.sqrt(hadamard)


# --------------------------------------------------------------------------------------------------
# launchers
def _launch_layernorm(x2d, weight, bias, eps, hadamard, residual, check, round_bf16=False):
    from ..quant import NonFiniteError
    R, C = x2d.shape
    dev = x2d.device
    x2d = x2d.contiguous()
    Cp = _padded(C, hadamard)
    n_blk = math.ceil(C / _CHUNK)
    n_out_blocks = 1 if hadamard else n_blk
    y_data = torch.empty((R, Cp), dtype=torch.int8, device=dev)
    y_scale = torch.empty((R, n_out_blocks), dtype=torch.float32, device=dev)
    x_data = torch.empty((R, C), dtype=torch.int8, device=dev)
    x_scale = torch.empty((R, n_blk), dtype=torch.float32, device=dev)
    mean = torch.empty(R, dtype=torch.float32, device=dev)
    rstd = torch.empty(R, dtype=torch.float32, device=dev)
    x_sum = torch.empty_like(x2d) if residual is not None else None
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    h, inv_sqrt = _hadamard_arg(hadamard, dev)
    r_arg = residual.contiguous() if residual is not None else dummy
    xs_arg = x_sum if x_sum is not None else dummy
    w_arg = weight if weight is not None else dummy
    b_arg = bias if bias is not None else dummy
    flags = dict(HAD=hadamard, HAS_RES=residual is not None, HAS_W=weight is not None,
                 HAS_B=bias is not None, CHECK=check, UPCAST=_interpreting(), ROUND_BF16=round_bf16)
    plan = _plan("layernorm_residual" if residual is not None else "layernorm", Cp, R, dev)
    if plan is not None:
        _triton()._layernorm_quant_resident_kernel[(plan["programs"],)](
            x2d, r_arg, xs_arg, w_arg, b_arg, R, C, n_blk, float(eps), y_data, y_scale, Cp,
            x_data, x_scale, mean, rstd, h, inv_sqrt, flag, plan["tiles"],
            BR=plan["BR"], NCH=plan["NCH"], **plan["options"], **flags)
    else:
        _triton()._layernorm_quant_kernel[(math.ceil(R / ROWS),)](
            x2d, r_arg, xs_arg, w_arg, b_arg, R, C, Cp, float(eps), y_data, y_scale, x_data, x_scale, n_blk,
            mean, rstd, h, inv_sqrt, flag, BR=ROWS, BC=_CHUNK, RINT_LIBDEVICE=_rint_libdevice(), num_warps=4,
            **flags)
    if check and int(flag.item()):
        raise NonFiniteError(f"LayerNorm input of shape {(R, C)} holds NaN or Inf values")
    block = (1, Cp) if hadamard else (1, _CHUNK)
    return LayerNormQuantized(x_sum, QuantizedTensor(y_data, y_scale, block, 8, (R, Cp)),
                              QuantizedTensor(x_data, x_scale, SAVE_BLOCK, 8, (R, C)), mean, rstd)


def _launch_layernorm_backward(x_q, mean, rstd, weight, grad, grad_residual, out_dtype):
    R, C = x_q.shape
    dev = x_q.data.device
    dx = torch.empty((R, C), dtype=out_dtype, device=dev)
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    int8_grad = isinstance(grad, QuantizedTensor)
    g_scale = grad.scale.contiguous() if int8_grad else dummy
    g_data = (grad.data if int8_grad else grad).contiguous()
    gr_arg = grad_residual.contiguous() if grad_residual is not None else dummy
    w_arg = weight if weight is not None else dummy
    flags = dict(HAS_W=weight is not None, HAS_RES=grad_residual is not None, G_INT8=int8_grad)
    plan = _plan("layernorm_backward", C, R, dev)
    n_prog = plan["programs"] if plan is not None else math.ceil(R / ROWS)
    # per-program partial sums of the weight and bias gradients, folded by one torch reduction
    dw_part = torch.empty((n_prog, C), dtype=torch.float32, device=dev)
    db_part = torch.empty((n_prog, C), dtype=torch.float32, device=dev)
    if plan is not None:
        _triton()._layernorm_backward_resident_kernel[(n_prog,)](
            x_q.data, x_q.scale, x_q.scale.shape[1], mean, rstd, w_arg, g_data, g_scale,
            gr_arg, dx, dw_part, db_part, R, C, plan["tiles"],
            BR=plan["BR"], NCH=plan["NCH"], **plan["options"], **flags)
    else:
        _triton()._layernorm_backward_kernel[(n_prog,)](
            x_q.data, x_q.scale, x_q.scale.shape[1], mean, rstd, w_arg, g_data, g_scale, g_scale.shape[-1],
            gr_arg, dx, dw_part, db_part, R, C, BR=ROWS, BC=_CHUNK, num_warps=4, **flags)
    return dx, dw_part.sum(0) if weight is not None else None, db_part.sum(0)


def _launch_gelu(h_q, hadamard, round_bf16=False):
    R, N = h_q.shape
    dev = h_q.data.device
    Np = _padded(N, hadamard)
    n_blk = h_q.scale.shape[1]
    n_out_blocks = 1 if hadamard else n_blk
    y_data = torch.empty((R, Np), dtype=torch.int8, device=dev)
    y_scale = torch.empty((R, n_out_blocks), dtype=torch.float32, device=dev)
    h, inv_sqrt = _hadamard_arg(hadamard, dev)
    plan = _plan("gelu", Np, R, dev)
    if plan is not None:
        _triton()._gelu_quant_resident_kernel[(plan["programs"],)](
            h_q.data, h_q.scale, R, N, n_blk, y_data, y_scale, Np, h, inv_sqrt, plan["tiles"],
            BR=plan["BR"], NCH=plan["NCH"], HAD=hadamard, UPCAST=_interpreting(), LIBDEVICE=_rint_libdevice(),
            ROUND_BF16=round_bf16, **plan["options"])
    else:
        _triton()._gelu_quant_kernel[(math.ceil(R / ROWS),)](
            h_q.data, h_q.scale, n_blk, R, N, Np, y_data, y_scale, h, inv_sqrt,
            BR=ROWS, BC=_CHUNK, HAD=hadamard, UPCAST=_interpreting(), RINT_LIBDEVICE=_rint_libdevice(),
            ROUND_BF16=round_bf16, num_warps=4)
    block = (1, Np) if hadamard else (1, _CHUNK)
    return QuantizedTensor(y_data, y_scale, block, 8, (R, Np))


def _launch_gelu_backward(h_q, grad2d):
    R, N = h_q.shape
    dh = torch.empty((R, N), dtype=grad2d.dtype, device=grad2d.device)
    ov = _OVERRIDE or {}
    br = ov.get("GELU_BWD_ROWS", GELU_BACKWARD_TILE[0])
    nb = ov.get("GELU_BWD_BLOCKS", GELU_BACKWARD_TILE[1])
    n_blk = h_q.scale.shape[1]
    _triton()._gelu_backward_kernel[(math.ceil(n_blk / nb), math.ceil(R / br))](
        h_q.data, h_q.scale, n_blk, grad2d.contiguous(), dh, R, N,
        BR=br, NB=nb, LIBDEVICE=_rint_libdevice(), num_warps=ov.get("GELU_BWD_WARPS", GELU_BACKWARD_TILE[2]))
    return dh


__all__ = ["LayerNormQuantized", "SAVE_BLOCK", "layernorm_quantize", "layernorm_backward",
           "gelu_quantize", "gelu_backward", "rotate_back", "gelu_tanh", "gelu_tanh_grad", "layernorm_forward_math",
           "layernorm_backward_math", "quantize_operand_reference"]
