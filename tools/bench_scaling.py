#!/usr/bin/env python
"""Multi-GPU evidence from the real trainer: a tensor x data parallel grid (tokens/s, scaling
efficiency, communication bytes per step, BF16 vs INT8 communication), and a loss match of
multi-GPU against single-GPU training.

    python tools/bench_scaling.py --json scaling.json                      # grid, all GPUs of the host
    python tools/bench_scaling.py --loss-match --json loss_match.json      # 200 steps, GPT-2 124M
    python tools/bench_scaling.py --model tiny --config configs/tiny_cpu.json --seq 64 --micro-batch 4 \\
        --tp 1,2 --dp 1,2 --steps 2 --warmup 1                             # CPU (gloo) smoke run

Every case runs `launch/pretrain_gpt.py` under `python -m torch.distributed.run --standalone` as a
subprocess and reads its metrics file (`logging.metrics_file`, one row per step). A case that fails
(out of memory, an error, a timeout) becomes a row with its error and the rest go on.

Communication modes:
  bf16  parallel.comm_dtype=bf16, parallel.grad_compression=none: exact tensor-parallel collectives in
        the activations' dtype, DeepSpeed's gradient reduction in its communication_data_type (BF16
        on GPUs, FP32 on CPU)
  int8  parallel.comm_dtype=int8, parallel.grad_compression=int8_ef: INT8 + FP32 block scales for the
        tensor-parallel collectives and the data-parallel gradient all-reduce (docs/COMMUNICATION.md)
  int4  parallel.comm_dtype=int8, parallel.grad_compression=int4_ef: the same INT8 tensor-parallel
        collectives, the gradient all-reduce with packed INT4 payloads (ZeRO++ qgZ's width)
A one-process case has no communication; it runs once (comm "-").

Grid (default): TP in {1,2,4} x DP in {1,2,4} with TP x DP <= --max-world (default: the GPUs of this
host), each in both modes, GPT-2 XL at sequence 1024, --micro-batch sequences per data-parallel rank
and no gradient accumulation, so every GPU of a pure-DP case does the work of the one-GPU case.
GPT-2 XL's 25 heads split over neither 2 nor 4 ranks: --n-head auto (default) picks the head count
nearest the preset's that every --tp size divides, with a head size that is a multiple of 8 (20 heads
of 80 for GPT-2 XL: the same parameters and FLOPs), for every case alike. ZeRO stage 1 by default
(--zero-stage), sequence parallelism with TP. Cases run one at a time, the
one-GPU baseline first and the widest next, so that a --time-budget-s that runs out leaves the
2-GPU cases (reported as skipped, with the --cases to run them later; every run measures its own
one-GPU baseline).

Per case: tokens/s and step time (medians over the steps after --warmup), MFU, peak GPU memory of rank
0, the final loss, and the wire bytes rank 0 sent per optimizer step (the trainer's comm/* metrics:
CommStats kinds, exact collectives counted from their tensor sizes with the ring / direct algorithm
formulas of megaq.parallel.quantized_comm.exact_wire_bytes, INT8 ones from their packed buffers):
  TP bytes       tensor-parallel collectives (the mappings, both directions)
  DP grad bytes  data-parallel gradient reduction (DeepSpeed's, or megaq's INT8 all-reduce) and
                 DeepSpeed's scalar reductions
  DP param bytes ZeRO-1/2's all-gather of the updated parameters (BF16 in both modes; none at stage 0)
Scaling: "per-GPU vs 1 GPU" = tokens/s / (GPUs x tokens/s of the one-GPU case). For a pure-DP case
(same micro batch per GPU) that is the data-parallel scaling efficiency; for a TP case it is the
throughput per GPU relative to one GPU training the same model alone.

Loss match (--loss-match): --steps (200) optimizer steps of GPT-2 124M at sequence 512 with the same
global batch (--global-batch 16, micro batch 4) and seed: a one-GPU reference (gradient accumulation
fills the batch) against the --multi runs (default TP=2 x DP=2 in INT8 and DP=4 in BF16). The runs
start from the same weights (initialization is seeded per parameter, independent of TP) and see the
same samples per step (the sampler's global order does not depend on DP), so the step-1 losses agree
to rounding. Noise: --noise-seeds more one-GPU runs whose train.seed differs (initialization, data
order and stochastic rounding: everything arbitrary about a run). A multi-GPU run is "within noise"
when its mean loss over the last --window steps differs from the reference's by no more than the
largest such difference of a noise run. One-GPU runs go side by side on separate GPUs (time is not
measured there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench_env, also when imported by the tests

from bench_env import checkout_commit  # noqa: E402

LAUNCH = ROOT / "launch" / "pretrain_gpt.py"
COMM_MODES = {
    "bf16": {"parallel.comm_dtype": "bf16", "parallel.grad_compression": "none"},
    "int8": {"parallel.comm_dtype": "int8", "parallel.grad_compression": "int8_ef"},
    "int4": {"parallel.comm_dtype": "int8", "parallel.grad_compression": "int4_ef"},
}
NO_COMM = "-"
DEFAULT_MULTI = "2x2:int8,1x4:bf16"


@dataclass(frozen=True)
class Case:
    tp: int
    dp: int
    comm: str          # a COMM_MODES key, or NO_COMM for one process
    seed: int = 1234

    @property
    def world(self) -> int:
        return self.tp * self.dp

    @property
    def name(self) -> str:
        return f"tp{self.tp}_dp{self.dp}_{'single' if self.comm == NO_COMM else self.comm}_seed{self.seed}"

    def spec(self) -> str:
        return f"{self.tp}x{self.dp}" + ("" if self.comm == NO_COMM else f":{self.comm}")


# ---- which cases ---------------------------------------------------------------------------------

def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"{what}: expected positive integers, got {text!r}")
    return values


def parse_cases(text: str, comms: list[str], seed: int) -> list[Case]:
    """'1x4:bf16,2x2' -> cases (TPxDP, optional :comm; without it every mode in `comms`)."""
    cases = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        shape, _, comm = item.partition(":")
        try:
            tp, dp = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            raise SystemExit(f"case {item!r}: expected TPxDP[:comm], e.g. 2x2:int8") from None
        if tp < 1 or dp < 1:
            raise SystemExit(f"case {item!r}: TP and DP must be >= 1")
        if comm and comm not in COMM_MODES:
            raise SystemExit(f"case {item!r}: comm must be one of {sorted(COMM_MODES)}")
        if tp * dp == 1:
            cases.append(Case(1, 1, NO_COMM, seed))
        else:
            cases += [Case(tp, dp, c, seed) for c in ([comm] if comm else comms)]
    return list(dict.fromkeys(cases))


def grid_cases(tps: list[int], dps: list[int], comms: list[str], max_world: int, seed: int) -> list[Case]:
    """The one-GPU baseline first, then the widest cases (pure DP before TP), each mode in turn."""
    shapes = sorted({(tp, dp) for tp in tps for dp in dps if 1 < tp * dp <= max_world},
                    key=lambda s: (-s[0] * s[1], s[0]))
    return [Case(1, 1, NO_COMM, seed)] + [Case(tp, dp, c, seed) for tp, dp in shapes for c in comms]


def pick_n_head(preset_heads: int, n_embd: int, tps: list[int]) -> int:
    """The head count nearest `preset_heads` that every TP size divides, dividing n_embd into heads
    of a multiple of 8 (ties: the larger head count)."""
    lcm = math.lcm(*tps)
    if preset_heads % lcm == 0:
        return preset_heads
    options = [h for h in range(lcm, n_embd + 1, lcm) if n_embd % h == 0 and (n_embd // h) % 8 == 0]
    if not options:
        raise SystemExit(f"no head count divides n_embd={n_embd} into heads of a multiple of 8 and is "
                         f"divisible by the TP sizes {tps}; pass --n-head")
    return min(options, key=lambda h: (abs(h - preset_heads), -h))


# ---- running one case ----------------------------------------------------------------------------

class Run:
    """One launched trainer (torch.distributed.run with `case.world` processes) in its own process
    group, so that a timeout can stop all of its processes."""

    def __init__(self, case: Case, overrides: list[str], config: str, workdir: Path,
                 gpu_ids: Optional[list[int]], host_processes: int) -> None:
        self.case = case
        self.metrics = workdir / f"{case.name}.jsonl"
        self.log = workdir / f"{case.name}.log"
        for path in (self.metrics, self.log):
            path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(case.world), str(LAUNCH), "--config", config]
        for o in overrides + [f"logging.metrics_file={self.metrics}"]:
            cmd += ["--override", o]
        env = dict(os.environ, MEGAQ_IGNORE_SLURM="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(
                       os.pathsep) if p]))
        if gpu_ids is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(visible_gpus()[i] for i in gpu_ids)
        # torchrun would give every process one thread; the CPU-side work (each rank draws the full
        # initial weights, then shards them) goes faster with this host's cores shared out
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // host_processes)))
        self.start = time.monotonic()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait(self, timeout: float, steps: int) -> dict:
        """Wait up to `timeout` s for the run of `steps` steps; returns {'rows': per-step metrics}
        or {'error': ...}, plus 'wall_s'. A run that logged its last step and then died (a crash
        while shutting down) still counts, with a 'warning'."""
        try:
            code = self.proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            self._stop()
            return self._failed(f"timeout after {timeout:.0f} s", timed_out=True)
        rows = read_metrics(self.metrics)
        finished = any(r["step"] == steps and "train/loss" in r for r in rows)
        if not finished:
            return self._failed(f"exit code {code}" if code else f"no metrics of step {steps}")
        outcome = {"rows": rows, "wall_s": self._wall()}
        if code:
            outcome["warning"] = f"exit code {code} after the last step: {error_summary(self._log_text())}"
        return outcome

    def _log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def _wall(self) -> float:
        return time.monotonic() - self.start

    def _failed(self, what: str, timed_out: bool = False) -> dict:
        text = self._log_text()
        summary = "" if timed_out else error_summary(text)  # a killed run's last lines are about the kill
        error = f"{summary} ({what}; log {self.log})" if summary else f"{what} (log {self.log})"
        return {"error": error, "log_tail": text[-3000:], "wall_s": self._wall()}

    def _stop(self) -> None:
        """SIGTERM to the launcher and its workers (their own process group), then SIGKILL to
        whatever of the group is left."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def error_summary(log: str) -> str:
    """The line of a failed run's log that says what went wrong: an out-of-memory line, megaq's own
    message (configuration or checkpoint error), else the last exception line of a worker."""
    lines = [line.strip() for line in log.splitlines()]
    for wanted in (lambda l: "out of memory" in l.lower(),
                   lambda l: l.startswith("megaq:"),
                   lambda l: re.match(r"^[\w.]*(Error|Exception)\b", l) and "ChildFailedError" not in l):
        found = [line for line in lines if wanted(line)]
        if found:
            return found[-1][:300]
    return ""


