"""Triton kernels of the INT8 data flow (`megaq.kernels.dataflow` launches them and holds the reference).

Each program owns BR rows and walks them in chunks of BC = 128 columns (one Hadamard block, one
saved (1, 128) block). A per-row output scale over a rotated row needs the whole row's abs-max before
anything is written, so the producers read their rows more than once (later reads mostly hit L2):

- `_layernorm_quant_kernel`: pass 1 — [x + residual, written back as the residual stream,] row
  statistics merged chunk by chunk (Chan's parallel mean/M2: stable where sum/sum-of-squares is not),
  the INT8 (1, 128) copy of the input saved for backward; pass 2 — normalize, affine, rotate, abs-max;
  pass 3 — the same again, quantized with the row scale. Unrotated (1, 128) output: one pass after
  the statistics (each chunk is its own block).
- `_gelu_quant_kernel`: INT8 (1, 128) input (fc1's GEMM epilogue) -> GELU in FP32 -> rotated row
  abs-max; then again -> quantize. The input is INT8, so the second read is cheap.
- `_layernorm_backward_kernel`: pass 1 — the row sums Σ g·w·x̂ and Σ g·w from the dequantized saved
  INT8 input; pass 2 — dx (+ the residual stream's gradient), and this program's partial column sums
  of the weight and bias gradients. The incoming gradient g is read as BF16/FP32, or (G_INT8) as
  INT8 (1, BC) blocks + FP32 scales dequantized on load; dx is written in the residual's dtype.
- `_gelu_backward_kernel`: elementwise GELU'(dequantized input) · gradient.

The rotation is a `tl.dot` with the ±1 Sylvester matrix (BF16, exact) times 1/√128: an FP32 value is
split into two BF16 parts (hi + lo, 16 significant bits, relative error ≤ 2⁻¹⁷ — far below INT8's
step), except under the interpreter, whose BF16 dot is wrong, where the dot runs in FP32.
"""

import triton
import triton.language as tl

from .triton_quant import _grid_tile, _load_hadamard, _nonfinite, _scale_from_amax, _to_int



@triton.jit
def _rotate(y, h, inv_sqrt, UPCAST: tl.constexpr):
    """y [BR, HAD] (FP32) times the orthonormal Hadamard block (h: the ±1 matrix)."""
    if UPCAST:
        r = tl.dot(y, h.to(tl.float32), out_dtype=tl.float32)
    else:
        hi = y.to(tl.bfloat16)
        lo = (y - hi.to(tl.float32)).to(tl.bfloat16)
        r = tl.dot(hi, h, out_dtype=tl.float32)
        r = tl.dot(lo, h, r, out_dtype=tl.float32)
    return r * inv_sqrt


@triton.jit
def _sigmoid(x):
    # 1 / (1 + e^{-x}): saturates cleanly to 0 or 1, no libdevice needed
    return 1.0 / (1.0 + tl.exp(-x))


# GELU, tanh approximation, in its sigmoid form (0.5 (1 + tanh z) = sigmoid(2z), no cancellation
# where tanh z is near -1), as the reference: sqrt(2/pi) = 0.7978845608028654, c = 0.044715 (literals:
# a jit function sees globals only as constexpr, which the interpreter cannot multiply with a tensor)
@triton.jit
def _gelu(v):
    return v * _sigmoid(1.5957691216057308 * (v + 0.044715 * v * v * v))


@triton.jit
def _gelu_grad(v):
    z2 = 1.5957691216057308 * (v + 0.044715 * v * v * v)
    return _sigmoid(z2) + v * _sigmoid(z2) * _sigmoid(-z2) * 1.5957691216057308 * (1.0 + 0.134145 * v * v)


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
                HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """LayerNorm output chunk (FP32), zero outside R x C (the Hadamard padding)."""
    xs = _load_sum(x_ptr, r_ptr, rows, cols, R, C, HAS_RES)
    y = (xs - mean[:, None]) * rstd[:, None]
    cmask = cols < C
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    mask = (rows < R)[:, None] & cmask[None, :]
    return tl.where(mask, y, 0.0)


