"""Triton block-scaled INT8 GEMM: out[M, N] = A[M, K] · B[N, K]ᵀ with FP32 scales along K.

    out[m, n] = Σ_kb sa[m // RA, kb] · sb[n // RB, kb] · Σ_{k ∈ kb} a[m, k] · b[n, k]

Two modes (constexpr MODE):
- MODE_ROWCOL (0): both operands have one scale per row over the whole K (per-row × per-column,
  the Hadamard-rotated recipe). INT32 accumulation over all of K on the tensor cores, the scales
  applied once in the epilogue.
- MODE_BLOCKED (1): scales every G elements of K (G = 32, 64, 128, 256). Each K-block's INT32
  partial product is converted to FP32, scaled by sa·sb and accumulated in FP32. J slices of G
  per loop iteration (separate loads and dots). An operand with one scale per row (K block ≥ K)
  gets a zero K-stride on its scale; an operand with a coarser K block (multiple of G) reads its
  scale index kb // RATIO.

The INT32→FP32 conversion of every K-block's partial (CVT):
- 0: `cvt.rn.f32.s32` (I2FP.F32.S32 in sm_90 SASS),
- 1: magic number: |p| < 2^22, so bitcast(p + 0x4B400000) = 1.5·2^23 + p exactly in fp32; one IADD
  and one FADD, both on the full-rate pipes,
Both are exact (|p| ≤ 256·127² < 2^22). (Triton folds the IADD of CVT 1 into the wgmma's
accumulator init, so CVT 1 = "the tensor core adds the magic offset" + one FADD; measured slower than
CVT 0 on sm_90, where the conversion is I2FP on the ALU pipe, not the 16/clk I2F.)

Epilogues (constexpr OUT_MODE): 0 = store FP32/BF16/FP16 (+ bias), 1 = requantize each 1×OUT_QB
block of the output row to INT8 (nearest or stochastic), writing payload + FP32 scales — the INT8
data flow (same numerics as `quantize_blockwise(out, (1, OUT_QB))` on the FP32 result).

Tails: rows of A/B beyond M/N are read wrapped (modulo), so loads never go out of bounds and need no
mask on M/N; K tails are masked (pointer path) or zero-filled by the TMA engine (descriptor path);
stores are masked. Grid over (M/BM)·(N/BN) tiles in grouped order (GROUP_M), any N (no 4096 limit).
"""


import triton
import triton.language as tl
from triton.language.extra import libdevice

from .triton_quant import _cast_out, _uniform_tile

MODE_ROWCOL = 0
MODE_BLOCKED = 1
MAGIC_I = 0x4B400000
MAGIC_F = 12582912.0


@triton.jit
def _load_ab(a_ptr, a_desc, b_ptr, b_desc, offs_am, offs_bn, k0, K, stride_am, stride_bn,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_TMA: tl.constexpr,
             EVEN_K: tl.constexpr, off_m, off_n):
    if USE_TMA:
        a = a_desc.load([off_m, k0])
        b = b_desc.load([off_n, k0])
    else:
        offs_k = k0 + tl.arange(0, BK)
        a_ptrs = a_ptr + offs_am.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + offs_bn.to(tl.int64)[:, None] * stride_bn + offs_k[None, :]
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(offs_k < K)[None, :], other=0)
            b = tl.load(b_ptrs, mask=(offs_k < K)[None, :], other=0)
    return a, b


@triton.jit
def _program_tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's [BM, BN] output tile, in grouped order: GROUP_M row tiles walk the column tiles
    together, so the A rows and B tiles they share are reused from L2. Returns the tile's column index
    pid_n, its first row and column, its row and column indices, and those indices wrapped modulo
    M / N for the loads (always in bounds; rows >= M and columns >= N are never stored)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_m)
    pid_n = (pid % num_in_group) // group_m
    off_m = pid_m * BM
    off_n = pid_n * BN
    offs_m = off_m + tl.arange(0, BM)
    offs_n = off_n + tl.arange(0, BN)
    return pid_n, off_m, off_n, offs_m, offs_n, offs_m % M, offs_n % N


