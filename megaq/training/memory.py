"""Where a training step's GPU memory peaks: the caching allocator's peak within each phase of one
optimizer step (forward, backward, optimizer update), and what is resident before it (weights,
optimizer state, cached INT8 weights).

The INT8 recipes shrink the activations a step saves for backward; whether that lowers the run's peak
depends on the phase the peak falls in. The peak in the optimizer update (all gradients plus the
AdamW state) does not depend on the recipe at all, so one figure for the whole run cannot tell the two
apart. `MemoryPhases` measures one step (the second by default: the first allocates the AdamW state
lazily inside its update, and compiles and captures), logs one line and returns the scalars for
TensorBoard / the metrics file.

Allocated or reserved: with `train.cuda_graphs` the blocks' activations live in the graphs' private
memory pool, carved out at capture and reused by every replay without an allocator call, so the
allocated-bytes counter never sees them (the replays' activations are neither allocated nor freed);
only the reserved bytes (what the process holds from the GPU: the caching allocator's segments,
graph pools included) do. Compare recipes on the reserved peak when graphs are on.

The allocator has one pair of peak counters; measuring a phase resets them. `peak_memory_gib()` /
`peak_reserved_gib()` are the peaks of the whole run across those resets (perf/peak_memory_gib and
perf/peak_reserved_gib in the progress reporter).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from typing import Iterator, Optional

import torch

logger = logging.getLogger("megaq.training")

_GIB = 2 ** 30
_peak_before_resets = 0     # bytes: the largest allocated peak the allocator reported before a phase reset it
_reserved_before_resets = 0  # the same for the reserved peak

PHASES = ("forward", "backward", "optimizer")
SNAPSHOT_ENV = "MEGAQ_MEMORY_SNAPSHOT"   # a path: the allocator's segments at the measured step's end, pickled


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def peak_memory_gib() -> Optional[float]:
    """Peak GPU memory allocated by this process so far, GiB (None without CUDA)."""
    if not _cuda():
        return None
    return max(_peak_before_resets, torch.cuda.max_memory_allocated()) / _GIB


def peak_reserved_gib() -> Optional[float]:
    """Peak GPU memory reserved by this process's caching allocator so far (graph pools included), GiB."""
    if not _cuda():
        return None
    return max(_reserved_before_resets, torch.cuda.max_memory_reserved()) / _GIB


def pool_usage(segments: Optional[list] = None) -> dict[str, dict[str, int]]:
    """Bytes the caching allocator holds, by pool: "default" (eager allocations) and "graphs" (every
    private pool: CUDA graph captures). Per pool: reserved (its segments), allocated (live blocks) and
    largest_free (the largest block a new allocation could take without a new segment). `segments`:
    `torch.cuda.memory_snapshot()`'s list (read now when None)."""
    if segments is None:
        segments = torch.cuda.memory_snapshot()
    usage: dict[str, dict[str, int]] = {}
    for seg in segments:
        pool = "default" if tuple(seg.get("segment_pool_id", (0, 0))) == (0, 0) else "graphs"
        u = usage.setdefault(pool, {"reserved": 0, "allocated": 0, "largest_free": 0})
        u["reserved"] += seg["total_size"]
        u["allocated"] += seg["allocated_size"]
        for block in seg.get("blocks", ()):
            if block["state"] == "inactive":
                u["largest_free"] = max(u["largest_free"], block["size"])
    return usage


def _reset_peak() -> None:
    global _peak_before_resets, _reserved_before_resets
    _peak_before_resets = max(_peak_before_resets, torch.cuda.max_memory_allocated())
    _reserved_before_resets = max(_reserved_before_resets, torch.cuda.max_memory_reserved())
    torch.cuda.reset_peak_memory_stats()


class MemoryPhases:
    """Peak allocated bytes per phase of optimizer step `at_step` (1-based; 0 or no CUDA: off).

    Usage, per micro batch of every step: `with phases.phase(step + 1, "forward"): ...`; after the
    step: `phases.report(step)` returns the scalars once, at `at_step`, else {}. A phase entered several
    times in the step (one forward per micro batch) keeps its largest peak."""

    def __init__(self, at_step: int = 2) -> None:
        self.at_step = at_step if at_step > 0 and torch.cuda.is_available() else 0
        self.resident: Optional[int] = None
        self.peaks: dict[str, int] = {}
        self.reserved_peaks: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, step: int, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"memory phase must be one of {PHASES}; got {name!r}")
        if step != self.at_step or not _cuda():
            yield
            return
        if self.resident is None:
            self.resident = torch.cuda.memory_allocated()
        _reset_peak()
        try:
            yield
        finally:
            self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated())
            self.reserved_peaks[name] = max(self.reserved_peaks.get(name, 0), torch.cuda.max_memory_reserved())

    def report(self, step: int) -> dict[str, float]:
        """The scalars of the measured step once it is done (perf/memory_*_gib), else {}."""
        if step != self.at_step or self.resident is None:
            return {}
        values = {"perf/memory_resident_gib": self.resident / _GIB}
        values.update({f"perf/memory_{name}_peak_gib": self.peaks[name] / _GIB
                       for name in PHASES if name in self.peaks})
        values.update({f"perf/memory_{name}_reserved_gib": self.reserved_peaks[name] / _GIB
                       for name in PHASES if name in self.reserved_peaks})
        where = max(self.peaks, key=self.peaks.get) if self.peaks else "n/a"
        logger.info(f"GPU memory in step {step} (GiB): resident at its start {values['perf/memory_resident_gib']:.2f}"
                    + "".join(f" | {name} peak {self.peaks[name] / _GIB:.2f} (reserved "
                              f"{self.reserved_peaks.get(name, 0) / _GIB:.2f})" for name in PHASES
                              if name in self.peaks)
                    + f" (the step peaks in its {where})")
        usage = pool_usage()
        for pool, u in usage.items():
            values.update({f"perf/memory_pool_{pool}_{k}_gib": v / _GIB for k, v in u.items()})
        logger.info("GPU memory by pool at the end of the step (GiB): " + " | ".join(
            f"{pool}: reserved {u['reserved'] / _GIB:.2f}, allocated {u['allocated'] / _GIB:.2f}, largest free "
            f"block {u['largest_free'] / _GIB:.2f}" for pool, u in sorted(usage.items())))
        path = os.environ.get(SNAPSHOT_ENV)
        if path:   # for offline reading (torch.cuda.memory._snapshot's format: segments with their blocks)
            with open(path, "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)
            logger.info(f"GPU memory: the allocator's snapshot is in {path}")
        return values
