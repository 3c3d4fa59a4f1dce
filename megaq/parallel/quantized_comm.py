"""Quantized collectives: INT8 payload + FP32 block scales on the wire (docs/COMMUNICATION.md).

Every collective here quantizes with ``megaq.quant.quantize_blockwise``'s format and semantics
(symmetric INT8, one FP32 scale per block of ``block`` consecutive elements along the last
dimension, i.e. block shape ``(1, block)``), through ``megaq.kernels.quantize`` / ``dequantize``:
the Triton kernels on GPUs, the megaq.quant reference itself on the CPU.

    quantized_all_gather(x, dim, group)      each rank quantizes its shard once, one all-gather,
                                              dequantize (or hand the QuantizedTensor to an INT8
                                              consumer); an input that already is a
                                              QuantizedTensor (INT8 data flow) is not requantized.
    quantized_reduce_scatter(x, dim, group)  split x into world chunks along dim, quantize each,
                                              all-to-all, dequantize what arrived, sum in FP32.
    quantized_all_reduce(x, group)           reduce-scatter + all-gather, both quantized (the
                                              two-step scheme of ZeRO++'s qgZ); works on the
                                              flattened tensor in blocks of ``block`` elements.

Wire format. By default (``pack=True``) the scales and the payload of one destination are packed
into one byte buffer ``[scales as bytes | int8 payload | pad to 16 bytes]``, so each quantized
collective is a single NCCL/gloo call (half the launches of payload + scales separately; the
tensor-parallel collectives are a few MB, where launch latency counts). ``pack=False`` issues the
two collectives (payload, then scales) instead; both give identical results.

All-to-all. ``torch.distributed.all_to_all_single`` works for int8/uint8 on NCCL and on gloo
(torch >= 2.1; checked on torch 2.13). Where a backend refuses it, the exchange falls back to an
all-gather of every rank's whole send buffer followed by picking this rank's chunks: same result,
``world`` times the bytes (recorded as such in CommStats), and a one-time warning.

Autograd versions of Megatron's tensor-parallel mappings, drop-in for ``megaq.parallel.mappings``
(same arguments plus ``config`` / ``block``), selectable by ``tp_mappings("bf16" | "int8")``:

    gather_from_sequence_parallel_region_int8     fwd quantized all-gather (dim 0)
                                                  bwd reduce-scatter (int8 or exact) or split
    reduce_scatter_to_sequence_parallel_region_int8  fwd quantized reduce-scatter (dim 0)
                                                  bwd all-gather (int8 or exact)
    reduce_from_tensor_parallel_region_int8       fwd quantized all-reduce, bwd identity
    copy_to_tensor_parallel_region_int8           fwd identity, bwd all-reduce (int8 or exact)

Forward collectives round to nearest and refuse NaN/Inf (NonFiniteError); gradient collectives
pass NaN/Inf on as NaN in their block (so loss scaling sees an overflow) and round stochastically
by default (unbiased, ALGORITHMS.md §1), drawing from torch's default generator of the tensor's
device like the recipes do (every TP rank quantizes tensors of the same shape, so the default
generators stay in step across the TP group).

Bytes. ``CommStats`` counts, per collective kind (``"all_gather[int8]"``, ``"reduce_scatter[bf16]"``
...), calls, the bytes of this rank's send buffer and the bytes this rank puts on the wire under the
usual algorithms (all-gather: (w-1) x shard; reduce-scatter and all-to-all: (w-1)/w x input;
all-reduce: 2 (w-1)/w x input). ``exact_all_gather`` / ``exact_reduce_scatter`` /
``exact_all_reduce`` are the unquantized collectives with the same accounting, for comparisons.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, NamedTuple

import torch
import torch.distributed as dist

from megaq.quant import QuantizedTensor
from megaq.quant.rounding import ROUNDING_MODES
from megaq.parallel.state import (get_tensor_parallel_group, get_tensor_parallel_rank,
                                  get_tensor_parallel_world_size)

# torch >= 2.12 renamed the single-tensor collectives; the old names still work but warn.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

try:  # the dispatcher: Triton kernels on GPUs, the megaq.quant reference elsewhere (same results)
    from megaq.kernels import dequantize as _dequantize_fast
    from megaq.kernels import quantize as _quantize_fast
except ImportError:  # pragma: no cover - kernels layer unavailable
    _quantize_fast = _dequantize_fast = None


def quantize_for_comm(x2d: torch.Tensor, block: tuple[int, int], bits: int = 8,
                       rounding: str = "nearest", generator: torch.Generator | None = None,
                       check: bool = True) -> QuantizedTensor:
    """``megaq.quant.quantize_blockwise`` semantics, through ``megaq.kernels`` where available."""
    if _quantize_fast is not None:
        return _quantize_fast(x2d, block, bits, rounding, generator, check)
    from megaq.quant import quantize_blockwise as reference
    return reference(x2d, block, bits, rounding, generator, check)


def quantize_propagating(x2d: torch.Tensor, block: tuple[int, int], rounding: str = "nearest",
                         generator: torch.Generator | None = None,
                         bits: int = 8) -> tuple[QuantizedTensor, bool]:
    """INT8 (or packed INT4) block quantization for gradients: NaN/Inf are not an error but travel
    as a NaN scale of their block, so every receiver sees NaN there (as an exact collective would
    spread the overflow; fp16 loss scaling then skips the step). Returns (tensor, had_non_finite).
    The finite case costs nothing extra: the quantizer's own check decides."""
    from megaq.quant import NonFiniteError
    try:
        return quantize_for_comm(x2d, block, bits, rounding, generator, True), False
    except NonFiniteError:
        pass
    bad = ~torch.isfinite(x2d)
    qt = quantize_for_comm(torch.where(bad, torch.zeros_like(x2d), x2d), block, bits, rounding,
                            generator, False)
    from megaq.quant import block_absmax
    bad_blocks = block_absmax(bad.float(), qt.block) > 0
    qt.scale = torch.where(bad_blocks, torch.full_like(qt.scale, float("nan")), qt.scale)
    return qt, True


