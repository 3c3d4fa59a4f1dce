"""What the benchmark scripts record about the code they measured (imported from the tools/ directory).

`checkout_commit()` names the commit only when the directory holding these scripts is itself the top
of a git checkout. A copy of the tree unpacked inside another checkout (e.g. `git archive | tar -x`
into a scratch folder of a clone, as the GPU runs do) would otherwise report the enclosing clone's HEAD,
not the code that ran; there, and wherever git is missing, the commit comes from `MEGAQ_COMMIT` (set it
when making such a copy), else it is None.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def checkout_commit(root: Path = ROOT) -> str | None:
    """Short HEAD of the checkout at `root` (+dirty when tracked files differ from it); `MEGAQ_COMMIT`
    (or None) when `root` is not the top of a git checkout."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != Path(root).resolve():
        return os.environ.get("MEGAQ_COMMIT") or None
    head = _git(root, "rev-parse", "--short", "HEAD")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    return None if head is None else head + ("+dirty" if dirty else "")


def gpus() -> str | None:
    """nvidia-smi's name and driver of each GPU, one line each (None without nvidia-smi). Asks
    nvidia-smi rather than torch so that a parent process of the measured runs opens no CUDA context."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(root: Path = ROOT) -> dict:
    """Date (UTC), GPUs, commit and command line of this run, for a results file."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": gpus(), "commit": checkout_commit(root), "command": " ".join(sys.argv)}
