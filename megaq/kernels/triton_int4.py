"""Triton kernels of the INT4 recipe (ALGORITHMS.md §2) on INT8 tensor cores. The data flow, what each
kernel computes and where it differs from `megaq.quant` are in `megaq.kernels.int4`'s docstring.

Kernels
- `_hq_int4_kernel`: block Hadamard rotation + INT4 quantization of whole rows in one read (the row
  strip lives in registers): per-row amax scale (MODE 0), a given per-tensor step (MODE 1, LSQ), or
  only the per-row Σ|rotated| that the LSQ step needs (MODE 2). Writes the INT4 values packed two per
  byte (saved for backward), optionally the same values in INT8 containers (the forward GEMM's
  operand) and Σq² per row (the row norms of the leverage scores).
- `_bit_split_kernel`: ∇Y → high = Q4 nearest, low = Q4 stochastic of the residual, both per row, one
  byte per element (high nibble | low nibble << 4), their scales and Σq² per row. One read of ∇Y.
- `_dgrad_operand_kernel`: the sampled, reweighted gradient of dgrad with W's per-channel scale folded
  in, requantized per token to INT8 (stochastic); in the same pass the per-column partial abs-max of
  wgrad's operand.
- `_wgrad_operand_kernel`: wgrad's operand for the kept tokens only (compacted through an index),
  requantized per output channel to INT8 (stochastic), written reduction-major (transposed).
- `_unpack_t_kernel`: packed INT4 rows (optionally gathered through the same index) unpacked into
  INT8 containers and written transposed: the B operands X̂ᵀ (wgrad) and Ŵᵀ (dgrad).
- `_sampled_mm_kernel`: INT8 tensor-core GEMM `s_a[m] · Σ_k A[m, k] B[n, k]`, the reduction length
  optionally read from device memory (the number of kept tokens: no host synchronization), with the
  inverse block Hadamard transform of the output rows and the crop of the padding in the epilogue.

Packed layout (megaq.quant.packing): element 2i in the low nibble, 2i+1 in the high nibble.
Random numbers: Philox keyed by a seed drawn from torch's generator per call, counter = the element's
index in its source tensor (so a value's random number does not depend on the tiling).
"""


import triton
import triton.language as tl

from .triton_gemm import _int8_dot_k_loop, _program_tile
from .triton_quant import (_load_hadamard, _load_tile, _nonfinite, _raise_flag, _rotate_cols,
                           _scale_from_amax, _to_int, _uniform_tile)


@triton.jit
def _nibbles(b):
    """uint8 → (low nibble, high nibble) as sign-extended int32 in [-8, 7]."""
    v = b.to(tl.int32)
    lo = ((v & 0xF) ^ 8) - 8
    hi = (((v >> 4) & 0xF) ^ 8) - 8
    return lo, hi


@triton.jit
def _pack_nibbles(lo, hi):
    """Two int8/int32 tensors in [-8, 7] → one uint8 tensor (lo | hi << 4)."""
    return ((lo.to(tl.int32) & 0xF) | ((hi.to(tl.int32) & 0xF) << 4)).to(tl.uint8)