def _quantize(x2d: torch.Tensor, block: tuple[int, int], rounding: str, generator, check: bool,
              propagate: bool) -> QuantizedTensor:
    if propagate:
        return quantize_propagating(x2d, block, rounding, generator)[0]
    return quantize_for_comm(x2d, block, 8, rounding, generator, check)


def _dequantize(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    return _dequantize_fast(qt, dtype) if _dequantize_fast is not None else qt.dequantize(dtype)


_ALIGN = 16  # bytes: every packed segment starts 16-byte aligned, so the FP32 scales can be viewed

COMM_DTYPES = ("bf16", "int8")
BACKWARD_MODES = ("int8", "exact")


# ---- configuration ---------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantizedCommConfig:
    """How the INT8 tensor-parallel collectives quantize.

    block:          elements per scale along the last dimension (``-1``: one scale per row).
    rounding:       rounding of forward (activation) collectives: "nearest" | "stochastic".
    grad_rounding:  rounding of the backward (gradient) collectives.
    backward:       "int8": the backward collectives are quantized too; "exact": they run in the
                    gradient's own dtype (only the forward is compressed).
    pack:           one collective per quantized exchange (scales + payload in one byte buffer)
                    instead of two.
    check_finite:   raise megaq.quant.NonFiniteError on NaN/Inf in a forward collective
                    instead of sending garbage. Backward (gradient) collectives never raise: a
                    NaN/Inf arrives as NaN in its block, as an exact collective would spread it,
                    so that fp16 loss scaling sees the overflow and skips the step.
    """

    block: int = 128
    rounding: str = "nearest"
    grad_rounding: str = "stochastic"
    backward: str = "int8"
    pack: bool = True
    check_finite: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.block, bool) or not isinstance(self.block, int) or \
                not (self.block == -1 or self.block > 0):
            raise ValueError(f"QuantizedCommConfig.block must be a positive int or -1, got {self.block!r}")
        for key in ("rounding", "grad_rounding"):
            if getattr(self, key) not in ROUNDING_MODES:
                raise ValueError(f"QuantizedCommConfig.{key} must be one of {ROUNDING_MODES}, "
                                 f"got {getattr(self, key)!r}")
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"QuantizedCommConfig.backward must be one of {BACKWARD_MODES}, "
                             f"got {self.backward!r}")


DEFAULT_CONFIG = QuantizedCommConfig()


def resolve_config(config: "QuantizedCommConfig | dict | None" = None,
                   block: int | None = None) -> QuantizedCommConfig:
    """A QuantizedCommConfig from None / a config / a dict of its fields, ``block`` overriding."""
    if config is None:
        config = DEFAULT_CONFIG
    elif isinstance(config, dict):
        unknown = set(config) - set(QuantizedCommConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown quantized communication key(s) {sorted(unknown)}; allowed: "
                             f"{sorted(QuantizedCommConfig.__dataclass_fields__)}")
        config = QuantizedCommConfig(**config)
    elif not isinstance(config, QuantizedCommConfig):
        raise TypeError(f"config must be a QuantizedCommConfig, a dict or None, got {type(config).__name__}")
    if block is not None and block != config.block:
        config = replace(config, block=block)
    return config


# ---- byte accounting -------------------------------------------------------------------------

@dataclass
class CollectiveRecord:
    calls: int = 0
    buffer_bytes: int = 0    # bytes of this rank's send buffer(s)
    wire_bytes: int = 0      # bytes this rank transmits (ring / direct algorithms)
    payload_bytes: int = 0   # of buffer_bytes: the data itself (int8 payload or exact tensor)
    scale_bytes: int = 0     # of buffer_bytes: FP32 block scales (and packing pad)


