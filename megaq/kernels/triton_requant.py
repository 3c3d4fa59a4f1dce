"""Triton kernels: the wgrad GEMM's Xᵀ operand written straight from a saved INT8 operand X̃.

The INT8 data flow keeps each linear's forward operand X̃ (INT8 [T, C'] + FP32 scales, one per token
or per (1, k) tile of a token's row) for backward. wgrad reduces over tokens, so it needs Xᵀ quantized
per its recipe: rows of X̃ᵀ (one per hidden column), rotated by a block Hadamard along tokens (zero
padded to whole blocks) and one scale per row, or (no rotation) one scale per k tokens. What these
kernels compute is `hadamard_quantize(dequantize(X̃), transpose=True)` (or `quantize(...,
transpose=True)`) without the dequantized copy: each tile is dequantized in registers, so X̃ is read
as INT8 (1 byte per element per pass) and no [T, C'] BF16 tensor is written and read twice.

Kernels
- `_requant_amax_kernel` + `_requant_quant_kernel`: one scale per row of X̃ᵀ (over all tokens), two
  passes like `triton_quant._amax_partial_kernel` / `_quant_given_amax_kernel` (AXIS=0): the rotated
  columns' abs-maxes folded with atomics, then a second read quantizes and writes X̃ᵀ. A program
  takes a block of tokens (one Hadamard block) and walks column tiles, so the per-block operands
  below are built once per block of tokens.
- `_requant_tile_kernel`: (1, k) blocks along tokens without rotation (`int8_block128`'s Xᵀ): a
  [k, BC] tile holds whole blocks, one pass.

The rotation of a tile, H · diag(s) · Q (H the ±1 Hadamard block, s the tokens' scales, Q the INT8
payload [tokens, columns]; the 1/√n folds into the scale), in one of two ways (`DIGITS`):
- exact (DIGITS=False): x = q · s in FP32 (as `dequantize` rounds it), rotated by three BF16
  tensor-core products (`triton_quant._hadamard_sums`, FP32 input): the same operations as the
  FP32-input two-pass quantizer on the same tiles, so the result is that of
  `hadamard_quantize(dequantize(X̃, float32), transpose=True)`. Three BF16 products per tile.
- digits (DIGITS=True, per-token scales only): the token scales of a Hadamard block are written as
  s_t ≈ s_max · k_t / 16383 with k_t = rint(s_t / s_max · 16383) = 128 · a_t + b_t, a_t, b_t in
  [0, 127]; then H · diag(s) · Q ≈ s_max / 16383 · (128 · (H diag(a)) Q + (H diag(b)) Q), two INT8
  tensor-core products with exact INT32 sums (the cost of one BF16 product; Q is not converted).
  Error: |s̃_t − s_t| <= s_max / 32766 (2^-15 of the block's largest scale) per token, the only error
  besides FP32 roundings of the final products (2^-24 relative). Today's path (X̃ dequantized to
  BF16) rounds every element by up to 2^-9 relative: digits is more accurate for every token whose
  scale is above 1/64 of its block's largest, and those below contribute at most 2^-15 · s_max · |q|
  each.
NaN/Inf: X̃'s payload is INT8, only its scales can be non-finite; a non-finite scale makes every output
scale of the affected columns NaN (never a finite-looking operand), the check on the scales is the
caller's (`dispatch.requantize_transposed`).
"""

import triton
import triton.language as tl

from .triton_quant import (_divide, _divisor, _dither_bits, _hadamard_sums, _load_hadamard, _nonfinite,
                           _round_to_int, _store_payload)

DIGIT_MAX = tl.constexpr(16383)   # 128 · 127 + 127: k_t = 128 · a_t + b_t with two INT8 digits in [0, 127]
_NAN_BITS = tl.constexpr(0x7FC00000)   # a positive quiet NaN: wins every atomic max over non-negative FP32 bits


@triton.jit
def _nan_like(v):
    return (v.to(tl.int32, bitcast=True) * 0 + _NAN_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _scale_keeping_nan(amax, QMAX: tl.constexpr):
    """amax / QMAX; 1 for an all-zero row (as `_scale_from_amax`), NaN stays NaN (a NaN input must not
    become the scale 1)."""
    return tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, amax * 0.0 + QMAX))


@triton.jit
def _column_amax(ay, m):
    """Per-column abs-max of the tile's values ay · m (ay >= 0 or NaN); NaN where a column holds NaN/Inf
    (a GPU max drops NaN operands)."""
    bad = tl.max(_nonfinite(ay), axis=0) > 0
    am = tl.max(ay, axis=0) * m
    return tl.where(bad, _nan_like(am), am)