@triton.jit
def _layernorm_quant_kernel(x_ptr, r_ptr, xs_ptr, w_ptr, b_ptr, R, C, Cp, eps,
                            yq_ptr, ys_ptr, xq_ptr, xqs_ptr, n_save, mean_ptr, rstd_ptr,
                            h_ptr, inv_sqrt, flag_ptr,
                            BR: tl.constexpr, BC: tl.constexpr, HAD: tl.constexpr,
                            HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                            CHECK: tl.constexpr, UPCAST: tl.constexpr, RINT_LIBDEVICE: tl.constexpr):
    """y_q [R, Cp]: per-row scale ys [R, 1] after the Hadamard (HAD = BC) or (1, BC) blocks, ys
    [R, C/BC] (HAD = 0, Cp = C). x_q [R, C] with (1, BC) scales xqs [R, n_save]; xs [R, C] = x + r."""
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
            y = _normalized(x_ptr, r_ptr, w_ptr, b_ptr, rows, cols, R, C, mean, rstd, HAS_RES, HAS_W, HAS_B)
            amax = tl.maximum(amax, tl.max(tl.abs(_rotate(y, h, inv_sqrt, UPCAST)), axis=1))
        s = _scale_from_amax(amax, QMAX)
        tl.store(ys_ptr + rows, s, mask=rmask)
        # pass 3: quantize
        for c0 in range(0, Cp, BC):
            cols = c0 + tl.arange(0, BC)
            y = _normalized(x_ptr, r_ptr, w_ptr, b_ptr, rows, cols, R, C, mean, rstd, HAS_RES, HAS_W, HAS_B)
            mask = rmask[:, None] & (cols < Cp)[None, :]
            _store_quantized(yq_ptr, rows, cols, Cp, mask, _rotate(y, h, inv_sqrt, UPCAST), s, QMAX,
                             RINT_LIBDEVICE)
    else:
        n_blocks = tl.cdiv(C, BC)
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            y = _normalized(x_ptr, r_ptr, w_ptr, b_ptr, rows, cols, R, C, mean, rstd, HAS_RES, HAS_W, HAS_B)
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
def _gelu_quant_kernel(hq_ptr, hs_ptr, n_hblk, R, N, Np, yq_ptr, ys_ptr, h_ptr, inv_sqrt,
                       BR: tl.constexpr, BC: tl.constexpr, HAD: tl.constexpr, UPCAST: tl.constexpr,
                       RINT_LIBDEVICE: tl.constexpr):
    """GELU of h [R, N] (INT8, (1, BC) scales) -> y_q [R, Np] per-row after the Hadamard (HAD = BC)
    or (1, BC) blocks (HAD = 0, Np = N). GELU(0) = 0, so the padding stays zero."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    rmask = rows < R
    QMAX: tl.constexpr = 127
    if HAD > 0:
        h = _load_hadamard(h_ptr, HAD)
        amax = tl.zeros([BR], tl.float32)
        for c0 in range(0, Np, BC):
            y = _gelu(_load_int8_chunk(hq_ptr, hs_ptr, n_hblk, rows, c0, R, N, BC))
            amax = tl.maximum(amax, tl.max(tl.abs(_rotate(y, h, inv_sqrt, UPCAST)), axis=1))
        s = _scale_from_amax(amax, QMAX)
        tl.store(ys_ptr + rows, s, mask=rmask)
        for c0 in range(0, Np, BC):
            cols = c0 + tl.arange(0, BC)
            y = _gelu(_load_int8_chunk(hq_ptr, hs_ptr, n_hblk, rows, c0, R, N, BC))
            mask = rmask[:, None] & (cols < Np)[None, :]
            _store_quantized(yq_ptr, rows, cols, Np, mask, _rotate(y, h, inv_sqrt, UPCAST), s, QMAX,
                             RINT_LIBDEVICE)
    else:
        for c0 in range(0, N, BC):
            cols = c0 + tl.arange(0, BC)
            y = _gelu(_load_int8_chunk(hq_ptr, hs_ptr, n_hblk, rows, c0, R, N, BC))
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
def _gelu_backward_kernel(hq_ptr, hs_ptr, n_hblk, g_ptr, dh_ptr, R, N,
                          BR: tl.constexpr, BC: tl.constexpr):
    pid_c, rows, cols, mask = _grid_tile(R, N, BR, BC)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    v = _load_int8_chunk(hq_ptr, hs_ptr, n_hblk, rows, pid_c * BC, R, N, BC)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dh_ptr + offs, (_gelu_grad(v) * g).to(dh_ptr.dtype.element_ty), mask=mask)
