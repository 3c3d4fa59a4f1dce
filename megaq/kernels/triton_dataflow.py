"""Triton kernels of the INT8 data flow (`megaq.kernels.dataflow` launches them and holds the reference).

A per-row output scale over a rotated row needs the whole row's abs-max before anything is written.
Two kernel families meet that (`dataflow._plan` picks one per operator and width, from H100 timings):

Row-resident kernels — rows of up to `dataflow.RESIDENT_MAX_CHUNKS` 128-column chunks. A program
holds BR whole rows in registers, laid out as `triton_quant._quant_rows_resident_kernel` does: one
[BR·NCH, 128] tile whose row t is chunk t % NCH of row t // NCH (NCH: the row's chunks rounded up
to a power of two; the chunks past the row are masked off). Every input is read once; a per-row
reduction is one over the tile's columns, then one over the row's NCH tile rows; one pair of
tensor-core products rotates every Hadamard block of the tile. Programs are persistent (the grid is
capped near the SM count and each program loops over tiles), so the ±1 matrix and the LayerNorm
weights are loaded once per program.
- `_layernorm_quant_resident_kernel`: [x + residual, written back as the residual stream,] the
  INT8 (1, 128) copy of the input saved for backward, the row statistics (two-pass, from registers),
  normalize, affine, rotate, row abs-max, quantize.
- `_gelu_quant_resident_kernel`: INT8 (1, 128) input (fc1's GEMM epilogue) -> GELU in FP32 ->
  rotate -> row abs-max -> quantize.
- `_layernorm_backward_resident_kernel`: a [BR, NCH, 128] tile (no product here, so a 3-D tile):
  row sums Σ g·w·x̂ and Σ g·w, dx (+ the residual stream's gradient); the weight and bias gradients
  are accumulated over the program's tiles in registers and written once per program.

Chunked kernels — any width. Each program owns BR rows and walks them in chunks of BC = 128 columns
(one Hadamard block, one saved (1, 128) block), reading its rows more than once (later reads mostly
hit L2):
- `_layernorm_quant_kernel`: pass 1 — [x + residual, written back,] row statistics merged chunk by
  chunk (Chan's parallel mean/M2: stable where sum/sum-of-squares is not), the INT8 (1, 128) copy
  of the input; pass 2 — normalize, affine, rotate, abs-max; pass 3 — the same again, quantized
  with the row scale. Unrotated (1, 128) output: one pass after the statistics.
- `_gelu_quant_kernel`: GELU -> rotated row abs-max; then again -> quantize.
- `_layernorm_backward_kernel`: pass 1 — the row sums; pass 2 — dx and this program's partial
  column sums of the weight and bias gradients.
The incoming LayerNorm gradient g is read as BF16/FP32, or (G_INT8) as INT8 (1, 128) blocks + FP32
scales dequantized on load; dx is written in the residual's dtype.

`_gelu_backward_kernel`: elementwise GELU'(dequantized input) · gradient over [BR, NB·128] tiles.

The rotation is a `tl.dot` with the ±1 Sylvester matrix (BF16, exact) times 1/√128. Its FP32 input
is split into two BF16 parts (hi + lo, 16 significant bits, relative error ≤ 2⁻¹⁷), except under the
interpreter, whose BF16 dot is wrong, where the dot runs in FP32. The lo product is needed: one BF16
(or TF32, or FP16) product rounds each input to 8 (11) significant bits, an error of ~2⁻⁹ (2⁻¹²) of
the row's RMS on every rotated value. Simulated in PyTorch on GELU outputs of width 6400 (the
tests' inputs), that moves the row scales by 6·10⁻⁴ (BF16) / 7.5·10⁻⁵ (FP16) / 3.6·10⁻⁴ (TF32)
relative and flips 2.4% / 0.31% / 0.32% of the INT8 values, against the bounds of 10⁻⁵ and 0.5%
the kernels are held to (the reference rotates in FP32); hi + lo: 1.0·10⁻⁶ and 0.004%. The GELU
and LayerNorm kernels with ROUND_BF16 (`gelu_quantize` / `layernorm_quantize(round_to=torch.bfloat16)`)
round their output to BF16 first, as a BF16 model's GELU or LayerNorm writes it; one BF16 product then
rotates those values exactly, and the reference rounds the same way (H100, 16384 × 16384: the GELU
kernels 0.19 ms faster per call).

Scales: amax / 127 (IEEE division), 1 for an all-zero block. In the resident kernels the abs-max
reductions propagate NaN, so a NaN input leaves a NaN scale (never a silently finite row); the
saved INT8 copies are divided by their scale (`_div_rn_rows`: bit for bit the reference's IEEE
division); the operands are multiplied by its reciprocal (≤ 1.5 ulp from the division: it changes
the rounding of a value only within 1.5 ulp of a tie, ~10⁻⁵ of them), and rounded by `_to_int8`.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .triton_quant import _cast_out, _load_hadamard, _nonfinite, _scale_from_amax, _to_int


@triton.jit
def _rotate_pm1(y, h, UPCAST: tl.constexpr, BF16_Y: tl.constexpr = False):
    """y [BR, HAD] (FP32) times the ±1 Hadamard matrix h (not normalised). BF16_Y: y holds BF16 values
    (`_round_bf16`), which one BF16 product rotates exactly (FP32 sums)."""
    if UPCAST:
        r = tl.dot(y, h.to(tl.float32), out_dtype=tl.float32)
    elif BF16_Y:
        r = tl.dot(y.to(tl.bfloat16), h, out_dtype=tl.float32)
    else:
        hi = y.to(tl.bfloat16)
        lo = (y - hi.to(tl.float32)).to(tl.bfloat16)
        r = tl.dot(hi, h, out_dtype=tl.float32)
        r = tl.dot(lo, h, r, out_dtype=tl.float32)
    return r


@triton.jit
def _rotate(y, h, inv_sqrt, UPCAST: tl.constexpr, BF16_Y: tl.constexpr = False):
    """y [BR, HAD] (FP32) times the orthonormal Hadamard block (h: the ±1 matrix)."""
    return _rotate_pm1(y, h, UPCAST, BF16_Y) * inv_sqrt


@triton.jit
def _round_bf16(y, ROUND: tl.constexpr, UPCAST: tl.constexpr):
    """y (FP32) rounded to BF16 (nearest even; also under the interpreter, whose own conversion
    truncates) and back, where ROUND: the GELU or LayerNorm output as a BF16 activation."""
    if ROUND:
        y = _cast_out(y, tl.bfloat16, UPCAST).to(tl.float32)
    return y


# GELU, tanh approximation (as the model: F.gelu(approximate="tanh")), in its sigmoid form:
# 0.5 (1 + tanh z) = σ(2z), 2z = 2·sqrt(2/π)·(v + 0.044715 v³). One exponential per element:
# e = exp(-|2z|) = 2^-|w| (w = 2z·log2(e)) lies in (0, 1] and never overflows, σ(|2z|) = 1 / (1 + e),
# σ(-|2z|) = e / (1 + e) (no cancellation on either side), σ(2z)·σ(-2z) = e / (1 + e)². On the GPU
# (LIBDEVICE) the exponential and the reciprocal are the flush-to-zero approximations (2 ulp; a
# denormal e, below 2^-126, is 0 to FP32 here anyway): the precise forms add range checks, ~10
# instructions per element. (Literals: a jit function sees globals only as constexpr, which the
# interpreter cannot multiply with a tensor.)
@triton.jit
def _gelu_sigmoids(v, LIBDEVICE: tl.constexpr):
    """(σ(2z), σ(2z)·σ(-2z)) of the GELU input v."""
    w = v * (2.302208198144325 + 0.1029432395800235 * v * v)     # 2z·log2(e)
    if LIBDEVICE:
        e = libdevice.exp2(-tl.abs(w))
        r = libdevice.fast_dividef(tl.full(w.shape, 1.0, tl.float32), 1.0 + e)
    else:
        e = tl.exp2(-tl.abs(w))
        r = 1.0 / (1.0 + e)
    return tl.where(w >= 0, r, e * r), e * r * r


@triton.jit
def _gelu(v, LIBDEVICE: tl.constexpr):
    """v·σ(2z) = v / (1 + 2^-w): without the sign split of `_gelu_sigmoids` (three instructions
    fewer), which only the product σ(2z)·σ(-2z) of the derivative needs. Where 2^-w overflows
    (w < -128), 1 / inf = 0 and v·0 = 0, GELU's limit."""
    w = v * (2.302208198144325 + 0.1029432395800235 * v * v)
    if LIBDEVICE:
        r = libdevice.fast_dividef(v, 1.0 + libdevice.exp2(-w))
    else:
        r = v / (1.0 + tl.exp2(-w))
    return r


