"""Rank-0 reporting: one console line per log interval and the same numbers as TensorBoard scalars.

Scalars: train/loss, train/lr, train/grad_norm, perf/tokens_per_s, perf/mfu, perf/step_time_s,
perf/peak_memory_gib and perf/peak_reserved_gib (megaq.training.memory: with CUDA graphs only the
reserved peak sees the activations), perf/memory_* (one step's memory by phase), val/loss, val/ppl, and
quant_error/<layer> (see megaq.training.quant_error). The same scalars can go
to a JSON-lines file (`logging.metrics_file`, appended to, so a resumed run continues it) for scripts
and plots. Other ranks get a no-op reporter, so the loop calls it unconditionally.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Optional

from megaq.training.memory import peak_memory_gib, peak_reserved_gib
from megaq.training.metrics import format_duration

logger = logging.getLogger("megaq.training")


def setup_console_logging(rank: int) -> None:
    """megaq's INFO lines on rank 0's stdout; other ranks print warnings and errors only."""
    root = logging.getLogger("megaq")
    if not any(getattr(h, "_megaq", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[megaq %(asctime)s] %(message)s", "%H:%M:%S"))
        handler._megaq = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


class ProgressReporter:
    def __init__(self, total_steps: int, tensorboard_dir: Optional[str], enabled: bool,
                 metrics_file: Optional[str] = None) -> None:
        self.total_steps = total_steps
        self.enabled = enabled
        self.writer = None
        self.metrics = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=os.path.expanduser(tensorboard_dir))
        if enabled and metrics_file:
            path = os.path.expanduser(metrics_file)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.metrics = open(path, "a", buffering=1)  # line-buffered: a crash loses no line

    def train_step(self, step: int, loss: float, lr: float, grad_norm: Optional[float], perf: dict) -> None:
        if not self.enabled:
            return
        width = len(str(self.total_steps))
        parts = [f"step {step:>{width}}/{self.total_steps}", f"loss {loss:.4f}", f"lr {lr:.3e}",
                 f"grad norm {grad_norm:.3f}" if grad_norm is not None else "grad norm n/a",
                 f"{perf['tokens_per_s']:,.0f} tok/s",
                 f"MFU {100 * perf['mfu']:.1f}%" if perf.get("mfu") is not None else "MFU n/a",
                 f"ETA {format_duration(perf.get('eta_s'))}"]
        logger.info(" | ".join(parts))
        scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                   "perf/tokens_per_s": perf["tokens_per_s"], "perf/mfu": perf.get("mfu"),
                   "perf/step_time_s": perf.get("step_time_s"),
                   "perf/peak_memory_gib": peak_memory_gib(), "perf/peak_reserved_gib": peak_reserved_gib()}
        self.scalars(scalars, step)

    def evaluation(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        ppl = math.exp(loss) if loss < 700 else float("inf")
        logger.info(f"step {step}: validation loss {loss:.4f} | perplexity {ppl:.2f}")
        self.scalars({"val/loss": loss, "val/ppl": ppl}, step)

    def quant_errors(self, step: int, errors: dict[str, float]) -> None:
        if not self.enabled or not errors:
            return
        worst = max(errors, key=errors.get)
        mean = sum(errors.values()) / len(errors)
        logger.info(f"step {step}: quantization error (relative, forward GEMM) mean {mean:.4f}, "
                    f"max {errors[worst]:.4f} in {worst}")
        self.scalars({f"quant_error/{name}": value for name, value in errors.items()}, step)

    def scalars(self, values: dict[str, Optional[float]], step: int) -> None:
        finite = {name: value for name, value in values.items() if value is not None and math.isfinite(value)}
        if self.metrics is not None:
            self.metrics.write(json.dumps({"step": step, **finite}) + "\n")
        if self.writer is None:
            return
        for name, value in finite.items():
            self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
