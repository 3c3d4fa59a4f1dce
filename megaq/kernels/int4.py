"""The INT4 recipe's quantizers and backward (ALGORITHMS.md §2) on INT8 tensor cores, with the
`megaq.quant` reference as the fallback (CPU tensors, no Triton, `MEGAQ_KERNELS=reference`, shapes the
fused kernels do not take): the same `_use_triton` decision as `megaq.kernels.dispatch`.

Notation: a linear `Y = X Wᵀ`, X `[T, I]` (tokens), W `[O, I]`; `Ip` = I zero-padded to whole Hadamard
blocks of size h; X̂ = Q4(X H) = sx ⊙ qx (one scale per token), Ŵ = Q4(W H) = sw ⊙ qw (one per output
channel; or one LSQ step per tensor), q ∈ [-7, 7].

Forward
    `hq_quantize_int4` rotates and quantizes whole rows in one read (`_hq_int4_kernel`), writing the
    packed INT4 copy (two per byte, the only activation kept for backward: ≈ ¼ of BF16's bytes), the
    same values in INT8 containers for the forward GEMM (transient) and Σq² per row (the leverage
    scores' ‖X̂_t‖ = sx_t·‖qx_t‖, so the backward never reads X̂ for them). `int4_mm` runs
    `Y = (sx ⊗ sw) · (qx qwᵀ)` on the INT8 tensor cores through `megaq.kernels.scaled_mm` (per-row ×
    per-column scales in the epilogue, bias and the output dtype there too); on GPUs with native INT4
    mma (sm_80/86/89) the packed operands go to the csrc/ INT4 GEMM instead.

Backward (the reference: `megaq.ops.int4_linear`'s docstring and `sampled_gradients_reference`)
    1. `bit_split_int4`: one read of ∇Y → `pair[t, o] = q_hi | q_lo << 4` (one byte per element, half
       of two INT8 copies), s_hi[t], s_lo[t], Σq_hi², Σq_lo² — `megaq.quant.bit_split`.
    2. Leverage scores from those norms only (T-sized vectors): dgrad ‖split row‖ = s·‖q‖, wgrad × ‖X̂_t‖;
       probabilities and 1/p weights by `megaq.quant.leverage_score_weights` — the reference's own
       function on the same scores: the same estimator, sync-free, drawn from torch's generator
       (seeded per step and rank by the trainer), `keep_ratio` configurable, or `drop_zero`.
       Per token the high and low rows fold into two coefficients: c_hi = w_hi·s_hi, c_lo = w_lo·s_lo
       (0 for a dropped row), so the sampled gradient is G[t, o] = c_hi[t]·q_hi + c_lo[t]·q_lo.
    3. Why a requantization is needed on integer tensor cores: both gradient GEMMs reduce over an axis
       that carries a per-index FP32 factor — dgrad ∇X = G · diag(sw) · qw reduces over o, where sw
       lives; wgrad ∇W = Gᵀ · diag(sx) · qx reduces over tokens, where c_hi, c_lo and sx live (and a
       token's high and low rows have different coefficients, not an integer ratio: no exact INT8
       merge). An INT8 GEMM can only scale rows and columns of its output. So the fast path folds
       those factors into the gradient operand and requantizes it to INT8 with *stochastic* rounding
       (unbiased, independent of the sampling, so the estimator's expectation is unchanged):
         dgrad  A_d[t, o] = SR8((c_hi q_hi + c_lo q_lo)[t, o] · sw[o] / v_t), v_t = row abs-max / 127
                B_d = qwᵀ [Ip, O] (INT4 values in INT8 containers, unpacked from the saved copy)
                ∇X = H · (v ⊙ (A_d · B_dᵀ)), cropped to I                      (`_dgrad_operand_kernel`)
         wgrad  only tokens with a kept row enter the reduction: idx = the kept tokens, compacted on
                the device (a prefix sum; their number stays on the device and is the GEMM's K)
                A_w[o, p] = SR8((c_hi q_hi + c_lo q_lo)[idx_p, o] · sx[idx_p] / u_o), u_o = column
                abs-max / 127 (computed in the dgrad operand's pass), written reduction-major
                B_w[j, p] = qx[idx_p, j] (gathered, unpacked, transposed)
                ∇W = H · (u ⊙ (A_w · B_wᵀ)), cropped to I                      (`_wgrad_operand_kernel`)
       Both GEMMs accumulate in INT32 on the tensor cores; the row scale, the inverse block Hadamard
       (an FP32 multiply by the ±1 matrix as three BF16 slices) and the crop run in the epilogue
       (`_sampled_mm_kernel`). The wgrad reduction shrinks to the kept tokens: with the default
       keep_ratio 0.5 of the 2T split rows most tokens keep their high row (≈ 90%), so the saving is
       small there and grows as keep_ratio falls.

Where the fast path differs numerically from the reference (the reference rounds the folded sampled
gradient to the activations' dtype (BF16) and multiplies dequantized operands):
    - the extra stochastic INT8 requantization of step 3: per element an unbiased error of at most one
      step (row/column abs-max / 127); tests bound the relative Frobenius error of ∇X, ∇W against the
      same sampled gradient computed exactly at 2% (tests/test_kernels_int4.py), and check the mean of
      many draws against the exact straight-through gradient within a stated number of standard errors;
    - FP32 sums in a different order (Hadamard rotation, scores): INT4 payloads may differ by ±1 at
      near-ties (≤ 0.1% of elements), scales by ≤ 1e-6 relative; a residual computed with an FMA may
      move s_lo by an ulp.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from . import dispatch, gemm
from .dispatch import (_cdiv, _cfg, _check_flag, _hadamard_pm1, _interpreting, _next_pow2, _rint_libdevice,
                       _rotation_matrix, _seed_tensor)

# The fused HQ quantizer keeps a whole (padded) row in registers: up to this many elements.
MAX_FUSED_ROW = 16384
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# sampled-GEMM tiles, swept on the H100 (tools/bench_kernels.py --sections int4): with the inverse
# Hadamard epilogue 4 warps reach 1050–1120 TOPS at 8192×4096×4096, 8 warps only 770–800
GRAD_MM_CONFIG = dict(BM=128, BN=128, BK=128, GROUP_M=16, num_warps=4, num_stages=3)


@dataclass
class BitSplitGradient:
    """∇Y bit-split: `pair` uint8 [T, O] holds q_hi in the low and q_lo in the high nibble; per-row
    FP32 scales and Σq² of both parts."""
    pair: torch.Tensor
    high_scale: torch.Tensor
    low_scale: torch.Tensor
    high_norm_sq: torch.Tensor
    low_norm_sq: torch.Tensor

    def row_norms(self) -> torch.Tensor:
        """‖split row‖ of the 2T rows (high rows first): the dgrad leverage scores."""
        return torch.cat((self.high_scale * self.high_norm_sq.sqrt(), self.low_scale * self.low_norm_sq.sqrt()))

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_hi, q_lo) as int8 [T, O]."""
        v = self.pair.to(torch.int16)
        lo, hi = v & 0xF, (v >> 4) & 0xF
        return (torch.where(lo >= 8, lo - 16, lo).to(torch.int8), torch.where(hi >= 8, hi - 16, hi).to(torch.int8))


