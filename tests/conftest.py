"""Shared test set-up: the `gpu` marker, and one small demo corpus for every training test.

`@pytest.mark.gpu` marks a test that needs a CUDA GPU; without one it is skipped (not failed), so
the suite runs on CI's CPU-only machines.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # a checkout that was not pip-installed
    sys.path.insert(0, str(REPO_ROOT))

# Console scripts of this Python environment first on PATH, as in an activated virtualenv: the
# deepspeed and torchrun launchers, and the `ninja` that DeepSpeed's JIT-compiled CPU communication
# op is built with (its build cache is keyed by the ninja version: mixing the system's ninja with
# the environment's would rebuild it, ~30 s, every time they alternate).
_ENV_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _ENV_BIN:
    os.environ["PATH"] = os.pathsep.join([_ENV_BIN, os.environ.get("PATH", "")])

# Big enough for a few hundred distinct 64-token samples and a validation split; small enough to
# build in a couple of seconds. Launch tests pass the same value so that the cache is reused.
DEMO_MAX_BYTES = 400_000


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped when none is available")
    config.addinivalue_line("markers", "slow: runs for a minute or more (deselect with -m 'not slow')")


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none available)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """A data.cache_dir holding the (size-capped) demo corpus, built once per test session."""
    from megaq.data import build_demo_corpus

    cache = tmp_path_factory.mktemp("megaq_cache")
    build_demo_corpus(cache / "demo", {"type": "byte", "model": None}, max_bytes=DEMO_MAX_BYTES)
    return cache


def tiny_config(cache_dir: Path, **sections) -> dict:
    """A tiny, fast CPU run on the shared demo corpus as a config dict; `sections` update it
    section by section, e.g. tiny_config(cache, train={"train_steps": 5}, zero_optimization={"stage": 2})."""
    cfg = {
        "model": {"preset": "tiny", "dropout": 0.0},
        "data": {"demo": True, "demo_max_bytes": DEMO_MAX_BYTES, "cache_dir": str(cache_dir),
                 "valid_fraction": 0.05},
        "quant": {"recipe": "bf16"},
        "parallel": {"tensor_parallel": 1},
        "train": {"train_steps": 6, "micro_batch_size": 4, "global_batch_size": 8, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 2, "seed": 1234},
        "checkpoint": {"dir": None},
        "logging": {"log_interval": 1},
        "zero_optimization": {"stage": 1},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(name), dict):
            cfg[name] = {**cfg[name], **copy.deepcopy(value)}
        else:
            cfg[name] = copy.deepcopy(value)
    return cfg


@pytest.fixture
def tiny_cfg(demo_cache):
    """Factory: tiny_cfg(**sections) -> config dict on the shared demo corpus (see tiny_config)."""
    return lambda **sections: tiny_config(demo_cache, **sections)


def subprocess_env(**extra: str) -> dict:
    """Environment for launching megaq in a child process: the checkout importable, one thread per
    process (CI has two cores), no GPU selection surprises."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def record_layernorm_backward_grads(monkeypatch) -> list:
    """Spy on the data-flow LayerNorm backward: the returned list collects the incoming gradient
    (tensor, or INT8 `QuantizedTensor`) of every call."""
    from megaq.kernels import dataflow as dataflow_kernels

    seen = []
    original = dataflow_kernels.layernorm_backward

    def spy(x_q, mean, rstd, weight, grad2d, grad_residual=None, **kw):
        seen.append(grad2d)
        return original(x_q, mean, rstd, weight, grad2d, grad_residual, **kw)
    monkeypatch.setattr(dataflow_kernels, "layernorm_backward", spy)
    return seen
