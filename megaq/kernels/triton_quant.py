"""Triton quantizers: BF16/FP16/FP32 -> INT8 payload + FP32 block scales in one pass.

What each kernel computes is `megaq.quant.quantize_blockwise` (scale = amax/qmax per block, zero block ->
scale 1, partial tail blocks from their valid elements only, nearest = round half to even,
stochastic = floor(v) + [u < frac(v)] clamped to ±qmax) — bit for bit for nearest rounding: x / scale
is IEEE division, computed per element from the block's reciprocal with two fused corrections
(`_divide`: a multiply and four FMAs instead of an IEEE division's ~11 instructions and slow-path
branch), and the rounding is `cvt.rni` (GPU) or the 1.5·2^23 trick (interpreter), both half-to-even.
Stochastic rounding runs in 16-bit fixed point against a 16-bit dither (`_quantize_scaled`): P(up)
within 2^-15 of frac(v), in a third fewer instructions than the float form.

Kernels
- `_quant_tile_kernel`: blocks that fit one program tile (1×128, 1×32, 128×128, 32×32, 128×1 ...).
  Writes the payload in the input orientation (N) and/or transposed (T), each with its own block
  shape, from one read of the input: the fused quantize+transpose pass for wgrad operands.
- `_quant_strip_kernel`: one scale per row over the whole row ((1, -1)), optionally after a block
  Hadamard rotation of the row; one program per block of rows (single read when the row fits a
  tile, otherwise two passes over its rows).
- `_quant_rows_resident_kernel`: per-row Hadamard quantization (the rotated recipe's X and ∇Y) with
  whole rows held in registers: one read of the input; persistent programs with the next tile's
  load in flight.
- `_amax_partial_kernel` + `_quant_given_amax_kernel`: the same per-row quantization (of x, AXIS=1,
  or of x.T written transposed, AXIS=0) in two passes over strips of tiles that share scales: the
  strips' abs-maxes folded with atomics, then a second read quantizes. Used for transposed per-row
  operands (wgrad: Xᵀ, ∇Yᵀ, Wᵀ) and for rows too long for the resident kernel. Pass 1 of x.T can
  also store the FP32 column sums of x (COLSUM: a linear's bias gradient, read with ∇Yᵀ's tiles).
- `_dual_amax_kernel` + `_dual_scales_kernel` + `_dual_quant_kernel`: both orientations of the
  rotated recipe's operand at once (x · H per row for the forward/dgrad GEMM, x.T · H per row for
  wgrad): each Hadamard-sized tile is read once per pass and rotated along both axes; the two
  abs-max vectors share one atomic buffer, turned into the scales (and their reciprocals) between
  the passes; the second pass writes both payloads; the first can store x's FP32 column sums
  (COLSUM).
- `_dequant_kernel`: payload * scale.

Random numbers: Philox4x32-7 (`tl.randint4x`) keyed by a seed drawn from torch's generator on every
call; each call gives 8 elements 16 bits each (`_dither_bits`: a call covers two adjacent columns in
each of four 8-column groups of a 32-column span, the elements one thread holds in the tensor-core
layout, so no dither crosses threads). The counter depends only on the element's (row, column), so
every element of every program has its own stream (the public Jetfire code shared one stream across
CTAs) and every kernel draws the same number for it: the Hadamard quantizers by the element's place
in the payload they write (x.T's for a transposed output), the tile kernel by its place in x. (`_uniform_tile`, 8 consecutive elements per
call, serves the GEMM's INT8 epilogue and the INT4 kernels.) A device-side flag records NaN/Inf; it is
read (one sync) only when the caller asks for the check.
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
def _cast_out(v, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """FP32 v in `dtype`, rounded to nearest even as on the GPU. The interpreter (triton 3.9) truncates
    FP32 -> BF16, so there the bits are rounded first (NaN passed through as it is)."""
    if dtype == tl.bfloat16 and INTERPRETER:
        b = v.to(tl.int32, bitcast=True)
        r = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        v = tl.where(v == v, r, v)
    return v.to(dtype)


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
def _dither_bits(seed, rows, spans, col0, BR: tl.constexpr, BC: tl.constexpr):
    """The quantizers' 16-bit dither k for a [BR, BC] tile (as int32; u = (k + 1/2) / 2^16).

    Element (row, col) of the tensor takes half col % 2 of word (col % 32) // 8 of the Philox call
    4 · (row · spans + col // 32) + (col % 8) // 2 (spans: 32-column spans per row, counted over the
    padded width). The 8 elements of a call, two adjacent columns in each of four 8-column groups, are
    the ones a thread holds in the tensor-core accumulator layout, so each call is computed once and
    no dither crosses threads; the mapping depends only on (row, col), so every kernel and tile shape
    draws the same number for an element. rows: [BR] row of each tile row; col0: its first column
    (scalar or [BR]), a multiple of 32 (of 16 when BC == 16)."""
    A: tl.constexpr = (BC + 31) // 32
    W: tl.constexpr = (BC // A) // 8
    c0 = col0 + tl.zeros([BR], tl.int32)
    a = tl.arange(0, A)[None, :, None, None, None]
    q = tl.arange(0, 4)[None, None, None, :, None]
    span0 = rows.to(tl.int64) * spans + c0 // 32
    call = (span0[:, None, None, None, None] + a) * 4 + q                      # [BR, A, 1, 4, 1]
    r0, r1, r2, r3 = tl.randint4x(seed, call, PHILOX_ROUNDS)
    w = tl.arange(0, W)[None, None, :, None, None]
    if BC < 32:   # a 16-column tile takes words 0-1 or 2-3 of its calls
        w = w + ((c0 % 32) // 8)[:, None, None, None, None]
    word = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))   # [BR, A, W, 4, 1]
    half = tl.arange(0, 2)[None, None, None, None, :]
    bits = tl.where(half == 0, word & 0xFFFF, word >> 16)                     # [BR, A, W, 4, 2]
    return tl.reshape(bits, [BR, BC]).to(tl.int32)


@triton.jit
def _round_nearest(v, QMAX: tl.constexpr, RINT_LIBDEVICE: tl.constexpr):
    """v (= x / scale) to INT8 in [-QMAX, QMAX], round half to even."""
    if RINT_LIBDEVICE:
        q = tl.minimum(tl.maximum(libdevice.float2int_rn(v), -QMAX), QMAX).to(tl.int8)
    else:
        q = tl.minimum(tl.maximum(_rint(v, False), -QMAX * 1.0), QMAX * 1.0).to(tl.int8)
    return q


@triton.jit
def _rint_to_int32(v, RINT_LIBDEVICE: tl.constexpr):
    """v (|v| < 2^23) rounded half to even, as int32: one `cvt.rni` on the GPU; in the interpreter
    floor plus the exact remainder (the 1.5·2^23 trick of `_rint` needs |v| < 2^22). NaN gives 0,
    as `cvt.rni` does (the NaN/Inf check reports it)."""
    if RINT_LIBDEVICE:
        r = libdevice.float2int_rn(v)
    else:
        v = tl.where(v == v, v, 0.0)
        fl = tl.floor(v)
        d = v - fl
        fi = fl.to(tl.int32)
        r = fi + ((d > 0.5) | ((d == 0.5) & ((fi & 1) == 1))).to(tl.int32)
    return r


@triton.jit
def _quantize_scaled(a, sn, rn, bits, STOCHASTIC: tl.constexpr, QMAX: tl.constexpr, RINT_LIBDEVICE: tl.constexpr):
    """INT8 of v = a / sn in [-QMAX, QMAX] (a = x · p and sn, rn from `_divisor`).

    Nearest: the exact division (`_divide`) and round half to even — bit for bit the reference.
    Stochastic: in 16-bit fixed point, t = rint(a · rn · 2^16) and q = (t + k) >> 16 with the dither
    k (`_dither_bits`, uniform on 0..2^16-1): up exactly when k >= 2^16 - (t mod 2^16), so P(up) =
    (t mod 2^16) / 2^16. t / 2^16 is v up to the rounding of rn and of two products (|v| <= QMAX,
    within ~2 ulp, 2^-16 of a step) and the rint (2^-17), so P(up) is within 2^-15 of frac(v); the
    error is a fixed relative one per scale (~2^-23), not a bias toward either neighbour. Why not
    the exact division here: on an H100 the stochastic quantizers were issue-bound, and the division's
    four FMAs plus the float floor / compare / select / clamp cost ~11 of ~33 instructions per
    element (SASS of the row kernel), and under a 16-bit dither the division's last bits decide
    nothing. H100, 16384 rows, bf16: rows 8192 wide 252 -> 190 µs, x.T 374 -> 295 µs."""
    if STOCHASTIC:
        t = _rint_to_int32(a * (rn * 65536.0), RINT_LIBDEVICE)
        q = tl.minimum(tl.maximum((t + bits) >> 16, -QMAX), QMAX).to(tl.int8)
    else:
        q = _round_nearest(_divide(a, sn, rn), QMAX, RINT_LIBDEVICE)
    return q


@triton.jit
def _divisor(s):
    """What `_divide` needs to divide by the scales s (> 0, finite): p = 2^-e for s = m · 2^e, 1 <= m < 2
    (2^127 for subnormal s), sn = s · p (exact) and rn = RN(1 / sn). Computed once per scale."""
    p, sn = _power_and_mantissa(s)
    return p, sn, tl.math.div_rn(sn * 0.0 + 1.0, sn)


@triton.jit
def _power_and_mantissa(s):
    """`_divisor`'s p and sn, without its division (integer and multiply only)."""
    e = (s.to(tl.int32, bitcast=True) >> 23) & 0xFF
    p = ((254 - e) << 23).to(tl.float32, bitcast=True)
    return p, s * p


