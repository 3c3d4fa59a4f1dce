"""CUDA-event timing shared by the benchmark scripts (imported from the tools/ directory they run in)."""

from __future__ import annotations

import statistics

import torch


def event_times(fn, iters: int, warmup: int = 0, queue_ahead: bool = False) -> list[float]:
    """Milliseconds of `iters` calls of `fn`, each between two CUDA events and synchronized, after
    `warmup` untimed calls. `queue_ahead`: put ~1 ms of GPU work (`torch.cuda._sleep`) before each
    call, so the host has enqueued the call's launches before the GPU reaches them and the events
    measure kernel time only."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if queue_ahead:
            torch.cuda._sleep(2_000_000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def kernel_ms(fn, iters: int, warmup: int = 0) -> float:
    """Median milliseconds of one call's kernels: `event_times` with every call queued behind ~1 ms of
    GPU work, so that the host's launch time is not in it."""
    return statistics.median(event_times(fn, iters, warmup, queue_ahead=True))
