"""Quantized weights kept across the micro batches of one optimizer step.

A weight changes only when the optimizer steps, yet every micro batch quantizes it twice (W for the
forward GEMM, Wᵀ for dgrad): with gradient accumulation over n micro batches, n - 1 of those passes
repeat work (the same idea as Transformer Engine's FP8 weight caching across micro batches).

When enabled, each weight keeps its quantized operands (one per GEMM spec and orientation), stamped with
the *weight epoch* they were made in. Whoever updates the weights calls `weights_updated()` afterwards
(the trainer: after every optimizer step and after loading a checkpoint); that makes every entry stale,
and a stale entry is requantized on its next use **into the same buffers**, whose addresses never change
— what a CUDA graph replay reads (`refresh_stale()` does it for all entries before a replay). Numerics
are unchanged: the weight quantizers round to nearest, so a cached operand is bit for bit what a fresh
quantization would give.

Off by default (`enabled()` is False): code that changes weights without calling `weights_updated()`
would otherwise compute with stale operands. The trainer turns it on with `quant.cache_weights`.
Memory: one INT8 copy of the weight per cached orientation (two for the int8 recipe: 2 bytes per
parameter) plus FP32 scales (`cached_bytes()`).

Entries live on the weight's own tensor object. Under `torch.autograd.graph.saved_tensors_hooks`
the backward receives new tensor objects for the saved weights, so the dgrad's Wᵀ is then quantized
afresh on every use (correct, not cached).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch

from ..quant import QuantizedTensor
from .recipe import OperandSpec

_ATTRIBUTE = "_megaq_quantized_weight"


@dataclass
class _Entry:
    operand: QuantizedTensor
    epoch: int


class _State:
    enabled = False
    epoch = 0
    refreshed_epoch = 0               # refresh_stale() brought every entry to this epoch
    weights: list[weakref.ref] = []   # every weight that holds entries, for refresh_stale()


def enabled() -> bool:
    return _State.enabled


def set_enabled(on: bool) -> None:
    """Turn the cache on or off (off also drops every entry, freeing their memory)."""
    _State.enabled = bool(on)
    if not on:
        clear()


@contextlib.contextmanager
def caching(on: bool = True):
    """`with caching():` — the cache on inside (tests, benchmarks)."""
    before = _State.enabled
    set_enabled(on)
    try:
        yield
    finally:
        set_enabled(before)


def weights_updated() -> None:
    """Call after the weights changed (an optimizer step, a checkpoint load): every entry is stale."""
    _State.epoch += 1


def clear() -> None:
    for ref in _State.weights:
        weight = ref()
        if weight is not None:
            weight.__dict__.pop(_ATTRIBUTE, None)
    _State.weights = []


def cached_bytes() -> int:
    """Bytes the entries hold (INT8 payloads and FP32 scales), for memory accounting."""
    total = 0
    for ref in _State.weights:
        weight = ref()
        for entry in (weight.__dict__.get(_ATTRIBUTE, {}).values() if weight is not None else ()):
            total += sum(t.numel() * t.element_size() for t in (entry.operand.data, entry.operand.scale))
    return total


def cached_weight(weight: torch.Tensor, spec: OperandSpec, hadamard: int, transpose: bool,
                  quantize) -> QuantizedTensor | None:
    """The quantized operand of `weight` for (`spec`, `hadamard`, `transpose`), or None when the cache
    is off or the spec rounds stochastically (each use must then draw afresh). `quantize()` makes a
    fresh operand; an existing stale entry is overwritten in place with it."""
    if not _State.enabled or spec.rounding != "nearest":
        return None
    entries = weight.__dict__.get(_ATTRIBUTE)
    if entries is None:
        entries = weight.__dict__[_ATTRIBUTE] = {}
        _State.weights.append(weakref.ref(weight))
    key = (spec, hadamard, transpose, tuple(weight.shape), weight.dtype)
    entry = entries.get(key)
    if entry is None:
        entries[key] = entry = _Entry(quantize(), _State.epoch)
    elif entry.epoch != _State.epoch:
        _refresh(entry, quantize)
    return entry.operand


def _refresh(entry: _Entry, quantize, stamp: bool = True) -> None:
    """Overwrite the entry's buffers with `quantize()`; `stamp`: it is now current (a CUDA graph
    capture runs nothing, so `requantize_all` leaves the epochs to `mark_fresh`)."""
    fresh = quantize()
    entry.operand.data.copy_(fresh.data)
    entry.operand.scale.copy_(fresh.scale)
    if stamp:
        entry.epoch = _State.epoch


def _live_entries():
    """(weight, key, entry) of every entry whose weight is alive; drops the references to dead weights."""
    alive = []
    for ref in _State.weights:
        weight = ref()
        if weight is None:
            continue
        alive.append(ref)
        for key, entry in list(weight.__dict__.get(_ATTRIBUTE, {}).items()):
            yield weight, key, entry
    _State.weights = alive


def stale() -> bool:
    """Whether some entry may be stale (the cache is on and the weights changed since the last refresh)."""
    return _State.enabled and _State.refreshed_epoch != _State.epoch


def signature() -> tuple:
    """What a captured refresh (`requantize_all` in a CUDA graph) depends on: each entry's weight,
    key and the addresses of the weight and of its buffers. A replay is valid while this is unchanged."""
    return tuple((id(weight), weight.data_ptr(), key, entry.operand.data.data_ptr(), entry.operand.scale.data_ptr())
                 for weight, key, entry in _live_entries())


def requantize_all(requantize) -> int:
    """Requantize every entry in place, stale or not, leaving the epochs alone: the work a CUDA graph
    captures once and replays after each optimizer step (then `mark_fresh()`). Returns the count."""
    count = 0
    for weight, (spec, hadamard, transpose, _, _), entry in _live_entries():
        _refresh(entry, lambda: requantize(weight, spec, hadamard, transpose), stamp=False)
        count += 1
    return count


def mark_fresh() -> None:
    """Every entry is current (a replayed `requantize_all` brought them up to date)."""
    for _, _, entry in _live_entries():
        entry.epoch = _State.epoch
    _State.refreshed_epoch = _State.epoch


def refresh_stale(requantize) -> int:
    """Requantize every stale entry in place; `requantize(weight, spec, hadamard, transpose)` makes
    a fresh operand. Returns how many were refreshed. (A CUDA graph replay runs no Python, so the
    entries it reads must be brought up to date before it.)"""
    if not _State.enabled or _State.refreshed_epoch == _State.epoch:
        return 0
    refreshed = 0
    for weight, (spec, hadamard, transpose, _, _), entry in _live_entries():
        if entry.epoch != _State.epoch:
            _refresh(entry, lambda: requantize(weight, spec, hadamard, transpose))
            refreshed += 1
    _State.refreshed_epoch = _State.epoch
    return refreshed