def read_metrics(path: Path) -> list[dict]:
    """The metrics file's rows merged per step (the trainer writes train/perf and comm rows apart)."""
    if not path.is_file():
        return []
    merged: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            merged.setdefault(row["step"], {}).update(row)
    return [merged[s] for s in sorted(merged)]


# ---- what a case measured ------------------------------------------------------------------------

def _is_param_gather(kind: str) -> bool:
    return kind.startswith(("ds_all_gather", "ds_broadcast"))


def summarize(rows: list[dict], warmup: int) -> dict:
    """Medians over the steps after `warmup` (all steps if there are no others)."""
    from megaq.parallel.quantized_comm import is_data_parallel_kind

    timed = [r for r in rows if "perf/tokens_per_s" in r]
    steady = [r for r in timed if r["step"] > warmup] or timed

    def median(key: str) -> Optional[float]:
        values = [r[key] for r in steady if key in r]
        return statistics.median(values) if values else None

    prefix = "comm/bytes/"
    kinds: dict[str, float] = {}
    for kind in {k[len(prefix):] for r in steady for k in r if k.startswith(prefix)}:
        kinds[kind] = statistics.median(r.get(prefix + kind, 0.0) for r in steady)
    memory = [r["perf/peak_memory_gib"] for r in rows if "perf/peak_memory_gib" in r]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    return {
        "tokens_per_s": median("perf/tokens_per_s"), "step_time_s": median("perf/step_time_s"),
        "mfu": median("perf/mfu"), "peak_memory_gib": max(memory) if memory else None,
        "final_loss": losses[-1] if losses else None, "steps_measured": len(steady),
        "tp_bytes": median("comm/tp_bytes") or 0.0,
        "dp_grad_bytes": sum(v for k, v in kinds.items() if is_data_parallel_kind(k) and not _is_param_gather(k)),
        "dp_param_bytes": sum(v for k, v in kinds.items() if _is_param_gather(k)),
        "bytes_by_kind": dict(sorted(kinds.items())),
    }