@dataclass
class CommStats:
    """Bytes moved per collective kind, e.g. ``stats.wire_bytes("all_gather[int8]")``."""

    records: dict[str, CollectiveRecord] = field(default_factory=dict)

    def record(self, kind: str, *, buffer_bytes: int, wire_bytes: int, payload_bytes: int | None = None,
               scale_bytes: int = 0, calls: int = 1) -> None:
        r = self.records.setdefault(kind, CollectiveRecord())
        r.calls += calls
        r.buffer_bytes += int(buffer_bytes)
        r.wire_bytes += int(wire_bytes)
        r.payload_bytes += int(buffer_bytes - scale_bytes if payload_bytes is None else payload_bytes)
        r.scale_bytes += int(scale_bytes)

    def _sum(self, attr: str, kind: str | None) -> int:
        if kind is not None:
            r = self.records.get(kind)
            return getattr(r, attr) if r is not None else 0
        return sum(getattr(r, attr) for r in self.records.values())

    def wire_bytes(self, kind: str | None = None) -> int:
        return self._sum("wire_bytes", kind)

    def buffer_bytes(self, kind: str | None = None) -> int:
        return self._sum("buffer_bytes", kind)

    def calls(self, kind: str | None = None) -> int:
        return self._sum("calls", kind)

    def reset(self) -> None:
        self.records.clear()

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {k: dict(vars(r)) for k, r in sorted(self.records.items())}


COMM_STATS = CommStats()          # process-wide totals
_TRACKERS: list[CommStats] = []   # open track_comm() blocks


@contextlib.contextmanager
def track_comm() -> Iterator[CommStats]:
    """``with track_comm() as stats:`` counts the collectives issued inside the block."""
    stats = CommStats()
    _TRACKERS.append(stats)
    try:
        yield stats
    finally:
        _TRACKERS.remove(stats)


def _record(kind: str, **kwargs) -> None:
    COMM_STATS.record(kind, **kwargs)
    for stats in _TRACKERS:
        stats.record(kind, **kwargs)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float64: "fp64"}.get(dtype, str(dtype).replace("torch.", ""))


# Kinds of data-parallel traffic: megaq's compressed gradient all-reduce (``grad_*``) and
# DeepSpeed's own collectives (``ds_*``: gradient reduction, ZeRO parameter all-gathers, its scalar
# overflow / norm reductions; counted by megaq.training.metrics.count_deepspeed_collectives).
# Every other kind is a tensor-parallel mapping.
DATA_PARALLEL_KIND_PREFIXES = ("grad_", "ds_")


def is_data_parallel_kind(kind: str) -> bool:
    return kind.startswith(DATA_PARALLEL_KIND_PREFIXES)


def exact_wire_bytes(op: str, nbytes: int, world: int) -> int:
    """Bytes one rank transmits in an unquantized collective (ring / direct algorithms, as NCCL's
    bus-bandwidth factors): ``all_gather`` (nbytes = this rank's shard) (w-1) x nbytes;
    ``reduce_scatter`` and ``all_to_all`` (nbytes = this rank's whole input) (w-1)/w x nbytes;
    ``all_reduce`` 2 (w-1)/w x nbytes; ``reduce`` and ``broadcast`` (a pipelined chain) nbytes."""
    if world <= 1:
        return 0
    if op == "all_gather":
        return nbytes * (world - 1)
    if op in ("reduce_scatter", "all_to_all"):
        return nbytes * (world - 1) // world
    if op == "all_reduce":
        return 2 * nbytes * (world - 1) // world
    if op in ("reduce", "broadcast"):
        return nbytes
    raise ValueError(f"no wire-byte formula for collective {op!r}")


def record_exact_collective(op: str, nbytes: int, dtype: torch.dtype, world: int, prefix: str = "") -> None:
    """Count one unquantized collective of ``nbytes`` (see ``exact_wire_bytes``) under the kind
    ``f"{prefix}{op}[{dtype}]"`` in COMM_STATS and the open track_comm() blocks."""
    _record(f"{prefix}{op}[{_dtype_name(dtype)}]", buffer_bytes=nbytes,
            wire_bytes=exact_wire_bytes(op, nbytes, world))


# ---- low-level helpers -----------------------------------------------------------------------

def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _block_shape(block: int) -> tuple[int, int]:
    if isinstance(block, bool) or not isinstance(block, int) or not (block == -1 or block > 0):
        raise ValueError(f"block must be a positive int or -1, got {block!r}")
    return (1, block)


