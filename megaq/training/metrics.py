"""Throughput, model FLOPs utilization (MFU) and time-to-go.

MFU = (model FLOPs per token x tokens per second) / (number of GPUs x peak FLOP/s of one GPU).
The peak is the GPU's dense BF16 tensor-core figure whatever the recipe, so an INT8 run that beats
BF16 shows it as MFU above what BF16 could reach (INT8 tensor-core peaks are 2x these).
"""

from __future__ import annotations

import time
from typing import Optional

# Dense (no sparsity) BF16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets. Matched against
# torch.cuda.get_device_name() in order: the first pattern contained in the name wins, so the more
# specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),          # SXM5 (names like "NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
]


def peak_tflops(device_name: Optional[str]) -> Optional[float]:
    """Dense BF16 peak of a GPU by name, or None if unknown (or no GPU)."""
    if not device_name:
        return None
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern in device_name:
            return tflops
    return None


def current_device_peak_tflops() -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_tflops(torch.cuda.get_device_name())


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Throughput:
    """Tokens per second and MFU over the steps since the last report, and ETA from the mean time
    of the steps so far (the first step, which pays for start-up and warm-up, is left out)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, num_gpus: int,
                 peak_tflops_per_gpu: Optional[float], total_steps: int, start_step: int = 0,
                 clock=time.perf_counter) -> None:
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.num_gpus = num_gpus
        self.peak = peak_tflops_per_gpu * 1e12 if peak_tflops_per_gpu else None
        self.total_steps = total_steps
        self.clock = clock
        self._window_start = clock()
        self._window_steps = 0
        self._steady_start: Optional[float] = None
        self._steady_steps = 0
        self._step = start_step

    def step_done(self, step: int) -> None:
        now = self.clock()
        self._window_steps += 1
        if self._steady_start is None:
            self._steady_start = now  # measure from the end of the first step
        else:
            self._steady_steps += 1
        self._step = step

    def report(self) -> dict:
        """{'tokens_per_s', 'mfu' (fraction or None), 'step_time_s', 'eta_s'}; starts a new window."""
        now = self.clock()
        elapsed = now - self._window_start
        steps = self._window_steps
        tokens_per_s = steps * self.tokens_per_step / elapsed if elapsed > 0 and steps else 0.0
        mfu = None
        if self.peak and tokens_per_s:
            mfu = self.flops_per_token * tokens_per_s / (self.num_gpus * self.peak)
        step_time = elapsed / steps if steps else None
        if self._steady_steps and self._steady_start is not None:
            mean = (now - self._steady_start) / self._steady_steps
        else:
            mean = step_time
        eta = mean * (self.total_steps - self._step) if mean is not None else None
        self._window_start, self._window_steps = now, 0
        return {"tokens_per_s": tokens_per_s, "mfu": mfu, "step_time_s": step_time, "eta_s": eta}

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (evaluation, checkpointing) out of the throughput and ETA windows."""
        self._window_start += seconds
        if self._steady_start is not None:
            self._steady_start += seconds
