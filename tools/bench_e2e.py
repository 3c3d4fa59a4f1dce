"""End-to-end training throughput of the real trainer: models x sequence lengths x recipes, one table.

Each case runs `launch/pretrain_gpt.py` as a subprocess for `--steps` optimizer steps on one GPU (demo
corpus, or `--override data.path=...`), logging every step to a metrics file; the table reports the
median tokens/s and MFU over the steps after `--warmup`, the peak GPU memory, and both as ratios to
BF16 of the same model and sequence length. Memory is given twice: the allocator's allocated peak and
its reserved peak. With `@graphs` only the reserved one counts the activations (they live in the CUDA
graphs' private pool, which replays reuse without allocating: megaq/training/memory.py), so compare
graphed recipes on it. The allocated bytes of one step by phase (resident at its start, forward,
backward, optimizer update) show which phase holds the peak. A case that fails (out of memory, an error, a time-out)
becomes a row saying so; the other cases still run.

    python tools/bench_e2e.py --models gpt2,gpt2-xl,gpt-1.3b --seq 1024,2048 \\
        --recipes bf16,int8,int4,fp8_tensorwise,fp8_rowwise --compile --json e2e.json

Recipes: megaq recipe names (bf16, int8, int4, ...), `int8_df` (int8 with `quant.data_flow: int8`),
`int8_attn8` / `int8_df_attn8` (the same with `quant.attention_saves: int8`), `int8_df_attn8_nocache`
(and `quant.cache_weights: false`), and the peers
`fp8_tensorwise` / `fp8_rowwise`: the same model, data and optimizer with the blocks' linear layers
trained by torchao's float8 (`quant.peer`; needs torchao). `--compile` compiles the megaq recipes'
blocks (`train.compile`); the peers are always compiled (torchao's float8 casts are meant to be
fused by it). A recipe may carry `@compile`, `@eager` or `@graphs` (the blocks replayed from CUDA
graphs, `train.cuda_graphs`) to choose for itself, e.g. `bf16@eager,bf16@graphs,int8@graphs`. When
several BF16 rows share a model and sequence length, the ratios use the fastest (the strongest
baseline).

The vocabulary is GPT-2's (`--vocab-size 50304`) even though the demo corpus's tokens are bytes, so
that the output layer and loss cost what they cost in a real GPT-2-sized run.

Cost: each case starts a process (imports, DeepSpeed, building the model: about 20 s for GPT-2 on an
H100) and, compiled, pays for compilation in its first step (10-25 s more for GPT-2); `--case-timeout`
bounds a case. Budget about 40 s per GPT-2 case, more for the larger models. A quantized recipe's case
starts slower: its process builds (or loads) the csrc extension and compiles the Triton kernels before
its first step, and its graphs capture after warm-up iterations. On a fresh H100 a 1.3B INT8 case had
not reached its first step after 130 s (2026-11-23), where BF16's finished in 35 s: keep
`--case-timeout` at its default (600 s) for them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench_env, also when imported by the tests

from bench_env import environment  # noqa: E402

# Bench recipe name -> quant.peer
PEERS = {"fp8_tensorwise": "torchao_float8_tensorwise", "fp8_rowwise": "torchao_float8_rowwise"}
# Bench recipe name -> its quant settings: the INT8 data flow (issue 5) and INT8 attention saves end to end
VARIANTS = {
    "int8_df": {"recipe": "int8", "data_flow": "int8"},
    "int8_attn8": {"recipe": "int8", "attention_saves": "int8"},
    "int8_df_attn8": {"recipe": "int8", "data_flow": "int8", "attention_saves": "int8"},
    # the same without the INT8 weight cache (its ~2 bytes per parameter; weights requantized every micro batch)
    "int8_df_attn8_nocache": {"recipe": "int8", "data_flow": "int8", "attention_saves": "int8",
                              "cache_weights": "false"},
    # the data flow under the int8_delayed recipe (one read for each wgrad operand)
    "int8_df_delayed": {"recipe": "int8_delayed", "data_flow": "int8"},
    "int8_df_delayed_attn8_nocache": {"recipe": "int8_delayed", "data_flow": "int8", "attention_saves": "int8",
                                      "cache_weights": "false"},
}
MODES = ("eager", "compile", "graphs")
# Seconds below which --case-timeout draws a warning when a quantized recipe runs (see the docstring)
QUANTIZED_START_S = 300
# Micro batches that fit an 80 GB H100 at sequence 2048 without activation checkpointing.
DEFAULT_MICRO_BATCH = "gpt2:16,gpt2-xl:4,gpt-1.3b:4,gpt-2.7b:2,gpt-6.7b:2"


@dataclass(frozen=True)
class Case:
    model: str
    seq_len: int
    recipe: str      # a megaq recipe name or a key of PEERS
    mode: str        # one of MODES
    micro_batch: int
    grad_accum: int = 1  # micro batches per optimizer step
    gpus: int = 1        # data-parallel processes (ZeRO shards the optimizer state over them)

    @property
    def name(self) -> str:
        return f"{self.model}_{self.seq_len}_{self.recipe}_{self.mode}" + (f"_dp{self.gpus}" if self.gpus > 1 else "")

    def overrides(self) -> list[str]:
        peer = PEERS.get(self.recipe)
        quant = {"recipe": "bf16" if peer else self.recipe, "data_flow": "bf16", "attention_saves": "bf16"}
        quant.update(VARIANTS.get(self.recipe, {}))
        return [f"model.preset={self.model}", f"model.seq_len={self.seq_len}",
                *(f"quant.{key}={value}" for key, value in quant.items()),
                f"quant.peer={json.dumps(peer)}", f"train.compile={json.dumps(self.mode == 'compile')}",
                f"train.cuda_graphs={json.dumps(self.mode == 'graphs')}",
                f"train.micro_batch_size={self.micro_batch}",
                f"train.global_batch_size={self.micro_batch * self.grad_accum * self.gpus}"]


def parse_micro_batches(text: str, models: list[str]) -> dict[str, int]:
    """'16' (every model) or 'gpt2:16,gpt2-xl:4' -> {model: micro batch} for every model benchmarked."""
    text = text.strip()
    if text.isdigit():
        return {m: int(text) for m in models}
    table = {}
    for item in text.split(","):
        model, sep, value = item.partition(":")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--micro-batch: {item!r} is not MODEL:N with N a positive integer "
                             f"(e.g. {DEFAULT_MICRO_BATCH})")
        table[model.strip()] = int(value)
    missing = [m for m in models if m not in table]
    if missing:
        raise ValueError(f"--micro-batch gives no micro batch for {missing}; add MODEL:N for them")
    return table


def parse_recipes(text: str, compile_default: bool) -> list[tuple[str, str]]:
    """'bf16,int8@graphs,fp8_rowwise' -> [(recipe, mode)]. Peers are compiled unless given a mode."""
    from megaq.ops import RecipeError, get_recipe

    out = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        recipe, _, mode = token.partition("@")
        if mode not in ("", *MODES):
            raise ValueError(f"--recipes: {token!r}: the suffix must be one of "
                             f"{', '.join('@' + m for m in MODES)}")
        if recipe not in PEERS and recipe not in VARIANTS:
            try:
                get_recipe(recipe)
            except RecipeError as e:
                raise ValueError(f"--recipes: {recipe!r} is neither a megaq recipe nor a peer "
                                 f"{sorted(PEERS)}: {e}") from None
        default = "compile" if recipe in PEERS or compile_default else "eager"
        out.append((recipe, mode or default))
    if not out:
        raise ValueError("--recipes is empty")
    return out


def build_cases(models: list[str], seqs: list[int], recipes: list[tuple[str, str]],
                micro: dict[str, int], grad_accum: int = 1, gpus: int = 1) -> list[Case]:
    return [Case(model, seq, recipe, mode, micro[model], grad_accum, gpus)
            for model in models for seq in seqs for recipe, mode in recipes]


def summarize_failure(returncode: int | None, output: str) -> str:
    """A one-line reason for a failed case: out of memory, the last error line, or the exit code."""
    if returncode is None:
        return "timed out"
    if "OutOfMemoryError" in output or "CUDA out of memory" in output:
        return "out of memory"
    errors = [line.strip() for line in output.splitlines()
              if re.match(r"\s*([\w.]+(Error|Exception)|megaq: )", line)]
    return errors[-1][:300] if errors else f"exit code {returncode}"


def read_metrics(path: Path, warmup: int, last_step: int | None = None) -> dict:
    """Medians over the logged steps after `warmup` (all steps when there are no more), up to `last_step`."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    phase_rows = [r for r in rows if "perf/tokens_per_s" not in r]
    rows = [r for r in rows if "perf/tokens_per_s" in r and (last_step is None or r["step"] <= last_step)]
    if not rows:
        raise ValueError(f"{path}: no step was logged")
    steady = [r for r in rows if r["step"] > warmup] or rows
    mfu = [r["perf/mfu"] for r in steady if r.get("perf/mfu") is not None]
    memory = [r["perf/peak_memory_gib"] for r in rows if r.get("perf/peak_memory_gib") is not None]
    reserved = [r["perf/peak_reserved_gib"] for r in rows if r.get("perf/peak_reserved_gib") is not None]
    # one row holds the trainer's per-phase memory of one step (megaq.training.memory)
    phases = {key.removeprefix("perf/memory_").removesuffix("_gib"): value
              for r in phase_rows for key, value in r.items() if key.startswith("perf/memory_")}
    return {"tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in steady),
            "mfu": statistics.median(mfu) if mfu else None,
            "peak_memory_gib": max(memory) if memory else None,
            "peak_reserved_gib": max(reserved) if reserved else None,
            "final_loss": rows[-1].get("train/loss"), "steps_measured": len(steady),
            "memory_phases_gib": phases or None}


