"""Checkpoints: atomic commit (a crash mid-save leaves the last good one loadable), keep_last,
RNG restore, refusal of another tensor-parallel layout, and skipping of corrupt checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from distributed_utils import run_distributed
from megaq.training.checkpoint import (LATEST_FILE, MANIFEST_FILE, STATE_FILE, CheckpointError, CheckpointManager,
                                       atomic_write_text, check_layout, find_latest, list_checkpoints,
                                       read_checkpoint, resolve_checkpoint)

LAYOUT = {"tensor_parallel": 1, "data_parallel": 2, "world_size": 2, "zero_stage": 1}


def _engine(seed: int):
    import deepspeed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _train_one_step(engine) -> None:
    x = torch.randn(2, 8)
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()


def _params(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


class _CrashBeforeCommit(CheckpointManager):
    """Dies after DeepSpeed and the RNG files are written, before the commit marker."""

    def _write_manifest(self, directory, manifest):
        raise RuntimeError("simulated crash mid-save")


def _save_crash_keep_last_and_reload(rank, world_size, root):
    import torch.distributed as dist

    root = Path(root)
    engine = _engine(seed=0)
    manager = CheckpointManager(root, keep_last=2, layout=LAYOUT, rank=rank)
    saved = {}
    for step in (1, 2, 3):
        _train_one_step(engine)
        manager.save(engine, step, {"consumed_samples": 4 * step})
        saved[step] = _params(engine)
    after_save_draw = torch.rand(3)  # what the RNG gives right after the step-3 save

    # A crash in the next save: DeepSpeed's files are on disk, the commit never happens.
    _train_one_step(engine)
    crashing = _CrashBeforeCommit(root, keep_last=2, layout=LAYOUT, rank=rank)
    crashed = False
    try:
        crashing.save(engine, 4, {"consumed_samples": 16})
    except RuntimeError:
        crashed = True
        dist.barrier()  # stand in for the final barrier of the save that died on this rank
    dist.barrier()

    # A fresh engine (different init) resumes from the last good checkpoint.
    fresh = _engine(seed=1)
    info = CheckpointManager(root, keep_last=2, layout=LAYOUT, rank=rank).latest()
    state = manager.load(fresh, info)
    loaded = _params(fresh)
    draw = torch.rand(3)
    return {"crashed": crashed, "step": info.step, "state": state, "draw_matches": torch.equal(draw, after_save_draw),
            "weights_match": all(torch.equal(a, b) for a, b in zip(loaded, saved[3])),
            "differs_from_step2": not all(torch.equal(a, b) for a, b in zip(loaded, saved[2]))}


def test_atomic_save_crash_keep_last_and_resume(tmp_path):
    results = run_distributed(_save_crash_keep_last_and_reload, 2, str(tmp_path), timeout=180)
    assert results[0]["crashed"] and not results[1]["crashed"]
    for r in results:
        assert r["step"] == 3 and r["state"]["consumed_samples"] == 12
        assert r["weights_match"] and r["differs_from_step2"]
        assert r["draw_matches"]  # every rank's RNG state came back
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    # keep_last=2 deleted step 1; the interrupted step-4 save is left as .tmp and never loaded.
    assert names == ["step_00000002", "step_00000003", "step_00000004.tmp"]
    assert (tmp_path / LATEST_FILE).read_text().strip() == "step_00000003"
    assert not (tmp_path / "step_00000004.tmp" / MANIFEST_FILE).exists()
    assert sorted(f.name for f in (tmp_path / "step_00000004.tmp").iterdir() if f.suffix == ".pt")  # DS wrote
    assert [c.step for c in list_checkpoints(tmp_path)] == [2, 3]
    committed = tmp_path / "step_00000003"
    assert {"megaq_rng_rank00000.pt", "megaq_rng_rank00001.pt", STATE_FILE, MANIFEST_FILE} <= {
        f.name for f in committed.iterdir()}
    state = json.loads((committed / STATE_FILE).read_text())
    assert state["layout"] == LAYOUT and state["step"] == 3


# ---------------------------------------------------------------------------------------------------
# No DeepSpeed needed: hand-made checkpoint directories


def _fake_checkpoint(root: Path, step: int, tensor_parallel: int = 1, zero_stage: int = 1,
                     data_parallel: int = 2, optimizer_group_params: int | None = None) -> Path:
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    layout = {"tensor_parallel": tensor_parallel, "data_parallel": data_parallel, "world_size": 2,
              "zero_stage": zero_stage}
    if optimizer_group_params is not None:
        layout["optimizer_group_params"] = optimizer_group_params
    atomic_write_text(path / STATE_FILE, json.dumps({"step": step, "consumed_samples": step, "layout": layout}))
    files = {f.name: f.stat().st_size for f in path.iterdir()}
    atomic_write_text(path / MANIFEST_FILE, json.dumps({"files": files}))
    return path


def test_tensor_parallel_mismatch_is_refused_naming_both_sizes(tmp_path):
    _fake_checkpoint(tmp_path, 5, tensor_parallel=2)
    info = find_latest(tmp_path)
    with pytest.raises(CheckpointError) as err:
        check_layout(info, {**LAYOUT, "tensor_parallel": 1})
    message = str(err.value)
    assert "tensor_parallel=2" in message and "parallel.tensor_parallel=1" in message
    manager = CheckpointManager(tmp_path, keep_last=2, layout={**LAYOUT, "tensor_parallel": 1}, rank=0,
                                barrier=lambda: None)
    with pytest.raises(CheckpointError, match="tensor_parallel=2"):
        manager.load(engine=None, info=info)  # refused before DeepSpeed is touched
    check_layout(info, {**LAYOUT, "tensor_parallel": 2})  # the matching layout is fine


def test_zero_data_parallel_change_is_refused(tmp_path):
    info = read_checkpoint(_fake_checkpoint(tmp_path, 1, zero_stage=2, data_parallel=2))
    with pytest.raises(CheckpointError, match="data-parallel size 2"):
        check_layout(info, {**LAYOUT, "zero_stage": 2, "data_parallel": 4})
    with pytest.raises(CheckpointError, match="zero_optimization.stage=2"):
        check_layout(info, {**LAYOUT, "zero_stage": 3})


def test_optimizer_group_change_is_refused_naming_the_setting(tmp_path):
    """The optimizer state is stored per parameter group: another train.optimizer_group_params cannot
    load it. A checkpoint from before the setting existed counts as 0 (the two unsplit groups)."""
    info = read_checkpoint(_fake_checkpoint(tmp_path, 1, optimizer_group_params=2 ** 26))
    with pytest.raises(CheckpointError, match=r"optimizer_group_params=67108864, this run uses 0.*"
                                              r"--override train.optimizer_group_params=67108864"):
        check_layout(info, {**LAYOUT, "optimizer_group_params": 0})
    check_layout(info, {**LAYOUT, "optimizer_group_params": 2 ** 26})
    old = read_checkpoint(_fake_checkpoint(tmp_path / "old", 1))      # no such key in its layout
    check_layout(old, {**LAYOUT, "optimizer_group_params": 0})
    with pytest.raises(CheckpointError, match="optimizer_group_params=0, this run uses 1024"):
        check_layout(old, {**LAYOUT, "optimizer_group_params": 1024})


def test_incomplete_and_corrupt_checkpoints_are_skipped(tmp_path):
    _fake_checkpoint(tmp_path, 1)
    good = _fake_checkpoint(tmp_path, 2)
    corrupt = _fake_checkpoint(tmp_path, 3)
    (corrupt / "mp_rank_00_model_states.pt").write_bytes(b"short")  # size no longer matches the manifest
    unfinished = _fake_checkpoint(tmp_path, 4)
    (unfinished / MANIFEST_FILE).unlink()
    (tmp_path / "step_00000005.tmp").mkdir()
    atomic_write_text(tmp_path / LATEST_FILE, "step_00000004\n")  # points at the unfinished one
    info = find_latest(tmp_path)
    assert info.path == good and info.step == 2
    assert resolve_checkpoint(tmp_path).path == good
    assert resolve_checkpoint(good).step == 2
    with pytest.raises(CheckpointError, match="not complete"):
        resolve_checkpoint(unfinished)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "elsewhere")


def test_save_without_directory_is_an_error():
    manager = CheckpointManager(None, keep_last=1, layout=LAYOUT, rank=0, barrier=lambda: None)
    assert manager.latest() is None
    with pytest.raises(CheckpointError, match="checkpoint.dir"):
        manager.save(engine=None, step=1, state={})


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "latest"
    atomic_write_text(target, "a\n")
    atomic_write_text(target, "b\n")
    assert target.read_text() == "b\n"
    assert os.listdir(tmp_path) == ["latest"]