@triton.jit
def _divide(a, sn, rn):
    """RN(a / sn), bit for bit IEEE division, for a = x · p (exact: x scaled by `_divisor`'s power of
    two; the caller folds p into a multiplication it already does) without a division per element:
    q0 = a · rn is within ~1.5 ulp of a / sn, one correction q1 = q0 + (a - sn·q0) · rn (fused)
    makes it faithful, and for a faithful quotient with rn the correctly rounded reciprocal the next
    correction gives the correctly rounded quotient (Markstein's theorem). With sn in [1, 2) and
    |a| <= QMAX · sn nothing under- or overflows where the rounding can depend on it (|a / sn| below
    ~2^-100 rounds to 0 either way)."""
    q = a * rn
    q = tl.fma(tl.fma(-sn, q, a), rn, q)
    return tl.fma(tl.fma(-sn, q, a), rn, q)


@triton.jit
def _nonfinite(ax):
    """1 where |x| is NaN or Inf (a NaN fails every comparison)."""
    return (~(ax <= 3.4028234663852886e38)).to(tl.int32)


@triton.jit
def _raise_flag(bad, flag_ptr):
    if tl.max(tl.max(bad, axis=1), axis=0) > 0:
        tl.store(flag_ptr, 1)


@triton.jit
def _spread_blocks(t, BR: tl.constexpr, NB: tl.constexpr, GC: tl.constexpr):
    """Per-block values t [BR, NB] (or [1, NB]) spread over the [BR, NB·GC] tile of 1 × GC blocks."""
    return tl.reshape(tl.broadcast_to(t[:, :, None], [BR, NB, GC]), [BR, NB * GC])


@triton.jit
def _store_payload(q_ptr, q, rows, cols, R, C, TRANSPOSED: tl.constexpr):
    """Store the tile `q` at (rows, cols) of an [R, C] INT8 payload, masked to its extents; TRANSPOSED:
    into the [C, R] payload of the transpose instead."""
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    if TRANSPOSED:
        tl.store(q_ptr + cols.to(tl.int64)[:, None] * R + rows[None, :], tl.trans(q), mask=tl.trans(mask))
    else:
        tl.store(q_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], q, mask=mask)