def run_case(case: Case, args: argparse.Namespace, workdir: Path, port: int) -> dict:
    metrics = workdir / f"{case.name}.jsonl"
    log = workdir / f"{case.name}.log"
    # --profile: one more step, profiled, after the measured ones (and left out of their medians)
    profile_dir = Path(args.profile) / case.name if args.profile else None
    steps = args.steps + (1 if profile_dir else 0)
    profiling = [f"logging.profile_steps=[{steps},{steps}]", f"logging.profile_dir={profile_dir}"] \
        if profile_dir else []
    overrides = case.overrides() + profiling + [
        f"model.vocab_size={args.vocab_size}", f"train.train_steps={steps}", "train.eval_interval=0",
        f"checkpoint.dir={workdir / 'checkpoints'}", "checkpoint.save_interval=0", "checkpoint.save_at_end=false",
        "checkpoint.auto_resume=false", "logging.log_interval=1", "logging.tensorboard_dir=null",
        f"logging.metrics_file={metrics}", "quant.log_error_interval=0", *args.override]
    launcher = [sys.executable] if case.gpus == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={case.gpus}"]
    cmd = [*launcher, str(ROOT / "launch" / "pretrain_gpt.py"), "--config", args.config]
    for o in overrides:
        cmd += ["--override", o]
    env = dict(os.environ, MASTER_PORT=str(port), MEGAQ_IGNORE_SLURM="1")
    if args.memory_snapshots:   # the allocator's segments at the end of the trainer's measured step
        Path(args.memory_snapshots).mkdir(parents=True, exist_ok=True)
        env["MEGAQ_MEMORY_SNAPSHOT"] = str(Path(args.memory_snapshots) / f"{case.name}.pickle")
    row = {"model": case.model, "seq_len": case.seq_len, "recipe": case.recipe, "mode": case.mode,
           "micro_batch": case.micro_batch, "grad_accum": case.grad_accum, "gpus": case.gpus, "steps": args.steps}
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=args.case_timeout)
        returncode, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:  # its output may come back as bytes even in text mode
        partial = e.stdout or ""
        returncode, output = None, partial.decode(errors="replace") if isinstance(partial, bytes) else partial
    log.write_text(output)
    if returncode != 0:
        row["error"] = summarize_failure(returncode, output)
        row["log_tail"] = output[-3000:]
        return row
    try:
        row.update(read_metrics(metrics, args.warmup, last_step=args.steps))
    except (OSError, ValueError) as e:
        row["error"] = f"no metrics: {e}"
    if profile_dir:
        summaries = sorted(profile_dir.glob("kernels_steps_*.json"))
        if summaries:
            row["profile"] = json.loads(summaries[-1].read_text())
        else:
            row["profile_error"] = f"no kernel summary in {profile_dir}"
    return row


