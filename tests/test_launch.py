"""launch/pretrain_gpt.py as a user runs it, on a CPU-only machine: the README's main command under
the deepspeed launcher, plain python (stopped by SIGUSR1, resumed, exported), torchrun with two
processes, and bad configurations failing at start-up."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import DEMO_MAX_BYTES, REPO_ROOT, subprocess_env

LAUNCH = str(REPO_ROOT / "launch" / "pretrain_gpt.py")
TIMEOUT = 240


def _tool(name: str) -> str:
    """A console script of this Python environment (deepspeed, torchrun)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_overrides(demo_cache: Path) -> list[str]:
    return ["--override", f"data.cache_dir={demo_cache}", "--override", f"data.demo_max_bytes={DEMO_MAX_BYTES}"]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=subprocess_env(PYTHONUNBUFFERED="1"), capture_output=True, text=True,
                            timeout=TIMEOUT)
    if result.returncode not in (0, 2, 75):
        print(result.stdout[-5000:], result.stderr[-5000:])
    return result


def _assert_checkpoint(directory: Path, step: int, ranks: int = 1) -> None:
    tag = f"step_{step:08d}"
    assert (directory / "latest").read_text().strip() == tag
    files = {f.name for f in (directory / tag).iterdir()}
    assert "megaq_complete.json" in files and "megaq_state.json" in files
    assert {f"megaq_rng_rank{r:05d}.pt" for r in range(ranks)} <= files


def test_readme_main_command_with_tiny_preset(tmp_path, demo_cache):
    """`deepspeed launch/pretrain_gpt.py --config configs/gpt2_int8.json`, shrunk with overrides,
    trains on the CPU and writes a checkpoint and TensorBoard event files."""
    cmd = [_tool("deepspeed"), "--master_port", str(_free_port()), LAUNCH,
           "--config", str(REPO_ROOT / "configs" / "gpt2_int8.json"),
           "--override", "model.preset=tiny", "--override", "train.train_steps=2",
           "--override", "train.global_batch_size=8", "--override", "train.micro_batch_size=4",
           "--override", "train.eval_interval=2", "--override", "train.eval_iters=2",
           *_data_overrides(demo_cache)]
    result = _run(cmd, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "recipe int8" in out and "on cpu" in out and "step 2/2" in out and "validation loss" in out
    _assert_checkpoint(tmp_path / "runs" / "gpt2_int8" / "checkpoints", 2)
    assert list((tmp_path / "runs" / "gpt2_int8" / "tensorboard").glob("events.out.tfevents.*"))


def test_python_run_stops_on_sigusr1_resumes_and_exports(tmp_path, demo_cache):
    """Plain `python`: SIGUSR1 -> checkpoint at the end of the step, exit 75; the same command
    again resumes from it; tools/export_hf.py turns the result into a Hugging Face directory."""
    base = [sys.executable, LAUNCH, "--config", str(REPO_ROOT / "configs" / "tiny_cpu.json"),
            "--override", "quant.recipe=bf16", "--override", "logging.log_interval=1",
            "--override", "train.eval_interval=0", *_data_overrides(demo_cache)]
    proc = subprocess.Popen(base + ["--override", "train.train_steps=100000"], cwd=tmp_path,
                            env=subprocess_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killer = threading.Timer(TIMEOUT, proc.kill)
    killer.start()
    lines, signalled = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if not signalled and re.search(r"step +3/100000 \|", line):
                proc.send_signal(signal.SIGUSR1)
                signalled = True
        returncode = proc.wait()
    finally:
        killer.cancel()
    output = "".join(lines)
    assert returncode == 75, output[-3000:]
    stopped = int(re.search(r"stopped at step (\d+) by a signal", output).group(1))
    assert stopped >= 3
    checkpoints = tmp_path / "runs" / "tiny_cpu" / "checkpoints"
    _assert_checkpoint(checkpoints, stopped)

    resumed = _run(base + ["--override", f"train.train_steps={stopped + 2}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {Path('runs/tiny_cpu/checkpoints') / f'step_{stopped:08d}'}" in resumed.stdout
    assert f"step {stopped + 2}/{stopped + 2}" in resumed.stdout
    _assert_checkpoint(checkpoints, stopped + 2)

    exported = _run([sys.executable, str(REPO_ROOT / "tools" / "export_hf.py"), str(checkpoints),
                     str(tmp_path / "hf")], tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["n_layer"], config["n_embd"], config["vocab_size"]) == ("gpt2", 2, 64, 257)
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size > 100_000


def test_torchrun_two_processes(tmp_path, demo_cache):
    cmd = [_tool("torchrun"), "--standalone", "--nproc_per_node", "2", LAUNCH,
           "--config", str(REPO_ROOT / "configs" / "tiny_cpu.json"), "--override", "train.train_steps=3",
           "--override", "zero_optimization.stage=2", "--override", "train.eval_interval=3",
           *_data_overrides(demo_cache)]
    result = _run(cmd, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world 2 = TP 1 x DP 2 | ZeRO stage 2" in result.stdout and "step 3/3" in result.stdout
    _assert_checkpoint(tmp_path / "runs" / "tiny_cpu" / "checkpoints", 3, ranks=2)


@pytest.mark.parametrize("override, named", [
    ("train.lerning_rate=1e-3", "train.lerning_rate"),
    ("data.path=/nonexistent/corpus", "data.path"),
    ("parallel.tensor_parallel=4", "parallel.tensor_parallel"),
])
def test_bad_config_fails_at_startup_naming_the_key(tmp_path, override, named):
    result = _run([sys.executable, LAUNCH, "--config", str(REPO_ROOT / "configs" / "tiny_cpu.json"),
                   "--override", override], tmp_path)
    assert result.returncode == 2
    assert "configuration error" in result.stderr and named in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # nothing started