@triton.jit
def _int8_dot_k_loop(a_ptr, a_desc, b_ptr, b_desc, offs_am, offs_bn, off_m, off_n, K, stride_am, stride_bn,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_TMA: tl.constexpr,
                     EVEN_K: tl.constexpr, WS: tl.constexpr):
    """Σ_{k < K} a[m, k] · b[n, k] of the tile, accumulated in INT32 on the tensor cores (`_load_ab`
    reads the operands). The K loop lives here as one plain loop: Triton inlines this function
    into the kernel, so the loop is software-pipelined (num_stages) as if written there.
    WS: Triton's automatic warp specialization of the loop (an experiment, documented for Blackwell)."""
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    if WS:
        for k0 in tl.range(0, K, BK, warp_specialize=True):
            a, b = _load_ab(a_ptr, a_desc, b_ptr, b_desc, offs_am, offs_bn, k0, K, stride_am, stride_bn,
                            BM, BN, BK, USE_TMA, EVEN_K, off_m, off_n)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    else:
        for k0 in range(0, K, BK):
            a, b = _load_ab(a_ptr, a_desc, b_ptr, b_desc, offs_am, offs_bn, k0, K, stride_am, stride_bn,
                            BM, BN, BK, USE_TMA, EVEN_K, off_m, off_n)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _partial_f32(a, b, BM: tl.constexpr, BN: tl.constexpr, CVT: tl.constexpr):
    if CVT == 1:
        p = tl.dot(a, tl.trans(b), out_dtype=tl.int32)
        f = (p + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        p = tl.dot(a, tl.trans(b), out_dtype=tl.int32)
        f = p.to(tl.float32)
    return f


@triton.jit
def _block_scale(sa_rows, sa_ptr, sb_cols, sb_ptr, kb, stride_sak, stride_sbk, nkb_a, nkb_b,
                 RATIO_A: tl.constexpr, RATIO_B: tl.constexpr,
                 SA_SCALAR: tl.constexpr, SB_SCALAR: tl.constexpr):
    """sa·sb for K-block kb, shaped to broadcast against [BM, BN]. Scales of blocks past the end
    of K read as 0 (their partial products are 0 too)."""
    kba = kb // RATIO_A
    kbb = kb // RATIO_B
    va = kba < nkb_a
    vb = kbb < nkb_b
    kba = tl.minimum(kba, nkb_a - 1)
    kbb = tl.minimum(kbb, nkb_b - 1)
    if SA_SCALAR:
        sa = tl.load(sa_ptr + sa_rows + kba * stride_sak)
    else:
        sa = tl.load(sa_ptr + sa_rows + kba * stride_sak)[:, None]
    if SB_SCALAR:
        sb = tl.load(sb_ptr + sb_cols + kbb * stride_sbk)
    else:
        sb = tl.load(sb_ptr + sb_cols + kbb * stride_sbk)[None, :]
    sa = tl.where(va & vb, sa, 0.0)
    return sa * sb


@triton.jit
def _scaled_mm_kernel(
        a_ptr, a_desc, b_ptr, b_desc, sa_ptr, sb_ptr, c_ptr, cs_ptr, bias_ptr, seed_ptr,
        M, N, K, stride_am, stride_bn, stride_cm,
        stride_sam, stride_sak, stride_sbn, stride_sbk, stride_csm,
        RA, RB, nkb_a, nkb_b,
        MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, J: tl.constexpr,
        GROUP_M: tl.constexpr, RATIO_A: tl.constexpr, RATIO_B: tl.constexpr,
        SA_SCALAR: tl.constexpr, SB_SCALAR: tl.constexpr, CVT: tl.constexpr,
        HAS_BIAS: tl.constexpr, OUT_MODE: tl.constexpr, OUT_QB: tl.constexpr,
        OUT_STOCHASTIC: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr,
        RINT_LIBDEVICE: tl.constexpr, WS: tl.constexpr = False):
    pid_n, off_m, off_n, offs_m, offs_n, offs_am, offs_bn = _program_tile(M, N, BM, BN, GROUP_M)

    # scale pointers (row part), hoisted out of the K loop
    if SA_SCALAR:
        sa_rows = (off_m // RA) * stride_sam
    else:
        sa_rows = (offs_am // RA) * stride_sam
    if SB_SCALAR:
        sb_cols = (off_n // RB) * stride_sbn
    else:
        sb_cols = (offs_bn // RB) * stride_sbn

    if MODE == 0:
        acc_i = _int8_dot_k_loop(a_ptr, a_desc, b_ptr, b_desc, offs_am, offs_bn, off_m, off_n, K, stride_am,
                                 stride_bn, BM, BN, BK, USE_TMA, EVEN_K, WS)
        if SA_SCALAR:
            sa = tl.load(sa_ptr + sa_rows)
        else:
            sa = tl.load(sa_ptr + sa_rows)[:, None]
        if SB_SCALAR:
            sb = tl.load(sb_ptr + sb_cols)
        else:
            sb = tl.load(sb_ptr + sb_cols)[None, :]
        acc = acc_i.to(tl.float32) * sa * sb
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK * J):
            kb = k0 // BK
            # scales first: their loads are in flight while the tensor cores work
            s0 = _block_scale(sa_rows, sa_ptr, sb_cols, sb_ptr, kb, stride_sak, stride_sbk,
                              nkb_a, nkb_b, RATIO_A, RATIO_B, SA_SCALAR, SB_SCALAR)
            if J == 2:
                s1 = _block_scale(sa_rows, sa_ptr, sb_cols, sb_ptr, kb + 1, stride_sak, stride_sbk,
                                  nkb_a, nkb_b, RATIO_A, RATIO_B, SA_SCALAR, SB_SCALAR)
            a0, b0 = _load_ab(a_ptr, a_desc, b_ptr, b_desc, offs_am, offs_bn, k0, K, stride_am,
                              stride_bn, BM, BN, BK, USE_TMA, EVEN_K, off_m, off_n)
            f0 = _partial_f32(a0, b0, BM, BN, CVT)
            acc = acc + f0 * s0
            if J == 2:
                a1, b1 = _load_ab(a_ptr, a_desc, b_ptr, b_desc, offs_am, offs_bn, k0 + BK, K,
                                  stride_am, stride_bn, BM, BN, BK, USE_TMA, EVEN_K, off_m, off_n)
                f1 = _partial_f32(a1, b1, BM, BN, CVT)
                acc = acc + f1 * s1

    # ---- epilogue
    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if OUT_MODE == 0:
        tl.store(c_ptrs, _cast_out(acc, c_ptr.dtype.element_ty, not RINT_LIBDEVICE), mask=mask)
    else:
        NQ: tl.constexpr = BN // OUT_QB
        acc = tl.where(mask_n[None, :], acc, 0.0)
        amax = tl.max(tl.reshape(tl.abs(acc), [BM, NQ, OUT_QB]), axis=2)
        sq = tl.math.div_rn(amax, amax * 0.0 + 127.0)
        sq = tl.where(amax > 0, sq, 1.0)                                        # [BM, NQ]
        sfull = tl.reshape(tl.broadcast_to(sq[:, :, None], [BM, NQ, OUT_QB]), [BM, BN])
        v = tl.math.div_rn(acc, sfull)
        if OUT_STOCHASTIC:
            seed = tl.load(seed_ptr)
            # the quantizers' counters (element index // 4 over a row of cdiv(N, BN)·BN columns)
            u = _uniform_tile(seed, offs_m, pid_n * (BN // 4) + tl.arange(0, BN // 4),
                              tl.cdiv(N, BN) * (BN // 4), BM, BN)
            fl = tl.floor(v)
            r = fl + tl.where(u < v - fl, 1.0, 0.0)
        else:
            if RINT_LIBDEVICE:
                r = libdevice.rint(v)
            else:
                r = (v + 12582912.0) - 12582912.0
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(c_ptrs, r.to(tl.int8), mask=mask)
        qcols = pid_n * NQ + tl.arange(0, NQ)
        tl.store(cs_ptr + offs_m.to(tl.int64)[:, None] * stride_csm + qcols[None, :], sq,
                 mask=mask_m[:, None] & (qcols < tl.cdiv(N, OUT_QB))[None, :])