@triton.jit
def _quant_one(xf, ax, rows, cols, pid_r, pid_c, R, C, q_ptr, s_ptr, s_stride, seed, spans,
               BR: tl.constexpr, BC: tl.constexpr, GR: tl.constexpr, GC: tl.constexpr,
               TRANS: tl.constexpr, STOCHASTIC: tl.constexpr, QMAX: tl.constexpr,
               RINT_LIBDEVICE: tl.constexpr):
    """Quantize one [BR, BC] tile (fp32 values xf, abs values ax) with blocks (GR, GC) in the tile's
    coordinates. TRANS: payload goes to q[C, R] (transposed) and the scale grid is transposed too.
    spans: 32-column dither spans per row of x (`_dither_bits`)."""
    NB: tl.constexpr = BC // GC
    n_cb = tl.cdiv(C, GC)
    if GR == 1 and GC == BC:          # one scale per row of the tile
        s = _scale_from_amax(tl.max(ax, axis=1), QMAX)
        smask = rows < R
        if TRANS:
            tl.store(s_ptr + pid_c * s_stride + rows, s, mask=smask)
        else:
            tl.store(s_ptr + rows * s_stride + pid_c, s, mask=smask)
        p, sn, rn = _divisor(s)
        p, sn, rn = p[:, None], sn[:, None], rn[:, None]
    elif GR == BR and GC == 1:        # one scale per column of the tile
        s = _scale_from_amax(tl.max(ax, axis=0), QMAX)
        smask = cols < C
        if TRANS:
            tl.store(s_ptr + cols * s_stride + pid_r, s, mask=smask)
        else:
            tl.store(s_ptr + pid_r * s_stride + cols, s, mask=smask)
        p, sn, rn = _divisor(s)
        p, sn, rn = p[None, :], sn[None, :], rn[None, :]
    elif GR == BR and GC == BC:       # the tile is one block
        s = _scale_from_amax(tl.max(tl.max(ax, axis=1), axis=0), QMAX)
        if TRANS:
            tl.store(s_ptr + pid_c * s_stride + pid_r, s)
        else:
            tl.store(s_ptr + pid_r * s_stride + pid_c, s)
        p, sn, rn = _divisor(s)
    elif GR == 1:                     # several 1 x GC blocks per tile row
        s = _scale_from_amax(tl.max(tl.reshape(ax, [BR, NB, GC]), axis=2), QMAX)   # [BR, NB]
        jb = pid_c * NB + tl.arange(0, NB)
        smask = (rows < R)[:, None] & (jb < n_cb)[None, :]
        if TRANS:
            tl.store(s_ptr + jb[None, :] * s_stride + rows[:, None], s, mask=smask)
        else:
            tl.store(s_ptr + rows[:, None] * s_stride + jb[None, :], s, mask=smask)
        p, sn, rn = _divisor(s)
        p, sn, rn = _spread_blocks(p, BR, NB, GC), _spread_blocks(sn, BR, NB, GC), _spread_blocks(rn, BR, NB, GC)
    else:                             # GR == BR: several GR x GC blocks side by side
        s = _scale_from_amax(tl.max(tl.max(tl.reshape(ax, [BR, NB, GC]), axis=2), axis=0), QMAX)  # [NB]
        jb = pid_c * NB + tl.arange(0, NB)
        smask = jb < n_cb
        if TRANS:
            tl.store(s_ptr + jb * s_stride + pid_r, s, mask=smask)
        else:
            tl.store(s_ptr + pid_r * s_stride + jb, s, mask=smask)
        p, sn, rn = _divisor(s[None, :])
        p, sn, rn = _spread_blocks(p, BR, NB, GC), _spread_blocks(sn, BR, NB, GC), _spread_blocks(rn, BR, NB, GC)
    bits = 0
    if STOCHASTIC:
        bits = _dither_bits(seed, rows, spans, pid_c * BC, BR, BC)
    q = _quantize_scaled(xf * p, sn, rn, bits, STOCHASTIC, QMAX, RINT_LIBDEVICE)
    _store_payload(q_ptr, q, rows, cols, R, C, TRANS)


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
    spans = tl.cdiv(C, 32)
    seed = 0
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
    if HAS_N:
        _quant_one(xf, ax, rows, cols, pid_r, pid_c, R, C, q_ptr, s_ptr, s_stride, seed, spans,
                   BR, BC, N_GR, N_GC, False, STOCHASTIC, QMAX, RINT_LIBDEVICE)
    if HAS_T:
        if STOCHASTIC:
            seed = tl.load(seed_ptr + 1)
        _quant_one(xf, ax, rows, cols, pid_r, pid_c, R, C, qt_ptr, st_ptr, st_stride, seed, spans,
                   BR, BC, T_GR, T_GC, True, STOCHASTIC, QMAX, RINT_LIBDEVICE)


@triton.jit
def _load_tile(x_ptr, rows, cols, R, C, stride_xr, stride_xc):
    """The [BR, BC] chunk of x at (rows, cols), zeros beyond R x C (the zero padding of the reference)."""
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    return tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xr + cols[None, :] * stride_xc,
                   mask=mask, other=0.0)