@triton.jit
def _token_scales(s_ptr, s_stride, rows, col0, T, GC: tl.constexpr):
    """The scales of X̃ at tokens `rows` for the columns from col0 (one scale for the tile's BC
    columns: GC is a multiple of BC, or 2^30 for one scale per row); 0 beyond T."""
    return tl.load(s_ptr + rows.to(tl.int64) * s_stride + col0 // GC, mask=rows < T, other=0.0)


@triton.jit
def _load_payload(q_ptr, rows, cols, T, C):
    mask = (rows < T)[:, None] & (cols < C)[None, :]
    return tl.load(q_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0)


@triton.jit
def _digit_operands(s, h, HAD: tl.constexpr):
    """For the token scales s [HAD] of one Hadamard block: the INT8 matrices H diag(a), H diag(b) and
    the FP32 multiplier s_max / 16383 with s_t ≈ s_max · (128 a_t + b_t) / 16383 (module doc); the
    multiplier is NaN when a scale is NaN/Inf."""
    bad = tl.max(_nonfinite(tl.abs(s)), axis=0) > 0
    s = tl.where(_nonfinite(tl.abs(s)) > 0, 0.0, s)
    smax = tl.max(s, axis=0)
    smax = tl.where(smax > 0.0, smax, 1.0)
    k = tl.floor(tl.math.div_rn(s, smax + tl.zeros([HAD], tl.float32)) * DIGIT_MAX + 0.5).to(tl.int32)
    hi = h.to(tl.int32)
    g_a = (hi * (k >> 7)[None, :]).to(tl.int8)
    g_b = (hi * (k & 127)[None, :]).to(tl.int8)
    mult = smax / DIGIT_MAX
    return g_a, g_b, tl.where(bad, _nan_like(mult), mult)


@triton.jit
def _rotated_tile(q_ptr, s_ptr, s_stride, rows, cols, col0, T, C, h, g_a, g_b, mult, inv_sqrt,
                  HAD: tl.constexpr, GC: tl.constexpr, DIGITS: tl.constexpr, UPCAST: tl.constexpr):
    """(y, m): the [BR, BC] tile of X̃ (tokens `rows`, columns `cols`) dequantized and rotated along
    tokens is y · m (m a scalar: 1/√HAD, times the digit multiplier in DIGITS mode)."""
    q = _load_payload(q_ptr, rows, cols, T, C)
    if DIGITS:
        if UPCAST:   # the interpreter: FP32 products of integers < 2^24 are exact
            y_a = tl.dot(g_a.to(tl.float32), q.to(tl.float32), out_dtype=tl.float32)
            y_b = tl.dot(g_b.to(tl.float32), q.to(tl.float32), out_dtype=tl.float32)
        else:
            y_a = tl.dot(g_a, q, out_dtype=tl.int32).to(tl.float32)
            y_b = tl.dot(g_b, q, out_dtype=tl.int32).to(tl.float32)
        y = y_a * 128.0 + y_b
        m = mult * inv_sqrt
    else:
        x = q.to(tl.float32) * _token_scales(s_ptr, s_stride, rows, col0, T, GC)[:, None]
        y = _hadamard_sums(x, h, 0, HAD, True, UPCAST)
        m = inv_sqrt
    return y, m


@triton.jit
def _requant_amax_kernel(q_ptr, s_ptr, s_stride, T, C, amax_ptr, h_ptr, inv_sqrt, n_tblocks, n_ctiles,
                         BR: tl.constexpr, BC: tl.constexpr, GC: tl.constexpr, HAD: tl.constexpr,
                         DIGITS: tl.constexpr, UPCAST: tl.constexpr, STAGES: tl.constexpr):
    """Pass 1: program (i, j) takes the token blocks i, i + grid[0], ... and in each the column tiles
    j, j + grid[1], ...; folds each tile's per-column abs-max of the rotated values into amax [C]
    (FP32 bits in int32: for values >= 0, and the positive NaN, the integer order is the float order)."""
    h = _load_hadamard(h_ptr, HAD)
    for tb in tl.range(tl.program_id(0), n_tblocks, tl.num_programs(0)):
        rows = tb * BR + tl.arange(0, BR)
        if DIGITS:
            g_a, g_b, mult = _digit_operands(_token_scales(s_ptr, s_stride, rows, 0, T, GC), h, HAD)
        else:
            g_a, g_b, mult = 0, 0, 0.0
        for ct in tl.range(tl.program_id(1), n_ctiles, tl.num_programs(1), num_stages=STAGES):
            cols = ct * BC + tl.arange(0, BC)
            y, m = _rotated_tile(q_ptr, s_ptr, s_stride, rows, cols, ct * BC, T, C, h, g_a, g_b, mult, inv_sqrt,
                                 HAD, GC, DIGITS, UPCAST)
            am = _column_amax(tl.abs(y), m)
            tl.atomic_max(amax_ptr + cols, am.to(tl.int32, bitcast=True), mask=cols < C)


@triton.jit
def _requant_quant_kernel(q_ptr, s_ptr, s_stride, T, Tp, C, amax_ptr, out_ptr, out_s_ptr, h_ptr, inv_sqrt,
                          seed_ptr, n_tblocks, n_ctiles,
                          BR: tl.constexpr, BC: tl.constexpr, GC: tl.constexpr, HAD: tl.constexpr,
                          DIGITS: tl.constexpr, UPCAST: tl.constexpr, STOCHASTIC: tl.constexpr,
                          QMAX: tl.constexpr, RINT_LIBDEVICE: tl.constexpr, STAGES: tl.constexpr):
    """Pass 2: the tiles of pass 1 again, quantized with the finished column abs-maxes and written
    transposed: out [C, Tp] (tokens zero padded to Tp), out_s [C, 1] (by the programs of token block 0).
    Dither (stochastic rounding): `_dither_bits` by the element's place in X̃, seed seed_ptr[0], as the
    two-pass quantizer of x.T draws it."""
    h = _load_hadamard(h_ptr, HAD)
    seed = 0
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
    for tb in tl.range(tl.program_id(0), n_tblocks, tl.num_programs(0)):
        rows = tb * BR + tl.arange(0, BR)
        if DIGITS:
            g_a, g_b, mult = _digit_operands(_token_scales(s_ptr, s_stride, rows, 0, T, GC), h, HAD)
        else:
            g_a, g_b, mult = 0, 0, 0.0
        for ct in tl.range(tl.program_id(1), n_ctiles, tl.num_programs(1), num_stages=STAGES):
            cols = ct * BC + tl.arange(0, BC)
            s = _scale_keeping_nan(tl.load(amax_ptr + cols, mask=cols < C, other=0).to(tl.float32, bitcast=True),
                                   QMAX)
            if tb == 0:
                tl.store(out_s_ptr + cols, s, mask=cols < C)
            p, sn, rn = _divisor(s)
            y, m = _rotated_tile(q_ptr, s_ptr, s_stride, rows, cols, ct * BC, T, C, h, g_a, g_b, mult, inv_sqrt,
                                 HAD, GC, DIGITS, UPCAST)
            v = _divide(y * (p * m)[None, :], sn[None, :], rn[None, :])
            bits = 0
            if STOCHASTIC:
                bits = _dither_bits(seed, rows, tl.cdiv(C, 32), ct * BC, BR, BC)
            q = _round_to_int(v, bits, STOCHASTIC, QMAX, RINT_LIBDEVICE)
            _store_payload(out_ptr, q, rows, cols, Tp, C, True)


@triton.jit
def _requant_tile_kernel(q_ptr, s_ptr, s_stride, T, C, out_ptr, out_s_ptr, out_s_stride, seed_ptr,
                         BR: tl.constexpr, BC: tl.constexpr, GC: tl.constexpr, STOCHASTIC: tl.constexpr,
                         QMAX: tl.constexpr, RINT_LIBDEVICE: tl.constexpr):
    """(1, BR) blocks along tokens, no rotation: the [BR, BC] tile at program (column tile, token
    block) holds BC whole blocks; out [C, T], out_s [C, ceil(T / BR)]. Same values as the tile
    quantizer writing x.T (`_quant_tile_kernel`, HAS_T), its dither (seed seed_ptr[1]) included."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_c * BC + tl.arange(0, BC)
    x = _load_payload(q_ptr, rows, cols, T, C).to(tl.float32) * \
        _token_scales(s_ptr, s_stride, rows, pid_c * BC, T, GC)[:, None]
    s = _scale_keeping_nan(_column_amax(tl.abs(x), 1.0), QMAX)
    tl.store(out_s_ptr + cols * out_s_stride + pid_r, s, mask=cols < C)
    p, sn, rn = _divisor(s)
    v = _divide(x * p[None, :], sn[None, :], rn[None, :])
    bits = 0
    if STOCHASTIC:
        bits = _dither_bits(tl.load(seed_ptr + 1), rows, tl.cdiv(C, 32), pid_c * BC, BR, BC)
    q = _round_to_int(v, bits, STOCHASTIC, QMAX, RINT_LIBDEVICE)
    _store_payload(out_ptr, q, rows, cols, T, C, True)