def add_scaling(cases: list[dict]) -> None:
    """per_gpu_vs_1gpu (and, for pure DP, scaling_efficiency) against the one-GPU case."""
    base = next((c for c in cases if c["world"] == 1 and c.get("tokens_per_s")), None)
    for c in cases:
        if base is None or not c.get("tokens_per_s"):
            continue
        c["per_gpu_vs_1gpu"] = c["tokens_per_s"] / (c["world"] * base["tokens_per_s"])
        if c["tp"] == 1:
            c["scaling_efficiency"] = c["per_gpu_vs_1gpu"]


def byte_ratios(cases: list[dict]) -> list[dict]:
    """Compressed / BF16 per (TP, DP, compressed mode): bytes of each part, all bytes, tokens/s."""
    ok = {(c["tp"], c["dp"], c["comm"]): c for c in cases if c.get("tokens_per_s")}
    parts = {"tp_bytes": ("tp_bytes",), "dp_grad_bytes": ("dp_grad_bytes",),
             "dp_bytes": ("dp_grad_bytes", "dp_param_bytes"),
             "all_bytes": ("tp_bytes", "dp_grad_bytes", "dp_param_bytes"), "tokens_per_s": ("tokens_per_s",)}
    out = []
    for (tp, dp, comm), compressed in ok.items():
        bf16 = ok.get((tp, dp, "bf16"))
        if comm in ("bf16", NO_COMM) or bf16 is None:
            continue
        row = {"tp": tp, "dp": dp, "comm": comm}
        for name, keys in parts.items():
            # no ratio for a group of one (its only traffic is DeepSpeed's scalar reductions)
            if (name == "tp_bytes" and tp == 1) or (name.startswith("dp_") and dp == 1):
                row[name] = None
                continue
            denominator = sum(bf16[k] for k in keys)
            row[name] = sum(compressed[k] for k in keys) / denominator if denominator else None
        out.append(row)
    return out