@triton.jit
def _gelu_grad(v, LIBDEVICE: tl.constexpr):
    """d/dv of v·σ(2z): σ(2z) + v·σ(2z)σ(-2z)·(2z)'."""
    sig, sig_sig = _gelu_sigmoids(v, LIBDEVICE)
    return sig + v * sig_sig * (1.5957691216057308 + 0.21406444881780073 * v * v)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _amax(a, axis: tl.constexpr):
    """Max along `axis`, NaN if any element is NaN (tl.max would skip it)."""
    return tl.reduce(a, axis, _max_nan)


@triton.jit
def _scale_nan(amax):
    """amax / 127 (IEEE), 1 where amax is 0, NaN where amax is NaN (`_scale_from_amax` maps NaN to 1)."""
    return tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32)))


@triton.jit
def _to_int8(v):
    """v (|v| ≤ 127 up to rounding: a value over its block's amax / 127) rounded to the nearest
    integer, half to even, as INT8: the low byte of the FP32 sum v + 1.5·2²³, which the add rounds
    to an integer (no conversion instructions, no clamp: |v| < 127.5 rounds into ±127)."""
    return (v + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _store_quantized(q_ptr, rows, cols, n_cols, mask, y, s, QMAX: tl.constexpr,
                     RINT_LIBDEVICE: tl.constexpr):
    v = tl.math.div_rn(y, tl.broadcast_to(s[:, None], y.shape))
    q = _to_int(v, 0.0, False, QMAX, RINT_LIBDEVICE)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], q, mask=mask)


