"""Graceful stop on SIGUSR1 / SIGTERM: finish the current step, save a checkpoint, exit.

A cluster scheduler warns a job before killing it (SLURM: `#SBATCH --signal=B:USR1@120` sends
SIGUSR1 to the batch shell 120 s before the time limit; the script forwards it to the tasks, or use
`--signal=USR1@120` to signal the tasks directly). The handler only records the signal; the
training loop checks at the end of every step, all ranks agree (any rank signalled = stop), and the
run saves and returns EXIT_RESUMABLE, so that the job script can requeue itself and the next run
resumes from that checkpoint (checkpoint.auto_resume).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

import torch

logger = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry". A run stopped by a
# signal after saving its checkpoint exits with it: nothing is wrong, start it again to continue.
EXIT_RESUMABLE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Records SIGUSR1 / SIGTERM while installed (a context manager; handlers restored on exit)."""

    def __init__(self, signals: tuple = STOP_SIGNALS) -> None:
        self.signals = signals
        self.signal_received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signal_received is None:
            logger.warning("received %s: stopping after this step (checkpoint, then exit %d)",
                           signal.Signals(signum).name, EXIT_RESUMABLE)
        self.signal_received = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not on the main thread: SIGUSR1/SIGTERM will not stop training gracefully")
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was signalled (a collective: all ranks must call it)."""
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.signal_received is not None else 0.0], device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