# ---- environment ---------------------------------------------------------------------------------

def gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_name() -> str:
    """The first visible GPU's name, from nvidia-smi: asking torch would create a CUDA context in
    this process, on a GPU the runs need."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", visible_gpus()[0]],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "cuda"


def visible_gpus() -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES names them (index i of torch = entry i)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [v.strip() for v in visible.split(",") if v.strip()]
    return [str(i) for i in range(gpu_count())]


def meta(args, gpus: int) -> dict:
    import platform

    import torch
    from importlib import metadata
    try:
        ds_version = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        ds_version = None
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": checkout_commit(),
            "device": gpu_name() if gpus else "cpu", "gpus": gpus,
            "torch": torch.__version__, "deepspeed": ds_version, "python": platform.python_version(),
            "argv": sys.argv[1:]}


def prepare_demo_corpus(config: str, overrides: list[str]) -> None:
    """Build the demo corpus once here, if the config trains on it, instead of in the first run (or,
    for runs side by side, in several runs at once)."""
    from megaq.data import build_demo_corpus
    from megaq.training.config import load_config

    data = load_config(config, overrides).data
    if data.source == "demo":
        build_demo_corpus(Path(os.path.expanduser(data.cache_dir)) / "demo", data.tokenizer.spec(),
                          max_bytes=data.demo_max_bytes)


class Budget:
    """Wall-clock budget of the whole tool: a case starts only if the remaining time covers the
    longest case of its world size so far (or of any size, before one of its size ran)."""

    def __init__(self, seconds: Optional[float]) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.durations: dict[int, float] = {}

    def remaining(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def allows(self, world: int) -> bool:
        estimate = self.durations.get(world, max(self.durations.values(), default=0.0))
        return self.remaining() > estimate

    def took(self, world: int, seconds: float) -> None:
        self.durations[world] = max(self.durations.get(world, 0.0), seconds)


def common_overrides(args) -> list[str]:
    out = [f"model.preset={args.model}", f"model.seq_len={args.seq}", f"quant.recipe={args.recipe}",
           f"zero_optimization.stage={args.zero_stage}", f"train.train_steps={args.steps}",
           f"train.micro_batch_size={args.micro_batch}", "train.eval_interval=0", "checkpoint.dir=null",
           "checkpoint.save_at_end=false", "checkpoint.auto_resume=false", "logging.log_interval=1",
           "logging.tensorboard_dir=null", "quant.log_error_interval=0"]
    if args.n_head:
        out.append(f"model.n_head={args.n_head}")
    return out


def case_overrides(case: Case, args, global_batch: int) -> list[str]:
    out = common_overrides(args) + [f"parallel.tensor_parallel={case.tp}", f"train.global_batch_size={global_batch}",
                                    f"train.seed={case.seed}"]
    if args.loss_match:  # the configs' warm-up (hundreds of steps) would outlast the run
        out.append(f"train.warmup_steps={max(1, args.steps // 10)}")
    out.append(f"parallel.sequence_parallel={'true' if case.tp > 1 and args.sequence_parallel else 'false'}")
    for key, value in COMM_MODES.get(case.comm, COMM_MODES["bf16"]).items():
        if case.comm != "bf16" and key == "parallel.comm_dtype" and case.tp == 1:
            continue  # no tensor-parallel collectives to compress (the config would warn)
        out.append(f"{key}={value}")
    return out + args.override


def case_record(case: Case) -> dict:
    return {"tp": case.tp, "dp": case.dp, "world": case.world, "comm": case.comm, "seed": case.seed}


def write_json(path: Optional[str], payload: dict) -> None:
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, path)


# ---- the grid ------------------------------------------------------------------------------------

def run_grid(args, gpus: int, workdir: Path) -> dict:
    comms = [c for c in args.comm.split(",") if c]
    for c in comms:
        if c not in COMM_MODES:
            raise SystemExit(f"--comm: unknown mode {c!r}; choose from {sorted(COMM_MODES)}")
    max_world = args.max_world or gpus or 2
    if args.cases:
        cases = parse_cases(args.cases, comms, args.seed)
        if Case(1, 1, NO_COMM, args.seed) not in cases:  # every run measures its own baseline
            cases.insert(0, Case(1, 1, NO_COMM, args.seed))
    else:
        cases = grid_cases(_ints(args.tp, "--tp"), _ints(args.dp, "--dp"), comms, max_world, args.seed)
    too_wide = [c.spec() for c in cases if c.world > max_world]
    if too_wide:
        raise SystemExit(f"cases {too_wide} need more than --max-world={max_world} processes")
    # the --tp sizes too: a run of a few --cases trains the same model as the whole grid
    resolve_heads(args, _ints(args.tp, "--tp") + [c.tp for c in cases])
    prepare_demo_corpus(args.config, common_overrides(args) + args.override)

    result = {"mode": "grid", "meta": meta(args, gpus), "settings": settings(args), "cases": []}
    budget = Budget(args.time_budget_s)
    for case in cases:
        record = case_record(case)
        if not budget.allows(case.world):
            record["error"] = "skipped: time budget"
        else:
            run = Run(case, case_overrides(case, args, args.micro_batch * case.dp), args.config, workdir,
                      list(range(case.world)) if gpus else None, case.world)
            outcome = run.wait(min(args.case_timeout, budget.remaining()), args.steps)
            budget.took(case.world, outcome["wall_s"])
            record["wall_s"] = outcome["wall_s"]
            if "error" in outcome:
                record.update(error=outcome["error"], log_tail=outcome["log_tail"])
            else:
                record.update(summarize(outcome["rows"], args.warmup))
                if "warning" in outcome:
                    record["warning"] = outcome["warning"]
        result["cases"].append(record)
        add_scaling(result["cases"])
        result["byte_ratios"] = byte_ratios(result["cases"])
        write_json(args.json, result)
        print(_progress_line(record), flush=True)
    return result


def resolve_heads(args, tps: list[int]) -> None:
    """--n-head auto: the preset's heads, or the nearest count that every size in `tps` divides."""
    from megaq.training.config import MODEL_PRESETS

    if args.n_head not in (None, "auto"):
        args.n_head = int(args.n_head)
        return
    preset = MODEL_PRESETS[args.model]
    heads = pick_n_head(preset["n_head"], preset["n_embd"], sorted(set(tps)))
    args.n_head = heads if heads != preset["n_head"] else None