@triton.jit
def _load_source_tile(x_ptr, xs_ptr, rows, cols, R, C, stride_xr, stride_xc, DEQUANT: tl.constexpr,
                      INTERPRETER: tl.constexpr, h, inv_sqrt, ROTATE_IN: tl.constexpr):
    """`_load_tile`, or with DEQUANT the tile of an INT8 payload with one FP32 scale per row (xs [R])
    dequantized to BF16 as `_dequant_kernel` rounds it: the quantizer then computes exactly what it
    would from `dequantize`'s BF16 output, without that tensor being written and read back.

    ROTATE_IN (with DEQUANT): each row of the tile rotated by the orthonormal Hadamard block (h: the
    ±1 matrix, inv_sqrt its normalisation; the tile one block wide) before the rounding to BF16 — the
    payload's rows taken back out of the Hadamard space they were quantized in. The product of the
    INT8 values with ±1 is exact (integers below 2^24 in FP32; BF16 holds every INT8 value), so the
    rotated row is one rounding of its exact value times the scale."""
    x = _load_tile(x_ptr, rows, cols, R, C, stride_xr, stride_xc)
    if DEQUANT:
        s = tl.load(xs_ptr + rows, mask=rows < R, other=0.0)
        if ROTATE_IN:
            if INTERPRETER:
                x = tl.dot(x.to(tl.float32), h.to(tl.float32), out_dtype=tl.float32)
            else:
                x = tl.dot(x.to(tl.bfloat16), h, out_dtype=tl.float32)
            s = s * inv_sqrt
        x = _cast_out(x.to(tl.float32) * s[:, None], tl.bfloat16, INTERPRETER)
    return x


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
def _hadamard_sums(x, h, AXIS: tl.constexpr, HAD: tl.constexpr, F32_INPUT: tl.constexpr, UPCAST: tl.constexpr):
    """The [BR, BC] chunk x rotated by the ±1 Hadamard block h, unscaled, in FP32: each row (AXIS=1,
    x · H, BC == HAD), each column (AXIS=0, H · x: the rows of x.T, BR == HAD), or each column as a
    row of the transposed [BC, BR] tile (AXIS=2, xᵀ · H = (H · x)ᵀ, H being symmetric; BR == HAD); x
    (transposed for AXIS=2) in FP32 when HAD == 0. FP32 inputs are rotated as three BF16 slices
    against the exact ±1 matrix."""
    if HAD == 0:
        if AXIS == 2:
            y = tl.trans(x).to(tl.float32)
        else:
            y = x.to(tl.float32)
    elif UPCAST:  # the interpreter's bf16/fp16 dot is wrong (triton 3.9): compute in fp32
        if AXIS == 1:
            y = tl.dot(x.to(tl.float32), h.to(tl.float32), out_dtype=tl.float32)
        elif AXIS == 0:
            y = tl.dot(h.to(tl.float32), x.to(tl.float32), out_dtype=tl.float32)
        else:
            y = tl.dot(tl.trans(x).to(tl.float32), h.to(tl.float32), out_dtype=tl.float32)
    elif F32_INPUT:
        x_hi, x_mid, x_lo = _bf16_slices(x)
        if AXIS == 1:
            y = tl.dot(x_hi, h, out_dtype=tl.float32)
            y = tl.dot(x_mid, h, y, out_dtype=tl.float32)
            y = tl.dot(x_lo, h, y, out_dtype=tl.float32)
        elif AXIS == 0:
            y = tl.dot(h, x_hi, out_dtype=tl.float32)
            y = tl.dot(h, x_mid, y, out_dtype=tl.float32)
            y = tl.dot(h, x_lo, y, out_dtype=tl.float32)
        else:
            y = tl.dot(tl.trans(x_hi), h, out_dtype=tl.float32)
            y = tl.dot(tl.trans(x_mid), h, y, out_dtype=tl.float32)
            y = tl.dot(tl.trans(x_lo), h, y, out_dtype=tl.float32)
    elif AXIS == 1:
        y = tl.dot(x, h, out_dtype=tl.float32)
    elif AXIS == 0:
        y = tl.dot(h, x, out_dtype=tl.float32)
    else:
        y = tl.dot(tl.trans(x), h, out_dtype=tl.float32)
    return y


@triton.jit
def _rotate_cols(x, h, inv_sqrt, HAD: tl.constexpr, F32_INPUT: tl.constexpr, UPCAST: tl.constexpr):
    """x · H in FP32: each row of the [BR, BC] chunk rotated by the orthonormal Hadamard block when
    HAD > 0 (BC == HAD; h the ±1 Sylvester matrix, inv_sqrt = 1/sqrt(HAD)); x itself in FP32 otherwise."""
    y = _hadamard_sums(x, h, 1, HAD, F32_INPUT, UPCAST)
    if HAD > 0:
        y = y * inv_sqrt
    return y


@triton.jit
def _load_hadamard(h_ptr, HAD: tl.constexpr):
    """The ±1 Sylvester matrix of size HAD (0.0 when HAD == 0: no rotation)."""
    h = 0.0
    if HAD > 0:
        hi = tl.arange(0, HAD)
        h = tl.load(h_ptr + hi[:, None] * HAD + hi[None, :])
    return h


@triton.jit
def _quant_rows(y, mult, amax, seed, rows, spans, col0, BR: tl.constexpr, BC: tl.constexpr,
                STOCHASTIC: tl.constexpr, QMAX: tl.constexpr, RINT_LIBDEVICE: tl.constexpr):
    """INT8 payload of the [BR, BC] values y · mult (mult: the Hadamard 1/√n, or 1) with one scale per
    row from the finished row abs-max amax [BR] (of y · mult). The row constants come first
    (`_divisor`), so each element costs a multiply and the exact division, or the fixed-point
    stochastic rounding (`_quantize_scaled`), not an IEEE division. Dither:
    `_dither_bits(seed, rows, spans, col0)`."""
    s = _scale_from_amax(amax, QMAX)
    p, sn, rn = _divisor(s)
    bits = 0
    if STOCHASTIC:
        bits = _dither_bits(seed, rows, spans, col0, BR, BC)
    return _quantize_scaled(y * (mult * p)[:, None], sn[:, None], rn[:, None], bits, STOCHASTIC, QMAX,
                            RINT_LIBDEVICE)


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
    ±1 Sylvester matrix, inv_sqrt = 1/sqrt(HAD); 1.0 without rotation). C_in <= C: columns of x that
    exist; the columns C_in..C read as zeros (zero padding to whole Hadamard blocks, kept in the
    output). SINGLE: the whole row fits one tile (one read); otherwise two passes over the row
    (abs-max, then quantize; the second read mostly hits L2)."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    rmask = rows < R
    h = _load_hadamard(h_ptr, HAD)
    seed = 0
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
    spans = tl.cdiv(C, 32)
    if SINGLE:
        cols = tl.arange(0, BC)
        y = _hadamard_sums(_load_tile(x_ptr, rows, cols, R, C_in, stride_xr, stride_xc), h, 1, HAD, F32_INPUT,
                           UPCAST)
        ay = tl.abs(y)
        if CHECK:
            _raise_flag(_nonfinite(ay), flag_ptr)
        amax = tl.max(ay, axis=1) * inv_sqrt
        q = _quant_rows(y, inv_sqrt, amax, seed, rows, spans, 0, BR, BC, STOCHASTIC, QMAX, RINT_LIBDEVICE)
        tl.store(q_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], q,
                 mask=rmask[:, None] & (cols < C)[None, :])
    else:
        amax = tl.zeros([BR], tl.float32)
        bad = tl.zeros([BR], tl.int32)
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            ay = tl.abs(_hadamard_sums(_load_tile(x_ptr, rows, cols, R, C_in, stride_xr, stride_xc), h, 1, HAD,
                                       F32_INPUT, UPCAST))
            amax = tl.maximum(amax, tl.max(ay, axis=1))
            if CHECK:
                bad = tl.maximum(bad, tl.max(_nonfinite(ay), axis=1))
        if CHECK:
            _raise_flag(bad[:, None], flag_ptr)
        amax = amax * inv_sqrt
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            y = _hadamard_sums(_load_tile(x_ptr, rows, cols, R, C_in, stride_xr, stride_xc), h, 1, HAD, F32_INPUT,
                               UPCAST)
            q = _quant_rows(y, inv_sqrt, amax, seed, rows, spans, c0, BR, BC, STOCHASTIC, QMAX, RINT_LIBDEVICE)
            tl.store(q_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], q,
                     mask=rmask[:, None] & (cols < C)[None, :])
    tl.store(s_ptr + rows, _scale_from_amax(amax, QMAX), mask=rmask)