def _quant():
    import megaq.quant as q
    return q



def _fused(*tensors: torch.Tensor, hadamard: int = 32) -> bool:
    """The Triton kernels take these tensors (and the Hadamard block: the rotations run as dots with
    K = hadamard ≥ 16)."""
    return (dispatch._use_triton(*tensors) and 16 <= hadamard <= 256
            and all(t.dtype in _FLOATS and t.numel() > 0 for t in tensors))


def _pack_pair(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return (lo.to(torch.uint8) & 0x0F) | ((hi.to(torch.uint8) & 0x0F) << 4)


# --------------------------------------------------------------------------------------------------
# forward
def hq_quantize_int4(x2d: torch.Tensor, hadamard: int, scale_mode: str = "row", check: bool = True,
                     want_values: bool = True):
    """`megaq.quant.hq_quantize(x2d, hadamard, scale_mode)` → `(packed QuantizedTensor, int8 values
    [R, Ip] or None, Σq² per row [R] FP32)`."""
    q = _quant()
    if x2d.dim() != 2:
        raise ValueError(f"hq_quantize_int4 input must be 2-D; got shape {tuple(x2d.shape)}")
    if scale_mode not in q.HQ_SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {q.HQ_SCALE_MODES}; got {scale_mode!r}")
    if hadamard not in q.SUPPORTED_HADAMARD_BLOCKS:
        raise ValueError(f"Hadamard block must be one of {q.SUPPORTED_HADAMARD_BLOCKS}; got {hadamard}")
    R, C_in = x2d.shape
    C = _cdiv(C_in, hadamard) * hadamard
    CP = max(_next_pow2(C), 16)
    if not _fused(x2d, hadamard=hadamard) or CP > MAX_FUSED_ROW:
        qt = q.hq_quantize(x2d, hadamard, scale_mode, check)
        values = qt.int_values()
        return qt, (values if want_values else None), values.float().pow(2).sum(1)
    from .triton_int4 import _hq_int4_kernel
    dev = x2d.device
    split3 = x2d.dtype == torch.float32
    h = _rotation_matrix(hadamard, x2d.dtype, dev)
    BR = max(1, min(_cfg("QUANT_ROWS", 32), 8192 // CP), 16 * hadamard // CP)
    nw = max(4, min(16, BR * CP // 1024))
    packed = torch.empty((R, C // 2), dtype=torch.uint8, device=dev)
    values = torch.empty((R, C), dtype=torch.int8, device=dev) if want_values else packed
    nsq = torch.empty(R, dtype=torch.float32, device=dev)
    flag = torch.zeros(1, dtype=torch.int32, device=dev) if check else nsq
    common = dict(BR=BR, CP=CP, HAD=hadamard, SPLIT3=split3, UPCAST=_interpreting(),
                  RINT_LIBDEVICE=_rint_libdevice(), num_warps=nw)
    grid = (_cdiv(R, BR),)
    inv = 1.0 / math.sqrt(hadamard)
    args = (x2d, R, C_in, C, x2d.stride(0), x2d.stride(1), h, inv)
    if scale_mode == "row":
        scale = torch.empty((R, 1), dtype=torch.float32, device=dev)
        _hq_int4_kernel[grid](*args, scale, values, packed, scale, nsq, nsq, flag, MODE=0, CHECK=check,
                              WRITE_Q8=want_values, **common)
        _check_flag(flag if check else None, x2d, "hq_quantize_int4 input")
        block = (1, C)
    else:
        # LSQ: step = 2·mean|x H|/√7 over the padded rotated tensor (`megaq.quant.lsq_step`): one pass
        # for the per-row Σ|x H|, then the quantizing pass with the step read on the device
        absum = torch.empty(R, dtype=torch.float32, device=dev)
        _hq_int4_kernel[grid](*args, absum, values, packed, absum, nsq, absum, flag, MODE=2, CHECK=check,
                              WRITE_Q8=False, **common)
        _check_flag(flag if check else None, x2d, "hq_quantize_int4 input")
        step = 2.0 * (absum.sum() / (R * C)) / math.sqrt(7)
        scale = torch.where(step > 0, step, torch.ones_like(step)).reshape(1, 1)
        _hq_int4_kernel[grid](*args, scale, values, packed, scale, nsq, nsq, flag, MODE=1, CHECK=False,
                              WRITE_Q8=want_values, **common)
        block = (R, C)
    qt = q.QuantizedTensor(packed, scale, block, 4, (R, C))
    return qt, (values if want_values else None), nsq


def row_scales(qt) -> torch.Tensor:
    """Per-row FP32 scales `[R]` of a per-row or per-tensor quantized operand."""
    scale = qt.scale.float().reshape(-1)
    return scale.expand(qt.shape[0]).contiguous() if scale.numel() == 1 else scale


def int4_mm(xq, wq, x_values: torch.Tensor | None, w_values: torch.Tensor | None,
            out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`X̂ Ŵᵀ (+ bias)` in `out_dtype` from the HQ operands: on INT8 tensor cores with the INT4 values in
    INT8 containers (`*_values`), or from the packed operands where INT4 mma is native."""
    q = _quant()
    from .cuda_ext import has_native_int4_mma
    # asked in this order so that sm_90 never loads (JIT-builds) csrc/ for an INT4 GEMM it would not use
    native = ((os.environ.get("MEGAQ_INT4_GEMM") == "native"
               or (xq.data.is_cuda and has_native_int4_mma(xq.data.device)))
              and gemm._native_int4_eligible(xq, wq, out_dtype))
    if native or x_values is None or w_values is None:
        return gemm.scaled_mm(xq, wq, out_dtype=out_dtype, bias=bias)
    a = q.QuantizedTensor(x_values, row_scales(xq).reshape(-1, 1).contiguous(), (1, xq.shape[1]), 8, xq.shape)
    b = q.QuantizedTensor(w_values, row_scales(wq).reshape(-1, 1).contiguous(), (1, wq.shape[1]), 8, wq.shape)
    return gemm.scaled_mm(a, b, out_dtype=out_dtype, bias=bias)


# --------------------------------------------------------------------------------------------------
# backward
def bit_split_int4(g: torch.Tensor, generator: torch.Generator | None = None,
                   check: bool = True) -> BitSplitGradient:
    """`megaq.quant.bit_split(g)` as one byte per element (see `BitSplitGradient`), one read of `g`."""
    if g.dim() != 2:
        raise ValueError(f"bit_split_int4 input must be 2-D [tokens, out]; got shape {tuple(g.shape)}")
    if not _fused(g):
        high, low = _quant().bit_split(g.float(), generator, check)
        qh, ql = high.int_values(), low.int_values()
        return BitSplitGradient(_pack_pair(qh, ql), high.scale.reshape(-1), low.scale.reshape(-1),
                                qh.float().pow(2).sum(1), ql.float().pow(2).sum(1))
    from .triton_int4 import _bit_split_kernel
    T, O = g.shape
    dev = g.device
    BC = max(16, _next_pow2(O))
    single = BC <= 8192
    if single:
        BR = max(1, min(_cfg("QUANT_ROWS", 64), 8192 // BC))
    else:
        BC, BR = 2048, 4
    pair = torch.empty((T, O), dtype=torch.uint8, device=dev)
    stats = torch.empty((4, T), dtype=torch.float32, device=dev)
    flag = torch.zeros(1, dtype=torch.int32, device=dev) if check else stats
    _bit_split_kernel[(_cdiv(T, BR),)](
        g, T, O, g.stride(0), g.stride(1), pair, stats[0], stats[1], stats[2], stats[3],
        _seed_tensor(dev, generator), flag, BR=BR, BC=BC, SINGLE=single, CHECK=check,
        RINT_LIBDEVICE=_rint_libdevice(), num_warps=8 if BR * BC >= 8192 else 4)
    _check_flag(flag if check else None, g, "output gradient of an int4 linear")
    return BitSplitGradient(pair, stats[0], stats[1], stats[2], stats[3])


def sampled_gradients_reference(split: BitSplitGradient, dgrad_weights, wgrad_weights, xq, wq,
                                hadamard: int, in_features: int, x_dtype: torch.dtype,
                                w_dtype: torch.dtype):
    """The reference backward products given the sampling weights (1/p per kept split row, 0 dropped;
    2T entries, high rows first): the sampled rows folded per token and rounded to the activations'
    dtype, times the dequantized saved operand, then the inverse Hadamard, cropped to `in_features`."""
    q = _quant()
    qh, ql = split.values()
    tokens = qh.shape[0]
    split_rows = torch.cat((qh.float() * split.high_scale[:, None], ql.float() * split.low_scale[:, None]))

    def folded(weights):
        sampled = split_rows * weights[:, None]
        return (sampled[:tokens] + sampled[tokens:]).to(x_dtype)

    grad_x = grad_w = None
    if dgrad_weights is not None:
        grad_x = q.block_hadamard(folded(dgrad_weights) @ wq.dequantize(x_dtype), hadamard)
        grad_x = grad_x[:, :in_features].to(x_dtype)
    if wgrad_weights is not None:
        grad_w = q.block_hadamard(folded(wgrad_weights).t() @ xq.dequantize(x_dtype), hadamard)
        grad_w = grad_w[:, :in_features].to(w_dtype)
    return grad_x, grad_w


def int4_sampled_gradients(split: BitSplitGradient, dgrad_weights: torch.Tensor | None,
                      wgrad_weights: torch.Tensor | None, xq, wq, hadamard: int, in_features: int,
                      x_dtype: torch.dtype, w_dtype: torch.dtype,
                      generator: torch.Generator | None = None):
    """(∇X or None, ∇W or None) of the INT4 backward given the sampling weights of the 2T split rows
    (high rows first; None: that gradient is not needed). The fused path is described in the module
    docstring (INT8 tensor cores, stochastic INT8 requantization of the sampled gradient)."""
    if dgrad_weights is None and wgrad_weights is None:
        return None, None
    if not _fused(split.high_scale, hadamard=hadamard):
        return sampled_gradients_reference(split, dgrad_weights, wgrad_weights, xq, wq, hadamard,
                                           in_features, x_dtype, w_dtype)
    from .triton_int4 import _dgrad_operand_kernel, _unpack_t_kernel, _wgrad_operand_kernel
    T, O = split.pair.shape
    Ip = xq.shape[1]
    dev = split.pair.device
    cfg = grad_mm_config(hadamard)
    BK = cfg["BK"]
    want_dx, want_dw = dgrad_weights is not None, wgrad_weights is not None
    dummy = split.high_scale
    chi = clo = whi = wlo = dummy
    if want_dx:
        chi, clo = dgrad_weights[:T] * split.high_scale, dgrad_weights[T:] * split.low_scale
    if want_dw:
        sx = row_scales(xq)
        whi = wgrad_weights[:T] * split.high_scale * sx
        wlo = wgrad_weights[T:] * split.low_scale * sx

    # dgrad operand (per-token INT8) and wgrad's per-column abs-max, one pass over the split gradient
    BR = _cfg("QUANT_ROWS", 16)
    BC = min(256, max(16, _next_pow2(O)))
    n_rb = _cdiv(T, BR)
    a_d = torch.empty((T, O), dtype=torch.int8, device=dev) if want_dx else split.pair
    v = torch.empty(T, dtype=torch.float32, device=dev) if want_dx else dummy
    colmax = torch.empty((n_rb, O), dtype=torch.float32, device=dev) if want_dw else dummy
    _dgrad_operand_kernel[(n_rb,)](split.pair, T, O, chi, clo, row_scales(wq), a_d, v, whi, wlo, colmax,
                                   _seed_tensor(dev, generator), BR=BR, BC=BC, DGRAD=want_dx,
                                   WGRAD=want_dw, RINT_LIBDEVICE=_rint_libdevice(), num_warps=4)
    BP, BJ = _cfg("QUANT_ROWS", 64), _cfg("QUANT_COLS", 128)
    grad_x = grad_w = None
    if want_dx:
        b_d = torch.empty((Ip, O), dtype=torch.int8, device=dev)
        _unpack_t_kernel[(_cdiv(O, BP), _cdiv(Ip, BJ))](wq.data, Ip, wq.data.stride(0), b_d, b_d, O, b_d, O,
                                                        BP=BP, BJ=BJ, GATHER=False, PADK=1, num_warps=4)
        grad_x = torch.empty((T, in_features), dtype=x_dtype, device=dev)
        _sampled_mm(a_d, b_d, v, grad_x, None, hadamard, cfg)
    if want_dw:
        colmax = colmax.amax(0)
        u = torch.where(colmax > 0, colmax / 127, torch.ones_like(colmax))
        # the kept tokens, compacted without a host synchronization: position = prefix sum
        kept = (whi != 0) | (wlo != 0)
        pos = torch.cumsum(kept, 0, dtype=torch.int32)
        count = pos[-1:]
        idx = torch.empty(T + 1, dtype=torch.int32, device=dev)
        idx.scatter_(0, torch.where(kept, pos - 1, T).long(), torch.arange(T, dtype=torch.int32, device=dev))
        kcap = _cdiv(T, BK) * BK
        a_w = torch.empty((O, kcap), dtype=torch.int8, device=dev)
        b_w = torch.empty((Ip, kcap), dtype=torch.int8, device=dev)
        _wgrad_operand_kernel[(_cdiv(kcap, BP), _cdiv(O, BJ))](
            split.pair, O, idx, count, whi, wlo, u, a_w, kcap, _seed_tensor(dev, generator),
            BP=BP, BO=BJ, PADK=BK, RINT_LIBDEVICE=_rint_libdevice(), num_warps=4)
        _unpack_t_kernel[(_cdiv(kcap, BP), _cdiv(Ip, BJ))](xq.data, Ip, xq.data.stride(0), idx, count, 0, b_w,
                                                           kcap, BP=BP, BJ=BJ, GATHER=True, PADK=BK,
                                                           num_warps=4)
        grad_w = torch.empty((O, in_features), dtype=w_dtype, device=dev)
        _sampled_mm(a_w, b_w, u, grad_w, count, hadamard, cfg)
    return grad_x, grad_w


def grad_mm_config(hadamard: int) -> dict:
    """The sampled GEMMs' tiles: `GRAD_MM_CONFIG` under `dispatch.config_override` (keys BM, BN, BK,
    GROUP_M, num_warps, num_stages, USE_TMA); BN holds whole Hadamard blocks for the epilogue."""
    cfg = dict(GRAD_MM_CONFIG)
    cfg.update({k: v for k, v in (dispatch._CONFIG_OVERRIDE or {}).items() if k in cfg or k == "USE_TMA"})
    cfg["BN"] = max(cfg["BN"], hadamard)
    return cfg


def _sampled_mm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, out: torch.Tensor,
                k_dev: torch.Tensor | None, hadamard: int, cfg: dict) -> None:
    """out = H · (sa ⊙ (a bᵀ)) cropped to out's columns (hadamard 0: no rotation, for the benchmark's
    cost split); the reduction length is `k_dev` (device) when given, else a's width."""
    from .triton_int4 import _sampled_mm_kernel
    M, K = a.shape
    N = b.shape[0]
    dev = a.device
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    h = _hadamard_pm1(hadamard, torch.float32 if _interpreting() else torch.bfloat16, str(dev)) if hadamard else sa
    use_tma = cfg.get("USE_TMA", True) and dispatch._has_tma(dev) and K % 16 == 0
    a_desc = b_desc = None
    a_ptr, b_ptr = a, b
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        a_desc, b_desc = TensorDescriptor.from_tensor(a, [BM, BK]), TensorDescriptor.from_tensor(b, [BN, BK])
        a_ptr = b_ptr = None
    _sampled_mm_kernel[(_cdiv(M, BM) * _cdiv(N, BN),)](
        a_ptr, a_desc, b_ptr, b_desc, sa, out, h, 1.0 / math.sqrt(max(hadamard, 1)), k_dev if k_dev is not None else sa,
        M, N, out.shape[1], K, a.stride(0), b.stride(0), out.stride(0),
        BM=BM, BN=BN, BK=BK, GROUP_M=cfg["GROUP_M"], HAD=hadamard, DYN_K=k_dev is not None,
        USE_TMA=use_tma, EVEN_K=k_dev is None and K % BK == 0, UPCAST=_interpreting(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
