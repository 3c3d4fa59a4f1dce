"""Atomic, resumable checkpoints: DeepSpeed's engine state plus megaq's own.

Layout of `checkpoint.dir` (a file system all ranks share):

    latest                      name of the newest committed checkpoint (DeepSpeed's convention,
                                so DeepSpeed's loaders and zero_to_fp32 read the directory as is)
    step_00000100/              one committed checkpoint
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   DeepSpeed's files
        megaq_rng_rank00000.pt  RNG states of global rank 0 (python, numpy, torch CPU/CUDA, TP stream)
        megaq_delayed_rank00000.pt  global rank 0's delayed-scaling predictions (megaq.ops.delayed_scaling),
                                where the recipe has them
        megaq_state.json        step, consumed samples, parallel layout, the run's configuration
        megaq_complete.json     manifest (every file and its size), written last: the commit marker
    step_00000200.tmp/          a save in progress (or one a crash interrupted): never loaded

A save writes everything into `<tag>.tmp`, waits for all ranks, writes the manifest, renames the
directory to `<tag>` and then replaces `latest` atomically (write a temporary file, os.replace).
A crash at any point leaves either the previous checkpoint as the newest complete one, or the new
one fully committed. Loading takes `latest` when it names a complete checkpoint and otherwise the
complete checkpoint with the highest step; `.tmp` directories and checkpoints whose manifest
does not match the files on disk are skipped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from megaq.ops import delayed_scaling

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST_FILE = "latest"
STATE_FILE = "megaq_state.json"
MANIFEST_FILE = "megaq_complete.json"
TMP_SUFFIX = ".tmp"
_TAG_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, incomplete, or written with another parallel layout."""


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def rng_file_name(rank: int) -> str:
    return f"megaq_rng_rank{rank:05d}.pt"


def delayed_file_name(rank: int) -> str:
    return f"megaq_delayed_rank{rank:05d}.pt"


# ---------------------------------------------------------------------------------------------------
# RNG state of one process


def capture_rng_state() -> dict[str, Any]:
    from megaq.parallel import get_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch_cpu": torch.get_rng_state(),
             "tp_tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    from megaq.parallel import get_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    if state.get("tp_tracker"):
        get_rng_tracker().set_states(state["tp_tracker"])


# ---------------------------------------------------------------------------------------------------
# Small atomic file helpers


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# Finding checkpoints


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path          # the checkpoint's own directory (<dir>/<tag>)
    tag: str
    step: int
    state: dict         # contents of megaq_state.json

    @property
    def root(self) -> Path:
        return self.path.parent


def _manifest_problem(path: Path) -> Optional[str]:
    """Why `path` is not a complete checkpoint, or None if it is."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return "no commit marker (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable commit marker ({e})"
    for name, size in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"file {name} listed in the manifest is missing"
        if f.stat().st_size != size:
            return f"file {name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def read_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Describe the complete checkpoint in directory `path`; CheckpointError if it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    problem = _manifest_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is not complete: {problem}")
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_FILE}: {e}") from None
    return CheckpointInfo(path=path, tag=path.name, step=int(state["step"]), state=state)


def list_checkpoints(directory: str | os.PathLike) -> list[CheckpointInfo]:
    """Complete checkpoints in `directory`, oldest first. Incomplete ones are skipped (with a log line)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        if not child.is_dir() or not _TAG_RE.match(child.name):
            continue
        try:
            found.append(read_checkpoint(child))
        except CheckpointError as e:
            logger.warning("skipping %s", e)
    return sorted(found, key=lambda info: info.step)


