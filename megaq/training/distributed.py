"""Who am I in the job: rank, world size, local rank and rendezvous address, from any launcher.

Sources, first match wins:
  1. torchrun / deepspeed / torch.distributed launchers: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
     MASTER_PORT (the deepspeed launcher also passes --local_rank, which it mirrors in LOCAL_RANK).
  2. SLURM, one task per GPU started by `srun`: SLURM_PROCID, SLURM_NTASKS (SLURM_STEP_NUM_TASKS
     inside a step), SLURM_LOCALID; the master is the first host of SLURM_JOB_NODELIST (via
     `scontrol show hostnames`, or our own parser of the compressed list); the port is MASTER_PORT
     or derived from SLURM_JOB_ID, so that every task agrees without talking.
  3. Open MPI (OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK) or MPICH / Intel MPI (PMI_RANK, PMI_SIZE,
     MPI_LOCALRANKID); MASTER_ADDR must then be exported by the job script.
  4. None of these: a single process (rank 0 of 1) on localhost, on a free port.

`init_distributed()` exports the result as the torch.distributed environment variables and starts
the process group through `deepspeed.init_distributed`: NCCL on GPUs, gloo on a CPU-only machine.
Setting MEGAQ_IGNORE_SLURM=1 skips source 2 (e.g. a single `python` run inside an salloc shell).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm", "mpi", "single" or "existing"
    local_world_size: int = 1  # processes on this node


_LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                    "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")


def local_world_size(env: Mapping[str, str], world_size: int) -> int:
    """Processes on this node, from whichever launcher variable is there (else the world size:
    when unsure, assume everything runs here)."""
    for name in _LOCAL_SIZE_VARS:
        value = env.get(name, "")
        match = re.match(r"\s*(\d+)", value)  # SLURM writes e.g. "4(x2)"
        if match and int(match.group(1)) > 0:
            return int(match.group(1))
    return max(1, world_size)


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """'gpu[001-003,007],login1' -> ['gpu001', 'gpu002', 'gpu003', 'gpu007', 'login1'].

    Handles zero-padded ranges and several bracket groups in one name ('r[1-2]n[3-4]').
    """
    hosts: list[str] = []
    # Split on commas outside brackets.
    parts, depth, current = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current:
        parts.append(current)
    for part in parts:
        hosts.extend(_expand_host_pattern(part))
    return hosts


def _expand_host_pattern(pattern: str) -> list[str]:
    match = re.search(r"\[([^\]]+)\]", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    out = []
    for item in match.group(1).split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            width = len(lo)
            for n in range(int(lo), int(hi) + 1):
                out.extend(_expand_host_pattern(f"{head}{n:0{width}d}{tail}"))
        else:
            out.extend(_expand_host_pattern(f"{head}{item}{tail}"))
    return out


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `scontrol show hostnames` when available, else our parser."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError) as e:
            logger.warning("scontrol show hostnames failed (%s); parsing SLURM_JOB_NODELIST myself", e)
    hosts = expand_slurm_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def discover(env: Optional[Mapping[str, str]] = None) -> DistributedEnv:
    """Work out this process's place in the job from the environment (no side effects except
    picking a free port for a single process)."""
    env = os.environ if env is None else env
    info = _discover(env)
    return dataclasses.replace(info, local_world_size=local_world_size(env, info.world_size))


def _discover(env: Mapping[str, str]) -> DistributedEnv:
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistributedEnv(
            rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT,
            source="torchrun")
    if "SLURM_PROCID" in env and env.get("MEGAQ_IGNORE_SLURM", "0") in ("", "0"):
        size_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        if size_var in env:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if "MASTER_ADDR" in env:
                master = env["MASTER_ADDR"]
            elif nodelist:
                master = first_slurm_host(nodelist)
            else:
                raise ValueError("SLURM job without SLURM_JOB_NODELIST: export MASTER_ADDR")
            if "MASTER_PORT" in env:
                port = _int(env, "MASTER_PORT")
            else:
                # Same on every task of the job, different between concurrent jobs on one node.
                port = 20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000
            return DistributedEnv(rank=_int(env, "SLURM_PROCID"), world_size=_int(env, size_var),
                                  local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                                  master_addr=master, master_port=port, source="slurm")
    for rank_var, size_var, local_var in (
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")):
        if rank_var in env and size_var in env:
            world = _int(env, size_var)
            if world > 1 and "MASTER_ADDR" not in env:
                raise ValueError(f"launched by MPI ({rank_var} is set) without MASTER_ADDR: export "
                                 f"MASTER_ADDR (the first host) and MASTER_PORT in the job script")
            return DistributedEnv(rank=_int(env, rank_var), world_size=world,
                                  local_rank=_int(env, local_var) if local_var in env else 0,
                                  master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                                  master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env
                                  else DEFAULT_MASTER_PORT, source="mpi")
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else _free_port()
    return DistributedEnv(rank=0, world_size=1, local_rank=0, master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                          master_port=port, source="single")


def device_type() -> str:
    """'cuda' when this process can use a GPU, else 'cpu'."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(timeout_minutes: float = 30.0) -> DistributedEnv:
    """Discover the job layout, export it, bind the GPU, and initialize torch.distributed.

    Safe to call when a process group already exists (tests, notebooks): it is reused as is.
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistributedEnv(rank=dist.get_rank(), world_size=dist.get_world_size(),
                              local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                              master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                              master_port=int(os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
                              source="existing",
                              local_world_size=local_world_size(os.environ, dist.get_world_size()))
    info = discover()
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"rank {info.rank} is outside the world size {info.world_size} ({info.source})")
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                      MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    if info.local_rank == 0:   # one look per node: its ranks share the build directory
        warn_stale_extension_locks()
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes),
                               rank=info.rank, world_size=info.world_size)
    return info


# A JIT build of a torch C++ extension (DeepSpeed builds its CPU shared-memory comm op in
# `deepspeed.init_distributed`) holds a `lock` file in its build directory; a process killed during
# the build leaves it, and every later build of that op waits for it forever, silently. Builds take
# seconds to minutes, so a lock older than this is almost surely left over.
STALE_EXTENSION_LOCK_SECONDS = 600


def warn_stale_extension_locks(root: str | None = None, now: float | None = None) -> list[str]:
    """Log a warning for each torch extension build lock under `root` (default: torch's extension
    build root, `TORCH_EXTENSIONS_DIR` or ~/.cache/torch_extensions) older than
    STALE_EXTENSION_LOCK_SECONDS, naming the file to delete; return their paths."""
    import glob
    import time

    if root is None:
        from torch.utils.cpp_extension import get_default_build_root
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    now = time.time() if now is None else now
    stale = []
    for path in sorted(glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock"))):
        try:
            age = now - os.path.getmtime(path)
        except OSError:   # removed meanwhile: a build finished
            continue
        if age > STALE_EXTENSION_LOCK_SECONDS:
            stale.append(path)
            logger.warning("torch extension build lock %s is %.0f min old: a build that was killed leaves it, "
                           "and the next build of that extension (DeepSpeed builds its CPU comm op in "
                           "init_distributed) waits for it forever. If no build is running, delete it.",
                           path, age / 60)
    return stale


def configure_cpu_threads(info: DistributedEnv) -> None:
    """On CPU, give each of the node's processes its share of the cores (unless OMP_NUM_THREADS
    says otherwise): several processes each spinning up one thread per core slow each other down
    by orders of magnitude."""
    import torch

    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, info.local_world_size)))


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