@triton.jit
def _quant_rows_resident_kernel(x_ptr, R, C_in, Cp, stride_xr, stride_xc, q_ptr, s_ptr, h_ptr, inv_sqrt,
                                seed_ptr, flag_ptr, n_tiles,
                                BR: tl.constexpr, NCH: tl.constexpr, HAD: tl.constexpr,
                                F32_INPUT: tl.constexpr, UPCAST: tl.constexpr, STOCHASTIC: tl.constexpr,
                                CHECK: tl.constexpr, QMAX: tl.constexpr, RINT_LIBDEVICE: tl.constexpr,
                                STAGES: tl.constexpr):
    """Per-row Hadamard quantization reading x once: a persistent program takes the n_tiles blocks of
    BR whole rows in turn (the next block's load in flight while this one computes, STAGES deep), each
    held in registers as a [BR * NCH, HAD] tile whose row t is Hadamard block t % NCH of row t // NCH
    (NCH: the row's Cp / HAD blocks rounded up to a power of two; the blocks past Cp are masked off).
    One tensor-core product against the Hadamard matrix (loaded once per program) rotates every
    block, the row abs-max is a max over the row's blocks, and the rotated values are quantized
    straight from registers — 2 bytes read and 1 written per element. Same outputs as
    `_amax_partial_kernel` + `_quant_given_amax_kernel` (AXIS=1), the dither included."""
    T: tl.constexpr = BR * NCH
    h = _load_hadamard(h_ptr, HAD)
    seed = 0
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
    t = tl.arange(0, T)
    chunk = t % NCH
    n_chunks = Cp // HAD
    cols = chunk[:, None] * HAD + tl.arange(0, HAD)[None, :]
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=STAGES):
        rows = tile * BR + t // NCH                        # [T]
        live = (rows < R) & (chunk < n_chunks)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xr + cols * stride_xc,
                    mask=live[:, None] & (cols < C_in), other=0.0)
        y = _hadamard_sums(x, h, 1, HAD, F32_INPUT, UPCAST)
        ay = tl.abs(y)
        if CHECK:
            _raise_flag(_nonfinite(ay), flag_ptr)
        row_amax = tl.max(tl.reshape(tl.max(ay, axis=1), [BR, NCH]), axis=1) * inv_sqrt    # [BR]
        spread = tl.reshape(tl.broadcast_to(row_amax[:, None], [BR, NCH]), [T])
        q = _quant_rows(y, inv_sqrt, spread, seed, rows, tl.cdiv(Cp, 32), chunk * HAD, T, HAD,
                        STOCHASTIC, QMAX, RINT_LIBDEVICE)
        tl.store(q_ptr + rows.to(tl.int64)[:, None] * Cp + cols, q, mask=live[:, None])
        out_rows = tile * BR + tl.arange(0, BR)
        tl.store(s_ptr + out_rows, _scale_from_amax(row_amax, QMAX), mask=out_rows < R)


@triton.jit
def _tile_of(tile, n_c, BR: tl.constexpr, BC: tl.constexpr):
    """Tile number `tile` of a grid of n_c tiles per row of tiles: (pid_r, pid_c, rows, cols)."""
    pid_r = tile // n_c
    pid_c = tile % n_c
    return pid_r, pid_c, pid_r * BR + tl.arange(0, BR), pid_c * BC + tl.arange(0, BC)


@triton.jit
def _fold_amax(ay, rows, cols, R_in, C_in, amax_ptr, inv_sqrt, AXIS: tl.constexpr):
    """Fold a tile's per-row (AXIS=1) or per-column (AXIS=0) abs-max (of the unscaled sums ay, times
    inv_sqrt) into amax with atomics (fp32 bits in int32: for values >= 0 the integer order is the
    float order)."""
    if AXIS == 0:
        m = (tl.max(ay, axis=0) * inv_sqrt).to(tl.int32, bitcast=True)
        tl.atomic_max(amax_ptr + cols, m, mask=cols < C_in)
    else:
        m = (tl.max(ay, axis=1) * inv_sqrt).to(tl.int32, bitcast=True)
        tl.atomic_max(amax_ptr + rows, m, mask=rows < R_in)


