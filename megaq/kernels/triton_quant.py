"""Triton quantizers: BF16/FP16/FP32 -> INT8 payload + FP32 block scales in one pass.

What each kernel computes is `megaq.quant.quantize_blockwise` (scale = amax/qmax per block, zero block ->
scale 1, partial tail blocks from their valid elements only, nearest = round half to even,
stochastic = floor(v + U[0,1)) clamped to ±qmax) — bit for bit for nearest rounding: the division is
IEEE (`div_rn`), the rounding `rint` (GPU) or the 1.5·2^23 trick (interpreter), both half-to-even.

Kernels
- `_quant_tile_kernel`: blocks that fit one program tile (1×128, 1×32, 128×128, 32×32, 128×1 ...).
  Writes the payload in the input orientation (N) and/or transposed (T), each with its own block
  shape, from one read of the input: the fused quantize+transpose pass for wgrad operands.
- `_quant_strip_kernel`: one scale per row over the whole row ((1, -1)), optionally after a block
  Hadamard rotation of the row; one program per block of rows (single read when the row fits a
  tile, otherwise two passes over its rows).
- `_quant_rows_resident_kernel`: per-row Hadamard quantization (the rotated recipe's X and ∇Y) with
  whole rows held in registers: one read of the input.
- `_amax_partial_kernel` + `_quant_given_amax_kernel`: the same per-row quantization (of x, AXIS=1,
  or of x.T written transposed, AXIS=0) split over a full 2-D grid: tile abs-maxes folded with
  atomics, then a second read quantizes. Used for transposed per-row operands (wgrad) and for the
  fused Hadamard + per-row quantize (the rotated recipe).
- `_dual_amax_kernel` + `_dual_quant_kernel`: both orientations of the rotated recipe's operand at
  once (x · H per row for the forward/dgrad GEMM, x.T · H per row for wgrad): each Hadamard-sized
  tile is read once per pass and rotated along both axes; the two abs-max vectors share one atomic
  buffer, the second pass writes both payloads.
- `_dequant_kernel`: payload * scale.

Random numbers: Philox4x32-7 (`tl.randint4x`) keyed by a seed drawn from torch's generator on every
call, counter = the element's global index // 8, 16 bits per element (`_uniform_at`), so every
element of every program has its own stream (the public Jetfire code shared one stream across CTAs).
A device-side flag records NaN/Inf; it is read (one sync) only when the caller asks for the check.
"""


import triton
import triton.language as tl
from triton.language.extra import libdevice

MAGIC_RINT = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 half-to-even in fp32


@triton.jit
def _rint(v, RINT_LIBDEVICE: tl.constexpr):
    if RINT_LIBDEVICE:
        r = libdevice.rint(v)
    else:
        r = (v + 12582912.0) - 12582912.0
    return r


@triton.jit
def _scale_from_amax(amax, QMAX: tl.constexpr):
    s = tl.math.div_rn(amax, amax * 0.0 + QMAX)
    return tl.where(amax > 0, s, 1.0)


@triton.jit
def _to_int(v, u, STOCHASTIC: tl.constexpr, QMAX: tl.constexpr, RINT_LIBDEVICE: tl.constexpr):
    if STOCHASTIC:
        # floor(v) + [u < frac(v)]: P(up) = frac(v) exactly. (floor(v + u) in fp32 is biased by an
        # ulp: v + u rounds up to the next integer when u is within half an ulp of 1.)
        fl = tl.floor(v)
        r = fl + tl.where(u < v - fl, 1.0, 0.0)
    else:
        r = _rint(v, RINT_LIBDEVICE)
    r = tl.minimum(tl.maximum(r, -QMAX * 1.0), QMAX * 1.0)
    return r.to(tl.int8)


@triton.jit
def _uniform_tile(seed, rows, qcols, n_qcols_total, BR: tl.constexpr, BC: tl.constexpr):
    """U[0,1) for a [BR, BC] tile: one Philox call per 4 elements. rows: [BR] global row index,
    qcols: [BC//4] global quarter-column index; n_qcols_total: quarter-columns per row."""
    return _uniform_at(seed, rows.to(tl.int64)[:, None] * n_qcols_total + qcols.to(tl.int64)[None, :], BR, BC)


PHILOX_ROUNDS = tl.constexpr(7)  # Philox4x32-7: the fewest rounds that pass BigCrush (Salmon et al., SC'11)