@triton.jit
def _rotate_row_groups(y, h, inv_sqrt, R: tl.constexpr, C: tl.constexpr, HAD: tl.constexpr,
                       SPLIT3: tl.constexpr, UPCAST: tl.constexpr):
    """Every consecutive group of HAD elements of each row of y [R, C] times the orthonormal Hadamard
    block (h the ±1 Sylvester matrix, inv_sqrt = 1/sqrt(HAD)): the groups are the rows of an
    [R·C/HAD, HAD] tile for `_rotate_cols`. SPLIT3: y is FP32 (three BF16 slices against the exact
    ±1 BF16 matrix); UPCAST (interpreter): one FP32 dot; otherwise y is BF16/FP16, h of its dtype."""
    z = _rotate_cols(tl.reshape(y, [R * C // HAD, HAD]), h, inv_sqrt, HAD, SPLIT3, UPCAST)
    return tl.reshape(z, [R, C])


@triton.jit
def _hq_int4_kernel(x_ptr, R, C_in, C, stride_xr, stride_xc, h_ptr, inv_sqrt, step_ptr,
                    q8_ptr, packed_ptr, s_ptr, nsq_ptr, absum_ptr, flag_ptr,
                    BR: tl.constexpr, CP: tl.constexpr, HAD: tl.constexpr, MODE: tl.constexpr,
                    SPLIT3: tl.constexpr, UPCAST: tl.constexpr, CHECK: tl.constexpr,
                    WRITE_Q8: tl.constexpr, RINT_LIBDEVICE: tl.constexpr):
    """Rows [pid·BR, pid·BR + BR) of x [R, C_in]: zero-pad to C (a multiple of HAD; CP ≥ C a power of
    two), rotate, quantize to [-7, 7]. Outputs: packed [R, C/2] uint8, q8 [R, C] int8 (WRITE_Q8),
    s [R] (MODE 0), nsq [R] = Σq² (MODE 0/1), absum [R] = Σ|rotated| (MODE 2 only)."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    cols = tl.arange(0, CP)
    rmask = rows < R
    x = _load_tile(x_ptr, rows, cols, R, C_in, stride_xr, stride_xc)
    y = _rotate_row_groups(x, _load_hadamard(h_ptr, HAD), inv_sqrt, BR, CP, HAD, SPLIT3, UPCAST)
    ay = tl.abs(y)
    if CHECK:
        _raise_flag(_nonfinite(ay), flag_ptr)
    if MODE == 2:
        tl.store(absum_ptr + rows, tl.sum(ay, axis=1), mask=rmask)
    else:
        if MODE == 0:
            s = _scale_from_amax(tl.max(ay, axis=1), 7)
            tl.store(s_ptr + rows, s, mask=rmask)
            v = tl.math.div_rn(y, tl.broadcast_to(s[:, None], [BR, CP]))
        else:
            step = tl.load(step_ptr)
            v = tl.math.div_rn(y, tl.zeros([BR, CP], tl.float32) + step)
        q = _to_int(v, 0.0, False, 7, RINT_LIBDEVICE)
        qf = q.to(tl.float32)
        tl.store(nsq_ptr + rows, tl.sum(qf * qf, axis=1), mask=rmask)
        if WRITE_Q8:
            tl.store(q8_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], q,
                     mask=rmask[:, None] & (cols < C)[None, :])
        lo, hi2 = tl.split(tl.reshape(q, [BR, CP // 2, 2]))
        pc = tl.arange(0, CP // 2)
        tl.store(packed_ptr + rows.to(tl.int64)[:, None] * (C // 2) + pc[None, :], _pack_nibbles(lo, hi2),
                 mask=rmask[:, None] & (pc < C // 2)[None, :])


@triton.jit
def _split_chunk(g, s_hi, s_lo, u, RINT_LIBDEVICE: tl.constexpr):
    """High and low INT4 parts of one chunk given both row scales ([BR] each); also the residual."""
    q_hi = _to_int(tl.math.div_rn(g, s_hi[:, None] + tl.zeros_like(g)), 0.0, False, 7, RINT_LIBDEVICE)
    resid = g - q_hi.to(tl.float32) * s_hi[:, None]
    q_lo = _to_int(tl.math.div_rn(resid, s_lo[:, None] + tl.zeros_like(g)), u, True, 7, RINT_LIBDEVICE)
    return q_hi, q_lo


@triton.jit
def _bit_split_kernel(g_ptr, R, C, stride_gr, stride_gc, pair_ptr, shi_ptr, slo_ptr, nhi_ptr, nlo_ptr,
                      seed_ptr, flag_ptr, BR: tl.constexpr, BC: tl.constexpr, SINGLE: tl.constexpr,
                      CHECK: tl.constexpr, RINT_LIBDEVICE: tl.constexpr):
    """megaq.quant.bit_split of rows [pid·BR, pid·BR + BR) of g [R, C]: s_hi = amax/7,
    q_hi = rint(g/s_hi); residual = g − q_hi·s_hi, s_lo = amax(residual)/7, q_lo = stochastic(residual/s_lo).
    pair [R, C] uint8 = q_hi | q_lo << 4. SINGLE: the row fits one [BR, BC] tile (one read); otherwise
    three passes over the row's chunks (abs-max, residual abs-max, quantize; re-reads hit L2)."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    rmask = rows < R
    seed = tl.load(seed_ptr)
    n_qcols = tl.cdiv(C, BC) * (BC // 4)
    zero_u = tl.zeros([BR, BC], tl.float32)
    if SINGLE:
        cols = tl.arange(0, BC)
        m = rmask[:, None] & (cols < C)[None, :]
        g = _load_tile(g_ptr, rows, cols, R, C, stride_gr, stride_gc).to(tl.float32)
        ag = tl.abs(g)
        if CHECK:
            _raise_flag(_nonfinite(ag), flag_ptr)
        s_hi = _scale_from_amax(tl.max(ag, axis=1), 7)
        q_hi = _to_int(tl.math.div_rn(g, s_hi[:, None] + zero_u), 0.0, False, 7, RINT_LIBDEVICE)
        resid = g - q_hi.to(tl.float32) * s_hi[:, None]
        s_lo = _scale_from_amax(tl.max(tl.abs(resid), axis=1), 7)
        u = _uniform_tile(seed, rows, tl.arange(0, BC // 4), n_qcols, BR, BC)
        q_lo = _to_int(tl.math.div_rn(resid, s_lo[:, None] + zero_u), u, True, 7, RINT_LIBDEVICE)
        tl.store(pair_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], _pack_nibbles(q_hi, q_lo), mask=m)
        fh = q_hi.to(tl.float32)
        fl = q_lo.to(tl.float32)
        n_hi = tl.sum(fh * fh, axis=1)
        n_lo = tl.sum(fl * fl, axis=1)
    else:
        amax = tl.zeros([BR], tl.float32)
        for c0 in range(0, C, BC):
            g = _load_tile(g_ptr, rows, c0 + tl.arange(0, BC), R, C, stride_gr, stride_gc).to(tl.float32)
            ag = tl.abs(g)
            if CHECK:
                _raise_flag(_nonfinite(ag), flag_ptr)
            amax = tl.maximum(amax, tl.max(ag, axis=1))
        s_hi = _scale_from_amax(amax, 7)
        ramax = tl.zeros([BR], tl.float32)
        for c0 in range(0, C, BC):
            g = _load_tile(g_ptr, rows, c0 + tl.arange(0, BC), R, C, stride_gr, stride_gc).to(tl.float32)
            q_hi = _to_int(tl.math.div_rn(g, s_hi[:, None] + zero_u), 0.0, False, 7, RINT_LIBDEVICE)
            ramax = tl.maximum(ramax, tl.max(tl.abs(g - q_hi.to(tl.float32) * s_hi[:, None]), axis=1))
        s_lo = _scale_from_amax(ramax, 7)
        n_hi = tl.zeros([BR], tl.float32)
        n_lo = tl.zeros([BR], tl.float32)
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            m = rmask[:, None] & (cols < C)[None, :]
            g = _load_tile(g_ptr, rows, cols, R, C, stride_gr, stride_gc).to(tl.float32)
            u = _uniform_tile(seed, rows, c0 // 4 + tl.arange(0, BC // 4), n_qcols, BR, BC)
            q_hi, q_lo = _split_chunk(g, s_hi, s_lo, u, RINT_LIBDEVICE)
            tl.store(pair_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], _pack_nibbles(q_hi, q_lo),
                     mask=m)
            fh = q_hi.to(tl.float32)
            fl = q_lo.to(tl.float32)
            n_hi += tl.sum(fh * fh, axis=1)
            n_lo += tl.sum(fl * fl, axis=1)
    tl.store(shi_ptr + rows, s_hi, mask=rmask)
    tl.store(slo_ptr + rows, s_lo, mask=rmask)
    tl.store(nhi_ptr + rows, n_hi, mask=rmask)
    tl.store(nlo_ptr + rows, n_lo, mask=rmask)


@triton.jit
def _dgrad_operand_kernel(pair_ptr, T, O, chi_ptr, clo_ptr, sw_ptr, a_ptr, v_ptr,
                          whi_ptr, wlo_ptr, colmax_ptr, seed_ptr,
                          BR: tl.constexpr, BC: tl.constexpr, DGRAD: tl.constexpr, WGRAD: tl.constexpr,
                          RINT_LIBDEVICE: tl.constexpr):
    """Rows [pid·BR, pid·BR + BR) of the sampled dgrad operand
        G[t, o] = (chi[t]·q_hi[t, o] + clo[t]·q_lo[t, o]) · sw[o]
    requantized per row to INT8 with stochastic rounding: a [T, O] int8, v [T] = amax/127.
    WGRAD: also the abs-max over these rows of wgrad's operand whi[t]·q_hi + wlo[t]·q_lo per column,
    written to colmax[pid, :] (reduced over programs by the caller). DGRAD=False: only that."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    rmask = rows < T
    chi = tl.load(chi_ptr + rows, mask=rmask, other=0.0)[:, None]
    clo = tl.load(clo_ptr + rows, mask=rmask, other=0.0)[:, None]
    if WGRAD:
        whi = tl.load(whi_ptr + rows, mask=rmask, other=0.0)[:, None]
        wlo = tl.load(wlo_ptr + rows, mask=rmask, other=0.0)[:, None]
    amax = tl.zeros([BR], tl.float32)
    for c0 in range(0, O, BC):
        cols = c0 + tl.arange(0, BC)
        cmask = cols < O
        b = tl.load(pair_ptr + rows.to(tl.int64)[:, None] * O + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0)
        q_hi, q_lo = _nibbles(b)
        if DGRAD:
            sw = tl.load(sw_ptr + cols, mask=cmask, other=0.0)[None, :]
            g = (chi * q_hi.to(tl.float32) + clo * q_lo.to(tl.float32)) * sw
            amax = tl.maximum(amax, tl.max(tl.abs(g), axis=1))
        if WGRAD:
            gw = whi * q_hi.to(tl.float32) + wlo * q_lo.to(tl.float32)
            tl.store(colmax_ptr + pid.to(tl.int64) * O + cols, tl.max(tl.abs(gw), axis=0), mask=cmask)
    if DGRAD:
        v = _scale_from_amax(amax, 127)
        tl.store(v_ptr + rows, v, mask=rmask)
        seed = tl.load(seed_ptr)
        n_qcols = tl.cdiv(O, BC) * (BC // 4)
        for c0 in range(0, O, BC):
            cols = c0 + tl.arange(0, BC)
            cmask = cols < O
            m = rmask[:, None] & cmask[None, :]
            b = tl.load(pair_ptr + rows.to(tl.int64)[:, None] * O + cols[None, :], mask=m, other=0)
            q_hi, q_lo = _nibbles(b)
            sw = tl.load(sw_ptr + cols, mask=cmask, other=0.0)[None, :]
            g = (chi * q_hi.to(tl.float32) + clo * q_lo.to(tl.float32)) * sw
            u = _uniform_tile(seed, rows, c0 // 4 + tl.arange(0, BC // 4), n_qcols, BR, BC)
            q = _to_int(tl.math.div_rn(g, v[:, None] + tl.zeros_like(g)), u, True, 127, RINT_LIBDEVICE)
            tl.store(a_ptr + rows.to(tl.int64)[:, None] * O + cols[None, :], q, mask=m)


@triton.jit
def _wgrad_operand_kernel(pair_ptr, O, idx_ptr, count_ptr, whi_ptr, wlo_ptr, u_ptr, at_ptr, KCAP,
                          seed_ptr, BP: tl.constexpr, BO: tl.constexpr, PADK: tl.constexpr,
                          RINT_LIBDEVICE: tl.constexpr):
    """at[o, p] = stochastic_int8((whi[t]·q_hi[t, o] + wlo[t]·q_lo[t, o]) / u[o]) for t = idx[p],
    p < count (the kept tokens, compacted); zeros for count ≤ p < ceil(count/PADK)·PADK (the
    GEMM's last K block); positions beyond are not read by the GEMM and not written."""
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    count = tl.load(count_ptr)
    if pid_p * BP < tl.cdiv(count, PADK) * PADK:
        ps = pid_p * BP + tl.arange(0, BP)
        os = pid_o * BO + tl.arange(0, BO)
        live = ps < count
        omask = os < O
        t = tl.load(idx_ptr + ps, mask=live, other=0)
        m = live[:, None] & omask[None, :]
        b = tl.load(pair_ptr + t.to(tl.int64)[:, None] * O + os[None, :], mask=m, other=0)
        q_hi, q_lo = _nibbles(b)
        whi = tl.load(whi_ptr + t, mask=live, other=0.0)[:, None]
        wlo = tl.load(wlo_ptr + t, mask=live, other=0.0)[:, None]
        uo = tl.load(u_ptr + os, mask=omask, other=1.0)[None, :]
        g = whi * q_hi.to(tl.float32) + wlo * q_lo.to(tl.float32)
        seed = tl.load(seed_ptr)
        # counter = the source element t·O + o, in quarter-column units as _uniform_tile expects
        r = _uniform_tile(seed, t, pid_o * (BO // 4) + tl.arange(0, BO // 4), tl.cdiv(O, BO) * (BO // 4),
                          BP, BO)
        q = _to_int(tl.math.div_rn(g, uo + tl.zeros_like(g)), r, True, 127, RINT_LIBDEVICE)
        q = tl.where(m, q, 0)
        smask = (ps < KCAP)[:, None] & omask[None, :]
        tl.store(at_ptr + os.to(tl.int64)[None, :] * KCAP + ps[:, None], q, mask=smask)


@triton.jit
def _unpack_t_kernel(packed_ptr, C, stride_pr, idx_ptr, count_ptr, n_static, out_ptr, KCAP,
                     BP: tl.constexpr, BJ: tl.constexpr, GATHER: tl.constexpr, PADK: tl.constexpr):
    """out[j, p] = q[src(p), j], q the INT4 values of packed [*, C/2] (C even), src(p) = idx[p] for
    p < count (GATHER) or p for p < n_static; zeros up to the next multiple of PADK."""
    pid_p = tl.program_id(0)
    pid_j = tl.program_id(1)
    if GATHER:
        count = tl.load(count_ptr)
    else:
        count = n_static
    if pid_p * BP < tl.cdiv(count, PADK) * PADK:
        ps = pid_p * BP + tl.arange(0, BP)
        live = ps < count
        if GATHER:
            src = tl.load(idx_ptr + ps, mask=live, other=0)
        else:
            src = ps
        jc = pid_j * (BJ // 2) + tl.arange(0, BJ // 2)
        b = tl.load(packed_ptr + src.to(tl.int64)[:, None] * stride_pr + jc[None, :],
                    mask=live[:, None] & (jc < C // 2)[None, :], other=0)
        lo, hi = _nibbles(b)
        q = tl.reshape(tl.join(lo, hi), [BP, BJ]).to(tl.int8)
        js = pid_j * BJ + tl.arange(0, BJ)
        m = (ps < KCAP)[:, None] & (js < C)[None, :]
        tl.store(out_ptr + js.to(tl.int64)[None, :] * KCAP + ps[:, None], q, mask=m)


@triton.jit
def _sampled_mm_kernel(a_ptr, a_desc, b_ptr, b_desc, sa_ptr, c_ptr, h_ptr, inv_sqrt, k_ptr,
                       M, N, N_OUT, K, stride_am, stride_bn, stride_cm,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                       HAD: tl.constexpr, DYN_K: tl.constexpr, USE_TMA: tl.constexpr,
                       EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """c[m, n] = (sa[m] · Σ_{k < K'} a[m, k] b[n, k]) · H_HAD over n-blocks, stored for n < N_OUT.
    K' = *k_ptr (DYN_K: the reduction length lives on the device) or K. A, B int8 K-major; INT32
    accumulation on the tensor cores; the row scale and the inverse Hadamard run once in the epilogue
    (HAD = 0: none). Rows of A/B beyond M/N are read wrapped (never stored)."""
    _, off_m, off_n, offs_m, offs_n, offs_am, offs_bn = _program_tile(M, N, BM, BN, GROUP_M)
    if DYN_K:
        k_run = tl.load(k_ptr)
    else:
        k_run = K
    acc = _int8_dot_k_loop(a_ptr, a_desc, b_ptr, b_desc, offs_am, offs_bn, off_m, off_n, k_run, stride_am,
                           stride_bn, BM, BN, BK, USE_TMA, EVEN_K, False)
    sa = tl.load(sa_ptr + offs_am)
    y = acc.to(tl.float32) * sa[:, None]
    if HAD > 0:
        y = _rotate_row_groups(y, _load_hadamard(h_ptr, HAD), inv_sqrt, BM, BN, HAD, True, UPCAST)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N_OUT)[None, :])

