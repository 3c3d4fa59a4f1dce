"""Run a function on N processes joined by a gloo process group (CPU-only distributed tests).

    from distributed_utils import run_distributed

    def check(rank, world_size, scale):          # module-level, so the children can import it
        x = torch.full((2,), float(rank) * scale)
        torch.distributed.all_reduce(x)
        return x                                  # anything torch.save can write

    results = run_distributed(check, 2, 3.0)      # [result of rank 0, result of rank 1]

Each child sets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK, uses one CPU thread (CI has
two cores), initializes the default gloo group, calls ``fn(rank, world_size, *args)``, waits for
the other ranks and destroys the group. If a child raises, ``run_distributed`` raises with the child's traceback; if
the run exceeds ``timeout`` seconds (a deadlocked collective), the children are killed and it
raises ``TimeoutError``.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, result_dir: str, timeout: float,
           fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
        # every rank past its last collective before any closes its gloo connections: a rank that
        # destroyed the group while a peer still finished a collective made that peer abort at exit
        # ("terminate called without an active exception", SIGABRT; seen in CI on
        # test_optimizer_groups_split_by_size_train_exactly_like_two_groups). Only on success: a
        # failed rank would leave the others waiting here.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any,
                    timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return the list of
    their return values, in rank order. ``fn`` and ``args`` must be picklable."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="megaq_dist_") as result_dir:
        context = mp.start_processes(
            _child, args=(world_size, find_free_port(), result_dir, timeout, fn, args),
            nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        # join() returns True once all children exited cleanly, and raises (with the child's
        # traceback) as soon as one fails, after terminating the others.
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world_size} processes did "
                                   f"not finish within {timeout} s")
        return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]


def require_contiguous_collectives(*modules) -> None:
    """Make gloo as strict as NCCL, which rejects non-contiguous tensors (gloo accepts them), so
    that CPU runs catch what would fail on GPUs. Wraps torch.distributed's collectives and each
    module's private `_all_gather_single` / `_reduce_scatter_single`. Call inside the workers."""

    def strict(collective):
        def wrapper(*args, **kwargs):
            for t in args:
                for x in (t if isinstance(t, (list, tuple)) else [t]):
                    if isinstance(x, torch.Tensor) and not x.is_contiguous():
                        raise ValueError(f"{getattr(collective, '__name__', collective)}: tensor of "
                                         f"shape {tuple(x.shape)} is not contiguous (NCCL rejects it)")
            return collective(*args, **kwargs)
        return wrapper

    for name in ("all_reduce", "all_to_all_single", "all_gather", "all_gather_single",
                 "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor"):
        if hasattr(dist, name):
            setattr(dist, name, strict(getattr(dist, name)))
    for module in modules:
        for name in ("_all_gather_single", "_reduce_scatter_single"):
            if hasattr(module, name):
                setattr(module, name, strict(getattr(module, name)))
