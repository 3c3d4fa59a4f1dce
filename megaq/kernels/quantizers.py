"""The quantizers of megaq.kernels: the public quantize / dequantize functions and the launchers of
their Triton kernels (`megaq.kernels.triton_quant`). Which implementation runs is the rule of
`megaq.kernels.dispatch` (`_use_triton`); launch settings come from `dispatch.config_override`.

Public functions (re-exported by `megaq.kernels`):
    quantize(x2d, block, bits=8, rounding="nearest", generator=None, check=True, transpose=False)
    quantize_dual(x2d, block, block_t, ...) -> (q of x, q of x.T)      both orientations
    hadamard_quantize(x2d, hadamard, block=(1, -1), ..., transpose=False, column_sums_out=None)
    hadamard_quantize_dual(x2d, hadamard, bits=8, ..., column_sums_out=None)
    hadamard_quantize_delayed(x2d, hadamard, state, ..., transpose=False, column_sums_out=None)
        per-row scales predicted by a megaq.quant.DelayedAmax (one read of x2d)
        -> (rotated x per row, rotated x.T per row); column_sums_out receives x2d.sum(0) in FP32
    dequantize(qt, dtype=torch.float32)

Launchers, by kernel: `_launch_tile` (blocks that fit one tile, both orientations from one read),
`_launch_strip` (per row, one program per block of rows), `_launch_rows_resident` (per row with whole
rows in registers), `_launch_twopass` (per row or per column in two passes over a 2-D grid),
`_launch_dual_hadamard` (both per-row Hadamard orientations at once). Kernel choices and their
measurements: DUAL_FUSED, ROW_KERNEL / `_auto_row_kernel`, `_COLUMN_SUMS_MIN_COLS`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from . import dispatch
from .dispatch import (_cdiv, _cfg, _check_flag, _interpreting, _kernel, _next_pow2, _placeholder, _pow2, _qmax,
                       _quant, _ref, _rint_libdevice, _rotation_matrix, _seed_tensor)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return q
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nib = q.to(torch.uint8) & 0x0F
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def _tile_plan(blocks: list[tuple[int, int]], rows_default: int = 32):
    """Tile [BR, BC] serving every (gr, gc) block (x coordinates) in one program, or None."""
    for gr, gc in blocks:
        if not (_pow2(gr) and _pow2(gc)) or (gr == 1 and gc == 1):
            return None
    max_gr = max(gr for gr, _ in blocks)
    max_gc = max(gc for _, gc in blocks)
    br = max_gr if max_gr > 1 else rows_default
    if max_gc > 1:
        bc = max(max_gc, 128)
    else:
        bc = 64 if br >= 128 else 128
    for gr, gc in blocks:
        if gr not in (1, br):
            return None
        if gc == 1 and gr != br:
            return None
        if gc > 1 and bc % gc:
            return None
    if br * bc > 32768 or br > 256:
        return None
    return br, bc


def _launch_tile(x, outs, bits, rounding, generator, check):
    """outs: list of ("N"|"T", (gr, gc) in x coordinates). Returns dict orientation -> QuantizedTensor."""
    q = _quant()
    R, C = x.shape
    rows_default = _cfg("QUANT_ROWS", 32)
    plan = _tile_plan([blk for _, blk in outs], rows_default)
    assert plan is not None
    BR, BC = plan
    dev = x.device
    res = {}
    args = {}
    for orient, (gr, gc) in outs:
        if orient == "N":
            data = torch.empty((R, C), dtype=torch.int8, device=dev)
            scale = torch.empty((math.ceil(R / gr), math.ceil(C / gc)), dtype=torch.float32, device=dev)
            res["N"] = (data, scale, (gr, gc), (R, C))
        else:
            data = torch.empty((C, R), dtype=torch.int8, device=dev)
            scale = torch.empty((math.ceil(C / gc), math.ceil(R / gr)), dtype=torch.float32, device=dev)
            res["T"] = (data, scale, (gc, gr), (C, R))
        args[orient] = (data, scale, scale.stride(0), gr, gc)
    dummy = _placeholder(dev, torch.int8)
    fdummy = _placeholder(dev, torch.float32)
    n = args.get("N", (dummy, fdummy, 0, 1, BC))
    t = args.get("T", (dummy, fdummy, 0, BR, 1))
    stochastic = rounding == "stochastic"
    seed = _seed_tensor(dev, generator) if stochastic else dummy
    flag = torch.zeros(1, dtype=torch.int32, device=dev) if check else None
    grid = (_cdiv(C, BC), _cdiv(R, BR))
    nw = _cfg("QUANT_WARPS", 8 if BR * BC >= 16384 else 4)
    _kernel("triton_quant", "_quant_tile_kernel")[grid](
        x, R, C, x.stride(0), x.stride(1),
        n[0], n[1], n[2], t[0], t[1], t[2], seed, flag if check else dummy,
        BR=BR, BC=BC, N_GR=n[3], N_GC=n[4], HAS_N="N" in args, T_GR=t[3], T_GC=t[4],
        HAS_T="T" in args, STOCHASTIC=stochastic, CHECK=check, QMAX=_qmax(bits),
        RINT_LIBDEVICE=_rint_libdevice(), num_warps=nw)
    _check_flag(flag, x, "quantize input")
    return {o: q.QuantizedTensor(_pack(d, bits), s, blk, bits, shp) for o, (d, s, blk, shp) in res.items()}


def _per_row_outputs(R: int, C: int, dev, rounding: str, generator, check: bool):
    """What a per-row quantizer kernel writes and reads besides its input: the INT8 payload [R, C], the
    scales [R, 1], a placeholder for unused pointers, the Philox seeds (stochastic rounding; else the
    placeholder) and the NaN flag (None without the check)."""
    dummy = _placeholder(dev, torch.int8)
    seed = _seed_tensor(dev, generator) if rounding == "stochastic" else dummy
    flag = torch.zeros(1, dtype=torch.int32, device=dev) if check else None
    return (torch.empty((R, C), dtype=torch.int8, device=dev), torch.empty((R, 1), dtype=torch.float32, device=dev),
            dummy, seed, flag)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _persistent_programs(n_tiles: int, device, per_sm: int) -> int:
    """Programs of a persistent quantizer grid: `per_sm` per SM (each loads the Hadamard matrix once and
    keeps the next tile's load in flight), never more than the tiles; under the interpreter a few, so
    that every program's loop runs more than once."""
    if device.type != "cuda":
        return max(1, min(n_tiles, 3))
    return max(1, min(n_tiles, per_sm * _sm_count(device.index or 0)))


def _pipeline_stages(stages: int, tile_bytes: int, hadamard: int) -> int:
    """The deepest load pipeline up to `stages` whose tiles fit ~192 KB of shared memory beside the BF16
    Hadamard matrix (the rest of the SM's 227 KB holds the layout-conversion scratch)."""
    return max(1, min(stages, (192 * 1024 - 2 * hadamard * hadamard) // tile_bytes))


def _launch_strip(view, bits, rounding, generator, check, hadamard: int = 0, block=None):
    """Per-row quantization of `view` [R, C] (any strides), optionally after a Hadamard rotation
    of each row (zero padded to whole Hadamard blocks)."""
    q = _quant()
    R, C_in = view.shape
    dev = view.device
    C = C_in if not hadamard else math.ceil(C_in / hadamard) * hadamard
    data, scale, dummy, seed, flag = _per_row_outputs(R, C, dev, rounding, generator, check)
    stochastic = rounding == "stochastic"
    if hadamard:
        f32 = view.dtype not in (torch.bfloat16, torch.float16)
        if f32 and view.dtype != torch.float32:
            view = view.float()
        h = _rotation_matrix(hadamard, view.dtype, dev)
        BC = hadamard
        BR = _cfg("QUANT_ROWS", 64)
        BR = max(BR, 16)
        single = C == hadamard
        inv_sqrt = 1.0 / math.sqrt(hadamard)
        nw = _cfg("QUANT_WARPS", 8)
    else:
        f32 = True
        h = dummy
        inv_sqrt = 1.0
        cp = max(16, _next_pow2(C))
        if cp <= 8192:
            BC, single = cp, True
            BR = max(1, min(16, 8192 // cp))
        else:
            BC, single = 2048, False
            BR = 4
        ov = _cfg("QUANT_ROWS")
        if ov:
            BR = min(BR, ov)
        nw = 8 if BR * BC >= 8192 else 4
    grid = (_cdiv(R, BR),)
    _kernel("triton_quant", "_quant_strip_kernel")[grid](
        view, R, C, C_in, view.stride(0), view.stride(1), data, scale, h, inv_sqrt,
        seed, flag if check else dummy,
        BR=BR, BC=BC, SINGLE=single, HAD=hadamard, F32_INPUT=f32, UPCAST=_interpreting(), STOCHASTIC=stochastic, CHECK=check,
        QMAX=_qmax(bits), RINT_LIBDEVICE=_rint_libdevice(), num_warps=nw,
        num_stages=_cfg("QUANT_STAGES", 1 if (hadamard and f32) else 2))
    _check_flag(flag, view, "quantize input")
    blk = block if block is not None else (1, C)
    return q.QuantizedTensor(_pack(data, bits), scale, blk, bits, (R, C))


def _launch_rows_resident(view, bits, rounding, generator, check, hadamard: int, block):
    """Per-row Hadamard quantization of `view` [R, C_in] (any strides), zero padded to whole
    Hadamard blocks, with whole rows held in registers (`_quant_rows_resident_kernel`): one read."""
    q = _quant()
    R, C_in = view.shape
    dev = view.device
    Cp = _cdiv(C_in, hadamard) * hadamard
    data, scale, dummy, seed, flag = _per_row_outputs(R, Cp, dev, rounding, generator, check)
    stochastic = rounding == "stochastic"
    f32 = view.dtype == torch.float32
    h = _rotation_matrix(hadamard, view.dtype, dev)
    ov = dispatch._CONFIG_OVERRIDE or {}
    nch = _next_pow2(Cp // hadamard)
    BR = max(1, ov.get("RESIDENT_TILE", _RESIDENT_TILE) // nch)
    # 64 FP32 values per thread: 4 warps for the default [64, 128] tile, 8 for one whole row of 128 blocks
    # (H100, 16384 wide: stochastic 273.5 / 535.0 µs at 8192 / 16384 rows against 403.1 / 807.7 with
    # 4 warps, which spill; nearest 186.8 / 362.4 against 190.9 / 369.9)
    nw = ov.get("QUANT_WARPS", max(4, BR * nch * hadamard // 2048))
    n_tiles = _cdiv(R, BR)
    grid = (_persistent_programs(n_tiles, dev, ov.get("QUANT_PER_SM", _PER_SM)),)
    _kernel("triton_quant", "_quant_rows_resident_kernel")[grid](
        view, R, C_in, Cp, view.stride(0), view.stride(1), data, scale, h, 1.0 / math.sqrt(hadamard),
        seed, flag if check else dummy, n_tiles,
        BR=BR, NCH=nch, HAD=hadamard, F32_INPUT=f32, UPCAST=_interpreting(), STOCHASTIC=stochastic,
        CHECK=check, QMAX=_qmax(bits), RINT_LIBDEVICE=_rint_libdevice(),
        STAGES=_pipeline_stages(ov.get("QUANT_STAGES", _PERSISTENT_STAGES), BR * nch * hadamard * view.element_size(),
                                hadamard), num_warps=nw)
    _check_flag(flag, view, "hadamard_quantize input")
    return q.QuantizedTensor(_pack(data, bits), scale, block, bits, (R, Cp))


def _twopass_grid(R: int, C: int, axis: int, hadamard: int, dev, element_size: int, rotate_in: bool = False):
    """The two-pass kernels' tile [BR, BC], grid, strips and blocks per strip, load stages and warps.
    rotate_in (axis 0): the tile one Hadamard block wide, the rows rotated on load (`_load_source_tile`)."""
    ov = dispatch._CONFIG_OVERRIDE or {}
    if axis == 0:
        BR = hadamard or ov.get("QUANT_ROWS", 64)
        BC = hadamard if rotate_in else ov.get("QUANT_COLS", 64 if hadamard else 128)
    else:
        BC = hadamard or ov.get("QUANT_COLS", 128)
        BR = ov.get("QUANT_ROWS", 64)
    # strips: the tile columns (axis 0) or rows (axis 1) that share scales; programs take strips in turn
    # and split each strip's tiles among grid[1] programs
    n_strips, n_blocks = (_cdiv(C, BC), _cdiv(R, BR)) if axis == 0 else (_cdiv(R, BR), _cdiv(C, BC))
    programs = _persistent_programs(n_strips * n_blocks, dev, ov.get("QUANT_PER_SM", _PER_SM))
    per_strip = ov.get("QUANT_PER_STRIP", _programs_per_strip(n_strips, n_blocks, programs))
    grid = (min(n_strips, programs), max(1, min(n_blocks, per_strip)))
    stages = _pipeline_stages(ov.get("QUANT_STAGES", _TWOPASS_STAGES), BR * BC * element_size, hadamard)
    # rotate_in: the tile twice as wide and a second product on it: 4 and 8 warps ran alike, 16 1.5x
    # slower (H100, 16384 tokens x 1664 / 4096 / 16384 features, session 15)
    return BR, BC, grid, n_strips, n_blocks, stages, ov.get("QUANT_WARPS", 8 if rotate_in else 4)


# what a program of the two-pass grid costs beyond its tiles (the Hadamard matrix, the strip's scales,
# filling the load pipeline), in tiles: fitted to the H100 sweep below (8192 columns: 1, 2 and 4 waves of
# 64, 32 and 16 tiles per program took 163, 167 and 175 µs)
_PROGRAM_OVERHEAD_TILES = 2


@functools.lru_cache(maxsize=None)   # a search over every count: ~27 µs of host time at 128 tiles
def _programs_per_strip(n_strips: int, n_blocks: int, programs: int) -> int:
    """How many programs share each strip's n_blocks tiles on the two-pass grid, where `programs` run at
    once (`_persistent_programs`): the count p of the shortest modelled time, waves × (tiles per program
    + _PROGRAM_OVERHEAD_TILES) = ceil(n_strips · p / programs) · (ceil(n_blocks / p) + 2), the fewest
    programs among equals. It takes what an H100 sweep of the delayed x.T kernel measured best at 16,384
    rows (`tools/sweep_quantizers.py --per-strip`, session 17): 2048 columns 8 per strip, 8192 2, and
    6144 8, where the earlier rule (programs // strips, rounded down) gave 2: 192 programs for 264 places,
    155 -> 135 µs nearest, 219 -> 178 stochastic. Counts that split a strip's tiles unevenly cost a
    tile per program (3 per strip ran 25-35% slower than 2 or 4)."""
    if n_strips >= programs:
        return 1

    def cost(p: int) -> tuple[int, int]:
        return _cdiv(n_strips * p, programs) * (_cdiv(n_blocks, p) + _PROGRAM_OVERHEAD_TILES), p
    return min(range(1, n_blocks + 1), key=cost)


@dataclass
class _TwoPassLaunch:
    """What the two-pass grid's kernels (and the one-pass delayed-scaling kernel on the same grid) take
    besides their own buffers: the input (FP32 where the rotation needs it), its extents (R, C padded to
    whole Hadamard blocks along the reduced axis), the payload and scales to fill, the seed, the NaN
    flag (None without the check), the rotation, and the grid (`_twopass_grid`). With `row_scales`, x
    is an INT8 payload read as its BF16 dequantization (`xs`: the scales, one per row; `dequant`), and
    with `rotate_in` its rows rotated back by the Hadamard block first."""
    x: torch.Tensor
    R_in: int
    C_in: int
    R: int
    C: int
    n: int                     # rows of the payload: one scale each
    data: torch.Tensor
    scale: torch.Tensor
    dummy: torch.Tensor
    seed: torch.Tensor
    flag: torch.Tensor | None
    h: torch.Tensor
    inv: float
    BR: int
    BC: int
    grid: tuple[int, int]
    n_strips: int
    n_blocks: int
    stages: int
    num_warps: int
    xs: torch.Tensor
    dequant: bool
    rotate_in: bool

    @classmethod
    def plan(cls, x, axis, rounding, generator, check, hadamard: int,
             row_scales: torch.Tensor | None = None, rotate_in: bool = False) -> "_TwoPassLaunch":
        R_in, C_in = x.shape
        dev = x.device
        dequant = row_scales is not None
        # the dtype the kernels rotate in: a dequantized payload is BF16, as `dequantize` writes it
        x_dtype = torch.bfloat16 if dequant else x.dtype
        if hadamard and not dequant and x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            x = x.float()
            x_dtype = x.dtype
        R = _cdiv(R_in, hadamard) * hadamard if (hadamard and axis == 0) else R_in
        C = _cdiv(C_in, hadamard) * hadamard if (hadamard and axis == 1) else C_in
        n = C if axis == 0 else R
        dummy = _placeholder(dev, torch.int8)
        return cls(x, R_in, C_in, R, C, n,
                   torch.empty((C, R) if axis == 0 else (R, C), dtype=torch.int8, device=dev),
                   torch.empty((n, 1), dtype=torch.float32, device=dev), dummy,
                   _seed_tensor(dev, generator) if rounding == "stochastic" else dummy,
                   torch.zeros(1, dtype=torch.int32, device=dev) if check else None,
                   _rotation_matrix(hadamard, x_dtype, dev) if hadamard else dummy,
                   1.0 / math.sqrt(hadamard) if hadamard else 1.0,
                   *_twopass_grid(R, C, axis, hadamard, dev, x.element_size(), rotate_in),
                   row_scales.reshape(-1) if dequant else _placeholder(dev, torch.float32), dequant, rotate_in)

    def result(self, axis, bits, block):
        ext = self.R if axis == 0 else self.C
        blk = block if block is not None else (1, ext)
        return _quant().QuantizedTensor(_pack(self.data, bits), self.scale, blk, bits, tuple(self.data.shape))


def _launch_twopass(x, axis, bits, rounding, generator, check, hadamard: int = 0, block=None,
                    column_sums_out: torch.Tensor | None = None, row_scales: torch.Tensor | None = None,
                    rotate_in: bool = False):
    """Per-row (axis=1) or per-column-written-transposed (axis=0) quantization over a full 2-D grid:
    pass 1 folds tile abs-maxes into a per-row/column buffer with atomics, pass 2 re-reads the
    tiles and quantizes. Hadamard rotation (zero padded) along the reduced axis when hadamard > 0.
    column_sums_out (axis=0): receives x.sum(0) in FP32 from pass 1 (`_column_sum_partials`).
    row_scales: x is an INT8 payload with these per-row scales, read as its BF16 dequantization (with
    rotate_in: its rows rotated back by the Hadamard block first)."""
    L = _TwoPassLaunch.plan(x, axis, rounding, generator, check, hadamard, row_scales, rotate_in)
    amax = torch.zeros(L.n, dtype=torch.int32, device=L.x.device)
    assert column_sums_out is None or axis == 0, "pass 1 sums columns only where its strips are columns"
    partials = _column_sum_partials(column_sums_out, L.grid[1])
    _kernel("triton_quant", "_amax_partial_kernel")[L.grid](
        L.x, L.xs, L.R_in, L.C_in, L.x.stride(0), L.x.stride(1), amax, L.h, L.inv, L.flag if check else L.dummy,
        L.dummy if partials is None else partials, L.n_strips, L.n_blocks, L.dummy,
        BR=L.BR, BC=L.BC, AXIS=axis, HAD=hadamard, UPCAST=_interpreting(), CHECK=check,
        COLSUM=partials is not None, STAGES=L.stages, DEQUANT=L.dequant, ROTATE_IN=L.rotate_in,
        num_warps=L.num_warps)
    _add_column_sum_partials(partials, column_sums_out)
    _check_flag(L.flag, x, "quantize input")
    _kernel("triton_quant", "_quant_given_amax_kernel")[L.grid](
        L.x, L.xs, L.R, L.C, L.R_in, L.C_in, L.x.stride(0), L.x.stride(1), amax, L.data, L.scale, L.h, L.inv,
        L.seed, L.n_strips, L.n_blocks, L.dummy, L.dummy, L.dummy, L.dummy, BR=L.BR, BC=L.BC, AXIS=axis,
        HAD=hadamard, UPCAST=_interpreting(), STOCHASTIC=rounding == "stochastic", QMAX=_qmax(bits),
        RINT_LIBDEVICE=_rint_libdevice(), STAGES=L.stages, DEQUANT=L.dequant, ROTATE_IN=L.rotate_in,
        num_warps=L.num_warps)
    return L.result(axis, bits, block)


def _launch_delayed(x, axis, state, bits, rounding, generator, check, hadamard: int, block,
                    column_sums_out: torch.Tensor | None, row_scales: torch.Tensor | None = None,
                    rotate_in: bool = False):
    """Delayed-scaling quantization (`megaq.quant.delayed`) on the two-pass grid, three launches whatever
    the state (one CUDA graph serves the first call and the later ones; the device flag `state.valid`
    decides): pass 1 (`_amax_partial_kernel` with SKIP) finds the exact abs-maxes into `state.track`
    only on a state's first call and otherwise returns at once; pass 2 (`_delayed_quantize_pass`)
    quantizes with the prediction (or that exact abs-max), tracks the true one and folds in the
    NaN/Inf check and the column sums, so that after the first call x is read once; then
    `_delayed_update_kernel` updates the prediction. row_scales, rotate_in: as in `_launch_twopass`."""
    if state.pred.device != x.device:
        raise ValueError(f"delayed-scaling state is on {state.pred.device}, the operand on {x.device}")
    L = _TwoPassLaunch.plan(x, axis, rounding, generator, check, hadamard, row_scales, rotate_in)
    state.check_rows(L.n, "delayed-scaling quantizer")
    assert column_sums_out is None or axis == 0, "the kernel sums columns only where its strips are columns"
    partials = _column_sum_partials(column_sums_out, L.grid[1])
    _kernel("triton_quant", "_amax_partial_kernel")[L.grid](
        L.x, L.xs, L.R_in, L.C_in, L.x.stride(0), L.x.stride(1), state.track.view(torch.int32), L.h, L.inv,
        L.dummy, L.dummy, L.n_strips, L.n_blocks, state.valid, BR=L.BR, BC=L.BC, AXIS=axis, HAD=hadamard,
        UPCAST=_interpreting(), CHECK=False, COLSUM=False, STAGES=L.stages, SKIP=True, DEQUANT=L.dequant,
        ROTATE_IN=L.rotate_in, num_warps=L.num_warps)
    _delayed_quantize_pass(L, axis, state, bits, rounding, check, hadamard, partials)
    _add_column_sum_partials(partials, column_sums_out)
    _kernel("triton_quant", "_delayed_update_kernel")[(1,)](
        state.pred, state.track, state.counts, state.valid, state.rows, state.decay, BLOCK=1024, num_warps=4)
    _check_flag(L.flag, x, "quantize input")
    return L.result(axis, bits, block)


def _delayed_quantize_pass(L: "_TwoPassLaunch", axis, state, bits, rounding, check, hadamard: int,
                           partials: torch.Tensor | None) -> None:
    """Pass 2 of `_launch_delayed` (`_quant_given_amax_kernel` with DELAYED) into L's payload and scales."""
    _kernel("triton_quant", "_quant_given_amax_kernel")[L.grid](
        L.x, L.xs, L.R, L.C, L.R_in, L.C_in, L.x.stride(0), L.x.stride(1), state.pred.view(torch.int32), L.data,
        L.scale, L.h, L.inv, L.seed, L.n_strips, L.n_blocks, state.track.view(torch.int32),
        L.flag if check else L.dummy, L.dummy if partials is None else partials, state.valid, BR=L.BR, BC=L.BC,
        AXIS=axis, HAD=hadamard, UPCAST=_interpreting(), STOCHASTIC=rounding == "stochastic", QMAX=_qmax(bits),
        RINT_LIBDEVICE=_rint_libdevice(), STAGES=L.stages, DELAYED=True, CHECK=check,
        COLSUM=partials is not None, DEQUANT=L.dequant, ROTATE_IN=L.rotate_in, num_warps=L.num_warps)


def _check_column_sums_out(out: torch.Tensor, x2d: torch.Tensor) -> None:
    if not (isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (x2d.shape[1],)
            and out.device == x2d.device and out.is_contiguous()):
        got = (f"{out.dtype} {tuple(out.shape)} on {out.device}, contiguous={out.is_contiguous()}"
               if isinstance(out, torch.Tensor) else type(out).__name__)
        raise ValueError(f"column_sums_out must be a contiguous float32 tensor of shape ({x2d.shape[1]},) "
                         f"on {x2d.device} (one sum per column of the input); got {got}")


# The column sums ride in a quantizer's first pass over x only where that measured faster than torch's own
# sum pass (H100, bf16, stochastic, 2026-11-22; µs saved against the quantizer + torch's sum at 16384×768 /
# 16384×1600 / 16384×3072 / 8192×4096 / 8192×16384: transposed single quantizer -8.6 / -3.2 / +19.5 /
# +30.6 / +51.6, dual -4.0 / +45.6 / +51.0 / +39.4 / +95.5); narrower inputs are summed by torch.
# Config key COLUMN_SUMS_MIN_COLS overrides both (0: the kernels always sum).
_COLUMN_SUMS_MIN_COLS = {"single": 2048, "dual": 1024}


def _column_sums_for_kernel(x2d: torch.Tensor, out: torch.Tensor | None, kernel_sums: bool,
                            path: str) -> torch.Tensor | None:
    """The column-sum output a quantizer kernel gets: `out` where the kernel sums (`kernel_sums`: its pass
    reads x's columns, and x is wide enough, `_COLUMN_SUMS_MIN_COLS[path]`), else None once torch has
    summed x into `out`."""
    if out is None:
        return None
    _check_column_sums_out(out, x2d)
    if kernel_sums and x2d.shape[1] >= _cfg("COLUMN_SUMS_MIN_COLS", _COLUMN_SUMS_MIN_COLS[path]):
        return out
    torch.sum(x2d, 0, dtype=torch.float32, out=out)
    return None


def _column_sum_partials(out: torch.Tensor | None, parts: int) -> torch.Tensor | None:
    """Where a pass-1 kernel stores its FP32 column sums: `parts` rows of partial sums (one per
    program or row of tiles that reads a share of each column), the output itself when there is one."""
    if out is None:
        return None
    return out if parts == 1 else torch.empty((parts, out.shape[0]), dtype=torch.float32, device=out.device)


def _add_column_sum_partials(partials: torch.Tensor | None, out: torch.Tensor | None) -> None:
    # a fixed-order sum of the partial rows, not atomics: the same bits on every run
    if partials is not None and partials is not out:
        torch.sum(partials, 0, out=out)


def _check_args(x, bits, rounding):
    if x.dim() != 2:
        raise ValueError(f"quantize input must be 2-D [rows, cols]; got shape {tuple(x.shape)} "
                         "(flatten leading dimensions first)")
    _qmax(bits)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be one of ('nearest', 'stochastic'); got {rounding!r}")


def _triton_quantizable(x) -> bool:
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.numel() > 0


def quantize(x2d: torch.Tensor, block: tuple[int, int], bits: int = 8, rounding: str = "nearest",
             generator: torch.Generator | None = None, check: bool = True, transpose: bool = False):
    """Block-quantize `x2d` (or `x2d.T` when `transpose`, written directly in that orientation):
    `megaq.quant.quantize_blockwise` semantics, returns a `QuantizedTensor`."""
    if not dispatch._use_triton(x2d) or not _triton_quantizable(x2d):
        return _ref().quantize(x2d, block, bits, rounding, generator, check, transpose)
    _check_args(x2d, bits, rounding)
    q = _quant()
    view = x2d.t() if transpose else x2d
    R, C = view.shape
    br, bc = q.resolve_block(block, (R, C))
    if br == 1 and bc >= C:                        # one scale per row of the output
        if transpose:
            return _launch_twopass(x2d, 0, bits, rounding, generator, check, block=(br, bc))
        return _launch_strip(view, bits, rounding, generator, check, block=(br, bc))
    if transpose:
        outs = [("T", (bc, br))]                    # the block in x2d's coordinates
        if _tile_plan([outs[0][1]]) is not None:
            return _launch_tile(x2d, outs, bits, rounding, generator, check)["T"]
    elif _tile_plan([(br, bc)]) is not None:
        return _launch_tile(x2d, [("N", (br, bc))], bits, rounding, generator, check)["N"]
    return _ref().quantize(x2d, block, bits, rounding, generator, check, transpose)


# One read for both orientations measured slower than two passes on an H200 (324 µs against
# 81 + 103 µs for 16384×4096 bf16, 1×128 blocks): two passes until the fused tile kernel is faster.
DUAL_FUSED = False
# Per-row Hadamard + quantize of x (not x.T), by kernel:
#   "resident": whole rows in registers, one read (`_quant_rows_resident_kernel`), where a padded row
#               fits (`_RESIDENT_MAX_ROW`; the two-kernel grid otherwise);
#   "twopass":  the two-kernel grid (atomics for the row abs-max, then a second read to quantize);
#   "strip":    one program per block of rows walking them twice (`_quant_strip_kernel`);
#   "auto":     by the padded row width (`_auto_row_kernel`), from H100 timings.
ROW_KERNEL = "auto"
ROW_KERNELS = ("auto", "resident", "twopass", "strip")
# A resident program holds BR rows × NCH Hadamard blocks (NCH a power of two) as one [BR·NCH, HAD]
# FP32 tile (4 warps: 64 values per thread at the default tile; rows up to 16384 elements).
_RESIDENT_MAX_ROW = 16384
_RESIDENT_TILE = 64         # BR·NCH target (rows of the [BR·NCH, HAD] tile); config key RESIDENT_TILE
# The persistent quantizers (resident, two-pass, dual): programs per SM and the depth of each program's
# load pipeline (config keys QUANT_PER_SM, QUANT_STAGES), from an H100 sweep at 8192×4096 (resident:
# 2 per SM, 3 stages, 4 warps: 46 / 72 µs nearest / stochastic against 60 / 83 at 2 stages, 8 warps;
# two-pass of x.T: 106 µs nearest at 2 per SM, 3 stages).
_PER_SM = 2
_PERSISTENT_STAGES = 3
_TWOPASS_STAGES = 3
# The dual kernels' programs per SM and load stages (three stages of [128, 128] tiles take ~150 KB of
# shared memory per program).
_DUAL_PER_SM = 2
_DUAL_STAGES = 3


def _auto_row_kernel(padded_cols: int, hadamard: int, dtype: torch.dtype) -> str:
    """The fastest per-row Hadamard quantizer measured on an H100 (bf16 input, Hadamard 128, µs of the
    persistent kernels with the exact reciprocal division, 2026-11-22): rows of <= 1024 → "strip"
    (768 wide: strip 34.3 / resident 34.6 nearest, 46.7 / 48.9 stochastic); up to 64 Hadamard blocks,
    padded ones included → "resident" (1600 wide, 13 of 16 blocks: 58.6 against strip 71.6 and twopass
    91.7 nearest, 80.6 / 89.9 / 112.6 stochastic; 6400 wide, 50 of 64: 184 / 240 / 272 nearest,
    277 / 286 / 340 stochastic; 4096 wide: 61 / 119 / 105 nearest); 128 blocks (16384 wide, one row per
    program at 8 warps) → "resident" (2026-11-22, µs at 8192 / 16384 rows: nearest 186.8 / 362.4 against
    twopass 255.0 / 492.3 and strip 431.0 / 590.6; stochastic 273.5 / 535.0 against 357.2 / 683.7 and
    526.4 / 683.8); 65-127 blocks (not measured) and longer rows (beyond `_RESIDENT_MAX_ROW`) →
    "twopass". Other Hadamard sizes and FP32 inputs (three BF16 products per rotation: more registers)
    were not measured: "twopass"."""
    if hadamard != 128 or dtype not in (torch.bfloat16, torch.float16):
        return "twopass"
    blocks = padded_cols // hadamard
    if padded_cols <= 1024:
        return "strip"
    if _next_pow2(blocks) <= 64 or blocks == 128:
        return "resident"
    return "twopass"


def quantize_dual(x2d: torch.Tensor, block: tuple[int, int], block_t: tuple[int, int], bits: int = 8,
                  rounding: str = "nearest", generator: torch.Generator | None = None,
                  check: bool = True):
    """`(quantize(x2d, block), quantize(x2d, block_t, transpose=True))`. With DUAL_FUSED (or the
    config override DUAL_FUSED=True) from one read of `x2d` where one tile serves both block shapes
    (e.g. (1,128) and (1,128): a 128×128 tile gives both the row and the column scales). Both share `rounding`; with
    stochastic rounding the two orientations draw independent random numbers."""
    if not dispatch._use_triton(x2d) or not _triton_quantizable(x2d):
        return (_ref().quantize(x2d, block, bits, rounding, generator, check, False),
                _ref().quantize(x2d, block_t, bits, rounding, generator, check, True))
    _check_args(x2d, bits, rounding)
    q = _quant()
    R, C = x2d.shape
    br, bc = q.resolve_block(block, (R, C))
    tr, tc = q.resolve_block(block_t, (C, R))
    outs = [("N", (br, bc)), ("T", (tc, tr))]
    fused = _cfg("DUAL_FUSED", DUAL_FUSED)
    if fused and not (br == 1 and bc >= C) and not (tr == 1 and tc >= R) and \
            _tile_plan([b for _, b in outs]) is not None:
        res = _launch_tile(x2d, outs, bits, rounding, generator, check)
        return res["N"], res["T"]
    return (quantize(x2d, block, bits, rounding, generator, check, False),
            quantize(x2d, block_t, bits, rounding, generator, check, True))


def _rotated_view(x2d: torch.Tensor, hadamard: int, transpose: bool, name: str) -> torch.Tensor:
    """The tensor whose rows a Hadamard quantizer rotates (`x2d`, or `x2d.T` when `transpose`), after
    checking that it is 2-D and that the Hadamard block is one the rotation supports."""
    view = x2d.t() if transpose else x2d
    if view.dim() != 2:
        raise ValueError(f"{name} input must be 2-D; got shape {tuple(view.shape)}")
    blocks = _quant().SUPPORTED_HADAMARD_BLOCKS
    if hadamard not in blocks:
        raise ValueError(f"Hadamard block must be one of {blocks}; got {hadamard}")
    return view


def hadamard_quantize(x2d: torch.Tensor, hadamard: int, block: tuple[int, int] = (1, -1), bits: int = 8,
                      rounding: str = "nearest", generator: torch.Generator | None = None,
                      check: bool = True, transpose: bool = False,
                      column_sums_out: torch.Tensor | None = None):
    """Rotate the last dim of `x2d` (of `x2d.T` when `transpose`) by the orthonormal block Hadamard
    of size `hadamard` (zero padded to whole blocks) in FP32, then block-quantize:
    `quantize_blockwise(block_hadamard(pad_to_multiple(v.float(), h), h), block)`. Fused (one
    kernel) for per-row blocks; other blocks rotate with the reference, then quantize.

    column_sums_out: a float32 tensor [x2d.shape[1]] that receives `x2d.sum(0)` (the columns of x2d
    as given, unrotated: a linear's bias gradient when x2d is ∇Y), FP32 sums in an order of the
    kernel's choosing. The fused `transpose` path sums in its first pass over x2d (no extra read) where
    x2d is wide enough for that to pay (`_COLUMN_SUMS_MIN_COLS`); every other path with torch."""
    q = _quant()
    view = _rotated_view(x2d, hadamard, transpose, "hadamard_quantize")
    R, C_in = view.shape
    Cp = math.ceil(C_in / hadamard) * hadamard
    br, bc = q.resolve_block(block, (R, Cp))
    fused = dispatch._use_triton(x2d) and _triton_quantizable(x2d) and hadamard >= 16 and br == 1 and bc >= Cp
    column_sums_out = _column_sums_for_kernel(x2d, column_sums_out, fused and transpose, "single")
    if fused:
        _check_args(view, bits, rounding)
        if check and not (view.dtype in (torch.bfloat16, torch.float16, torch.float32)):
            q.check_finite(view, "hadamard_quantize input")
        if transpose:
            return _launch_twopass(x2d, 0, bits, rounding, generator, check, hadamard=hadamard,
                                   block=(br, bc), column_sums_out=column_sums_out)
        kernel = _cfg("ROW_KERNEL", ROW_KERNEL)
        if kernel not in ROW_KERNELS:
            raise ValueError(f"ROW_KERNEL must be one of {ROW_KERNELS}; got {kernel!r}")
        if kernel == "auto":
            kernel = _auto_row_kernel(Cp, hadamard, view.dtype)
        if kernel == "resident" and _next_pow2(Cp // hadamard) * hadamard <= _RESIDENT_MAX_ROW:
            return _launch_rows_resident(view, bits, rounding, generator, check, hadamard, block=(br, bc))
        if kernel == "strip":
            return _launch_strip(view, bits, rounding, generator, check, hadamard=hadamard, block=(br, bc))
        return _launch_twopass(x2d, 1, bits, rounding, generator, check, hadamard=hadamard,
                               block=(br, bc))
    if check:
        q.check_finite(view, "hadamard_quantize input")
    rotated = q.block_hadamard(q.pad_to_multiple(view.float(), hadamard), hadamard)
    return quantize(rotated, block, bits, rounding, generator, check=False)


def hadamard_quantize_delayed(x2d: torch.Tensor, hadamard: int, state, bits: int = 8, rounding: str = "nearest",
                              generator: torch.Generator | None = None, check: bool = True,
                              transpose: bool = False, column_sums_out: torch.Tensor | None = None):
    """`hadamard_quantize(x2d, hadamard, (1, -1), ...)` with delayed scaling: each row of the rotated
    `x2d` (of `x2d.T` when `transpose`) is scaled by the abs-max that `state` (a
    `megaq.quant.DelayedAmax` with one entry per such row) predicts from earlier calls, values past it
    clip, and the prediction is updated in place (`megaq.quant.quantize_rows_delayed`). On the Triton
    path one read of `x2d` after the state's first call, instead of two. column_sums_out: as in
    `hadamard_quantize`."""
    view = _rotated_view(x2d, hadamard, transpose, "hadamard_quantize_delayed")
    _check_args(view, bits, rounding)
    if bits != 8:
        raise ValueError(f"delayed scaling is defined for INT8 operands; got bits={bits}")
    state.check_rows(view.shape[0], "hadamard_quantize_delayed")
    fused = dispatch._use_triton(x2d) and _triton_quantizable(x2d) and hadamard >= 16
    column_sums_out = _column_sums_for_kernel(x2d, column_sums_out, fused and transpose, "single")
    if not fused:
        return _ref().hadamard_quantize_delayed(x2d, hadamard, state, bits, rounding, generator, check,
                                                transpose)
    Cp = _cdiv(view.shape[1], hadamard) * hadamard
    return _launch_delayed(x2d, 0 if transpose else 1, state, bits, rounding, generator, check, hadamard,
                           (1, Cp), column_sums_out)


def requantize_transposed(xq, hadamard: int, dtype: torch.dtype = torch.bfloat16, state=None, bits: int = 8,
                          rounding: str = "nearest", generator: torch.Generator | None = None,
                          check: bool = True, rotate_back: bool = False):
    """The rows of x.T rotated along x's rows and quantized per row, where x = `dequantize(xq, dtype)` and
    xq is an INT8 payload with one scale per row: `hadamard_quantize(x, hadamard, transpose=True, ...)`,
    or with a delayed-scaling `state` `hadamard_quantize_delayed(x, hadamard, state, transpose=True, ...)`
    (the INT8 data flow's wgrad operand Xᵀ from the X̃ its forward saved). On the Triton path (BF16
    `dtype`) the quantizer's kernels dequantize each tile as they load it, with `dequantize`'s rounding,
    so the result is the same bit for bit and x is never written: 1 byte read per element where the two
    calls move 5 (1 read and 2 written, then 2 read back).

    rotate_back: x is instead the dequantized payload's rows rotated by the orthonormal block Hadamard of
    size `hadamard` (x̃·H = X: the forward operand X̃ = X·H taken back to the features; xq's columns must
    be whole blocks), rounded once to `dtype`. The kernels rotate each [hadamard, hadamard] tile as they
    load it (the INT8 values times ±1 exactly, then the scale); the reference path rotates the FP32
    dequantization. The two roundings to BF16 differ by one ulp at most, on near-ties."""
    per_row = (xq.bits == 8 and xq.data.dim() == 2 and tuple(xq.data.shape) == tuple(xq.shape)
               and tuple(xq.block) == (1, xq.shape[1]) and xq.scale.numel() == xq.shape[0])
    if rotate_back and xq.shape[1] % hadamard:
        raise ValueError(f"requantize_transposed: rotate_back needs whole Hadamard blocks of {hadamard} "
                         f"columns; the payload has {xq.shape[1]}")
    fused = (per_row and dtype == torch.bfloat16 and hadamard in _quant().SUPPORTED_HADAMARD_BLOCKS
             and hadamard >= 16 and dispatch._use_triton(xq.data))
    if not fused:
        if rotate_back:
            x = _quant().block_hadamard(dequantize(xq, torch.float32), hadamard).to(dtype)
        else:
            x = dequantize(xq, dtype)
        if state is None:
            return hadamard_quantize(x, hadamard, bits=bits, rounding=rounding, generator=generator, check=check,
                                     transpose=True)
        return hadamard_quantize_delayed(x, hadamard, state, bits=bits, rounding=rounding, generator=generator,
                                         check=check, transpose=True)
    data = xq.data.contiguous()
    _check_args(data, bits, rounding)
    scales = xq.scale.reshape(-1).float().contiguous()
    if state is None:
        return _launch_twopass(data, 0, bits, rounding, generator, check, hadamard=hadamard, row_scales=scales,
                               rotate_in=rotate_back)
    if bits != 8:
        raise ValueError(f"delayed scaling is defined for INT8 operands; got bits={bits}")
    Rp = _cdiv(data.shape[0], hadamard) * hadamard
    return _launch_delayed(data, 0, state, bits, rounding, generator, check, hadamard, (1, Rp), None,
                           row_scales=scales, rotate_in=rotate_back)


def hadamard_quantize_dual(x2d: torch.Tensor, hadamard: int, bits: int = 8, rounding: str = "nearest",
                           generator: torch.Generator | None = None, check: bool = True,
                           column_sums_out: torch.Tensor | None = None):
    """Both per-row Hadamard quantizations of `x2d` at once:
    `(hadamard_quantize(x2d, hadamard, ...), hadamard_quantize(x2d, hadamard, ..., transpose=True))`,
    i.e. the rows of x rotated along x's columns (the forward / dgrad operand) and the rows of x.T
    rotated along x's rows (the wgrad operand), each zero padded to whole Hadamard blocks, one FP32
    scale per row. On the Triton path (Hadamard 16..128) two kernels in all, each reading every
    Hadamard-sized tile of x once, instead of two per orientation; with stochastic rounding the two
    orientations draw independent random numbers. Otherwise the two single calls.
    column_sums_out: as in `hadamard_quantize` (on the Triton path summed by the first kernel)."""
    if x2d.dim() != 2:
        raise ValueError(f"hadamard_quantize_dual input must be 2-D; got shape {tuple(x2d.shape)}")
    # tiles are hadamard × hadamard: at 256 the tile and the matrix (128 KB each in BF16) no longer fit
    # an SM's shared memory together; below 16 tl.dot has no instruction shape
    if 16 <= hadamard <= 128 and _pow2(hadamard) and dispatch._use_triton(x2d) and _triton_quantizable(x2d):
        _check_args(x2d, bits, rounding)
        column_sums_out = _column_sums_for_kernel(x2d, column_sums_out, True, "dual")
        return _launch_dual_hadamard(x2d, hadamard, bits, rounding, generator, check, column_sums_out)
    return (hadamard_quantize(x2d, hadamard, bits=bits, rounding=rounding, generator=generator, check=check),
            hadamard_quantize(x2d, hadamard, bits=bits, rounding=rounding, generator=generator, check=check,
                              transpose=True, column_sums_out=column_sums_out))


def _launch_dual_hadamard(x, hadamard, bits, rounding, generator, check, column_sums_out=None):
    """The kernels of `hadamard_quantize_dual` over a grid of [hadamard, hadamard] tiles of x: abs-maxes,
    scales, payloads. One zero-filled int32 buffer holds both abs-max vectors (rows of x, then
    columns; then the scales' reciprocals) and the NaN flag.
    column_sums_out: x.sum(0) from the first kernel (one partial row per row of tiles)."""
    q = _quant()
    R, C = x.shape
    dev = x.device
    Rp = _cdiv(R, hadamard) * hadamard
    Cp = _cdiv(C, hadamard) * hadamard
    amax = torch.zeros(R + C + int(check), dtype=torch.int32, device=dev)
    data = torch.empty((R, Cp), dtype=torch.int8, device=dev)
    scale = torch.empty((R, 1), dtype=torch.float32, device=dev)
    data_t = torch.empty((C, Rp), dtype=torch.int8, device=dev)
    scale_t = torch.empty((C, 1), dtype=torch.float32, device=dev)
    stochastic = rounding == "stochastic"
    seed = _seed_tensor(dev, generator) if stochastic else _placeholder(dev, torch.int8)
    interp = _interpreting()
    h = _rotation_matrix(hadamard, x.dtype, dev)
    inv = 1.0 / math.sqrt(hadamard)
    n_c = Cp // hadamard
    n_tiles = n_c * (Rp // hadamard)
    grid = (_persistent_programs(n_tiles, dev, _cfg("QUANT_PER_SM", _DUAL_PER_SM)),)
    nw = _cfg("QUANT_WARPS", 8 if hadamard >= 128 else 4)
    stages = _pipeline_stages(_cfg("QUANT_STAGES", _DUAL_STAGES), hadamard * hadamard * x.element_size(), hadamard)
    partials = _column_sum_partials(column_sums_out, Rp // hadamard)
    _kernel("triton_quant", "_dual_amax_kernel")[grid](
        x, R, C, x.stride(0), x.stride(1), amax, h, inv, amax if partials is None else partials, n_tiles, n_c,
        HAD=hadamard, UPCAST=interp, CHECK=check, COLSUM=partials is not None, STAGES=stages, num_warps=nw)
    _add_column_sum_partials(partials, column_sums_out)
    _kernel("triton_quant", "_dual_scales_kernel")[(_cdiv(R + C, 1024),)](
        amax, scale, scale_t, R, C, QMAX=_qmax(bits), BLOCK=1024, num_warps=4)
    _kernel("triton_quant", "_dual_quant_kernel")[grid](
        x, R, C, Rp, Cp, x.stride(0), x.stride(1), amax, data, scale, data_t, scale_t, h, inv, seed,
        n_tiles, n_c, HAD=hadamard, UPCAST=interp, STOCHASTIC=stochastic, QMAX=_qmax(bits),
        RINT_LIBDEVICE=not interp, STAGES=stages, num_warps=nw)
    if check:   # after both launches: one host sync, the GPU never waits for the host in between
        _check_flag(amax[R + C:], x, "hadamard_quantize input")
    return (q.QuantizedTensor(_pack(data, bits), scale, (1, Cp), bits, (R, Cp)),
            q.QuantizedTensor(_pack(data_t, bits), scale_t, (1, Rp), bits, (C, Rp)))


def dequantize(qt, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`qt.dequantize(dtype)`: payload × block scale."""
    if not dispatch._use_triton(qt.data) or qt.bits != 8 or dtype not in (torch.float32, torch.bfloat16,
                                                                 torch.float16):
        return qt.dequantize(dtype)
    R, C = qt.shape
    gr, gc = qt.block
    gr = 1 << 30 if gr >= R else gr
    gc = 1 << 30 if gc >= C else gc
    if not (_pow2(gr) and _pow2(gc)):
        return qt.dequantize(dtype)
    out = torch.empty((R, C), dtype=dtype, device=qt.data.device)
    BR, BC = 32, 128
    scale = qt.scale.contiguous()
    _kernel("triton_quant", "_dequant_kernel")[(_cdiv(C, BC), _cdiv(R, BR))](
        qt.data.contiguous(), scale, out, R, C, scale.stride(0), GR=gr, GC=gc,
        BR=BR, BC=BC, INTERPRETER=_interpreting(), num_warps=4)
    return out