def _norm_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim {dim} is out of range for a {ndim}-D tensor")
    return dim % ndim


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _pack_rows(scales: torch.Tensor, payload: torch.Tensor) -> torch.Tensor:
    """``scales`` [k, m] fp32 and ``payload`` [k, n] int8 -> uint8 [k, pad16(4m + n)], one
    segment per row: [scale bytes | payload | zero pad]."""
    k = scales.size(0)
    sbytes = scales.contiguous().view(torch.uint8).reshape(k, -1)
    pbytes = payload.contiguous().view(torch.uint8).reshape(k, -1)
    used = sbytes.size(1) + pbytes.size(1)
    pad = _padded(used) - used
    parts = [sbytes, pbytes]
    if pad:
        parts.append(torch.zeros(k, pad, dtype=torch.uint8, device=payload.device))
    return torch.cat(parts, dim=1)


def _unpack_rows(buf: torch.Tensor, m: int, n: int,
                 payload_dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``_pack_rows``: uint8 [k, seg] -> (fp32 scales [k, m], payload [k, n] bytes as
    ``payload_dtype``: int8, or uint8 for packed INT4)."""
    scales = buf[:, :4 * m].contiguous().view(torch.float32)
    payload = buf[:, 4 * m:4 * m + n].contiguous().view(payload_dtype)
    return scales, payload


_A2A_FALLBACK_WARNED = False


def _all_to_all_equal(out: torch.Tensor, inp: torch.Tensor, group) -> int:
    """Equal-split all-to-all along dim 0 of contiguous ``inp`` into ``out``; returns the number of
    bytes this rank transmitted. Falls back to an all-gather where all_to_all_single is missing."""
    global _A2A_FALLBACK_WARNED
    world = _world(group)
    try:
        dist.all_to_all_single(out, inp, group=group)
        return _nbytes(inp) * (world - 1) // world
    except (RuntimeError, NotImplementedError) as err:
        msg = str(err).lower()
        if "support" not in msg and "implement" not in msg:
            raise
        if not _A2A_FALLBACK_WARNED:
            warnings.warn(f"all_to_all_single is not available on this backend ({err}); quantized "
                          f"reduce-scatter falls back to an all-gather exchange ({world}x the bytes)",
                          RuntimeWarning, stacklevel=3)
            _A2A_FALLBACK_WARNED = True
    everything = torch.empty((world * inp.size(0),) + tuple(inp.shape[1:]), dtype=inp.dtype,
                             device=inp.device)
    _all_gather_single(everything, inp, group=group)
    me = dist.get_rank(group)
    chunk = inp.size(0) // world
    everything = everything.view((world, inp.size(0)) + tuple(inp.shape[1:]))
    out.copy_(everything[:, me * chunk:(me + 1) * chunk].reshape(out.shape))
    return _nbytes(inp) * (world - 1)


# ---- quantized exchanges on QuantizedTensors (shared with grad_compression) -------------------

def _all_to_all_packed(send: torch.Tensor, group, kind: str, payload_bytes: int) -> torch.Tensor:
    """All-to-all of packed segments: uint8 ``[world, seg]``, row j for rank j -> the received
    ``[world, seg]``, row j from rank j. Recorded under ``kind`` as one call whose ``payload_bytes``
    of the send buffer are payload (the rest: scales and pad)."""
    recv = torch.empty_like(send)
    wire = _all_to_all_equal(recv, send, group)
    _record(kind, buffer_bytes=_nbytes(send), wire_bytes=wire, scale_bytes=_nbytes(send) - payload_bytes)
    return recv


def _all_gather_packed(seg: torch.Tensor, group, kind: str, payload_bytes: int) -> torch.Tensor:
    """All-gather of one packed segment (uint8, ``seg`` bytes in all) -> ``[world, seg]`` in rank
    order; recorded as ``_all_to_all_packed`` does."""
    world = _world(group)
    flat = seg.reshape(-1)
    out = torch.empty((world, flat.numel()), dtype=torch.uint8, device=flat.device)
    _all_gather_single(out.view(-1), flat, group=group)
    _record(kind, buffer_bytes=_nbytes(flat), wire_bytes=_nbytes(flat) * (world - 1),
            scale_bytes=_nbytes(flat) - payload_bytes)
    return out


def _exchange_all_gather(qt: QuantizedTensor, group, pack: bool, kind: str) -> QuantizedTensor:
    """All-gather a row-blocked QuantizedTensor ``[R, C]`` -> ``[world * R, C]`` (rank-major); INT8
    or packed INT4 (each row's bytes travel as they are)."""
    world = _world(group)
    rows, cols = qt.shape
    payload, scales = qt.data.contiguous(), qt.scale.contiguous()
    if pack:
        seg = _pack_rows(scales.reshape(1, -1), payload.reshape(1, -1))
        out = _all_gather_packed(seg, group, kind, _nbytes(payload))
        g_scales, g_payload = _unpack_rows(out, scales.numel(), payload.numel(), payload.dtype)
    else:
        # gloo wants the concatenated layout [world * rows, ...] (NCCL also takes [world, ...])
        g_payload = torch.empty((world * rows, payload.size(1)), dtype=payload.dtype, device=payload.device)
        g_scales = torch.empty((world * scales.size(0), scales.size(1)), dtype=scales.dtype,
                               device=scales.device)
        _all_gather_single(g_payload, payload, group=group)
        _all_gather_single(g_scales, scales, group=group)
        buffer_bytes = _nbytes(payload) + _nbytes(scales)
        _record(kind, buffer_bytes=buffer_bytes, wire_bytes=buffer_bytes * (world - 1),
                scale_bytes=_nbytes(scales), calls=2)
    return QuantizedTensor(g_payload.reshape(world * rows, payload.size(1)),
                           g_scales.reshape(world * scales.size(0), scales.size(1)),
                           qt.block, qt.bits, (world * rows, cols))


def _exchange_reduce_scatter(qt: QuantizedTensor, group, pack: bool, kind: str) -> torch.Tensor:
    """``qt`` is ``[world * Rc, C]``: rows ``[j*Rc, (j+1)*Rc)`` are destined for rank j. Returns
    the FP32 sum ``[Rc, C]`` over all ranks of the chunk destined for this rank. INT8 or packed INT4."""
    world = _world(group)
    rows, cols = qt.shape
    rc = rows // world
    payload, scales = qt.data.contiguous(), qt.scale.contiguous()
    nb, row_bytes = scales.size(1), payload.size(1)
    if pack:
        send = _pack_rows(scales.reshape(world, -1), payload.reshape(world, -1))
        recv = _all_to_all_packed(send, group, kind, _nbytes(payload))
        r_scales, r_payload = _unpack_rows(recv, rc * nb, rc * row_bytes, payload.dtype)
    else:
        r_payload, r_scales = torch.empty_like(payload), torch.empty_like(scales)
        wire = _all_to_all_equal(r_payload, payload, group)
        wire += _all_to_all_equal(r_scales, scales, group)
        _record(kind, buffer_bytes=_nbytes(payload) + _nbytes(scales), wire_bytes=wire,
                scale_bytes=_nbytes(scales), calls=2)
    received = QuantizedTensor(r_payload.reshape(rows, row_bytes), r_scales.reshape(rows, nb),
                               qt.block, qt.bits, (rows, cols))
    return _sum_received(received, world)


def _sum_received(received: QuantizedTensor, world: int) -> torch.Tensor:
    """FP32 sum ``[Rc, C]`` of the ``world`` chunks (rank-major rows) of a received
    ``[world * Rc, C]`` QuantizedTensor, dequantized, in rank order (deterministic)."""
    rows, cols = received.shape
    return _dequantize(received, torch.float32).view(world, rows // world, cols).sum(0)


# ---- public quantized collectives ------------------------------------------------------------

def quantized_all_gather(x: "torch.Tensor | QuantizedTensor", dim: int = 0, group=None,
                         block: int = 128, *, rounding: str = "nearest",
                         generator: torch.Generator | None = None, pack: bool = True,
                         return_quantized: bool = False, out_dtype: torch.dtype | None = None,
                         check_finite: bool = True, propagate_nonfinite: bool = False,
                         kind: str = "all_gather[int8]") -> "torch.Tensor | QuantizedTensor":
    """All-gather ``x`` along ``dim`` over ``group`` (None: the default group) with an INT8 payload.

    ``x`` is this rank's shard (any shape); the result has ``world x`` its size along ``dim``,
    shards in rank order, in ``out_dtype`` (default ``x``'s dtype). A 2-D QuantizedTensor input
    (block ``(1, bc)``, e.g. an INT8 LayerNorm output) is sent as it is, gathered along rows, and
    dequantized to FP32 unless ``out_dtype`` says otherwise. ``return_quantized=True`` (dim 0
    only) returns the gathered QuantizedTensor ``[world * rows, C]`` of the flattened
    ``[-1, C]`` view for an INT8 consumer, without dequantizing. A group of one rank returns
    ``x`` itself. NaN/Inf raise ``megaq.quant.NonFiniteError`` (``check_finite``), or with
    ``propagate_nonfinite`` (gradients) arrive as NaN in their block on every rank.
    """
    world = _world(group)
    if isinstance(x, QuantizedTensor):
        if dim not in (0, -2):
            raise ValueError("a QuantizedTensor input is gathered along its rows (dim 0)")
        if x.bits != 8:
            raise ValueError(f"quantized_all_gather sends INT8 payloads, got an int{x.bits} tensor")
        if x.shape[0] % x.block[0] != 0:
            raise ValueError(f"a QuantizedTensor of {x.shape[0]} rows with row-block {x.block[0]} "
                             f"cannot be gathered along rows (rows must be whole blocks)")
        if world == 1:
            return x if return_quantized else _dequantize(x, out_dtype or torch.float32)
        gathered = _exchange_all_gather(x, group, pack, kind)
        return gathered if return_quantized else _dequantize(gathered, out_dtype or torch.float32)

    dim = _norm_dim(dim, x.dim())
    if return_quantized and dim != 0:
        raise ValueError("return_quantized=True is only supported for dim=0 (rows of the "
                         "flattened [-1, C] view stay in gathered order)")
    if world == 1:
        if return_quantized:
            return _quantize(x.reshape(-1, x.shape[-1]), _block_shape(block), rounding, generator,
                             check_finite, propagate_nonfinite)
        return x
    out_dtype = out_dtype or x.dtype
    flat = x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)
    qt = _quantize(flat, _block_shape(block), rounding, generator, check_finite, propagate_nonfinite)
    gathered = _exchange_all_gather(qt, group, pack, kind)
    if return_quantized:
        return gathered
    full = _dequantize(gathered, out_dtype).view((world,) + tuple(x.shape))
    if dim == 0:
        return full.reshape((world * x.size(0),) + tuple(x.shape[1:]))
    return torch.cat(full.unbind(0), dim=dim)


def _stack_chunks(x: torch.Tensor, dim: int, world: int, what: str) -> torch.Tensor:
    """``[world, *chunk_shape]``: the world chunks of x along dim (a view when dim == 0)."""
    if x.size(dim) % world != 0:
        raise ValueError(f"{what}: dimension {dim} of size {x.size(dim)} is not divisible by the "
                         f"group size {world}")
    if dim == 0:
        return x.contiguous().view((world, x.size(0) // world) + tuple(x.shape[1:]))
    return torch.stack(x.chunk(world, dim), 0)


def quantized_reduce_scatter(x: torch.Tensor, dim: int = 0, group=None, block: int = 128,
                             rounding: str = "nearest", *, generator: torch.Generator | None = None,
                             pack: bool = True, out_dtype: torch.dtype | None = None,
                             check_finite: bool = True, propagate_nonfinite: bool = False,
                             kind: str = "reduce_scatter[int8]") -> torch.Tensor:
    """Sum ``x`` over ``group`` and keep this rank's chunk along ``dim`` (rank r: chunk r).

    Each rank quantizes its ``world`` chunks (blocks along the last dimension of a chunk), an
    all-to-all delivers chunk r of every rank to rank r, which dequantizes and sums in FP32 and
    returns ``out_dtype`` (default ``x``'s dtype). ``x.size(dim)`` must be divisible by the group
    size (ValueError otherwise). A group of one rank returns ``x`` itself. Non-finite values: as
    in ``quantized_all_gather``.
    """
    world = _world(group)
    dim = _norm_dim(dim, x.dim())
    if world == 1:
        return x
    stacked = _stack_chunks(x, dim, world, "quantized_reduce_scatter")  # [world, *chunk]
    chunk_shape = tuple(stacked.shape[1:])
    flat = stacked.reshape(-1, chunk_shape[-1])  # [world * Rc, C]: row blocks never cross chunks
    qt = _quantize(flat, _block_shape(block), rounding, generator, check_finite, propagate_nonfinite)
    summed = _exchange_reduce_scatter(qt, group, pack, kind)
    return summed.view(chunk_shape).to(out_dtype or x.dtype)


def _padded_numel(n: int, world: int, block: int) -> int:
    """n rounded up to whole ``world x block`` units (at least one)."""
    unit = world * block
    return max(unit, -(-n // unit) * unit)


def _flat_blocks(x: torch.Tensor, world: int, block: int) -> tuple[torch.Tensor, int]:
    """x flattened, zero-padded to whole ``world x block`` units, as FP32 ``[rows, block]``."""
    n = x.numel()
    padded = _padded_numel(n, world, block)
    flat = x.reshape(-1).float()
    if padded != n:
        flat = torch.nn.functional.pad(flat, (0, padded - n))
    return flat.view(-1, block), n


def quantized_all_reduce(x: torch.Tensor, group=None, block: int = 128, rounding: str = "nearest", *,
                         average: bool = False, generator: torch.Generator | None = None,
                         pack: bool = True, check_finite: bool = True,
                         propagate_nonfinite: bool = False) -> torch.Tensor:
    """Sum (or mean, ``average=True``) of ``x`` over ``group``: a quantized reduce-scatter of the
    flattened tensor, then a quantized all-gather of the FP32 partial sums (requantized). Any
    shape; the flattened tensor is quantized in blocks of ``block`` consecutive elements. Returns a
    new tensor of ``x``'s shape and dtype (a group of one rank returns ``x`` itself)."""
    world = _world(group)
    if world == 1:
        return x
    if block == -1:
        raise ValueError("quantized_all_reduce needs a finite block size")
    blocks, n = _flat_blocks(x, world, block)
    qt = _quantize(blocks, _block_shape(block), rounding, generator, check_finite, propagate_nonfinite)
    shard = _exchange_reduce_scatter(qt, group, pack, "all_reduce[int8]")
    if average:
        shard = shard / world
    qs = _quantize(shard, _block_shape(block), rounding, generator, check_finite, propagate_nonfinite)
    full = _exchange_all_gather(qs, group, pack, "all_reduce[int8]")
    return _dequantize(full, torch.float32).reshape(-1)[:n].view(x.shape).to(x.dtype)


# ---- exact collectives with the same accounting (references and benchmarks) ------------------

def exact_all_gather(x: torch.Tensor, dim: int = 0, group=None) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    dim = _norm_dim(dim, x.dim())
    x = x.contiguous()
    out = torch.empty((world * x.size(0),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=group)
    record_exact_collective("all_gather", _nbytes(x), x.dtype, world)
    if dim == 0:
        return out
    return torch.cat(out.view((world,) + tuple(x.shape)).unbind(0), dim=dim)


def exact_reduce_scatter(x: torch.Tensor, dim: int = 0, group=None) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    dim = _norm_dim(dim, x.dim())
    stacked = _stack_chunks(x, dim, world, "exact_reduce_scatter").contiguous()
    out = torch.empty(stacked.shape[1:], dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, stacked.view((-1,) + tuple(stacked.shape[2:])), group=group)
    record_exact_collective("reduce_scatter", _nbytes(x), x.dtype, world)
    return out


def exact_all_reduce(x: torch.Tensor, group=None, *, average: bool = False) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    record_exact_collective("all_reduce", _nbytes(out), x.dtype, world)
    return out / world if average else out


# ---- autograd mappings (tensor-parallel group) -----------------------------------------------

def _tp():
    return get_tensor_parallel_group(), get_tensor_parallel_world_size()


def _split_first_dim(x: torch.Tensor) -> torch.Tensor:
    world = get_tensor_parallel_world_size()
    if x.size(0) % world != 0:
        raise ValueError(f"cannot split dimension 0 of size {x.size(0)} evenly over {world} "
                         f"tensor-parallel ranks")
    chunk = x.size(0) // world
    return x.narrow(0, get_tensor_parallel_rank() * chunk, chunk).contiguous()


def _grad_reduce_scatter(grad: torch.Tensor, cfg: QuantizedCommConfig) -> torch.Tensor:
    group, _ = _tp()
    if cfg.backward == "exact":
        return exact_reduce_scatter(grad, 0, group)
    return quantized_reduce_scatter(grad, 0, group, cfg.block, cfg.grad_rounding, pack=cfg.pack,
                                    propagate_nonfinite=True)


def _grad_all_gather(grad: torch.Tensor, cfg: QuantizedCommConfig) -> torch.Tensor:
    group, _ = _tp()
    if cfg.backward == "exact":
        return exact_all_gather(grad, 0, group)
    return quantized_all_gather(grad, 0, group, cfg.block, rounding=cfg.grad_rounding, pack=cfg.pack,
                                propagate_nonfinite=True)


def _grad_all_reduce(grad: torch.Tensor, cfg: QuantizedCommConfig) -> torch.Tensor:
    group, _ = _tp()
    if cfg.backward == "exact":
        return exact_all_reduce(grad, group)
    return quantized_all_reduce(grad, group, cfg.block, cfg.grad_rounding, pack=cfg.pack,
                                propagate_nonfinite=True)


class _GatherFromSequenceParallelRegionInt8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tensor_parallel_output_grad, cfg):
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        ctx.cfg = cfg
        group, world = _tp()
        if world == 1:
            return x
        return quantized_all_gather(x, 0, group, cfg.block, rounding=cfg.rounding, pack=cfg.pack,
                                    check_finite=cfg.check_finite)

    @staticmethod
    def backward(ctx, grad):
        if get_tensor_parallel_world_size() == 1:
            return grad, None, None
        if ctx.tensor_parallel_output_grad:
            return _grad_reduce_scatter(grad, ctx.cfg), None, None
        return _split_first_dim(grad), None, None


class _ReduceScatterToSequenceParallelRegionInt8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cfg):
        ctx.cfg = cfg
        group, world = _tp()
        if world == 1:
            return x
        return quantized_reduce_scatter(x, 0, group, cfg.block, cfg.rounding, pack=cfg.pack,
                                        check_finite=cfg.check_finite)

    @staticmethod
    def backward(ctx, grad):
        if get_tensor_parallel_world_size() == 1:
            return grad, None
        return _grad_all_gather(grad, ctx.cfg), None


class _ReduceFromTensorParallelRegionInt8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cfg):
        group, world = _tp()
        if world == 1:
            return x
        return quantized_all_reduce(x, group, cfg.block, cfg.rounding, pack=cfg.pack,
                                    check_finite=cfg.check_finite)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToTensorParallelRegionInt8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cfg):
        ctx.cfg = cfg
        return x

    @staticmethod
    def backward(ctx, grad):
        if get_tensor_parallel_world_size() == 1:
            return grad, None
        return _grad_all_reduce(grad, ctx.cfg), None


def gather_from_sequence_parallel_region_int8(x: torch.Tensor, tensor_parallel_output_grad: bool = True,
                                              config: "QuantizedCommConfig | dict | None" = None, *,
                                              block: int | None = None) -> torch.Tensor:
    """INT8 ``gather_from_sequence_parallel_region``: quantized all-gather of dim 0 over the TP
    group; backward: reduce-scatter of the partial gradients (``config.backward``: int8 or exact)
    when the result feeds a TP region (default), else a split."""
    return _GatherFromSequenceParallelRegionInt8.apply(x, tensor_parallel_output_grad,
                                                       resolve_config(config, block))


def reduce_scatter_to_sequence_parallel_region_int8(x: torch.Tensor,
                                                    config: "QuantizedCommConfig | dict | None" = None, *,
                                                    block: int | None = None) -> torch.Tensor:
    """INT8 ``reduce_scatter_to_sequence_parallel_region``: quantized reduce-scatter along dim 0
    (FP32 local sum); backward: all-gather of dim 0 (int8 or exact)."""
    return _ReduceScatterToSequenceParallelRegionInt8.apply(x, resolve_config(config, block))


def reduce_from_tensor_parallel_region_int8(x: torch.Tensor,
                                            config: "QuantizedCommConfig | dict | None" = None, *,
                                            block: int | None = None) -> torch.Tensor:
    """INT8 ``reduce_from_tp_region``: quantized all-reduce (reduce-scatter + all-gather);
    backward: identity."""
    return _ReduceFromTensorParallelRegionInt8.apply(x, resolve_config(config, block))


def copy_to_tensor_parallel_region_int8(x: torch.Tensor,
                                        config: "QuantizedCommConfig | dict | None" = None, *,
                                        block: int | None = None) -> torch.Tensor:
    """INT8 ``copy_to_tp_region``: identity; backward: all-reduce of the gradient (int8 or exact)."""
    return _CopyToTensorParallelRegionInt8.apply(x, resolve_config(config, block))


# Megatron-style short names, matching megaq.parallel.mappings
reduce_from_tp_region_int8 = reduce_from_tensor_parallel_region_int8
copy_to_tp_region_int8 = copy_to_tensor_parallel_region_int8


class TPMappings(NamedTuple):
    """The four mappings a parallel linear uses, for one ``parallel.comm_dtype``."""
    copy_to_tp_region: Callable[[torch.Tensor], torch.Tensor]
    reduce_from_tp_region: Callable[[torch.Tensor], torch.Tensor]
    gather_from_sequence_parallel_region: Callable[..., torch.Tensor]
    reduce_scatter_to_sequence_parallel_region: Callable[[torch.Tensor], torch.Tensor]


def tp_mappings(comm_dtype: str = "bf16",
                config: "QuantizedCommConfig | dict | None" = None) -> TPMappings:
    """``"bf16"``: megaq.parallel.mappings' exact collectives (in the activations' dtype);
    ``"int8"``: the quantized ones above, bound to ``config``. Cached per (dtype, config), so a
    layer may call it in its constructor or on every forward."""
    if comm_dtype not in COMM_DTYPES:
        raise ValueError(f"parallel.comm_dtype must be one of {COMM_DTYPES}, got {comm_dtype!r}")
    return _tp_mappings(comm_dtype, resolve_config(config) if comm_dtype == "int8" else None)


@functools.lru_cache(maxsize=None)
def _tp_mappings(comm_dtype: str, cfg: QuantizedCommConfig | None) -> TPMappings:
    if comm_dtype == "bf16":
        from megaq.parallel import mappings
        return TPMappings(mappings.copy_to_tp_region, mappings.reduce_from_tp_region,
                          mappings.gather_from_sequence_parallel_region,
                          mappings.reduce_scatter_to_sequence_parallel_region)
    if comm_dtype == "int8":
        def gather(x, tensor_parallel_output_grad=True):
            return gather_from_sequence_parallel_region_int8(x, tensor_parallel_output_grad, cfg)

        return TPMappings(lambda x: copy_to_tensor_parallel_region_int8(x, cfg),
                          lambda x: reduce_from_tensor_parallel_region_int8(x, cfg),
                          gather,
                          lambda x: reduce_scatter_to_sequence_parallel_region_int8(x, cfg))
    raise ValueError(f"parallel.comm_dtype must be one of {COMM_DTYPES}, got {comm_dtype!r}")


def bytes_ratio_int8_vs(dtype_bytes: int, last_dim: int, block: int = 128) -> float:
    """Analytic bytes of the INT8 format (payload + FP32 scales) per element over ``dtype_bytes``:
    e.g. 0.516 against BF16 for a last dim of 1600 in blocks of 128 (13 scales per row)."""
    b = last_dim if block == -1 else block
    return (last_dim + 4 * math.ceil(last_dim / b)) / (dtype_bytes * last_dim)