@triton.jit
def _load_sum(x_ptr, r_ptr, rows, cols, R, C, HAS_RES: tl.constexpr):
    """The LayerNorm input chunk as FP32: x (+ residual, rounded to x's dtype as the stream keeps it);
    zeros outside R x C."""
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _normalized(x_ptr, r_ptr, w_ptr, b_ptr, rows, cols, R, C, mean, rstd,
                HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                ROUND_BF16: tl.constexpr, UPCAST: tl.constexpr):
    """LayerNorm output chunk (FP32; BF16 values: ROUND_BF16, `_round_bf16`), zero outside R x C (the
    Hadamard padding)."""
    xs = _load_sum(x_ptr, r_ptr, rows, cols, R, C, HAS_RES)
    y = (xs - mean[:, None]) * rstd[:, None]
    cmask = cols < C
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    mask = (rows < R)[:, None] & cmask[None, :]
    return _round_bf16(tl.where(mask, y, 0.0), ROUND_BF16, UPCAST)


@triton.jit
def _layernorm_quant_kernel(x_ptr, r_ptr, xs_ptr, w_ptr, b_ptr, R, C, Cp, eps,
                            yq_ptr, ys_ptr, xq_ptr, xqs_ptr, n_save, mean_ptr, rstd_ptr,
                            h_ptr, inv_sqrt, flag_ptr,
                            BR: tl.constexpr, BC: tl.constexpr, HAD: tl.constexpr,
                            HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                            CHECK: tl.constexpr, UPCAST: tl.constexpr, RINT_LIBDEVICE: tl.constexpr,
                            ROUND_BF16: tl.constexpr = False):
    """y_q [R, Cp]: per-row scale ys [R, 1] after the Hadamard (HAD = BC) or (1, BC) blocks, ys
    [R, C/BC] (HAD = 0, Cp = C). x_q [R, C] with (1, BC) scales xqs [R, n_save]; xs [R, C] = x + r.
    ROUND_BF16: the LayerNorm output rounded to BF16 first (`_round_bf16`; one product rotates it)."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    rmask = rows < R
    QMAX: tl.constexpr = 127
    # pass 1: statistics, residual stream, saved INT8 copy
    n = tl.zeros([BR], tl.float32)
    mean = tl.zeros([BR], tl.float32)
    m2 = tl.zeros([BR], tl.float32)
    bad = tl.zeros([BR], tl.int32)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        mask = rmask[:, None] & (cols < C)[None, :]
        xs = _load_sum(x_ptr, r_ptr, rows, cols, R, C, HAS_RES)
        if HAS_RES:
            tl.store(xs_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :],
                     xs.to(xs_ptr.dtype.element_ty), mask=mask)
        nc = tl.zeros([BR], tl.float32) + tl.minimum(C - c0, BC).to(tl.float32)
        cmean = tl.sum(xs, axis=1) / nc
        d = tl.where(mask, xs - cmean[:, None], 0.0)
        cm2 = tl.sum(d * d, axis=1)
        delta = cmean - mean
        tot = n + nc
        mean = mean + delta * (nc / tot)
        m2 = m2 + cm2 + delta * delta * (n * nc / tot)
        n = tot
        ax = tl.abs(xs)
        if CHECK:
            bad = tl.maximum(bad, tl.max(_nonfinite(ax), axis=1))
        s = _scale_from_amax(tl.max(ax, axis=1), QMAX)
        tl.store(xqs_ptr + rows * n_save + c0 // BC, s, mask=rmask)
        _store_quantized(xq_ptr, rows, cols, C, mask, xs, s, QMAX, RINT_LIBDEVICE)
    if CHECK:
        if tl.max(bad, axis=0) > 0:
            tl.store(flag_ptr, 1)
    rstd = 1.0 / tl.sqrt_rn(m2 / C + eps)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)
    if HAD > 0:
        h = _load_hadamard(h_ptr, HAD)
        # pass 2: abs-max of the rotated row
        amax = tl.zeros([BR], tl.float32)
        for c0 in range(0, Cp, BC):
            cols = c0 + tl.arange(0, BC)
            y = _normalized(x_ptr, r_ptr, w_ptr, b_ptr, rows, cols, R, C, mean, rstd, HAS_RES, HAS_W, HAS_B,
                            ROUND_BF16, UPCAST)
            amax = tl.maximum(amax, tl.max(tl.abs(_rotate(y, h, inv_sqrt, UPCAST, ROUND_BF16)), axis=1))
        s = _scale_from_amax(amax, QMAX)
        tl.store(ys_ptr + rows, s, mask=rmask)
        # pass 3: quantize
        for c0 in range(0, Cp, BC):
            cols = c0 + tl.arange(0, BC)
            y = _normalized(x_ptr, r_ptr, w_ptr, b_ptr, rows, cols, R, C, mean, rstd, HAS_RES, HAS_W, HAS_B,
                            ROUND_BF16, UPCAST)
            mask = rmask[:, None] & (cols < Cp)[None, :]
            _store_quantized(yq_ptr, rows, cols, Cp, mask, _rotate(y, h, inv_sqrt, UPCAST, ROUND_BF16), s, QMAX,
                             RINT_LIBDEVICE)
    else:
        n_blocks = tl.cdiv(C, BC)
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            y = _normalized(x_ptr, r_ptr, w_ptr, b_ptr, rows, cols, R, C, mean, rstd, HAS_RES, HAS_W, HAS_B,
                            ROUND_BF16, UPCAST)
            s = _scale_from_amax(tl.max(tl.abs(y), axis=1), QMAX)
            tl.store(ys_ptr + rows * n_blocks + c0 // BC, s, mask=rmask)
            mask = rmask[:, None] & (cols < C)[None, :]
            _store_quantized(yq_ptr, rows, cols, C, mask, y, s, QMAX, RINT_LIBDEVICE)


@triton.jit
def _load_int8_chunk(q_ptr, s_ptr, n_blocks, rows, c0, R, C, BC: tl.constexpr):
    """A dequantized [BR, BC] chunk of an INT8 tensor with (1, BC) block scales (zeros outside)."""
    cols = c0 + tl.arange(0, BC)
    rmask = rows < R
    mask = rmask[:, None] & (cols < C)[None, :]
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0)
    s = tl.load(s_ptr + rows * n_blocks + c0 // BC, mask=rmask, other=0.0)
    return q.to(tl.float32) * s[:, None]


@triton.jit
def _gelu_chunk(hq_ptr, hs_ptr, n_hblk, rows, c0, R, N, BC: tl.constexpr, LIBDEVICE: tl.constexpr,
                ROUND_BF16: tl.constexpr, UPCAST: tl.constexpr):
    """GELU of a [BR, BC] chunk of the INT8 input (`_load_int8_chunk`), FP32 (BF16 values: ROUND_BF16)."""
    return _round_bf16(_gelu(_load_int8_chunk(hq_ptr, hs_ptr, n_hblk, rows, c0, R, N, BC), LIBDEVICE),
                       ROUND_BF16, UPCAST)


@triton.jit
def _gelu_quant_kernel(hq_ptr, hs_ptr, n_hblk, R, N, Np, yq_ptr, ys_ptr, h_ptr, inv_sqrt,
                       BR: tl.constexpr, BC: tl.constexpr, HAD: tl.constexpr, UPCAST: tl.constexpr,
                       RINT_LIBDEVICE: tl.constexpr, ROUND_BF16: tl.constexpr = False):
    """GELU of h [R, N] (INT8, (1, BC) scales) -> y_q [R, Np] per-row after the Hadamard (HAD = BC)
    or (1, BC) blocks (HAD = 0, Np = N). GELU(0) = 0, so the padding stays zero. ROUND_BF16: the GELU
    output rounded to BF16 first (`_round_bf16`)."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    rmask = rows < R
    QMAX: tl.constexpr = 127
    if HAD > 0:
        h = _load_hadamard(h_ptr, HAD)
        amax = tl.zeros([BR], tl.float32)
        for c0 in range(0, Np, BC):
            y = _gelu_chunk(hq_ptr, hs_ptr, n_hblk, rows, c0, R, N, BC, RINT_LIBDEVICE, ROUND_BF16, UPCAST)
            amax = tl.maximum(amax, tl.max(tl.abs(_rotate(y, h, inv_sqrt, UPCAST, ROUND_BF16)), axis=1))
        s = _scale_from_amax(amax, QMAX)
        tl.store(ys_ptr + rows, s, mask=rmask)
        for c0 in range(0, Np, BC):
            cols = c0 + tl.arange(0, BC)
            y = _gelu_chunk(hq_ptr, hs_ptr, n_hblk, rows, c0, R, N, BC, RINT_LIBDEVICE, ROUND_BF16, UPCAST)
            mask = rmask[:, None] & (cols < Np)[None, :]
            _store_quantized(yq_ptr, rows, cols, Np, mask, _rotate(y, h, inv_sqrt, UPCAST, ROUND_BF16), s, QMAX,
                             RINT_LIBDEVICE)
    else:
        for c0 in range(0, N, BC):
            cols = c0 + tl.arange(0, BC)
            y = _gelu_chunk(hq_ptr, hs_ptr, n_hblk, rows, c0, R, N, BC, RINT_LIBDEVICE, ROUND_BF16, UPCAST)
            s = _scale_from_amax(tl.max(tl.abs(y), axis=1), QMAX)
            tl.store(ys_ptr + rows * n_hblk + c0 // BC, s, mask=rmask)
            mask = rmask[:, None] & (cols < N)[None, :]
            _store_quantized(yq_ptr, rows, cols, N, mask, y, s, QMAX, RINT_LIBDEVICE)


@triton.jit
def _load_grad_chunk(g_ptr, gs_ptr, n_gblk, rows, c0, R, C, BC: tl.constexpr, G_INT8: tl.constexpr):
    """A [BR, BC] chunk of the incoming gradient as FP32 (zeros outside R x C): a BF16/FP32 tensor, or
    INT8 with (1, BC) block scales gs [R, n_gblk]."""
    if G_INT8:
        return _load_int8_chunk(g_ptr, gs_ptr, n_gblk, rows, c0, R, C, BC)
    cols = c0 + tl.arange(0, BC)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    return tl.load(g_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _layernorm_backward_kernel(xq_ptr, xqs_ptr, n_save, mean_ptr, rstd_ptr, w_ptr, g_ptr, gs_ptr, n_gblk,
                               gr_ptr, dx_ptr, dwp_ptr, dbp_ptr, R, C,
                               BR: tl.constexpr, BC: tl.constexpr, HAS_W: tl.constexpr,
                               HAS_RES: tl.constexpr, G_INT8: tl.constexpr):
    """dx [R, C] (+ gr), and partial column sums dwp/dbp [programs, C] of g·x̂ and g. g: BF16/FP32
    [R, C], or INT8 [R, C] with (1, BC) scales gs [R, n_gblk] (G_INT8)."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    rmask = rows < R
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    c1 = tl.zeros([BR], tl.float32)
    c2 = tl.zeros([BR], tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        mask = rmask[:, None] & (cols < C)[None, :]
        xhat = (_load_int8_chunk(xq_ptr, xqs_ptr, n_save, rows, c0, R, C, BC) - mean[:, None]) * rstd[:, None]
        xhat = tl.where(mask, xhat, 0.0)
        g = _load_grad_chunk(g_ptr, gs_ptr, n_gblk, rows, c0, R, C, BC, G_INT8)
        if HAS_W:
            g = g * tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
        c1 += tl.sum(g * xhat, axis=1)
        c2 += tl.sum(g, axis=1)
    c1 = c1 / C
    c2 = c2 / C
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        xhat = (_load_int8_chunk(xq_ptr, xqs_ptr, n_save, rows, c0, R, C, BC) - mean[:, None]) * rstd[:, None]
        xhat = tl.where(mask, xhat, 0.0)
        g = _load_grad_chunk(g_ptr, gs_ptr, n_gblk, rows, c0, R, C, BC, G_INT8)
        gw = g
        if HAS_W:
            gw = g * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        dx = (gw - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_RES:
            dx += tl.load(gr_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_W:
            tl.store(dwp_ptr + pid * C + cols, tl.sum(g * xhat, axis=0), mask=cmask)
        tl.store(dbp_ptr + pid * C + cols, tl.sum(g, axis=0), mask=cmask)


@triton.jit
def _gelu_backward_kernel(hq_ptr, hs_ptr, n_blk, g_ptr, dh_ptr, R, N,
                          BR: tl.constexpr, NB: tl.constexpr, LIBDEVICE: tl.constexpr):
    """dh [R, N] = GELU'(h) · g over a (column tiles, row tiles) grid of [BR, NB, 128] tiles (programs
    next to each other read neighbouring columns of the same rows: the rows-first order measured
    10% slower on the H100, 0.50 against 0.45 ms at 16384 × 16384): h INT8 with (1, 128) scales hs [R, n_blk], g and dh in g's dtype."""
    BC: tl.constexpr = 128
    rows = tl.program_id(1) * BR + tl.arange(0, BR)
    blk = tl.program_id(0) * NB + tl.arange(0, NB)
    cols = blk[:, None] * BC + tl.arange(0, BC)[None, :]
    rmask = rows < R
    mask = rmask[:, None, None] & (cols < N)[None, :, :]
    offs = rows.to(tl.int64)[:, None, None] * N + cols[None, :, :]
    # the scales as a [BR, NB, 1] tile: a slice of the data's layout (a 2-D load would be converted)
    s = tl.load(hs_ptr + (rows[:, None] * n_blk + blk[None, :])[:, :, None],
                mask=(rmask[:, None] & (blk < n_blk)[None, :])[:, :, None], other=0.0)
    v = tl.load(hq_ptr + offs, mask=mask, other=0).to(tl.float32) * s
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dh_ptr + offs, (_gelu_grad(v, LIBDEVICE) * g).to(dh_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# row-resident kernels
@triton.jit
def _tile_layout(BR: tl.constexpr, NCH: tl.constexpr, BC: tl.constexpr):
    """The resident [BR·NCH, BC] tile's indices: row within the tile [T], chunk [T], column [T, BC]."""
    t = tl.arange(0, BR * NCH)
    chunk = t % NCH
    return t // NCH, chunk, chunk[:, None] * BC + tl.arange(0, BC)[None, :]


@triton.jit
def _row_sum(v, BR: tl.constexpr, NCH: tl.constexpr):
    """[BR] per-row sums of a resident [BR·NCH, BC] tile."""
    return tl.sum(tl.reshape(tl.sum(v, axis=1), [BR, NCH]), axis=1)


@triton.jit
def _row_amax(a, BR: tl.constexpr, NCH: tl.constexpr):
    """[BR] per-row maxima of a resident [BR·NCH, BC] tile (NaN-propagating)."""
    return _amax(tl.reshape(_amax(a, 1), [BR, NCH]), 1)


@triton.jit
def _spread(v, BR: tl.constexpr, NCH: tl.constexpr):
    """[BR] per-row values repeated for each of the row's tile rows: [BR·NCH]."""
    return tl.reshape(tl.broadcast_to(v[:, None], [BR, NCH]), [BR * NCH])


@triton.jit
def _div_rn_rows(x, s, UPCAST: tl.constexpr):
    """x [T, BC] / s [T] rounded to nearest (IEEE, what `quantize_blockwise` computes) from the
    reciprocal: q = x·RN(1/s), then one FMA correction q + (x - q·s)·RN(1/s), which is the correctly
    rounded quotient (Markstein's theorem: RN(1/s) within half an ulp, q within one; the remainder
    x - q·s exact in one FMA while nothing underflows, i.e. for |x / s| above ~2⁻¹⁰⁰). Three
    instructions per element where div.rn takes ~10 and a slow-path branch. Under the interpreter
    (UPCAST), whose FMA is not fused, the division itself."""
    if UPCAST:
        q = tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape))
    else:
        r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)[:, None]
        q0 = x * r
        q = tl.fma(tl.fma(-q0, s[:, None], x), r, q0)
    return q


