"""Run a test file's `test_interp_*` tests in a child pytest under the Triton interpreter.

`TRITON_INTERPRET=1` must be set before triton is imported, so the CPU runs of the Triton kernels
happen in a fresh process (`MEGAQ_KERNELS=triton`); `child_flag` is the environment variable the
file reads to know it is that child."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_interpreter_child(test_file: str, child_flag: str, timeout: int = 900) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", MEGAQ_KERNELS="triton", **{child_flag: "1"})
    env.pop("CUDA_VISIBLE_DEVICES", None)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           str(Path(test_file).resolve()), "-k", "test_interp_"],
                          env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    last = proc.stdout.splitlines()[-1]
    assert " passed" in proc.stdout and "skipped" not in last, proc.stdout[-2000:]