def find_latest(directory: str | os.PathLike) -> Optional[CheckpointInfo]:
    """The checkpoint to resume from in `directory`: the one `latest` names if it is complete,
    else the complete one with the highest step; None if there is none."""
    directory = Path(directory)
    latest_file = directory / LATEST_FILE
    if latest_file.is_file():
        tag = latest_file.read_text(encoding="utf-8").strip()
        try:
            return read_checkpoint(directory / tag)
        except CheckpointError as e:
            logger.warning("'latest' in %s names %r, which is unusable (%s); looking for the newest "
                           "complete checkpoint", directory, tag, e)
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """`path` is either one checkpoint's directory or a directory of checkpoints."""
    path = Path(path)
    if (path / MANIFEST_FILE).exists() or (path / STATE_FILE).exists():
        return read_checkpoint(path)
    info = find_latest(path)
    if info is None:
        raise CheckpointError(f"no complete checkpoint in {path}")
    return info


def check_layout(info: CheckpointInfo, layout: dict) -> None:
    """Refuse a checkpoint whose parallel layout this run cannot load."""
    saved = info.state.get("layout", {})
    tp_saved, tp_now = saved.get("tensor_parallel"), layout.get("tensor_parallel")
    if tp_saved != tp_now:
        raise CheckpointError(
            f"checkpoint {info.path} was written with tensor_parallel={tp_saved}, but this run uses "
            f"parallel.tensor_parallel={tp_now}; the weight shards do not match. Run with "
            f"--override parallel.tensor_parallel={tp_saved}, or export the checkpoint with "
            f"tools/export_hf.py (which merges the shards) and start from that")
    zero_saved, zero_now = saved.get("zero_stage", 0), layout.get("zero_stage", 0)
    dp_saved, dp_now = saved.get("data_parallel"), layout.get("data_parallel")
    if (zero_saved or zero_now) and dp_saved != dp_now:
        raise CheckpointError(
            f"checkpoint {info.path} was written with data-parallel size {dp_saved} and ZeRO stage {zero_saved}; "
            f"this run has data-parallel size {dp_now}. ZeRO partitions the optimizer state per data-parallel "
            f"rank: launch {dp_saved * layout.get('tensor_parallel', 1)} processes to resume")
    if zero_saved != zero_now:
        raise CheckpointError(
            f"checkpoint {info.path} was written with zero_optimization.stage={zero_saved}, this run uses "
            f"stage {zero_now}; resume with the same stage")
    # the optimizer state is saved per parameter group (ZeRO: one flat partition per group); checkpoints
    # from before the setting existed have the two unsplit groups
    groups_saved, groups_now = saved.get("optimizer_group_params", 0), layout.get("optimizer_group_params", 0)
    if groups_saved != groups_now:
        raise CheckpointError(
            f"checkpoint {info.path} was written with train.optimizer_group_params={groups_saved}, this run uses "
            f"{groups_now}; the optimizer state is stored per parameter group. Resume with "
            f"--override train.optimizer_group_params={groups_saved}")


# ---------------------------------------------------------------------------------------------------
# Saving and loading


