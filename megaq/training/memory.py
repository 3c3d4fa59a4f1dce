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
from typing import Iterator, Optional

import torch

logger = logging.getLogger("megaq.training")

_GIB = 2 ** 30
_peak_before_resets = 0     # bytes: the largest allocated peak the allocator reported before a phase reset it
_reserved_before_resets = 0  # the same for the reserved peak

PHASES = ("forward", "backward", "optimizer")


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

    def report(self, step: int) -> dict[str, float]:
        """The scalars of the measured step once it is done (perf/memory_*_gib), else {}."""
        if step != self.at_step or self.resident is None:
            return {}
        values = {"perf/memory_resident_gib": self.resident / _GIB}
        values.update({f"perf/memory_{name}_peak_gib": self.peaks[name] / _GIB
                       for name in PHASES if name in self.peaks})
        where = max(self.peaks, key=self.peaks.get) if self.peaks else "n/a"
        logger.info(f"GPU memory in step {step} (GiB): resident at its start {values['perf/memory_resident_gib']:.2f}"
                    + "".join(f" | {name} peak {self.peaks[name] / _GIB:.2f}" for name in PHASES
                              if name in self.peaks)
                    + f" (the step peaks in its {where})")
        return values
