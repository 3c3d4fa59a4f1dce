"""Loss curves from megaq metrics files (logging.metrics_file, JSON lines) as one PNG, and a summary.

    python tools/plot_curves.py runs/shakespeare/shakespeare_{bf16,int8,int4}.jsonl [--out curves.png]

A file that holds several runs (appended to after a restart from scratch) is cut to its last run:
the rows after the last point where the step number went backwards.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def last_run(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    start, last_step = 0, -1
    for i, row in enumerate(rows):
        if "train/loss" in row:
            if row["step"] < last_step:
                start = i
            last_step = row["step"]
    return rows[start:]


def summarize(rows: list[dict]) -> dict:
    val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    best = min(val, key=lambda v: v[1]) if val else (None, None)
    return {"best_val_loss": best[1], "best_step": best[0], "last_val_loss": val[-1][1] if val else None,
            "last_step": max((r["step"] for r in rows), default=0), "evaluations": len(val)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="PNG to write (without it: the table only)")
    ap.add_argument("--title", default="")
    args = ap.parse_args()

    runs = {path.stem.split("_")[-1]: last_run(path) for path in args.metrics}
    summaries = {name: summarize(rows) for name, rows in runs.items()}
    bf16_best = summaries.get("bf16", {}).get("best_val_loss")
    print("| run | best validation loss (step) | last validation loss (step) | best vs bf16 |\n|---|---|---|---|")
    for name, s in summaries.items():
        if s["evaluations"]:
            last_val_step = [r["step"] for r in runs[name] if "val/loss" in r][-1]
            ratio = f"{100 * (s['best_val_loss'] / bf16_best - 1):+.2f}%" if bf16_best else "-"
            print(f"| {name} | {s['best_val_loss']:.4f} ({s['best_step']}) | "
                  f"{s['last_val_loss']:.4f} ({last_val_step}) | {ratio} |")
        else:
            print(f"| {name} | no evaluation (last step {s['last_step']}) | | |")
    if args.out:
        plot(runs, args.out, args.title)


def plot(runs: dict[str, list[dict]], out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
        val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
        ax_train.plot(*zip(*train), label=name, linewidth=1)
        if val:
            ax_val.plot(*zip(*val), marker="o", markersize=3, label=name)
    for ax, what in ((ax_train, "training loss"), (ax_val, "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    # Zoom the validation panel to 1.5x the best loss, so that the first evaluations' high losses do
    # not flatten the differences between runs near the end.
    best = min((r["val/loss"] for rows in runs.values() for r in rows if "val/loss" in r), default=None)
    if best is not None and best > 0:
        ax_val.set_ylim(top=min(ax_val.get_ylim()[1], 1.5 * best))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