@triton.jit
def _store_operand(yq_ptr, ys_ptr, n_out, y, tile, rows, chunk, cols, R, n_blk, h, inv_sqrt,
                   BR: tl.constexpr, NCH: tl.constexpr, HAD: tl.constexpr, UPCAST: tl.constexpr,
                   BF16_Y: tl.constexpr = False):
    """Write the resident tile y (FP32, zero beyond the row) in the operand format: rotated, one
    scale per row (HAD = 128: y_q [R, n_blk·128], ys [R, 1]); or (1, 128) blocks (HAD = 0: y_q
    [R, n_out], ys [R, n_blk]). Values are multiplied by the reciprocal scale (the module doc).
    BF16_Y: y holds BF16 values (one product rotates them)."""
    live = (rows < R) & (chunk < n_blk)
    if HAD > 0:
        y = _rotate_pm1(y, h, UPCAST, BF16_Y)    # the 1/√128 goes into the per-row multiplier
        s_row = _scale_nan(_row_amax(tl.abs(y), BR, NCH) * inv_sqrt)
        out_rows = tile * BR + tl.arange(0, BR)
        tl.store(ys_ptr + out_rows, s_row, mask=out_rows < R)
        mult = _spread(inv_sqrt * tl.math.div_rn(tl.full(s_row.shape, 1.0, tl.float32), s_row), BR, NCH)
        mask = live[:, None]
    else:
        s = _scale_nan(_amax(tl.abs(y), 1))
        tl.store(ys_ptr + rows * n_blk + chunk, s, mask=live)
        mult = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
        mask = live[:, None] & (cols < n_out)
    tl.store(yq_ptr + rows.to(tl.int64)[:, None] * n_out + cols, _to_int8(y * mult[:, None]), mask=mask)


