"""End-to-end training throughput of the real trainer, one recipe after another, in one run.

Each case runs `launch/pretrain_gpt.py` as a subprocess for `--steps` optimizer steps on the demo
corpus (or `--data-path`), logging every step to a metrics file; the table reports the median
tokens/s and MFU over the steps after `--warmup` and the peak GPU memory, side by side with BF16.

    python tools/bench_e2e.py --models gpt2 --seq 1024 --recipes bf16,int8,int4 --json e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_case(model: str, seq: int, recipe: str, micro: int, steps: int, warmup: int, config: str,
             extra: list[str], workdir: Path, port: int) -> dict:
    metrics = workdir / f"{model}_{seq}_{recipe}.jsonl"
    overrides = [f"model.preset={model}", f"model.seq_len={seq}", f"quant.recipe={recipe}",
                 f"train.train_steps={steps}", f"train.micro_batch_size={micro}",
                 f"train.global_batch_size={micro}", "train.eval_interval=0",
                 f"checkpoint.dir={workdir / 'ckpt' / recipe}", "checkpoint.save_interval=0",
                 "checkpoint.save_at_end=false", "checkpoint.auto_resume=false",
                 "logging.log_interval=1", "logging.tensorboard_dir=null",
                 f"logging.metrics_file={metrics}", "quant.log_error_interval=0", *extra]
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain_gpt.py"), "--config", config]
    for o in overrides:
        cmd += ["--override", o]
    env = dict(os.environ, MASTER_PORT=str(port), MEGAQ_IGNORE_SLURM="1")
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    case = {"model": model, "seq_len": seq, "recipe": recipe, "micro_batch": micro, "steps": steps}
    if proc.returncode != 0:
        case["error"] = f"exit code {proc.returncode}: " + (proc.stdout + proc.stderr)[-2000:]
        return case
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "perf/tokens_per_s" in r and r["step"] > warmup]
    case["tokens_per_s"] = statistics.median(r["perf/tokens_per_s"] for r in rows)
    mfu = [r["perf/mfu"] for r in rows if "perf/mfu" in r]
    case["mfu"] = statistics.median(mfu) if mfu else None
    mem = [r["perf/peak_memory_gib"] for r in rows if "perf/peak_memory_gib" in r]
    case["peak_memory_gib"] = max(mem) if mem else None
    case["final_loss"] = rows[-1]["train/loss"] if rows else None
    return case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2", help="comma-separated model presets")
    ap.add_argument("--seq", default="1024", help="comma-separated sequence lengths")
    ap.add_argument("--recipes", default="bf16,int8,int4")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the medians")
    ap.add_argument("--config", default=str(ROOT / "configs" / "gpt2_bf16.json"))
    ap.add_argument("--override", action="append", default=[], help="extra section.key=value")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        port = 29700
        for model in args.models.split(","):
            for seq in (int(s) for s in args.seq.split(",")):
                for recipe in args.recipes.split(","):
                    port += 1
                    case = run_case(model, seq, recipe, args.micro_batch, args.steps, args.warmup,
                                    args.config, args.override, Path(tmp), port)
                    results.append(case)
                    print(json.dumps(case)[:300], flush=True)

    print("\n| model | seq | recipe | tokens/s | vs bf16 | MFU | peak GiB |\n|---|---|---|---|---|---|---|")
    for case in results:
        if "error" in case:
            print(f"| {case['model']} | {case['seq_len']} | {case['recipe']} | failed | | | |")
            continue
        base = next((c for c in results if c["model"] == case["model"] and c["seq_len"] == case["seq_len"]
                     and c["recipe"] == "bf16" and "tokens_per_s" in c), None)
        ratio = f"{case['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mfu = f"{100 * case['mfu']:.1f}%" if case.get("mfu") else "n/a"
        mem = f"{case['peak_memory_gib']:.1f}" if case.get("peak_memory_gib") else "n/a"
        print(f"| {case['model']} | {case['seq_len']} | {case['recipe']} | {case['tokens_per_s']:,.0f} | "
              f"{ratio} | {mfu} | {mem} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