def settings(args) -> dict:
    return {"model": args.model, "n_head": args.n_head, "seq": args.seq, "micro_batch": args.micro_batch,
            "seed": args.seed, "recipe": args.recipe, "zero_stage": args.zero_stage, "steps": args.steps,
            "warmup": args.warmup, "sequence_parallel": args.sequence_parallel, "config": args.config,
            "override": args.override}


def _progress_line(record: dict) -> str:
    head = f"[bench_scaling] TP {record['tp']} x DP {record['dp']} {record['comm']}"
    if "error" in record:
        return f"{head}: {record['error'][:300]}"
    return (f"{head}: {record['tokens_per_s']:,.0f} tok/s, step {1e3 * record['step_time_s']:.0f} ms, "
            f"TP {record['tp_bytes'] / 1e6:.1f} MB, DP {(record['dp_grad_bytes'] + record['dp_param_bytes']) / 1e6:.1f}"
            f" MB per step, {record['wall_s']:.0f} s")


def _fmt(value: Optional[float], spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def grid_tables(result: dict) -> str:
    m, s = result["meta"], result["settings"]
    heads = f", {s['n_head']} heads" if s["n_head"] else ""
    lines = [f"# bench_scaling grid: {m['device']} x{m['gpus']}, {m['date']}, commit {m['commit'] or '?'}, "
             f"torch {m['torch']}, deepspeed {m['deepspeed']}",
             f"# {s['model']}{heads}, seq {s['seq']}, micro batch {s['micro_batch']} per DP rank, recipe "
             f"{s['recipe']}, ZeRO-{s['zero_stage']}, sequence parallel {s['sequence_parallel']}, median of steps "
             f"{s['warmup'] + 1}-{s['steps']}; bytes = rank 0's wire bytes per optimizer step",
             "",
             "| TP | DP | GPUs | comm | tokens/s | per-GPU vs 1 GPU | step ms | TP MB | DP grad MB | DP param MB "
             "| peak GiB | loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    skipped = []
    for c in result["cases"]:
        if "error" in c:
            if c["error"].startswith("skipped"):
                skipped.append(Case(c["tp"], c["dp"], c["comm"]).spec())
                what = "skipped (time budget)"
            else:
                what = "failed: " + c["error"].splitlines()[0][:120].replace("|", "/")
            lines.append(f"| {c['tp']} | {c['dp']} | {c['world']} | {c['comm']} | {what} | | | | | | | |")
            continue
        lines.append(f"| {c['tp']} | {c['dp']} | {c['world']} | {c['comm']} | {c['tokens_per_s']:,.0f} | "
                     f"{_fmt(c.get('per_gpu_vs_1gpu'), '.1%')} | {_fmt(c['step_time_s'], '.0f', 1e3)} | "
                     f"{c['tp_bytes'] / 1e6:.1f} | {c['dp_grad_bytes'] / 1e6:.1f} | {c['dp_param_bytes'] / 1e6:.1f} | "
                     f"{_fmt(c['peak_memory_gib'], '.1f')} | {_fmt(c['final_loss'], '.3f')} |")
    if result.get("byte_ratios"):
        lines += ["", "| TP x DP | comm | TP bytes vs BF16 | DP grad bytes | DP bytes (grad + params) | all bytes "
                  "| tokens/s vs BF16 |", "|---|---|---|---|---|---|---|"]
        for r in result["byte_ratios"]:
            lines.append(f"| {r['tp']} x {r['dp']} | {r['comm']} | {_fmt(r['tp_bytes'], '.3f')} | "
                         f"{_fmt(r['dp_grad_bytes'], '.3f')}"
                         f" | {_fmt(r['dp_bytes'], '.3f')} | {_fmt(r['all_bytes'], '.3f')} | "
                         f"{r['tokens_per_s']:.3f} |")
    lines += _warnings(result["cases"])
    if skipped:
        lines += ["", f"skipped for time: run them later with --cases {','.join(skipped)}"]
    return "\n".join(lines)


def _warnings(records: list[dict]) -> list[str]:
    return [f"warning, TP {r['tp']} x DP {r['dp']} {r['comm']} seed {r['seed']}: {r['warning']}"
            for r in records if "warning" in r]


# ---- the loss match ------------------------------------------------------------------------------

def run_loss_match(args, gpus: int, workdir: Path) -> dict:
    comms = list(COMM_MODES)
    multis = parse_cases(args.multi, comms, args.seed)
    max_world = args.max_world or gpus or 4
    for c in multis:
        if c.world > max_world:
            raise SystemExit(f"--multi {c.spec()} needs {c.world} processes, more than --max-world={max_world}")
        if args.global_batch % (args.micro_batch * c.dp):
            raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of --micro-batch "
                             f"{args.micro_batch} x DP {c.dp} ({c.spec()})")
    reference = Case(1, 1, NO_COMM, args.seed)
    noise = [Case(1, 1, NO_COMM, args.seed + i) for i in range(1, args.noise_seeds + 1)]
    resolve_heads(args, [c.tp for c in multis])
    prepare_demo_corpus(args.config, common_overrides(args) + args.override)

    result = {"mode": "loss_match", "meta": meta(args, gpus), "settings": {**settings(args),
              "global_batch": args.global_batch, "window": args.window}, "runs": []}
    budget = Budget(args.time_budget_s)
    losses: dict[Case, list[float]] = {}
    for wave in waves([reference] + noise + multis, gpus):
        if not budget.allows(max(c.world for c in wave)):
            result["runs"] += [{**case_record(c), "role": role(c, reference), "error": "skipped: time budget"}
                               for c in wave]
            continue
        started, first = [], 0
        for case in wave:
            ids = list(range(first, first + case.world)) if gpus else None
            first += case.world
            started.append(Run(case, case_overrides(case, args, args.global_batch), args.config, workdir, ids,
                               sum(c.world for c in wave)))
        for run in started:
            outcome = run.wait(min(args.case_timeout, budget.remaining()), args.steps)
            budget.took(run.case.world, outcome["wall_s"])
            record = {**case_record(run.case), "role": role(run.case, reference), "wall_s": outcome["wall_s"]}
            if "error" in outcome:
                record.update(error=outcome["error"], log_tail=outcome["log_tail"])
            else:
                if "warning" in outcome:
                    record["warning"] = outcome["warning"]
                steps = [r for r in outcome["rows"] if "train/loss" in r]
                losses[run.case] = [r["train/loss"] for r in steps]
                record["losses"] = losses[run.case]
            result["runs"].append(record)
            print(f"[bench_scaling] {record['role']} {run.case.spec()} seed {run.case.seed}: "
                  + (record["error"][:300] if "error" in record else
                     f"loss {losses[run.case][0]:.4f} -> {losses[run.case][-1]:.4f}, {outcome['wall_s']:.0f} s"),
                  flush=True)
        result["comparison"] = compare_losses(losses, reference, noise, multis, args.window)
        write_json(args.json, result)
    return result


def role(case: Case, reference: Case) -> str:
    if case == reference:
        return "reference"
    return "noise" if case.world == 1 else "multi"


def waves(cases: list[Case], gpus: int) -> list[list[Case]]:
    """Runs grouped to go side by side on disjoint GPUs (in order, first fit); one at a time on CPU."""
    if not gpus:
        return [[c] for c in cases]
    out: list[list[Case]] = []
    for case in cases:
        for wave in out:
            if sum(c.world for c in wave) + case.world <= gpus:
                wave.append(case)
                break
        else:
            out.append([case])
    return out


def loss_stats(run: list[float], ref: list[float], window: int) -> dict:
    n = min(len(run), len(ref))
    delta = [a - b for a, b in zip(run[:n], ref[:n])]
    last = delta[-window:]
    return {"steps": n, "step1_delta": delta[0], "mean_abs_delta_last": statistics.fmean(abs(d) for d in last),
            "max_abs_delta": max(abs(d) for d in delta), "mean_delta_last": statistics.fmean(last),
            "mean_loss_last": statistics.fmean(run[:n][-window:]), "final_loss": run[n - 1]}


def compare_losses(losses: dict, reference: Case, noise: list[Case], multis: list[Case], window: int) -> dict:
    ref = losses.get(reference)
    if not ref:
        return {"error": "no reference run"}
    noise_stats = {c.seed: loss_stats(losses[c], ref, window) for c in noise if losses.get(c)}
    band = max((abs(s["mean_delta_last"]) for s in noise_stats.values()), default=None)
    out = {"reference": {"final_loss": ref[-1], "mean_loss_last": statistics.fmean(ref[-window:])},
           "noise": noise_stats, "noise_band": band, "multi": {}}
    for c in multis:
        if losses.get(c):
            s = loss_stats(losses[c], ref, window)
            s["within_noise"] = None if band is None else abs(s["mean_delta_last"]) <= band
            out["multi"][c.spec()] = s
    return out


def loss_tables(result: dict) -> str:
    m, s = result["meta"], result["settings"]
    cmp_ = result.get("comparison") or {}
    lines = [f"# bench_scaling loss match: {m['device']} x{m['gpus']}, {m['date']}, commit {m['commit'] or '?'}",
             f"# {s['model']}, seq {s['seq']}, global batch {s['global_batch']} (micro {s['micro_batch']}), recipe "
             f"{s['recipe']}, ZeRO-{s['zero_stage']}, {s['steps']} steps; last = mean over the last {s['window']} "
             f"steps; Δ = run - one-GPU reference (same seed, same batches)"]
    if "reference" not in cmp_:
        failed = [f"{r['role']} {r['tp']}x{r['dp']}: {r['error'][:200]}" for r in result["runs"] if "error" in r]
        return "\n".join(lines + ["", "no comparison: " + ("; ".join(failed) or "no reference run")])
    ref = cmp_["reference"]
    lines += ["", "| run | GPUs | comm | final loss | last mean | Δ last mean | mean abs Δ last | max abs Δ | "
              "step-1 Δ | within noise |", "|---|---|---|---|---|---|---|---|---|---|",
              f"| 1 GPU, seed {s.get('seed', '')} (reference) | 1 | - | {ref['final_loss']:.4f} | "
              f"{ref['mean_loss_last']:.4f} | 0 | 0 | 0 | 0 | |"]
    for seed, st in cmp_["noise"].items():
        lines.append(f"| 1 GPU, seed {seed} (noise) | 1 | - | {st['final_loss']:.4f} | {st['mean_loss_last']:.4f} | "
                     f"{st['mean_delta_last']:+.4f} | {st['mean_abs_delta_last']:.4f} | {st['max_abs_delta']:.4f} | "
                     f"{st['step1_delta']:+.2e} | |")
    for spec, st in cmp_["multi"].items():
        shape, _, comm = spec.partition(":")
        tp, dp = (int(v) for v in shape.split("x"))
        verdict = {True: "yes", False: "**no**", None: "n/a"}[st["within_noise"]]
        lines.append(f"| TP {tp} x DP {dp} | {tp * dp} | {comm} | {st['final_loss']:.4f} | {st['mean_loss_last']:.4f} | "
                     f"{st['mean_delta_last']:+.4f} | {st['mean_abs_delta_last']:.4f} | {st['max_abs_delta']:.4f} | "
                     f"{st['step1_delta']:+.2e} | {verdict} |")
    band = cmp_.get("noise_band")
    lines.append("")
    lines.append(f"noise band (largest |Δ last mean| of another seed): {_fmt(band, '.4f')}")
    failed = [f"{r['role']} {r['tp']}x{r['dp']}:{r['comm']}: {r['error'].splitlines()[0][:120]}"
              for r in result["runs"] if "error" in r]
    if failed:
        lines.append("failed: " + "; ".join(failed))
    return "\n".join(lines + _warnings(result["runs"]))


# ---- entry point ---------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss-match", action="store_true", help="run the loss match instead of the grid")
    ap.add_argument("--config", help="base config (default: configs/gpt2_xl.json for the grid, "
                    "configs/gpt2_int8.json for the loss match)")
    ap.add_argument("--model", help="model preset (default: gpt2-xl for the grid, gpt2 for the loss match)")
    ap.add_argument("--n-head", default="auto", help="heads, or 'auto': the preset's if every TP size divides it")
    ap.add_argument("--seq", type=int, help="sequence length (default: 1024 grid, 512 loss match)")
    ap.add_argument("--micro-batch", type=int, help="sequences per DP rank per forward (default: 8 grid, 4 loss)")
    ap.add_argument("--recipe", default="int8", help="quant.recipe of the transformer blocks")
    ap.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2), help="zero_optimization.stage")
    ap.add_argument("--no-sequence-parallel", dest="sequence_parallel", action="store_false",
                    help="TP without sequence parallelism (all-reduces instead of all-gather/reduce-scatter)")
    ap.add_argument("--steps", type=int, help="optimizer steps per case (default: 10 grid, 200 loss match)")
    ap.add_argument("--warmup", type=int, default=4, help="grid: steps left out of the medians")
    ap.add_argument("--seed", type=int, default=1234, help="train.seed (the reference's, in the loss match)")
    ap.add_argument("--tp", default="1,2,4", help="grid: tensor-parallel sizes (also what --n-head auto "
                    "fits the heads to)")
    ap.add_argument("--dp", default="1,2,4", help="grid: data-parallel sizes")
    ap.add_argument("--comm", default="bf16,int8", help=f"grid: communication modes, of {sorted(COMM_MODES)}")
    ap.add_argument("--cases", help="grid: explicit cases TPxDP[:comm],... instead of --tp/--dp (the one-GPU "
                    "baseline is always added)")
    ap.add_argument("--max-world", type=int, help="most processes a case may use (default: the GPUs here; "
                    "on CPU 2 for the grid, 4 for the loss match)")
    ap.add_argument("--multi", default=DEFAULT_MULTI, help="loss match: the multi-GPU runs, TPxDP:comm,...")
    ap.add_argument("--global-batch", type=int, default=16, help="loss match: sequences per optimizer step")
    ap.add_argument("--noise-seeds", type=int, default=3, help="loss match: one-GPU runs with other seeds")
    ap.add_argument("--window", type=int, default=50, help="loss match: the last steps the means cover")
    ap.add_argument("--override", action="append", default=[], help="extra section.key=value for every case")
    ap.add_argument("--time-budget-s", type=float, help="start no case that would not finish within this many "
                    "seconds of the tool's start (estimated from the cases so far)")
    ap.add_argument("--case-timeout", type=float, default=900, help="seconds before a case is stopped")
    ap.add_argument("--workdir", help="where logs and metrics files go (default: next to --json, else ./bench_scaling)")
    ap.add_argument("--json", help="write the results here (after every case); the tables go to the same "
                    "name with .md")
    args = ap.parse_args(argv)
    grid = not args.loss_match
    args.config = args.config or str(ROOT / "configs" / ("gpt2_xl.json" if grid else "gpt2_int8.json"))
    args.model = args.model or ("gpt2-xl" if grid else "gpt2")
    args.seq = args.seq or (1024 if grid else 512)
    args.micro_batch = args.micro_batch or (8 if grid else 4)
    args.steps = args.steps or (10 if grid else 200)
    if grid and args.steps <= args.warmup:
        ap.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    if not grid and not 1 <= args.window <= args.steps:
        ap.error(f"--window {args.window} must be between 1 and --steps {args.steps}")
    if not Path(args.config).is_file():
        ap.error(f"--config {args.config}: file not found")
    args.config = str(Path(args.config).resolve())  # the runs start in the work directory
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    gpus = gpu_count()
    workdir = Path(args.workdir or (Path(args.json).resolve().parent / "bench_scaling_runs" if args.json
                                    else "bench_scaling")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.loss_match:
        result = run_loss_match(args, gpus, workdir)
        tables = loss_tables(result)
    else:
        result = run_grid(args, gpus, workdir)
        tables = grid_tables(result)
    write_json(args.json, result)
    if args.json:
        Path(args.json).with_suffix(".md").write_text(tables + "\n")
    print("\n" + tables, flush=True)
    failed = [c for c in result.get("cases", result.get("runs", []))
              if "error" in c and not c["error"].startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