@triton.jit
def _strip_tile(strip, blk, AXIS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Rows and columns of tile `blk` of strip `strip` of the two-pass grid: a strip is a column of
    [BR, BC] tiles for AXIS=0 (the scales are per column) and a row of tiles for AXIS=1."""
    if AXIS == 0:
        rows = blk * BR + tl.arange(0, BR)
        cols = strip * BC + tl.arange(0, BC)
    else:
        rows = strip * BR + tl.arange(0, BR)
        cols = blk * BC + tl.arange(0, BC)
    return rows, cols


@triton.jit
def _strip_scales(strip, R, C, AXIS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """The scale indices of strip `strip` of the two-pass grid (its columns for AXIS=0, its rows for
    AXIS=1) and their extent (C or R), for masking."""
    if AXIS == 0:
        idx = strip * BC + tl.arange(0, BC)
        n = C
    else:
        idx = strip * BR + tl.arange(0, BR)
        n = R
    return idx, n


@triton.jit
def _amax_partial_kernel(x_ptr, xs_ptr, R_in, C_in, stride_xr, stride_xc, amax_ptr, h_ptr, inv_sqrt, flag_ptr,
                         colsum_ptr, n_strips, n_blocks, skip_ptr,
                         BR: tl.constexpr, BC: tl.constexpr, AXIS: tl.constexpr, HAD: tl.constexpr,
                         UPCAST: tl.constexpr, CHECK: tl.constexpr, COLSUM: tl.constexpr,
                         STAGES: tl.constexpr, SKIP: tl.constexpr = False, DEQUANT: tl.constexpr = False,
                         ROTATE_IN: tl.constexpr = False):
    """Pass 1 of a per-row (AXIS=1) or per-column (AXIS=0) quantization over [BR, BC] tiles: program
    (i, j) takes the strips (`_strip_tile`) i, i + grid[0], ... and, in each, the tiles j, j + grid[1],
    ... (loads STAGES deep in flight), rotates each along the reduced axis by the Hadamard block when
    HAD > 0, keeps the strip's running abs-max in registers and folds it into amax once per strip
    with atomics (fp32 bits in int32: for values >= 0 the integer order is the float order).

    COLSUM (AXIS=0 only): also the FP32 sums of x's columns over the rows this program read, stored
    (not added: no atomics, the result does not depend on scheduling) to colsum[j, strip columns];
    the caller adds the grid[1] rows. The bias gradient of a linear from the pass that already reads
    ∇Y for its wgrad operand ∇Yᵀ.

    SKIP: no strip at all where skip[0] != 0 (delayed scaling with a valid prediction: the pass is
    only needed to seed it, and one captured CUDA graph serves both cases).

    DEQUANT: x is an INT8 payload with one FP32 scale per row (xs_ptr), read as its BF16
    dequantization (`_load_source_tile`); with ROTATE_IN (AXIS=0, BC == HAD) its rows rotated back by
    the same Hadamard block first."""
    h = _load_hadamard(h_ptr, HAD)
    strips = n_strips
    if SKIP:
        strips = tl.where(tl.load(skip_ptr) != 0, 0, n_strips)
    for strip in tl.range(tl.program_id(0), strips, tl.num_programs(0)):
        if AXIS == 0:
            m = tl.zeros([BC], tl.float32)
        else:
            m = tl.zeros([BR], tl.float32)
        if COLSUM:
            csum = tl.zeros([BC], tl.float32)
        for blk in tl.range(tl.program_id(1), n_blocks, tl.num_programs(1), num_stages=STAGES):
            rows, cols = _strip_tile(strip, blk, AXIS, BR, BC)
            x = _load_source_tile(x_ptr, xs_ptr, rows, cols, R_in, C_in, stride_xr, stride_xc, DEQUANT, UPCAST,
                                  h, inv_sqrt, ROTATE_IN)
            ay = tl.abs(_hadamard_sums(x, h, AXIS, HAD, x.dtype == tl.float32, UPCAST))
            if CHECK:
                _raise_flag(_nonfinite(ay), flag_ptr)
            m = tl.maximum(m, tl.max(ay, axis=AXIS))
            if COLSUM:
                csum += tl.sum(x.to(tl.float32), axis=0)
        idx, n = _strip_scales(strip, R_in, C_in, AXIS, BR, BC)
        tl.atomic_max(amax_ptr + idx, (m * inv_sqrt).to(tl.int32, bitcast=True), mask=idx < n)
        if COLSUM:
            tl.store(colsum_ptr + tl.program_id(1) * C_in + idx, csum, mask=idx < C_in)


@triton.jit
def _quant_given_amax_kernel(x_ptr, xs_ptr, R, C, R_in, C_in, stride_xr, stride_xc, amax_ptr, q_ptr, s_ptr,
                             h_ptr, inv_sqrt, seed_ptr, n_strips, n_blocks, track_ptr, flag_ptr, colsum_ptr,
                             valid_ptr,
                             BR: tl.constexpr, BC: tl.constexpr, AXIS: tl.constexpr, HAD: tl.constexpr,
                             UPCAST: tl.constexpr, STOCHASTIC: tl.constexpr, QMAX: tl.constexpr,
                             RINT_LIBDEVICE: tl.constexpr, STAGES: tl.constexpr,
                             DELAYED: tl.constexpr = False, CHECK: tl.constexpr = False,
                             COLSUM: tl.constexpr = False, DEQUANT: tl.constexpr = False,
                             ROTATE_IN: tl.constexpr = False):
    """Pass 2: quantize each tile with the finished abs-max, programs over strips and tiles as in
    pass 1. A strip's scale constants (`_divisor`) are computed once, before its tiles. AXIS=0:
    q [C, R] (x.T per row), s [C, 1]; AXIS=1: q [R, C], s [R, 1]; R, C: padded extents (Hadamard
    blocks). Dither (`_dither_bits`): by the element's place in the payload (x.T's for AXIS=0).

    DELAYED (`megaq.quant.delayed`): where valid[0] != 0, amax is a prediction, not this call's
    abs-max, and this is the only pass over x; else (the prediction's first call) pass 1 has just put
    the exact abs-max in track, which is used instead. Values past the abs-max clip to ±QMAX (clamped
    before the fixed-point stochastic rounding, whose int32 would overflow far out), and the true
    abs-max per payload row is folded into track with atomics (FP32 bits in int32) for
    `_delayed_update_kernel` (on later calls only: the first call's is pass 1's, already there). CHECK
    and COLSUM are then pass 1's NaN/Inf flag and column sums (COLSUM: AXIS=0 only), done here. DEQUANT,
    ROTATE_IN: as in pass 1."""
    h = _load_hadamard(h_ptr, HAD)
    seed = 0
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
    TR: tl.constexpr = BC if AXIS == 0 else BR
    TC: tl.constexpr = BR if AXIS == 0 else BC
    if DELAYED:
        predicted = tl.load(valid_ptr) != 0
    for strip in tl.range(tl.program_id(0), n_strips, tl.num_programs(0)):
        idx, n = _strip_scales(strip, R, C, AXIS, BR, BC)
        amax = tl.load(amax_ptr + idx, mask=idx < n, other=0)
        if DELAYED:
            amax = tl.where(predicted, amax, tl.load(track_ptr + idx, mask=idx < n, other=0))
        s = _scale_from_amax(amax.to(tl.float32, bitcast=True), QMAX)
        if tl.program_id(1) == 0:
            tl.store(s_ptr + idx, s, mask=idx < n)
        p, sn, rn = _divisor(s)
        c = p * inv_sqrt
        if DELAYED:
            m = tl.zeros([TR], tl.float32)
            limit = sn * QMAX
        if COLSUM:
            csum = tl.zeros([BC], tl.float32)
        for blk in tl.range(tl.program_id(1), n_blocks, tl.num_programs(1), num_stages=STAGES):
            rows, cols = _strip_tile(strip, blk, AXIS, BR, BC)
            x = _load_source_tile(x_ptr, xs_ptr, rows, cols, R_in, C_in, stride_xr, stride_xc, DEQUANT, UPCAST,
                                  h, inv_sqrt, ROTATE_IN)
            if AXIS == 0:
                # the tile of x.T, [BC, BR]: its rows are x's columns, scaled per row and stored as
                # they are (quantizing H · x and storing it transposed held ~250 registers per thread
                # in per-column constants and the transposed store)
                y = _hadamard_sums(x, h, 2, HAD, x.dtype == tl.float32, UPCAST)
                q_rows, q_cols, q_R, q_C = cols, rows, C, R
            else:
                y = _hadamard_sums(x, h, 1, HAD, x.dtype == tl.float32, UPCAST)
                q_rows, q_cols, q_R, q_C = rows, cols, R, C
            bits = 0
            if STOCHASTIC:   # by the element's place in the payload, whose tile is [TR, TC]
                bits = _dither_bits(seed, q_rows, tl.cdiv(q_C, 32), blk * TC, TR, TC)
            a = y * c[:, None]
            if DELAYED:
                ay = tl.abs(y)
                if CHECK:
                    _raise_flag(_nonfinite(ay), flag_ptr)
                m = tl.maximum(m, tl.max(ay, axis=1))
                a = tl.minimum(tl.maximum(a, -limit[:, None]), limit[:, None])
            if COLSUM:
                csum += tl.sum(x.to(tl.float32), axis=0)
            q = _quantize_scaled(a, sn[:, None], rn[:, None], bits, STOCHASTIC, QMAX, RINT_LIBDEVICE)
            _store_payload(q_ptr, q, q_rows, q_cols, q_R, q_C, False)
        if DELAYED:
            # Only where the prediction was used: on a state's first call every program of this strip
            # reads pass 1's abs-max from track as its scale, and a maximum folded in now could reach a
            # program of the same strip that starts later (this pass rotates xᵀ·H where pass 1 rotated
            # H·x: nothing makes their FP32 sums round alike), which would then quantize with another
            # scale than the one stored, in a scheduling-dependent way. Pass 1's value is the exact one.
            if predicted:
                tl.atomic_max(track_ptr + idx, (m * inv_sqrt).to(tl.int32, bitcast=True), mask=idx < n)
        if COLSUM:
            tl.store(colsum_ptr + tl.program_id(1) * C_in + idx, csum, mask=idx < C_in)


@triton.jit
def _delayed_update_kernel(pred_ptr, track_ptr, counts_ptr, valid_ptr, n, decay, BLOCK: tl.constexpr):
    """After a delayed-scaling pass (`megaq.quant.delayed.update_prediction`), one program:
    pred <- max(track, decay * pred) (pred is 0 before the first call, so that seeds it), track <- 0,
    valid <- 1; where valid was set, the rows whose track exceeded pred and all rows are added to
    counts[0] and counts[1]. A non-finite track (NaN/Inf input, caught by the check where it is on)
    keeps the old prediction: one bad call must not poison every later scale. One program, so that
    valid is read before it is written."""
    count = tl.load(valid_ptr) != 0
    over = tl.zeros([BLOCK], tl.int64)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = offs < n
        t = tl.load(track_ptr + offs, mask=live, other=0.0)
        p = tl.load(pred_ptr + offs, mask=live, other=0.0)
        t = tl.where(t <= 3.4028234663852886e38, t, p)
        over += ((t > p) & live).to(tl.int64)
        tl.store(pred_ptr + offs, tl.maximum(t, p * decay), mask=live)
        tl.store(track_ptr + offs, tl.zeros([BLOCK], tl.float32), mask=live)
    if count:
        tl.store(counts_ptr, tl.load(counts_ptr) + tl.sum(over, axis=0))
        tl.store(counts_ptr + 1, tl.load(counts_ptr + 1) + n)
    tl.store(valid_ptr, 1)


@triton.jit
def _quant_from_scales(y, inv_sqrt, rows, cols, col_tile, R, C, s_ptr, rn_ptr, q_ptr, seed,
                       BR: tl.constexpr, BC: tl.constexpr, STOCHASTIC: tl.constexpr,
                       QMAX: tl.constexpr, RINT_LIBDEVICE: tl.constexpr):
    """Quantize the [BR, BC] tile (rows, cols) of an [R, C] payload q, values y · inv_sqrt (y:
    unscaled Hadamard sums), one scale per row: the finished scales s and their mantissas'
    reciprocals rn (`_dual_scales_kernel`; rn as FP32 bits in int32). R, C: padded extents (Hadamard
    blocks); col_tile: the tile's column index. Dither (`_dither_bits`): by the element's place in q."""
    s = tl.load(s_ptr + rows, mask=rows < R, other=1.0)
    rn = tl.load(rn_ptr + rows, mask=rows < R, other=0).to(tl.float32, bitcast=True)
    p, sn = _power_and_mantissa(s)
    bits = 0
    if STOCHASTIC:
        bits = _dither_bits(seed, rows, tl.cdiv(C, 32), col_tile * BC, BR, BC)
    q = _quantize_scaled(y * (p * inv_sqrt)[:, None], sn[:, None], rn[:, None], bits, STOCHASTIC, QMAX,
                         RINT_LIBDEVICE)
    _store_payload(q_ptr, q, rows, cols, R, C, False)


@triton.jit
def _dual_scales_kernel(amax_ptr, s_ptr, st_ptr, R_in, C_in, QMAX: tl.constexpr, BLOCK: tl.constexpr):
    """Between the dual passes: the finished abs-maxes (amax[0:R_in] of x's rows, amax[R_in:R_in+C_in]
    of its columns) to the output scales s [R_in] and st [C_in], and each scale's `_divisor` rn
    written over its abs-max (FP32 bits), so that pass 2 loads two numbers per row and column instead
    of dividing in every tile (a tile's 256 IEEE divisions were ~30% of pass 2's instructions)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n = R_in + C_in
    s = _scale_from_amax(tl.load(amax_ptr + i, mask=i < n, other=0).to(tl.float32, bitcast=True), QMAX)
    _, _, rn = _divisor(s)
    tl.store(s_ptr + i, s, mask=i < R_in)
    tl.store(st_ptr + (i - R_in), s, mask=(i >= R_in) & (i < n))
    tl.store(amax_ptr + i, rn.to(tl.int32, bitcast=True), mask=i < n)


@triton.jit
def _dual_amax_kernel(x_ptr, R_in, C_in, stride_xr, stride_xc, amax_ptr, h_ptr, inv_sqrt, colsum_ptr,
                      n_tiles, n_c,
                      HAD: tl.constexpr, UPCAST: tl.constexpr, CHECK: tl.constexpr, COLSUM: tl.constexpr,
                      STAGES: tl.constexpr):
    """Pass 1 of the dual Hadamard quantization (both orientations of x from one read): each
    [HAD, HAD] tile (persistent programs over n_tiles tiles, n_c per row of tiles), rotated along its
    columns (x · H: rows of x) and along its rows (H · x: rows of x.T), folds its per-row abs-max
    into amax[0:R_in] and its per-column abs-max into amax[R_in:R_in+C_in]; amax[R_in+C_in] is the
    NaN/Inf flag (read only when CHECK). COLSUM: each tile also stores the FP32 sums of its columns
    to colsum[row of tiles, its columns] (no atomics: the caller adds the rows in a fixed order)."""
    h = _load_hadamard(h_ptr, HAD)
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=STAGES):
        pid_r, pid_c, rows, cols = _tile_of(tile, n_c, HAD, HAD)
        x = _load_tile(x_ptr, rows, cols, R_in, C_in, stride_xr, stride_xc)
        if COLSUM:
            tl.store(colsum_ptr + pid_r * C_in + cols, tl.sum(x.to(tl.float32), axis=0), mask=cols < C_in)
        a_rows = tl.abs(_hadamard_sums(x, h, 1, HAD, x.dtype == tl.float32, UPCAST))
        if CHECK:
            _raise_flag(_nonfinite(a_rows), amax_ptr + R_in + C_in)
        _fold_amax(a_rows, rows, cols, R_in, C_in, amax_ptr, inv_sqrt, 1)
        a_cols = tl.abs(_hadamard_sums(x, h, 0, HAD, x.dtype == tl.float32, UPCAST))
        if CHECK:
            _raise_flag(_nonfinite(a_cols), amax_ptr + R_in + C_in)
        _fold_amax(a_cols, rows, cols, R_in, C_in, amax_ptr + R_in, inv_sqrt, 0)


