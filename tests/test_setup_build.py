"""setup.py's extension switch (MEGAQ_BUILD_EXT) and the csrc/ layout rules, on a CPU-only machine.

The real install (`pip install -e .` in a fresh virtualenv) is what .ci/run does; the nvcc compile
check of csrc/ is .ci/check_cuda.sh. These tests only run `setup.py --version`, which evaluates the
extension decision without compiling anything.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CPU_TORCH = torch.version.cuda is None


def _setup(mode: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MEGAQ_BUILD_EXT", None)
    if mode is not None:
        env["MEGAQ_BUILD_EXT"] = mode
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_build_ext_off_installs_pure_python():
    res = _setup("0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == __import__("megaq").__version__
    assert "MEGAQ_BUILD_EXT=0" in res.stderr


@pytest.mark.skipif(not CPU_TORCH, reason="checks the behaviour with a CPU build of torch")
def test_build_ext_auto_skips_with_reason_on_cpu_torch():
    res = _setup(None)
    assert res.returncode == 0, res.stderr
    assert "not building the CUDA extension megaq._C" in res.stderr
    assert "not a CUDA build" in res.stderr


@pytest.mark.skipif(not CPU_TORCH, reason="checks the behaviour with a CPU build of torch")
def test_build_ext_forced_fails_loudly_on_cpu_torch():
    res = _setup("1")
    assert res.returncode != 0
    assert "MEGAQ_BUILD_EXT=1 but megaq._C cannot be built" in res.stderr
    assert "not a CUDA build" in res.stderr


def test_build_ext_rejects_unknown_values():
    res = _setup("maybe")
    assert res.returncode != 0
    assert "MEGAQ_BUILD_EXT='maybe'" in res.stderr


def test_cuda_sources_keep_pytorch_headers_out():
    """DESIGN.md: .cu files take raw pointers, sizes and a stream; torch stays in the .cpp binding."""
    cu_files = sorted((ROOT / "csrc").rglob("*.cu")) + sorted((ROOT / "csrc").rglob("*.cuh"))
    assert cu_files, "no CUDA sources under csrc/"
    pattern = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|pybind11)/', re.M)
    offenders = [str(p.relative_to(ROOT)) for p in cu_files if pattern.search(p.read_text())]
    assert not offenders, f"PyTorch/pybind11 headers included in kernel sources: {offenders}"