def add_ratios(rows: list[dict]) -> None:
    """tokens/s and peak memory relative to the fastest BF16 row of the same model and sequence."""
    for row in rows:
        if "tokens_per_s" not in row:
            continue
        bases = [b for b in rows if b["model"] == row["model"] and b["seq_len"] == row["seq_len"]
                 and b.get("gpus", 1) == row.get("gpus", 1) and b["recipe"] == "bf16" and "tokens_per_s" in b]
        if not bases:
            continue
        base = max(bases, key=lambda b: b["tokens_per_s"])
        row["speed_vs_bf16"] = row["tokens_per_s"] / base["tokens_per_s"]
        if row.get("peak_memory_gib") and base.get("peak_memory_gib"):
            row["memory_vs_bf16"] = row["peak_memory_gib"] / base["peak_memory_gib"]
        if row.get("peak_reserved_gib") and base.get("peak_reserved_gib"):
            row["reserved_vs_bf16"] = row["peak_reserved_gib"] / base["peak_reserved_gib"]


def format_table(rows: list[dict]) -> str:
    lines = ["| model | seq | micro × accum | recipe | mode | tokens/s | vs bf16 | MFU | peak allocated GiB "
             "| vs bf16 | peak reserved GiB | vs bf16 | allocated GiB: resident / fwd / bwd / optimizer peak | loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gpus = f" × {r['gpus']} GPUs" if r.get("gpus", 1) > 1 else ""
        head = (f"| {r['model']} | {r['seq_len']} | {r['micro_batch']} × {r.get('grad_accum', 1)}{gpus} | {r['recipe']} "
                f"| {r['mode']} |")
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:120].replace('|', '/')} | | | | | | | | |")
            continue

        def fmt(key: str, spec: str, suffix: str = "") -> str:
            return format(r[key], spec) + suffix if r.get(key) is not None else "-"

        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        phases = r.get("memory_phases_gib") or {}
        by_phase = " / ".join(f"{phases[k]:.1f}" if k in phases else "-" for k in
                              ("resident", "forward_peak", "backward_peak", "optimizer_peak")) if phases else "-"
        lines.append(f"{head} {r['tokens_per_s']:,.0f} | {fmt('speed_vs_bf16', '.2f', 'x')} | {mfu} | "
                     f"{fmt('peak_memory_gib', '.1f')} | {fmt('memory_vs_bf16', '.2f', 'x')} | "
                     f"{fmt('peak_reserved_gib', '.1f')} | {fmt('reserved_vs_bf16', '.2f', 'x')} | {by_phase} | "
                     f"{fmt('final_loss', '.3f')} |")
    return "\n".join(lines)