@triton.jit
def _layernorm_quant_resident_kernel(x_ptr, r_ptr, xs_ptr, w_ptr, b_ptr, R, C, n_blk, eps,
                                     yq_ptr, ys_ptr, n_out, xq_ptr, xqs_ptr, mean_ptr, rstd_ptr,
                                     h_ptr, inv_sqrt, flag_ptr, n_tiles,
                                     BR: tl.constexpr, NCH: tl.constexpr, HAD: tl.constexpr,
                                     HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                                     CHECK: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr = False):
    """[x + r ->] LayerNorm of x [R, C] -> the operand (`_store_operand`; n_blk = ⌈C/128⌉); x_q
    [R, C] with (1, 128) scales xqs [R, n_blk]; mean, rstd [R]; xs [R, C] = x + r (HAS_RES).
    ROUND_BF16: the LayerNorm output rounded to BF16 first (`_round_bf16`), then rotated by one BF16
    product."""
    BC: tl.constexpr = 128
    r_in, chunk, cols = _tile_layout(BR, NCH, BC)
    cmask = cols < C
    w = 1.0
    b = 0.0
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    h = _load_hadamard(h_ptr, HAD)
    bad = tl.zeros([BR * NCH], tl.int32)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows = tile * BR + r_in
        rmask = rows < R
        mask = rmask[:, None] & cmask
        offs = rows.to(tl.int64)[:, None] * C + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(
                x_ptr.dtype.element_ty)
            tl.store(xs_ptr + offs, x.to(xs_ptr.dtype.element_ty), mask=mask)
        x = x.to(tl.float32)
        # the saved INT8 copy: one (1, 128) block per tile row
        a = _amax(tl.abs(x), 1)
        if CHECK:
            bad = tl.maximum(bad, _nonfinite(a))
        s = _scale_nan(a)
        tl.store(xqs_ptr + rows * n_blk + chunk, s, mask=rmask & (chunk < n_blk))
        tl.store(xq_ptr + offs, _to_int8(_div_rn_rows(x, s, UPCAST)), mask=mask)
        # statistics: mean, then the centred sum of squares (both from registers)
        mean = _row_sum(x, BR, NCH) / C
        d = tl.where(mask, x - _spread(mean, BR, NCH)[:, None], 0.0)
        rstd = 1.0 / tl.sqrt_rn(_row_sum(d * d, BR, NCH) / C + eps)
        out_rows = tile * BR + tl.arange(0, BR)
        tl.store(mean_ptr + out_rows, mean, mask=out_rows < R)
        tl.store(rstd_ptr + out_rows, rstd, mask=out_rows < R)
        y = d * _spread(rstd, BR, NCH)[:, None] * w + b      # zero beyond C: d, w and b are
        y = _round_bf16(y, ROUND_BF16, UPCAST)
        _store_operand(yq_ptr, ys_ptr, n_out, y, tile, rows, chunk, cols, R, n_blk, h, inv_sqrt,
                       BR, NCH, HAD, UPCAST, ROUND_BF16)
    if CHECK:
        if tl.max(bad, axis=0) > 0:
            tl.store(flag_ptr, 1)