@triton.jit
def _sixteen_bit_pair(r):
    """Two uniforms on the centred 2^16-point grid (k + 1/2) / 2^16 from one 32-bit word."""
    lo = (r & 0xFFFF).to(tl.float32)
    hi = (r >> 16).to(tl.float32)
    return (lo + 0.5) * (1.0 / 65536.0), (hi + 0.5) * (1.0 / 65536.0)


@triton.jit
def _uniform_at(seed, offs, BR: tl.constexpr, BC: tl.constexpr):
    """U(0,1) for a [BR, BC] tile from the quarter-column counters `offs` [BR, BC//4] that the
    callers compute (element index // 4, with BC and each tile's start multiples of 8).

    Stochastic rounding needs a dither, not 32-bit uniforms: one Philox call (7 rounds) gives 4
    words = 8 uniforms of 16 bits, for the 8 elements of an even/odd pair of quarter counters
    (the call's counter is the even one / 2). P(round up) then differs from frac(v) by at most
    2^-17 of an INT8 step, far below the step's own noise. This halves the Philox calls of 4
    uniforms per counter and cuts their rounds from 10 to 7 (Philox was ~45% of a stochastic
    quantization's time on the H100)."""
    group = tl.reshape(offs, [BR, BC // 8, 2])
    even, _ = tl.split(group)
    r0, r1, r2, r3 = tl.randint4x(seed, even // 2, PHILOX_ROUNDS)
    a0, a1 = _sixteen_bit_pair(r0)
    b0, b1 = _sixteen_bit_pair(r1)
    c0, c1 = _sixteen_bit_pair(r2)
    d0, d1 = _sixteen_bit_pair(r3)
    u = tl.join(tl.join(tl.join(a0, a1), tl.join(b0, b1)), tl.join(tl.join(c0, c1), tl.join(d0, d1)))
    return tl.reshape(u, [BR, BC])


@triton.jit
def _nonfinite(ax):
    """1 where |x| is NaN or Inf (a NaN fails every comparison)."""
    return (~(ax <= 3.4028234663852886e38)).to(tl.int32)


@triton.jit
def _raise_flag(bad, flag_ptr):
    if tl.max(tl.max(bad, axis=1), axis=0) > 0:
        tl.store(flag_ptr, 1)


@triton.jit
def _quant_one(xf, ax, rows, cols, pid_r, pid_c, R, C, q_ptr, s_ptr, s_stride, seed, n_qcols,
               BR: tl.constexpr, BC: tl.constexpr, GR: tl.constexpr, GC: tl.constexpr,
               TRANS: tl.constexpr, STOCHASTIC: tl.constexpr, QMAX: tl.constexpr,
               RINT_LIBDEVICE: tl.constexpr):
    """Quantize one [BR, BC] tile (fp32 values xf, abs values ax) with blocks (GR, GC) in the tile's
    coordinates. TRANS: payload goes to q[C, R] (transposed) and the scale grid is transposed too."""
    NB: tl.constexpr = BC // GC
    n_cb = tl.cdiv(C, GC)
    if GR == 1 and GC == BC:          # one scale per row of the tile
        s = _scale_from_amax(tl.max(ax, axis=1), QMAX)
        sfull = s[:, None]
        smask = rows < R
        if TRANS:
            tl.store(s_ptr + pid_c * s_stride + rows, s, mask=smask)
        else:
            tl.store(s_ptr + rows * s_stride + pid_c, s, mask=smask)
    elif GR == BR and GC == 1:        # one scale per column of the tile
        s = _scale_from_amax(tl.max(ax, axis=0), QMAX)
        sfull = s[None, :]
        smask = cols < C
        if TRANS:
            tl.store(s_ptr + cols * s_stride + pid_r, s, mask=smask)
        else:
            tl.store(s_ptr + pid_r * s_stride + cols, s, mask=smask)
    elif GR == BR and GC == BC:       # the tile is one block
        s = _scale_from_amax(tl.max(tl.max(ax, axis=1), axis=0), QMAX)
        sfull = s
        if TRANS:
            tl.store(s_ptr + pid_c * s_stride + pid_r, s)
        else:
            tl.store(s_ptr + pid_r * s_stride + pid_c, s)
    elif GR == 1:                     # several 1 x GC blocks per tile row
        s = _scale_from_amax(tl.max(tl.reshape(ax, [BR, NB, GC]), axis=2), QMAX)   # [BR, NB]
        sfull = tl.reshape(tl.broadcast_to(s[:, :, None], [BR, NB, GC]), [BR, BC])
        jb = pid_c * NB + tl.arange(0, NB)
        smask = (rows < R)[:, None] & (jb < n_cb)[None, :]
        if TRANS:
            tl.store(s_ptr + jb[None, :] * s_stride + rows[:, None], s, mask=smask)
        else:
            tl.store(s_ptr + rows[:, None] * s_stride + jb[None, :], s, mask=smask)
    else:                             # GR == BR: several GR x GC blocks side by side
        s = _scale_from_amax(tl.max(tl.max(tl.reshape(ax, [BR, NB, GC]), axis=2), axis=0), QMAX)  # [NB]
        sfull = tl.reshape(tl.broadcast_to(s[None, :, None], [BR, NB, GC]), [BR, BC])
        jb = pid_c * NB + tl.arange(0, NB)
        smask = jb < n_cb
        if TRANS:
            tl.store(s_ptr + jb * s_stride + pid_r, s, mask=smask)
        else:
            tl.store(s_ptr + pid_r * s_stride + jb, s, mask=smask)
    v = tl.math.div_rn(xf, tl.zeros([BR, BC], tl.float32) + sfull)
    if STOCHASTIC:
        u = _uniform_tile(seed, rows, pid_c * (BC // 4) + tl.arange(0, BC // 4), n_qcols, BR, BC)
    else:
        u = 0.0
    q = _to_int(v, u, STOCHASTIC, QMAX, RINT_LIBDEVICE)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    if TRANS:
        tl.store(q_ptr + cols.to(tl.int64)[:, None] * R + rows[None, :], tl.trans(q), mask=tl.trans(mask))
    else:
        tl.store(q_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], q, mask=mask)


@triton.jit
def _quant_tile_kernel(x_ptr, R, C, stride_xr, stride_xc,
                       q_ptr, s_ptr, s_stride,
                       qt_ptr, st_ptr, st_stride,
                       seed_ptr, flag_ptr,
                       BR: tl.constexpr, BC: tl.constexpr,
                       N_GR: tl.constexpr, N_GC: tl.constexpr, HAS_N: tl.constexpr,
                       T_GR: tl.constexpr, T_GC: tl.constexpr, HAS_T: tl.constexpr,
                       STOCHASTIC: tl.constexpr, CHECK: tl.constexpr, QMAX: tl.constexpr,
                       RINT_LIBDEVICE: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_c * BC + tl.arange(0, BC)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xr + cols[None, :] * stride_xc,
                mask=mask, other=0.0)
    xf = x.to(tl.float32)
    ax = tl.abs(xf)
    if CHECK:
        _raise_flag(_nonfinite(ax), flag_ptr)
    n_qcols = tl.cdiv(C, BC) * (BC // 4)
    seed = 0
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
    if HAS_N:
        _quant_one(xf, ax, rows, cols, pid_r, pid_c, R, C, q_ptr, s_ptr, s_stride, seed, n_qcols,
                   BR, BC, N_GR, N_GC, False, STOCHASTIC, QMAX, RINT_LIBDEVICE)
    if HAS_T:
        if STOCHASTIC:
            seed = tl.load(seed_ptr + 1)
        _quant_one(xf, ax, rows, cols, pid_r, pid_c, R, C, qt_ptr, st_ptr, st_stride, seed, n_qcols,
                   BR, BC, T_GR, T_GC, True, STOCHASTIC, QMAX, RINT_LIBDEVICE)


@triton.jit
def _load_tile(x_ptr, rows, cols, R, C, stride_xr, stride_xc):
    """The [BR, BC] chunk of x at (rows, cols), zeros beyond R x C (the zero padding of the reference)."""
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    return tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xr + cols[None, :] * stride_xc,
                   mask=mask, other=0.0)


@triton.jit
def _bf16_slices(x):
    """FP32 x as three BF16 slices hi + mid + lo (24 significant bits): an FP32 input rotated by three
    BF16 tensor-core products against the exact ±1 BF16 Hadamard matrix."""
    x_hi = x.to(tl.bfloat16)
    r = x - x_hi.to(tl.float32)
    x_mid = r.to(tl.bfloat16)
    x_lo = (r - x_mid.to(tl.float32)).to(tl.bfloat16)
    return x_hi, x_mid, x_lo


@triton.jit
def _rotate_cols(x, h, inv_sqrt, HAD: tl.constexpr, F32_INPUT: tl.constexpr, UPCAST: tl.constexpr):
    """x · H in FP32: each row of the [BR, BC] chunk rotated by the Hadamard block when HAD > 0
    (BC == HAD; h the ±1 Sylvester matrix, inv_sqrt = 1/sqrt(HAD)); x itself in FP32 otherwise."""
    if HAD > 0:
        if UPCAST:  # the interpreter's bf16/fp16 dot is wrong (triton 3.9): compute in fp32
            y = tl.dot(x.to(tl.float32), h.to(tl.float32), out_dtype=tl.float32)
        elif F32_INPUT:
            x_hi, x_mid, x_lo = _bf16_slices(x)
            y = tl.dot(x_hi, h, out_dtype=tl.float32)
            y = tl.dot(x_mid, h, y, out_dtype=tl.float32)
            y = tl.dot(x_lo, h, y, out_dtype=tl.float32)
        else:
            y = tl.dot(x, h, out_dtype=tl.float32)
        y = y * inv_sqrt
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _load_rotated(x_ptr, rows, cols, R, C, stride_xr, stride_xc, h, inv_sqrt,
                  HAD: tl.constexpr, F32_INPUT: tl.constexpr, UPCAST: tl.constexpr):
    """Load a [BR, BC] chunk (zeros beyond R x C) and rotate its rows (`_rotate_cols`)."""
    x = _load_tile(x_ptr, rows, cols, R, C, stride_xr, stride_xc)
    return _rotate_cols(x, h, inv_sqrt, HAD, F32_INPUT, UPCAST)


@triton.jit
def _quant_strip_kernel(x_ptr, R, C, C_in, stride_xr, stride_xc,
                        q_ptr, s_ptr, h_ptr, inv_sqrt,
                        seed_ptr, flag_ptr,
                        BR: tl.constexpr, BC: tl.constexpr, SINGLE: tl.constexpr,
                        HAD: tl.constexpr, F32_INPUT: tl.constexpr, UPCAST: tl.constexpr,
                        STOCHASTIC: tl.constexpr, CHECK: tl.constexpr, QMAX: tl.constexpr,
                        RINT_LIBDEVICE: tl.constexpr):
    """One scale per row over the whole row, q [R, C] contiguous, s [R, 1]. With HAD > 0 each row is
    first rotated by the orthonormal Hadamard of size HAD (BC == HAD, C a multiple of HAD; h_ptr the
    ±1 Sylvester matrix, inv_sqrt = 1/sqrt(HAD)). C_in <= C: columns of x that exist; the
    columns C_in..C read as zeros (zero padding to whole Hadamard blocks, kept in the output). SINGLE: the whole row fits one tile (one read);
    otherwise two passes over the row (abs-max, then quantize; the second read mostly hits L2)."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    rmask = rows < R
    h = _load_hadamard(h_ptr, HAD)
    seed = 0
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
    n_qcols = tl.cdiv(C, BC) * (BC // 4)
    if SINGLE:
        cols = tl.arange(0, BC)
        y = _load_rotated(x_ptr, rows, cols, R, C_in, stride_xr, stride_xc, h, inv_sqrt, HAD, F32_INPUT, UPCAST)
        ay = tl.abs(y)
        if CHECK:
            _raise_flag(_nonfinite(ay), flag_ptr)
        s = _scale_from_amax(tl.max(ay, axis=1), QMAX)
    else:
        amax = tl.zeros([BR], tl.float32)
        bad = tl.zeros([BR], tl.int32)
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            y = _load_rotated(x_ptr, rows, cols, R, C_in, stride_xr, stride_xc, h, inv_sqrt, HAD, F32_INPUT, UPCAST)
            ay = tl.abs(y)
            amax = tl.maximum(amax, tl.max(ay, axis=1))
            if CHECK:
                bad = tl.maximum(bad, tl.max(_nonfinite(ay), axis=1))
        if CHECK:
            _raise_flag(bad[:, None], flag_ptr)
        s = _scale_from_amax(amax, QMAX)
    tl.store(s_ptr + rows, s, mask=rmask)
    if SINGLE:
        cols = tl.arange(0, BC)
        v = tl.math.div_rn(y, tl.broadcast_to(s[:, None], [BR, BC]))
        if STOCHASTIC:
            u = _uniform_tile(seed, rows, tl.arange(0, BC // 4), n_qcols, BR, BC)
        else:
            u = 0.0
        q = _to_int(v, u, STOCHASTIC, QMAX, RINT_LIBDEVICE)
        tl.store(q_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], q,
                 mask=rmask[:, None] & (cols < C)[None, :])
    else:
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            y = _load_rotated(x_ptr, rows, cols, R, C_in, stride_xr, stride_xc, h, inv_sqrt, HAD, F32_INPUT, UPCAST)
            v = tl.math.div_rn(y, tl.broadcast_to(s[:, None], [BR, BC]))
            if STOCHASTIC:
                u = _uniform_tile(seed, rows, c0 // 4 + tl.arange(0, BC // 4), n_qcols, BR, BC)
            else:
                u = 0.0
            q = _to_int(v, u, STOCHASTIC, QMAX, RINT_LIBDEVICE)
            tl.store(q_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], q,
                     mask=rmask[:, None] & (cols < C)[None, :])


@triton.jit
def _quant_rows_resident_kernel(x_ptr, R, C_in, Cp, stride_xr, stride_xc, q_ptr, s_ptr, h_ptr, inv_sqrt,
                                seed_ptr, flag_ptr,
                                BR: tl.constexpr, NCH: tl.constexpr, HAD: tl.constexpr,
                                F32_INPUT: tl.constexpr, UPCAST: tl.constexpr, STOCHASTIC: tl.constexpr,
                                CHECK: tl.constexpr, QMAX: tl.constexpr, RINT_LIBDEVICE: tl.constexpr):
    """Per-row Hadamard quantization reading x once: each program holds BR whole rows in registers,
    laid out as a [BR * NCH, HAD] tile whose row t is Hadamard block t % NCH of row t // NCH (NCH: the
    row's Cp / HAD blocks rounded up to a power of two; the blocks past Cp are masked off). One
    tensor-core product rotates every block, the row abs-max is a max over the row's blocks, and
    the rotated values are quantized straight from registers — 2 bytes read and 1 written per element
    where the two-pass kernels read 4. Same outputs as `_amax_partial_kernel` +
    `_quant_given_amax_kernel` (AXIS=1), including the stochastic-rounding counters."""
    T: tl.constexpr = BR * NCH
    pid = tl.program_id(0)
    t = tl.arange(0, T)
    rows = pid * BR + t // NCH                         # [T]
    chunk = t % NCH
    n_chunks = Cp // HAD
    cols = chunk[:, None] * HAD + tl.arange(0, HAD)[None, :]
    live = (rows < R) & (chunk < n_chunks)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xr + cols * stride_xc,
                mask=live[:, None] & (cols < C_in), other=0.0)
    y = _rotate_cols(x, _load_hadamard(h_ptr, HAD), inv_sqrt, HAD, F32_INPUT, UPCAST)
    ay = tl.abs(y)
    if CHECK:
        _raise_flag(_nonfinite(ay), flag_ptr)
    row_amax = tl.max(tl.reshape(tl.max(ay, axis=1), [BR, NCH]), axis=1)     # [BR]
    s_row = _scale_from_amax(row_amax, QMAX)
    out_rows = pid * BR + tl.arange(0, BR)
    tl.store(s_ptr + out_rows, s_row, mask=out_rows < R)
    s = tl.reshape(tl.broadcast_to(s_row[:, None], [BR, NCH]), [T])
    v = tl.math.div_rn(y, tl.broadcast_to(s[:, None], [T, HAD]))
    if STOCHASTIC:
        # the counters of the two-pass kernels: (row, quarter column) over Cp / 4 per row
        qcols = chunk.to(tl.int64)[:, None] * (HAD // 4) + tl.arange(0, HAD // 4)[None, :]
        u = _uniform_at(tl.load(seed_ptr), rows.to(tl.int64)[:, None] * (Cp // 4) + qcols, T, HAD)
    else:
        u = 0.0
    q = _to_int(v, u, STOCHASTIC, QMAX, RINT_LIBDEVICE)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * Cp + cols, q, mask=live[:, None])


@triton.jit
def _rotate_rows(x, h, inv_sqrt, HAD: tl.constexpr, UPCAST: tl.constexpr):
    """H · x in FP32: each column of the [BR, BC] chunk rotated by the Hadamard block when HAD > 0
    (BR == HAD), i.e. the rows of x.T rotated; x itself in FP32 otherwise."""
    if HAD > 0:
        if UPCAST:
            y = tl.dot(h.to(tl.float32), x.to(tl.float32), out_dtype=tl.float32)
        elif x.dtype == tl.float32:
            x_hi, x_mid, x_lo = _bf16_slices(x)
            y = tl.dot(h, x_hi, out_dtype=tl.float32)
            y = tl.dot(h, x_mid, y, out_dtype=tl.float32)
            y = tl.dot(h, x_lo, y, out_dtype=tl.float32)
        else:
            y = tl.dot(h, x, out_dtype=tl.float32)
        y = y * inv_sqrt
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _rotate_axis(x, h, inv_sqrt, AXIS: tl.constexpr, HAD: tl.constexpr, UPCAST: tl.constexpr):
    """The chunk rotated along the axis a per-row (AXIS=1: x · H) or per-column (AXIS=0: H · x,
    the rows of x.T) quantization reduces."""
    if AXIS == 0:
        y = _rotate_rows(x, h, inv_sqrt, HAD, UPCAST)
    else:
        y = _rotate_cols(x, h, inv_sqrt, HAD, x.dtype == tl.float32, UPCAST)
    return y


@triton.jit
def _load_axis(x_ptr, rows, cols, R, C, stride_xr, stride_xc, h, inv_sqrt, AXIS: tl.constexpr,
               HAD: tl.constexpr, UPCAST: tl.constexpr):
    x = _load_tile(x_ptr, rows, cols, R, C, stride_xr, stride_xc)
    return _rotate_axis(x, h, inv_sqrt, AXIS, HAD, UPCAST)


@triton.jit
def _load_hadamard(h_ptr, HAD: tl.constexpr):
    """The ±1 Sylvester matrix of size HAD (0.0 when HAD == 0: no rotation)."""
    h = 0.0
    if HAD > 0:
        hi = tl.arange(0, HAD)
        h = tl.load(h_ptr + hi[:, None] * HAD + hi[None, :])
    return h


@triton.jit
def _fold_amax(ay, rows, cols, R_in, C_in, amax_ptr, AXIS: tl.constexpr):
    """Fold a tile's per-row (AXIS=1) or per-column (AXIS=0) abs-max into amax with atomics (fp32 bits
    in int32: for values >= 0 the integer order is the float order)."""
    if AXIS == 0:
        m = tl.max(ay, axis=0).to(tl.int32, bitcast=True)
        tl.atomic_max(amax_ptr + cols, m, mask=cols < C_in)
    else:
        m = tl.max(ay, axis=1).to(tl.int32, bitcast=True)
        tl.atomic_max(amax_ptr + rows, m, mask=rows < R_in)


@triton.jit
def _amax_partial_kernel(x_ptr, R_in, C_in, stride_xr, stride_xc, amax_ptr, h_ptr, inv_sqrt, flag_ptr,
                         BR: tl.constexpr, BC: tl.constexpr, AXIS: tl.constexpr, HAD: tl.constexpr,
                         UPCAST: tl.constexpr, CHECK: tl.constexpr):
    """Pass 1 of a per-row (AXIS=1) or per-column (AXIS=0) quantization split over a full 2-D grid:
    each [BR, BC] tile (rotated along the reduced axis by the Hadamard block when HAD > 0) folds its
    abs-max into amax (`_fold_amax`)."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_c * BC + tl.arange(0, BC)
    h = _load_hadamard(h_ptr, HAD)
    ay = tl.abs(_load_axis(x_ptr, rows, cols, R_in, C_in, stride_xr, stride_xc, h, inv_sqrt, AXIS, HAD,
                           UPCAST))
    if CHECK:
        _raise_flag(_nonfinite(ay), flag_ptr)
    _fold_amax(ay, rows, cols, R_in, C_in, amax_ptr, AXIS)


@triton.jit
def _quant_from_amax(y, rows, cols, pid_r, pid_c, R, C, amax_ptr, q_ptr, s_ptr, seed_ptr,
                     BR: tl.constexpr, BC: tl.constexpr, AXIS: tl.constexpr, STOCHASTIC: tl.constexpr,
                     QMAX: tl.constexpr, RINT_LIBDEVICE: tl.constexpr):
    """Quantize a rotated [BR, BC] tile y with the finished abs-max (pass 2). AXIS=0: q [C, R] (x.T per
    row, written transposed), s [C, 1]; AXIS=1: q [R, C], s [R, 1]. R, C: padded extents (Hadamard
    blocks). The first tile of each row (AXIS=1) or column (AXIS=0) of tiles writes the scales.
    Stochastic rounding: Philox keyed by the seed at seed_ptr, counter = the element's index in x."""
    if AXIS == 0:
        am = tl.load(amax_ptr + cols, mask=cols < C, other=0).to(tl.float32, bitcast=True)
        s = _scale_from_amax(am, QMAX)
        sfull = tl.broadcast_to(s[None, :], [BR, BC])
        if pid_r == 0:
            tl.store(s_ptr + cols, s, mask=cols < C)
    else:
        am = tl.load(amax_ptr + rows, mask=rows < R, other=0).to(tl.float32, bitcast=True)
        s = _scale_from_amax(am, QMAX)
        sfull = tl.broadcast_to(s[:, None], [BR, BC])
        if pid_c == 0:
            tl.store(s_ptr + rows, s, mask=rows < R)
    v = tl.math.div_rn(y, sfull)
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
        u = _uniform_tile(seed, rows, pid_c * (BC // 4) + tl.arange(0, BC // 4), tl.cdiv(C, BC) * (BC // 4),
                          BR, BC)
    else:
        u = 0.0
    q = _to_int(v, u, STOCHASTIC, QMAX, RINT_LIBDEVICE)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    if AXIS == 0:
        tl.store(q_ptr + cols.to(tl.int64)[:, None] * R + rows[None, :], tl.trans(q), mask=tl.trans(mask))
    else:
        tl.store(q_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], q, mask=mask)


@triton.jit
def _quant_given_amax_kernel(x_ptr, R, C, R_in, C_in, stride_xr, stride_xc, amax_ptr, q_ptr, s_ptr,
                             h_ptr, inv_sqrt, seed_ptr,
                             BR: tl.constexpr, BC: tl.constexpr, AXIS: tl.constexpr, HAD: tl.constexpr,
                             UPCAST: tl.constexpr, STOCHASTIC: tl.constexpr, QMAX: tl.constexpr,
                             RINT_LIBDEVICE: tl.constexpr):
    """Pass 2: quantize each tile with the finished abs-max (`_quant_from_amax`)."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_c * BC + tl.arange(0, BC)
    h = _load_hadamard(h_ptr, HAD)
    y = _load_axis(x_ptr, rows, cols, R_in, C_in, stride_xr, stride_xc, h, inv_sqrt, AXIS, HAD, UPCAST)
    _quant_from_amax(y, rows, cols, pid_r, pid_c, R, C, amax_ptr, q_ptr, s_ptr, seed_ptr,
                     BR, BC, AXIS, STOCHASTIC, QMAX, RINT_LIBDEVICE)


@triton.jit
def _hadamard_square_tile(x_ptr, R_in, C_in, stride_xr, stride_xc, h_ptr, HAD: tl.constexpr):
    """The dual kernels' [HAD, HAD] tile of x at this program of a (column tiles, row tiles) grid
    (zeros beyond R_in x C_in) and the ±1 Hadamard matrix: (pid_r, pid_c, rows, cols, h, x)."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_r * HAD + tl.arange(0, HAD)
    cols = pid_c * HAD + tl.arange(0, HAD)
    x = _load_tile(x_ptr, rows, cols, R_in, C_in, stride_xr, stride_xc)
    return pid_r, pid_c, rows, cols, _load_hadamard(h_ptr, HAD), x


@triton.jit
def _dual_amax_kernel(x_ptr, R_in, C_in, stride_xr, stride_xc, amax_ptr, h_ptr, inv_sqrt,
                      HAD: tl.constexpr, UPCAST: tl.constexpr, CHECK: tl.constexpr):
    """Pass 1 of the dual Hadamard quantization (both orientations of x from one read): each
    [HAD, HAD] tile, rotated along its columns (x · H: rows of x) and along its rows (H · x: rows of
    x.T), folds its per-row abs-max into amax[0:R_in] and its per-column abs-max into
    amax[R_in:R_in+C_in]; amax[R_in+C_in] is the NaN/Inf flag (read only when CHECK)."""
    pid_r, pid_c, rows, cols, h, x = _hadamard_square_tile(x_ptr, R_in, C_in, stride_xr, stride_xc, h_ptr, HAD)
    a_rows = tl.abs(_rotate_axis(x, h, inv_sqrt, 1, HAD, UPCAST))
    a_cols = tl.abs(_rotate_axis(x, h, inv_sqrt, 0, HAD, UPCAST))
    if CHECK:
        _raise_flag(_nonfinite(a_rows) | _nonfinite(a_cols), amax_ptr + R_in + C_in)
    _fold_amax(a_rows, rows, cols, R_in, C_in, amax_ptr, 1)
    _fold_amax(a_cols, rows, cols, R_in, C_in, amax_ptr + R_in, 0)


@triton.jit
def _dual_quant_kernel(x_ptr, R_in, C_in, Rp, Cp, stride_xr, stride_xc, amax_ptr,
                       q_ptr, s_ptr, qt_ptr, st_ptr, h_ptr, inv_sqrt, seed_ptr,
                       HAD: tl.constexpr, UPCAST: tl.constexpr, STOCHASTIC: tl.constexpr,
                       QMAX: tl.constexpr, RINT_LIBDEVICE: tl.constexpr):
    """Pass 2 of the dual Hadamard quantization: re-read each tile once and write both outputs,
    q [R_in, Cp] with s [R_in, 1] (rows of x · H) and qt [C_in, Rp] with st [C_in, 1] (rows of
    x.T · H), Rp / Cp the extents padded to whole Hadamard blocks. Stochastic rounding draws the two
    orientations from independent Philox streams (seeds seed_ptr[0] and seed_ptr[1])."""
    pid_r, pid_c, rows, cols, h, x = _hadamard_square_tile(x_ptr, R_in, C_in, stride_xr, stride_xc, h_ptr, HAD)
    _quant_from_amax(_rotate_axis(x, h, inv_sqrt, 1, HAD, UPCAST), rows, cols, pid_r, pid_c, R_in, Cp,
                     amax_ptr, q_ptr, s_ptr, seed_ptr, HAD, HAD, 1, STOCHASTIC, QMAX, RINT_LIBDEVICE)
    _quant_from_amax(_rotate_axis(x, h, inv_sqrt, 0, HAD, UPCAST), rows, cols, pid_r, pid_c, Rp, C_in,
                     amax_ptr + R_in, qt_ptr, st_ptr, seed_ptr + 1, HAD, HAD, 0, STOCHASTIC, QMAX,
                     RINT_LIBDEVICE)


@triton.jit
def _grid_tile(R, C, BR: tl.constexpr, BC: tl.constexpr):
    """The [BR, BC] tile of an R × C tensor at this program of a (column tiles, row tiles) grid:
    (pid_c, rows, cols, in-bounds mask)."""
    pid_c = tl.program_id(0)
    rows = tl.program_id(1) * BR + tl.arange(0, BR)
    cols = pid_c * BC + tl.arange(0, BC)
    return pid_c, rows, cols, (rows < R)[:, None] & (cols < C)[None, :]


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, out_ptr, R, C, s_stride, GR: tl.constexpr, GC: tl.constexpr,
                    BR: tl.constexpr, BC: tl.constexpr):
    """GR/GC: block dims (powers of two, or the whole extent passed as 1 << 30 with one scale)."""
    pid_c, rows, cols, mask = _grid_tile(R, C, BR, BC)
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0)
    if GC % BC == 0:   # one scale per row of the tile: load a vector, not a gather per element
        s = tl.load(s_ptr + (rows // GR) * s_stride + (pid_c * BC) // GC, mask=rows < R, other=0.0)
        out = q.to(tl.float32) * s[:, None]
    else:
        s = tl.load(s_ptr + (rows // GR)[:, None] * s_stride + (cols // GC)[None, :], mask=mask,
                    other=0.0)
        out = q.to(tl.float32) * s
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)