def _default_barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves and loads checkpoints of one run. Every rank makes the same calls.

    `layout` describes the parallel layout (tensor_parallel, data_parallel, world_size, zero_stage)
    and is stored with each checkpoint and compared on load.
    """

    def __init__(self, directory: str | os.PathLike | None, keep_last: int, layout: dict, rank: int,
                 barrier: Callable[[], None] = _default_barrier) -> None:
        self.directory = Path(os.path.expanduser(directory)) if directory is not None else None
        self.keep_last = keep_last
        self.layout = dict(layout)
        self.rank = rank
        self.barrier = barrier

    # -- saving -------------------------------------------------------------------------------------

    def save(self, engine, step: int, state: dict) -> Path:
        """Commit a checkpoint of `engine` at `step`; `state` (JSON-able) goes into megaq_state.json."""
        if self.directory is None:
            raise CheckpointError("checkpoint.dir is not set; nowhere to save")
        tag = tag_for_step(step)
        final = self.directory / tag
        tmp = self.directory / f"{tag}{TMP_SUFFIX}"
        if (final / MANIFEST_FILE).is_file():
            # Same step, same weights (nothing trained since): the committed one stands.
            logger.info("checkpoint %s already exists; not saving again", final)
            self.barrier()
            return final
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in (tmp, final):  # leftovers of an interrupted save of this same step
                if stale.exists():
                    shutil.rmtree(stale)
        self.barrier()

        start = time.perf_counter()
        engine.save_checkpoint(str(self.directory), tag=tmp.name, save_latest=False)
        _atomic_torch_save(capture_rng_state(), tmp / rng_file_name(self.rank))
        predictions = delayed_scaling.state_dict(engine.module)
        if predictions:
            _atomic_torch_save(predictions, tmp / delayed_file_name(self.rank))
        self.barrier()  # every rank's files are on disk

        if self.rank == 0:
            full_state = {"format": FORMAT_VERSION, "step": step, "tag": tag, "layout": self.layout,
                          "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **_versions(), **state}
            atomic_write_text(tmp / STATE_FILE, json.dumps(full_state, indent=1, sort_keys=True) + "\n")
            self._commit(tmp, final, tag)
            self._prune(step)
        self.barrier()  # nobody moves on (or exits) before the commit
        logger.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - start)
        return final

    def _commit(self, tmp: Path, final: Path, tag: str) -> None:
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        self._write_manifest(tmp, {"format": FORMAT_VERSION, "tag": tag, "files": files})
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        atomic_write_text(self.directory / LATEST_FILE, tag + "\n")

    @staticmethod
    def _write_manifest(directory: Path, manifest: dict) -> None:
        atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True) + "\n")

    def _prune(self, newest_step: int) -> None:
        """Delete checkpoints beyond keep_last, and interrupted saves older than the newest commit."""
        for child in self.directory.iterdir():
            if child.is_dir() and child.name.endswith(TMP_SUFFIX):
                m = _TAG_RE.match(child.name[:-len(TMP_SUFFIX)])
                if m and int(m.group(1)) < newest_step:
                    shutil.rmtree(child, ignore_errors=True)
        if self.keep_last <= 0:
            return
        for old in list_checkpoints(self.directory)[:-self.keep_last]:
            # Marker first: a deletion cut short must not leave something that looks complete.
            (old.path / MANIFEST_FILE).unlink(missing_ok=True)
            shutil.rmtree(old.path, ignore_errors=True)
            logger.info("deleted old checkpoint %s (checkpoint.keep_last=%d)", old.path, self.keep_last)

    # -- loading ------------------------------------------------------------------------------------

    def latest(self) -> Optional[CheckpointInfo]:
        return find_latest(self.directory) if self.directory is not None else None

    def load(self, engine, info: CheckpointInfo) -> dict:
        """Restore `engine` (weights, optimizer, LR schedule) and this rank's RNG state from `info`.
        Returns the saved megaq state (step, consumed_samples, ...)."""
        check_layout(info, self.layout)
        load_path, _ = engine.load_checkpoint(str(info.root), tag=info.tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {info.path}")
        same_world = info.state.get("layout", {}).get("world_size") == self.layout.get("world_size")
        rng_path = info.path / rng_file_name(self.rank)
        if same_world and rng_path.is_file():
            restore_rng_state(torch.load(rng_path, map_location="cpu", weights_only=False))
        else:
            logger.warning("checkpoint %s has no RNG state for rank %d of this world size; random "
                           "streams start fresh", info.path, self.rank)
        delayed_path = info.path / delayed_file_name(self.rank)
        if same_world and delayed_path.is_file():
            try:
                delayed_scaling.load_state_dict(engine.module, torch.load(delayed_path, map_location="cpu",
                                                                          weights_only=True))
            except ValueError as e:
                raise CheckpointError(f"checkpoint {info.path}: {e}") from None
        return info.state


def _versions() -> dict:
    import megaq

    out = {"megaq_version": getattr(megaq, "__version__", "unknown"), "torch_version": torch.__version__}
    try:
        import deepspeed
        out["deepspeed_version"] = deepspeed.__version__
    except Exception:
        pass
    return out