@triton.jit
def _gelu_quant_resident_kernel(hq_ptr, hs_ptr, R, N, n_blk, yq_ptr, ys_ptr, n_out, h_ptr, inv_sqrt, n_tiles,
                                BR: tl.constexpr, NCH: tl.constexpr, HAD: tl.constexpr,
                                UPCAST: tl.constexpr, LIBDEVICE: tl.constexpr, ROUND_BF16: tl.constexpr = False):
    """GELU of h [R, N] (INT8, (1, 128) scales hs [R, n_blk]) -> the operand (`_store_operand`).
    GELU(0) = 0, so the Hadamard padding stays zero. ROUND_BF16: the GELU output rounded to BF16
    first (`_round_bf16`), then rotated by one BF16 product."""
    BC: tl.constexpr = 128
    r_in, chunk, cols = _tile_layout(BR, NCH, BC)
    h = _load_hadamard(h_ptr, HAD)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows = tile * BR + r_in
        live = (rows < R) & (chunk < n_blk)
        q = tl.load(hq_ptr + rows.to(tl.int64)[:, None] * N + cols, mask=live[:, None] & (cols < N), other=0)
        s = tl.load(hs_ptr + rows * n_blk + chunk, mask=live, other=0.0)
        y = _round_bf16(_gelu(q.to(tl.float32) * s[:, None], LIBDEVICE), ROUND_BF16, UPCAST)
        _store_operand(yq_ptr, ys_ptr, n_out, y, tile, rows, chunk, cols, R, n_blk, h, inv_sqrt,
                       BR, NCH, HAD, UPCAST, ROUND_BF16)


