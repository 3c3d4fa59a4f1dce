"""Triton kernels of the error-feedback compressed gradient all-reduce (`int8_ef` / `int4_ef`,
`megaq.parallel.grad_compression`): one pass each around the two exchanges. The launchers, the
buffer layout and what each kernel must reproduce are in `megaq.kernels.grad_comm`.

Kernels (the bucket is viewed as `[rows, BLOCK]`, one FP32 scale per row = block):
- `_worker_kernel`: v = g + e (g of any float dtype, zero past n), per-block amax scale, INT8 or
  packed INT4 payload written straight into the all-to-all send buffer (destination rank j's
  segment holds rows [j*rc, (j+1)*rc)), new residual e = v - q*s in place.
- `_server_kernel`: the `world` received segments of this rank's shard dequantized and summed in FP32
  in rank order, / world, + the server residual, requantized into the all-gather segment, new server
  residual in place.
- `_dequant_gathered_kernel`: the gathered segments dequantized into the output (first n elements);
  raises a device flag when a gathered scale is NaN (an overflow on some rank).
- `_zero_if_flag_kernel`: zeroes both residuals when the flag is set (every program reads one word
  and returns otherwise), so an overflow step keeps no residual without a host synchronization.

Non-finite values: a block holding NaN/Inf is quantized with its non-finite elements as 0 and gets
a NaN scale (`quantize_propagating`), so it reaches every rank as NaN. Bit-exactness with the torch
path for round-to-nearest: IEEE division (`div_rn`), round-half-even, and no FMA contraction (the
launchers pass `enable_fp_fusion=False`: `v - q*s` and `acc + q*s` round the product first, as torch).
"""


import triton
import triton.language as tl

from .triton_int4 import _nibbles, _pack_nibbles
from .triton_quant import _nonfinite, _scale_from_amax, _to_int, _uniform_at


