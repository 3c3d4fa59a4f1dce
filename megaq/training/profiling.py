"""Where a training step's GPU time goes: torch.profiler over chosen steps, kernels grouped by kind.

`logging.profile_steps: [first, last]` makes rank 0 profile those optimizer steps (CPU and CUDA
activities). At the end of the last one it writes, into `logging.profile_dir`:

    trace_steps_F-L.json.gz   the Chrome/Perfetto trace (chrome://tracing, ui.perfetto.dev)
    kernels_steps_F-L.json    GPU time per step by kernel category and by kernel, and the step's wall time

and logs the category table. Kernels replayed from CUDA graphs are traced one by one (CUPTI records
graph kernel nodes), so graphed and eager runs compare kernel for kernel.

The grouping reads the kernel names in the trace, not the Python call stack, so it is the same for
every recipe and for the peers' compiled kernels: the first pattern of KERNEL_CATEGORIES that matches a
name decides its category. The summary is built from the exported trace file (its "kernel",
"gpu_memcpy" and "gpu_memset" events), which is also how it is tested without a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable, Optional

logger = logging.getLogger("megaq.profile")

# Ordered: the first match wins, so megaq's own kernels (whose names say what they do) and the more
# specific library kernels come before the generic elementwise / copy patterns that would also match.
KERNEL_CATEGORIES: list[tuple[str, re.Pattern]] = [
    ("int8/int4 gemm", re.compile(r"_scaled_mm_kernel|_sampled_mm_kernel|int8_gemm|int4_gemm|_int_mm|"
                                  r"imma|s8s8|i8i8", re.I)),
    ("quantize", re.compile(r"^_quant|^_dual_|^_amax_partial|^_dequant|^_hq_int4|^_bit_split|"
                            r"^_dgrad_operand|^_wgrad_operand|^_unpack_t|quantize", re.I)),
    ("int8 data flow", re.compile(r"^_layernorm_|^_gelu_", re.I)),
    ("cross entropy", re.compile(r"^_row_stats_kernel|^_softmax_grad_kernel|cross_entropy|log_softmax|"
                                 r"nll_loss|softmax", re.I)),
    ("attention", re.compile(r"flash|fmha|sdpa|attention|attn", re.I)),
    ("gemm (bf16/fp8)", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|splitK|gemv|^triton_tem_|wgmma|"
                                   r"sm90_|sm80_|ampere_", re.I)),
    ("layernorm", re.compile(r"layer_?norm|GammaBeta|rms_?norm", re.I)),
    ("gelu", re.compile(r"gelu", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|_foreach", re.I)),
    ("communication", re.compile(r"nccl|all_?reduce|all_?gather|reduce_?scatter", re.I)),
    ("fused (inductor)", re.compile(r"^triton_(poi|red|per)_", re.I)),
    ("copy / cast", re.compile(r"copy|memcpy|cast|convert|CatArray|transpose|permute|index", re.I)),
    ("fill", re.compile(r"memset|fill|zero", re.I)),
    ("reduction", re.compile(r"reduce|norm|sum|amax|max_", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|add|mul|div", re.I)),
]
OTHER = "other"
_DEVICE_EVENT_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
_PHASE_PREFIX = "megaq/"


def kernel_category(name: str) -> str:
    for category, pattern in KERNEL_CATEGORIES:
        if pattern.search(name):
            return category
    return OTHER


def device_events(trace: dict) -> Iterable[tuple[str, float]]:
    """(name, duration µs) of every GPU kernel, copy and memset in a Chrome trace from torch.profiler."""
    for event in trace.get("traceEvents", []):
        if event.get("ph") == "X" and event.get("cat") in _DEVICE_EVENT_CATEGORIES:
            yield str(event.get("name", "?")), float(event.get("dur", 0.0))


def _busy_intervals(trace: dict) -> list[tuple[float, float]]:
    """The merged [start, end) µs intervals in which some GPU kernel, copy or memset ran."""
    spans = sorted((float(e.get("ts", 0.0)), float(e.get("ts", 0.0)) + float(e.get("dur", 0.0)))
                   for e in trace.get("traceEvents", [])
                   if e.get("ph") == "X" and e.get("cat") in _DEVICE_EVENT_CATEGORIES)
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def device_busy(trace: dict, intervals: Optional[list] = None) -> tuple[float, float]:
    """(µs some GPU kernel, copy or memset ran, µs from the first device event's start to the last's end):
    the difference is the time the GPU sat idle, waiting for the host (launches, Python, syncs).
    `intervals`: `_busy_intervals(trace)` when the caller has it already."""
    intervals = _busy_intervals(trace) if intervals is None else intervals
    if not intervals:
        return 0.0, 0.0
    return sum(b - a for a, b in intervals), intervals[-1][1] - intervals[0][0]


def idle_by_phase(trace: dict, intervals: Optional[list] = None) -> dict[str, float]:
    """The GPU's idle µs between kernels, by the `StepProfiler.phase` range the host was in when each
    gap began ("outside" when in none): which part of the step leaves the GPU waiting."""
    intervals = _busy_intervals(trace) if intervals is None else intervals
    phases = sorted((float(e.get("ts", 0.0)), float(e.get("ts", 0.0)) + float(e.get("dur", 0.0)),
                     str(e["name"]).removeprefix(_PHASE_PREFIX))
                    for e in trace.get("traceEvents", [])
                    if e.get("ph") == "X" and e.get("cat") == "user_annotation"
                    and str(e.get("name", "")).startswith(_PHASE_PREFIX))
    totals: dict[str, float] = collections.defaultdict(float)
    for (_, gap_start), (gap_end, _) in zip(intervals, intervals[1:]):
        where = next((name for a, b, name in phases if a <= gap_start < b), "outside")
        totals[where] += gap_end - gap_start
    return dict(totals)


def runtime_calls(trace: dict, top: int = 12) -> list[dict]:
    """The CUDA runtime / driver calls of the window by total host time (launches, graph launches,
    synchronizations, copies), the `top` longest, in µs."""
    table: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            table[str(e.get("name", "?"))][0] += float(e.get("dur", 0.0))
            table[str(e.get("name", "?"))][1] += 1
    ordered = sorted(table.items(), key=lambda item: -item[1][0])[:top]
    return [{"name": name, "us": us, "calls": count} for name, (us, count) in ordered]


def longest_gaps(trace: dict, top: int = 10, intervals: Optional[list] = None) -> list[dict]:
    """The `top` longest GPU idle gaps: µs, and the host ops running at their midpoint (outermost
    first): what the host was doing while the GPU waited."""
    intervals = _busy_intervals(trace) if intervals is None else intervals
    gaps = sorted(((b2 - a1, a1, b2) for (_, a1), (b2, _) in zip(intervals, intervals[1:])), reverse=True)[:top]
    host = [(float(e.get("ts", 0.0)), float(e.get("ts", 0.0)) + float(e.get("dur", 0.0)), str(e.get("name", "?")))
            for e in trace.get("traceEvents", [])
            if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime", "python_function")]
    out = []
    for length, start, end in gaps:
        middle = (start + end) / 2
        running = sorted((a, -b, name) for a, b, name in host if a <= middle < b)
        out.append({"us": length, "host": [name for _, _, name in running][:6]})
    return out


def host_phases(trace: dict) -> dict[str, float]:
    """Host µs spent in each `StepProfiler.phase` range ("megaq/forward", ...) of the window."""
    totals: dict[str, float] = collections.defaultdict(float)
    for e in trace.get("traceEvents", []):
        name = str(e.get("name", ""))
        if e.get("ph") == "X" and e.get("cat") == "user_annotation" and name.startswith(_PHASE_PREFIX):
            totals[name.removeprefix(_PHASE_PREFIX)] += float(e.get("dur", 0.0))
    return dict(totals)


def summarize(events: Iterable[tuple[str, float]], steps: int, top: int = 25) -> dict:
    """GPU microseconds per step by category and by kernel name (the `top` longest), with counts."""
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    by_category: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    by_kernel: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for name, us in events:
        for table, key in ((by_category, kernel_category(name)), (by_kernel, name)):
            table[key][0] += us
            table[key][1] += 1
    total = sum(us for us, _ in by_category.values())

    def rows(table: dict, limit: Optional[int]) -> list[dict]:
        ordered = sorted(table.items(), key=lambda item: -item[1][0])[:limit]
        return [{"name": key, "us_per_step": us / steps, "calls_per_step": count / steps,
                 "share": us / total if total else 0.0} for key, (us, count) in ordered]

    kernels = rows(by_kernel, top)
    for row in kernels:
        row["category"] = kernel_category(row["name"])
    return {"steps": steps, "gpu_us_per_step": total / steps, "categories": rows(by_category, None),
            "kernels": kernels}


def format_summary(summary: dict) -> str:
    lines = [f"GPU time per step over {summary['steps']} profiled step(s): "
             f"{summary['gpu_us_per_step'] / 1000:.1f} ms of kernels"
             + (f", {summary['wall_ms_per_step']:.1f} ms wall" if summary.get("wall_ms_per_step") else "")
             + (f", GPU idle {summary['gpu_idle_ms_per_step']:.1f} ms" if "gpu_idle_ms_per_step" in summary else ""),
             f"  {'category':<20} {'ms/step':>9} {'share':>7} {'calls':>8}"]
    for row in summary["categories"]:
        lines.append(f"  {row['name']:<20} {row['us_per_step'] / 1000:9.2f} {100 * row['share']:6.1f}% "
                     f"{row['calls_per_step']:8.0f}")
    return "\n".join(lines)


class StepProfiler:
    """Profiles optimizer steps `first`..`last` (1-based, inclusive) when enabled; a no-op otherwise.

    Call `step_begins(n)` before step n's first micro batch and `step_done(n)` after its update.
    """

    def __init__(self, steps: Optional[tuple[int, int]], directory: Optional[str], enabled: bool):
        self.first, self.last = steps if steps else (0, -1)
        self.enabled = bool(steps) and enabled
        self.directory = Path(os.path.expanduser(directory)) if directory else None
        if self.enabled and self.directory is None:
            raise ValueError("logging.profile_steps needs logging.profile_dir (where the trace goes)")
        self._profiler = None
        self._started_at = 0.0
        self.summary: Optional[dict] = None

    def step_begins(self, step: int) -> None:
        if not self.enabled or step != self.first or self._profiler is not None:
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.synchronize()   # the steps before must not spill into the window
        self._profiler = profile(activities=activities)
        self._profiler.__enter__()
        self._started_at = time.perf_counter()
        logger.info(f"profiling steps {self.first}-{self.last} (torch.profiler) into {self.directory}")

    def step_done(self, step: int) -> float:
        """Ends the window after its last step; returns the seconds spent writing (to leave out of throughput)."""
        if self._profiler is None or step != self.last:
            return 0.0
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._started_at
        t0 = time.perf_counter()
        self._profiler.__exit__(None, None, None)
        self.summary = self._write(self._profiler, wall)
        self._profiler = None
        logger.info(format_summary(self.summary))
        return time.perf_counter() - t0

    def phase(self, name: str):
        """A named range of the trace (forward, backward, optimizer) while the window is open; else nothing."""
        if self._profiler is None:
            return contextlib.nullcontext()
        import torch
        return torch.profiler.record_function(_PHASE_PREFIX + name)

    def close(self) -> None:
        """Stops a window that training left before its last step (an error, a stop signal), writing nothing."""
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self._profiler = None
            logger.warning(f"profiling stopped before step {self.last}: no trace written")

    def _write(self, prof, wall_seconds: float) -> dict:
        self.directory.mkdir(parents=True, exist_ok=True)
        tag = f"steps_{self.first}-{self.last}"
        steps = self.last - self.first + 1
        raw = self.directory / f".trace_{tag}.json"
        prof.export_chrome_trace(str(raw))
        with open(raw) as f:
            trace = json.load(f)
        summary = summarize(device_events(trace), steps)
        intervals = _busy_intervals(trace)
        busy, span = device_busy(trace, intervals)
        summary["gpu_busy_ms_per_step"] = busy / 1000.0 / steps
        summary["gpu_idle_ms_per_step"] = (span - busy) / 1000.0 / steps
        summary["runtime_calls"] = runtime_calls(trace)
        summary["host_ms_per_step"] = {name: us / 1000.0 / steps for name, us in host_phases(trace).items()}
        summary["longest_gaps"] = longest_gaps(trace, intervals=intervals)
        summary["gpu_idle_ms_by_phase"] = {name: us / 1000.0 / steps
                                           for name, us in idle_by_phase(trace, intervals).items()}
        summary["wall_ms_per_step"] = 1000.0 * wall_seconds / steps
        summary["profiled_steps"] = [self.first, self.last]
        final = self.directory / f"trace_{tag}.json.gz"
        with open(raw, "rb") as src, gzip.open(f"{final}.tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(f"{final}.tmp", final)
        raw.unlink()
        out = self.directory / f"kernels_{tag}.json"
        out.write_text(json.dumps(summary, indent=1) + "\n")
        summary["files"] = [str(final), str(out)]
        return summary