@triton.jit
def _layernorm_backward_resident_kernel(xq_ptr, xqs_ptr, n_blk, mean_ptr, rstd_ptr, w_ptr, g_ptr, gs_ptr,
                                        gr_ptr, dx_ptr, dwp_ptr, dbp_ptr, R, C, n_tiles,
                                        BR: tl.constexpr, NCH: tl.constexpr, HAS_W: tl.constexpr,
                                        HAS_RES: tl.constexpr, G_INT8: tl.constexpr):
    """dx [R, C] (+ gr) from x_q (INT8, (1, 128) scales xqs [R, n_blk]) and g (BF16/FP32, or INT8
    with (1, 128) scales gs [R, n_blk] when G_INT8); this program's column sums of g·x̂ and g over
    its tiles in dwp/dbp [programs, C]."""
    BC: tl.constexpr = 128
    ch = tl.arange(0, NCH)
    cols = ch[:, None] * BC + tl.arange(0, BC)[None, :]
    cmask = cols < C
    w = 1.0
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :, :]
    dw = tl.zeros([NCH, BC], tl.float32)
    db = tl.zeros([NCH, BC], tl.float32)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows = tile * BR + tl.arange(0, BR)
        rmask = rows < R
        mask = rmask[:, None, None] & cmask[None, :, :]
        offs = rows.to(tl.int64)[:, None, None] * C + cols[None, :, :]
        soffs = rows[:, None] * n_blk + ch[None, :]
        smask = rmask[:, None] & (ch < n_blk)[None, :]
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)[:, None, None]
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)[:, None, None]
        x = tl.load(xq_ptr + offs, mask=mask, other=0).to(tl.float32) * \
            tl.load(xqs_ptr + soffs, mask=smask, other=0.0)[:, :, None]
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if G_INT8:
            g = g * tl.load(gs_ptr + soffs, mask=smask, other=0.0)[:, :, None]
        gw = g * w
        c1 = (tl.sum(tl.sum(gw * xhat, axis=2), axis=1) / C)[:, None, None]
        c2 = (tl.sum(tl.sum(gw, axis=2), axis=1) / C)[:, None, None]
        dx = (gw - xhat * c1 - c2) * rstd
        if HAS_RES:
            dx += tl.load(gr_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(g * xhat, axis=0)
        db += tl.sum(g, axis=0)
    part = tl.program_id(0).to(tl.int64) * C + cols
    if HAS_W:
        tl.store(dwp_ptr + part, dw, mask=cmask)
    tl.store(dbp_ptr + part, db, mask=cmask)


@triton.jit
def _rotate_rows_kernel(x_ptr, out_ptr, R, Cp, C_out, h_ptr, inv_sqrt,
                        BR: tl.constexpr, HAD: tl.constexpr, UPCAST: tl.constexpr):
    """out[:, :C_out] = (x · H)[:, :C_out] in out's dtype, each row of x [R, Cp] (FP32/BF16/FP16) rotated by
    the orthonormal Hadamard block (h: the ±1 matrix; Cp a multiple of HAD) on the tensor cores: one
    [BR, HAD] tile per program, FP32 as two BF16 parts (`_rotate`)."""
    rows = tl.program_id(1) * BR + tl.arange(0, BR)
    cols = tl.program_id(0) * HAD + tl.arange(0, HAD)
    rmask = rows < R
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * Cp + cols[None, :], mask=rmask[:, None], other=0.0)
    y = _rotate(x.to(tl.float32), _load_hadamard(h_ptr, HAD), inv_sqrt, UPCAST)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C_out + cols[None, :],
             _cast_out(y, out_ptr.dtype.element_ty, UPCAST), mask=rmask[:, None] & (cols < C_out)[None, :])