@triton.jit
def _quantize_rows(v, seed, counter_rows, BR: tl.constexpr, BLOCK: tl.constexpr, QMAX: tl.constexpr,
                   STOCHASTIC: tl.constexpr, RINT_LIBDEVICE: tl.constexpr):
    """One scale per row of v [BR, BLOCK] (FP32): (q int8 [BR, BLOCK], scale [BR] (NaN where the row
    holds NaN/Inf), v - q*scale [BR, BLOCK]). Non-finite elements quantize as 0. Stochastic
    rounding: Philox counter = counter_rows (int64 [BR]) * BLOCK/4 + quarter column."""
    bad = _nonfinite(tl.abs(v))
    vz = tl.where(bad != 0, 0.0, v)
    s = _scale_from_amax(tl.max(tl.abs(vz), axis=1), QMAX)
    sfull = tl.broadcast_to(s[:, None], [BR, BLOCK])
    if STOCHASTIC:
        offs = counter_rows[:, None] * (BLOCK // 4) + tl.arange(0, BLOCK // 4)[None, :]
        u = _uniform_at(seed, offs, BR, BLOCK)
    else:
        u = 0.0
    q = _to_int(tl.math.div_rn(vz, sfull), u, STOCHASTIC, QMAX, RINT_LIBDEVICE)
    residual = v - q.to(tl.float32) * sfull
    nan = tl.full([BR], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    s = tl.where(tl.max(bad, axis=1) > 0, nan, s)
    return q, s, residual


@triton.jit
def _store_payload(ptr, rows_off, q, BR: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr, mask):
    """Row r of q at ptr + rows_off[r]: BLOCK int8 bytes, or BLOCK/2 bytes of packed INT4 (element
    2i in the low nibble of byte i, 2i+1 in the high one: megaq.quant.packing)."""
    if BITS == 8:
        cols = tl.arange(0, BLOCK)
        tl.store(ptr + rows_off[:, None] + cols[None, :], q, mask=mask[:, None])
    else:
        lo, hi = tl.split(tl.reshape(q, [BR, BLOCK // 2, 2]))
        cols = tl.arange(0, BLOCK // 2)
        tl.store(ptr + rows_off[:, None] + cols[None, :], _pack_nibbles(lo, hi).to(tl.int8, bitcast=True),
                 mask=mask[:, None])


@triton.jit
def _load_dequantized(ptr, rows_off, scale, BR: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr,
                      mask):
    """q * scale [BR, BLOCK] in FP32 for the payload rows at ptr + rows_off (`_store_payload`'s layout)."""
    if BITS == 8:
        cols = tl.arange(0, BLOCK)
        q = tl.load(ptr + rows_off[:, None] + cols[None, :], mask=mask[:, None], other=0).to(tl.float32)
    else:
        cols = tl.arange(0, BLOCK // 2)
        b = tl.load(ptr + rows_off[:, None] + cols[None, :], mask=mask[:, None], other=0)
        lo, hi = _nibbles(b.to(tl.uint8, bitcast=True))
        q = tl.reshape(tl.join(lo, hi), [BR, BLOCK]).to(tl.float32)
    return q * tl.broadcast_to(scale[:, None], [BR, BLOCK])


@triton.jit
def _worker_kernel(g_ptr, n, e_ptr, send_ptr, send_scale_ptr, total_rows, rows_per_rank, seg_bytes,
                   seed_ptr, counter_base,
                   BR: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr,
                   HAS_RESIDUAL: tl.constexpr, STOCHASTIC: tl.constexpr, RINT_LIBDEVICE: tl.constexpr):
    """Rows [pid*BR, pid*BR + BR) of the bucket: g (length n, zeros past it) + e -> send buffer
    (int8 view `send_ptr`, FP32 view `send_scale_ptr` of the same bytes, `seg_bytes` per destination:
    [rows_per_rank scales | rows_per_rank payload rows | pad]), e <- v - q*s."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    live = rows < total_rows
    rows64 = rows.to(tl.int64)
    idx = rows64[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    v = tl.load(g_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        v = v + tl.load(e_ptr + idx, mask=live[:, None], other=0.0)
    seed = 0
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
    q, s, residual = _quantize_rows(v, seed, counter_base + rows64, BR, BLOCK, QMAX, STOCHASTIC,
                                    RINT_LIBDEVICE)
    if HAS_RESIDUAL:
        tl.store(e_ptr + idx, residual, mask=live[:, None])
    dest = rows64 // rows_per_rank
    local = rows64 % rows_per_rank
    tl.store(send_scale_ptr + dest * (seg_bytes // 4) + local, s, mask=live)
    payload_off = dest * seg_bytes + 4 * rows_per_rank + local * (BLOCK * BITS // 8)
    _store_payload(send_ptr, payload_off, q, BR, BLOCK, BITS, live)


@triton.jit
def _server_kernel(recv_ptr, recv_scale_ptr, world, rows_per_rank, seg_bytes, e_ptr,
                   out_ptr, out_scale_ptr, seed_ptr,
                   BR: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr,
                   AVERAGE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STOCHASTIC: tl.constexpr,
                   RINT_LIBDEVICE: tl.constexpr):
    """Rows [pid*BR, pid*BR + BR) of this rank's shard: sum over the `world` received segments (rank
    order) of q*s, / world (AVERAGE), + E, quantized into the outgoing segment (out_ptr / its FP32
    view out_scale_ptr, the same layout with one segment), E <- that sum - q*s."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    live = rows < rows_per_rank
    rows64 = rows.to(tl.int64)
    row_bytes = BLOCK * BITS // 8
    acc = tl.zeros([BR, BLOCK], tl.float32)
    for j in range(0, world):
        s = tl.load(recv_scale_ptr + j * (seg_bytes // 4) + rows64, mask=live, other=0.0)
        off = j * seg_bytes + 4 * rows_per_rank + rows64 * row_bytes
        acc = acc + _load_dequantized(recv_ptr, off, s, BR, BLOCK, BITS, live)
    if AVERAGE:
        acc = tl.math.div_rn(acc, tl.zeros([BR, BLOCK], tl.float32) + world)
    idx = rows64[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    if HAS_RESIDUAL:
        acc = acc + tl.load(e_ptr + idx, mask=live[:, None], other=0.0)
    seed = 0
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
    q, s, residual = _quantize_rows(acc, seed, rows64, BR, BLOCK, QMAX, STOCHASTIC, RINT_LIBDEVICE)
    if HAS_RESIDUAL:
        tl.store(e_ptr + idx, residual, mask=live[:, None])
    tl.store(out_scale_ptr + rows64, s, mask=live)
    _store_payload(out_ptr, 4 * rows_per_rank + rows64 * row_bytes, q, BR, BLOCK, BITS, live)


@triton.jit
def _dequant_gathered_kernel(gath_ptr, gath_scale_ptr, total_rows, rows_per_rank, seg_bytes, n,
                             out_ptr, flag_ptr,
                             BR: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr):
    """Rows [pid*BR, pid*BR + BR) of the gathered bucket (segment j holds rows [j*rc, (j+1)*rc)) ->
    out[:n] in out's dtype; flag <- 1 when one of these rows' scales is NaN."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    live = rows < total_rows
    rows64 = rows.to(tl.int64)
    src = rows64 // rows_per_rank
    local = rows64 % rows_per_rank
    s = tl.load(gath_scale_ptr + src * (seg_bytes // 4) + local, mask=live, other=0.0)
    if tl.max(tl.where(live & (s != s), 1, 0), axis=0) > 0:
        tl.store(flag_ptr, 1)
    off = src * seg_bytes + 4 * rows_per_rank + local * (BLOCK * BITS // 8)
    x = _load_dequantized(gath_ptr, off, s, BR, BLOCK, BITS, live)
    idx = rows64[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(out_ptr + idx, x.to(out_ptr.dtype.element_ty), mask=idx < n)


@triton.jit
def _zero_if_flag_kernel(flag_ptr, a_ptr, na, b_ptr, nb, BLOCK: tl.constexpr):
    """a[:na] = 0 and b[:nb] = 0 when *flag_ptr != 0 (this program's BLOCK elements of each)."""
    if tl.load(flag_ptr) != 0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        zero = tl.zeros([BLOCK], tl.float32)
        tl.store(a_ptr + offs, zero, mask=offs < na)
        tl.store(b_ptr + offs, zero, mask=offs < nb)