@triton.jit
def _dual_quant_kernel(x_ptr, R_in, C_in, Rp, Cp, stride_xr, stride_xc, rn_ptr,
                       q_ptr, s_ptr, qt_ptr, st_ptr, h_ptr, inv_sqrt, seed_ptr, n_tiles, n_c,
                       HAD: tl.constexpr, UPCAST: tl.constexpr, STOCHASTIC: tl.constexpr,
                       QMAX: tl.constexpr, RINT_LIBDEVICE: tl.constexpr, STAGES: tl.constexpr):
    """Pass 2 of the dual Hadamard quantization: re-read each tile once and write both outputs,
    q [R_in, Cp] with the scales s [R_in, 1] (rows of x · H) and qt [C_in, Rp] with st [C_in, 1]
    (rows of x.T · H), Rp / Cp the extents padded to whole Hadamard blocks; the scales and their
    reciprocals (rn_ptr: rows, then columns) come from `_dual_scales_kernel`. Stochastic rounding
    draws the two orientations from independent Philox streams (seeds seed_ptr[0] and seed_ptr[1])."""
    h = _load_hadamard(h_ptr, HAD)
    seed = 0
    seed_t = 0
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
        seed_t = tl.load(seed_ptr + 1)
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=STAGES):
        pid_r, pid_c, rows, cols = _tile_of(tile, n_c, HAD, HAD)
        x = _load_tile(x_ptr, rows, cols, R_in, C_in, stride_xr, stride_xc)
        _quant_from_scales(_hadamard_sums(x, h, 1, HAD, x.dtype == tl.float32, UPCAST), inv_sqrt, rows, cols,
                           pid_c, R_in, Cp, s_ptr, rn_ptr, q_ptr, seed, HAD, HAD, STOCHASTIC, QMAX, RINT_LIBDEVICE)
        # x.T's tile, [HAD, HAD] rows of x's columns (as the two-pass kernel's AXIS=0 pass 2)
        _quant_from_scales(_hadamard_sums(x, h, 2, HAD, x.dtype == tl.float32, UPCAST), inv_sqrt, cols, rows,
                           pid_r, C_in, Rp, st_ptr, rn_ptr + R_in, qt_ptr, seed_t, HAD, HAD, STOCHASTIC, QMAX,
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
                    BR: tl.constexpr, BC: tl.constexpr, INTERPRETER: tl.constexpr = False):
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
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :],
             _cast_out(out, out_ptr.dtype.element_ty, INTERPRETER), mask=mask)