def format_profile_table(rows: list[dict]) -> str:
    """GPU ms per optimizer step by kernel category, one column per profiled case."""
    profiled = [r for r in rows if r.get("profile")]
    if not profiled:
        return ""
    order: list[str] = []
    for r in profiled:
        for c in r["profile"]["categories"]:
            if c["name"] not in order:
                order.append(c["name"])
    per_case = [{c["name"]: c["us_per_step"] / 1000 for c in r["profile"]["categories"]} for r in profiled]
    heads = [f"{r['model']} {r['recipe']}@{r['mode']}" for r in profiled]
    lines = ["| GPU ms per step | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for name in order:
        lines.append(f"| {name} | " + " | ".join(f"{c.get(name, 0.0):.1f}" for c in per_case) + " |")
    lines.append("| all kernels | " + " | ".join(f"{r['profile']['gpu_us_per_step'] / 1000:.1f}"
                                              for r in profiled) + " |")
    lines.append("| GPU idle between kernels | " + " | ".join(f"{r['profile'].get('gpu_idle_ms_per_step', 0.0):.1f}"
                                                          for r in profiled) + " |")
    for phase in ("forward", "backward", "optimizer", "outside"):
        lines.append(f"| GPU idle, host in {phase} | " + " | ".join(
            f"{(r['profile'].get('gpu_idle_ms_by_phase') or {}).get(phase, 0.0):.1f}" for r in profiled) + " |")
    lines.append("| wall (profiled step) | " + " | ".join(f"{r['profile'].get('wall_ms_per_step', 0.0):.1f}"
                                                      for r in profiled) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2", help="comma-separated model presets")
    ap.add_argument("--seq", default="1024", help="comma-separated sequence lengths")
    ap.add_argument("--recipes", default="bf16,int8,int4", help="megaq recipes and peers (fp8_tensorwise, "
                    "fp8_rowwise), each optionally @eager / @compile / @graphs")
    ap.add_argument("--compile", action="store_true", help="compile the megaq recipes' blocks (train.compile)")
    ap.add_argument("--micro-batch", default=DEFAULT_MICRO_BATCH, help="N for every model, or MODEL:N,...")
    ap.add_argument("--grad-accum", type=int, default=8,
                    help="micro batches per optimizer step (global batch = micro x this). As in real pretraining "
                    "(GPT-2's 512-sequence batches), the optimizer step is amortized over many micro batches; with "
                    "1, DeepSpeed's step (~125 ms for GPT-2 XL on an H100) would dominate every recipe's time")
    ap.add_argument("--gpus", type=int, default=1,
                    help="data-parallel processes per case (torch.distributed.run; ZeRO shards the optimizer state "
                         "over them): the same micro batch and accumulation per GPU, tokens/s of all of them, the "
                         "memory of rank 0")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=8, help="steps left out of the medians (start-up, compilation)")
    ap.add_argument("--vocab-size", type=int, default=50304, help="model.vocab_size (GPT-2's, padded)")
    ap.add_argument("--case-timeout", type=float, default=600, help="seconds before a case counts as failed")
    ap.add_argument("--config", default=str(ROOT / "configs" / "gpt2_bf16.json"))
    ap.add_argument("--override", action="append", default=[], help="extra section.key=value for every case")
    ap.add_argument("--workdir", help="keep the cases' logs and metrics here (default: a temporary directory)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--memory-snapshots", help="write each case's allocator snapshot (segments and blocks at the "
                                               "end of the trainer's memory-measured step) into this directory")
    ap.add_argument("--profile", help="profile one extra step per case (after the measured ones, left out of the "
                    "medians) with torch.profiler into DIR/<case> (logging.profile_steps) and print the GPU time "
                    "per kernel category")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be positive and --warmup non-negative")
    if args.grad_accum < 1:
        ap.error("--grad-accum must be positive")
    if args.gpus < 1:
        ap.error("--gpus must be positive")
    try:
        args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
        args.seq_list = [int(s) for s in args.seq.split(",")]
        args.micro_table = parse_micro_batches(args.micro_batch, args.model_list)
        args.recipe_list = parse_recipes(args.recipes, args.compile)
    except ValueError as e:
        ap.error(str(e))
    quantized = [r for r, _ in args.recipe_list if r != "bf16" and r not in PEERS]
    if quantized and args.case_timeout < QUANTIZED_START_S:
        print(f"bench_e2e: warning: --case-timeout {args.case_timeout:g} s is shorter than a quantized case's "
              f"start-up can be on a fresh machine (extension build, Triton compiles, graph capture: over "
              f"130 s for 1.3B); {', '.join(quantized)} may time out before their first step", file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = build_cases(args.model_list, args.seq_list, args.recipe_list, args.micro_table, args.grad_accum,
                        args.gpus)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        for i, case in enumerate(cases):
            row = run_case(case, args, workdir, port=29700 + i)
            rows.append(row)
            brief = {k: v for k, v in row.items() if k != "log_tail"}
            print(f"[{i + 1}/{len(cases)}] {json.dumps(brief)}", flush=True)
    add_ratios(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": environment(), "results": rows}, indent=1) + "\n")
    print("\n" + format_table(rows))
    profile_table = format_profile_table(rows)
    if profile_table:
        print("\n" + profile_table)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
