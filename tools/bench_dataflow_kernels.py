"""The INT8 data flow's LayerNorm and GELU kernels against their BF16 equivalents, one operator at a time.

    python tools/bench_dataflow_kernels.py --json dfk.json
    python tools/bench_dataflow_kernels.py --baseline old/ --sweep     # + the kernels of an older
                                                                       #   checkout, + a config sweep

At `--tokens` rows (16,384) and hidden widths `--widths` (1600, 4096; GELU at 4x the width, as fc1's
output), with the default recipe's operand format (a 128-Hadamard per row, one scale per token),
BF16 inputs and BF16 LayerNorm parameters, `check_finite` off (as the trainer runs):

| operator | data flow (`megaq.kernels.dataflow`) | BF16 equivalent |
| --- | --- | --- |
| LN fwd | `layernorm_quantize` | `F.layer_norm` |
| LN fwd + residual | `layernorm_quantize(..., residual=r)` | `x + r`, `F.layer_norm` |
| LN bwd | `layernorm_backward` (BF16 gradient) | `aten.native_layer_norm_backward` |
| LN bwd + residual grad | `layernorm_backward(..., grad_residual)` | the same + the add of the residual's gradient |
| GELU fwd | `gelu_quantize` (INT8 (1, 128) input) | `F.gelu(approximate="tanh")` |
| GELU bwd | `gelu_backward` | `aten.gelu_backward(approximate="tanh")` |

Time: median of `--iters` CUDA-event timings of one call each, every call enqueued behind a
`torch.cuda._sleep` so that the GPU runs its kernels back to back: kernel time, not the host's
launch time (the block benchmark's profiler breakdown counts the same). `new` is this checkout's
automatic choice; `--baseline DIR` adds `old`, the same functions from DIR/dataflow.py and
DIR/triton_dataflow.py (e.g. `git show <rev>:megaq/kernels/dataflow.py`). `--sweep` also times the
launch plans listed in SWEEP (`dataflow.config_override`) and checks each one's output against the
automatic choice's. Writes JSON; prints a markdown table last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_timing import kernel_ms  # noqa: E402  (tools/, the script's directory)
from megaq import kernels  # noqa: E402
from megaq.kernels import dataflow  # noqa: E402
from megaq.quant import QuantizedTensor  # noqa: E402

OPERATORS = ("ln_fwd", "ln_fwd_res", "ln_bwd", "ln_bwd_res", "gelu_fwd", "gelu_bwd")
FORMAT = (128, (1, -1))          # the default recipe's operand: 128-Hadamard, one scale per row
EPS = 1e-5
# launch plans timed by --sweep, per operator (config_override keys)
_RESIDENT = [dict(TILE=t, WARPS=w, PER_SM=p) for t, w in ((32, 4), (64, 4), (64, 8), (128, 8), (128, 16))
             for p in (1, 2, 64)]
SWEEP = {
    "ln_fwd": _RESIDENT + [dict(KERNEL="chunked")],
    "gelu_fwd": _RESIDENT + [dict(TILE=t, WARPS=w, PER_SM=p, MAXNREG=m) for t, w, p, m in
                             ((64, 4, 3, 168), (64, 4, 4, 128), (128, 8, 2, 128))] + [dict(KERNEL="chunked")],
    "ln_bwd": [dict(TILE=b, WARPS=w, PER_SM=p) for b, w in ((1, 4), (1, 8), (2, 8), (4, 8)) for p in (1, 2, 4, 8)]
    + [dict(KERNEL="chunked")],
    "gelu_bwd": [dict(GELU_BWD_ROWS=r, GELU_BWD_BLOCKS=b, GELU_BWD_WARPS=w)
                 for r, b, w in ((8, 1, 4), (16, 1, 4), (16, 2, 4), (32, 1, 4), (16, 2, 8), (32, 1, 8),
                                 (32, 2, 8), (64, 1, 8), (16, 4, 8))],
}
SWEEP["ln_fwd_res"] = SWEEP["ln_fwd"]
SWEEP["ln_bwd_res"] = SWEEP["ln_bwd"]


_PLAN_OP = {"ln_fwd": "layernorm", "ln_fwd_res": "layernorm_residual", "gelu_fwd": "gelu", "ln_bwd": "layernorm_backward",
            "ln_bwd_res": "layernorm_backward"}


def sweep_configs(op: str, width: int, rows: int) -> list[dict]:
    """SWEEP[op] without the entries that resolve to a plan already listed (e.g. TILE 32 and 64 on
    rows of 128 chunks both hold one row)."""
    seen, out = set(), []
    for cfg in SWEEP[op]:
        key = repr(cfg)
        if op in _PLAN_OP:
            with dataflow.config_override(**cfg):
                cols = 4 * width if op.startswith("gelu") else width
                key = repr(dataflow._plan(_PLAN_OP[op], cols, rows, torch.device("cuda")))
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def load_baseline(path: Path):
    """megaq.kernels.dataflow as of an older checkout: DIR/dataflow.py launching DIR/triton_dataflow.py."""
    mods = {}
    for name in ("triton_dataflow", "dataflow"):
        spec = importlib.util.spec_from_file_location(f"megaq.kernels._baseline_{name}", path / f"{name}.py",
                                                      submodule_search_locations=None)
        mod = importlib.util.module_from_spec(spec)
        mod.__package__ = "megaq.kernels"
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    mods["dataflow"]._triton = lambda: mods["triton_dataflow"]
    return mods["dataflow"]


def make_inputs(rows: int, width: int, seed: int = 0) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, device="cuda", generator=gen) * scale + shift

    x = randn(rows, width, scale=2.0, shift=0.5)
    x[:, ::97] *= 10                                    # outlier channels
    h = randn(rows, 4 * width, scale=3.0, shift=-0.5)
    inp = {"x": x.bfloat16(), "r": randn(rows, width).bfloat16(),
           "w": (1 + 0.1 * randn(width)).bfloat16(), "b": (0.1 * randn(width)).bfloat16(),
           "g": randn(rows, width).bfloat16(), "gr": randn(rows, width).bfloat16(),
           "h_q": kernels.quantize(h, dataflow.SAVE_BLOCK, check=False), "h": h.bfloat16(),
           "gh": randn(rows, 4 * width).bfloat16()}
    ln = dataflow.layernorm_quantize(inp["x"], inp["w"], inp["b"], EPS, *FORMAT, check=False)
    inp["x_q"], inp["mean"], inp["rstd"] = ln.x_q, ln.mean, ln.rstd
    _, inp["mean_bf16"], inp["rstd_bf16"] = torch.ops.aten.native_layer_norm(inp["x"], [width], inp["w"],
                                                                             inp["b"], EPS)
    return inp


def dataflow_call(mod, op: str, inp: dict):
    """The data-flow operator `op` of module `mod` (this checkout's dataflow or a baseline) as a thunk."""
    if op == "ln_fwd":
        return lambda: mod.layernorm_quantize(inp["x"], inp["w"], inp["b"], EPS, *FORMAT, check=False)
    if op == "ln_fwd_res":
        return lambda: mod.layernorm_quantize(inp["x"], inp["w"], inp["b"], EPS, *FORMAT, residual=inp["r"],
                                              check=False)
    if op == "ln_bwd":
        return lambda: mod.layernorm_backward(inp["x_q"], inp["mean"], inp["rstd"], inp["w"], inp["g"])
    if op == "ln_bwd_res":
        return lambda: mod.layernorm_backward(inp["x_q"], inp["mean"], inp["rstd"], inp["w"], inp["g"], inp["gr"])
    if op == "gelu_fwd":
        return lambda: mod.gelu_quantize(inp["h_q"], *FORMAT)
    if op == "gelu_bwd":
        return lambda: mod.gelu_backward(inp["h_q"], inp["gh"])
    raise ValueError(op)


def bf16_call(op: str, inp: dict):
    C = inp["x"].shape[1]
    if op == "ln_fwd":
        return lambda: F.layer_norm(inp["x"], (C,), inp["w"], inp["b"], EPS)
    if op == "ln_fwd_res":
        return lambda: F.layer_norm(inp["x"] + inp["r"], (C,), inp["w"], inp["b"], EPS)

    def ln_bwd():
        return torch.ops.aten.native_layer_norm_backward(inp["g"], inp["x"], [C], inp["mean_bf16"],
                                                         inp["rstd_bf16"], inp["w"], inp["b"], [True, True, True])
    if op == "ln_bwd":
        return ln_bwd
    if op == "ln_bwd_res":
        return lambda: ln_bwd()[0] + inp["gr"]
    if op == "gelu_fwd":
        return lambda: F.gelu(inp["h"], approximate="tanh")
    if op == "gelu_bwd":
        return lambda: torch.ops.aten.gelu_backward(inp["gh"], inp["h"], approximate="tanh")
    raise ValueError(op)


def _first_tensors(out) -> list[torch.Tensor]:
    """The tensors of an operator's result, in order (QuantizedTensor: payload, scale)."""
    items = out if isinstance(out, tuple) else (out,)
    flat = []
    for item in items:
        if isinstance(item, QuantizedTensor):
            flat += [item.data, item.scale]
        elif isinstance(item, torch.Tensor):
            flat.append(item)
    return flat


def compare(out, ref) -> dict:
    """Largest difference between two results of one operator: INT8 payloads as (max |Δ|, fraction
    differing), everything else as relative Frobenius error."""
    worst = {"int8_max": 0, "int8_frac": 0.0, "rel": 0.0}
    for a, b in zip(_first_tensors(out), _first_tensors(ref)):
        if a.dtype == torch.int8:
            d = (a.int() - b.int()).abs()
            worst["int8_max"] = max(worst["int8_max"], int(d.max()))
            worst["int8_frac"] = max(worst["int8_frac"], float((d > 0).float().mean()))
        else:
            a, b = a.float(), b.float()
            rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
            worst["rel"] = max(worst["rel"], rel if rel == rel else float("inf"))
    worst["ok"] = worst["int8_max"] <= 1 and worst["int8_frac"] <= 5e-3 and worst["rel"] <= 1e-2
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--widths", default="1600,4096")
    ap.add_argument("--operators", default=",".join(OPERATORS))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--baseline", type=Path, default=None, help="directory with an older dataflow.py + "
                    "triton_dataflow.py to time as 'old'")
    ap.add_argument("--sweep", action="store_true", help="also time the launch plans in SWEEP")
    ap.add_argument("--shard", default=None, help="i/n: run (untimed, once) every n-th of the calls the "
                    "same arguments would time, from the i-th, then exit: a parallel warm-up of Triton's cache")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_dataflow_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    ops = args.operators.split(",")
    unknown = sorted(set(ops) - set(OPERATORS))
    if unknown:
        ap.error(f"unknown operator(s) {unknown}; choose from {OPERATORS}")
    baseline = load_baseline(args.baseline) if args.baseline else None
    widths = [int(w) for w in args.widths.split(",")]
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        jobs = [(w, op, cfg) for w in widths for op in ops
                for cfg in [None] + (sweep_configs(op, w, args.tokens) if args.sweep else [])]
        jobs += [(w, op, "old") for w in widths for op in ops] if baseline is not None else []
        inputs = {}
        for w, op, cfg in jobs[i::n]:
            if w not in inputs:
                inputs[w] = make_inputs(args.tokens, w)
            inp = inputs[w]
            try:
                if cfg == "old":
                    dataflow_call(baseline, op, inp)()
                else:
                    with dataflow.config_override(**(cfg or {})):
                        dataflow_call(dataflow, op, inp)()
            except Exception as e:  # a config that does not compile is reported by the timing run
                print(f"warm {w} {op} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        torch.cuda.synchronize()
        return 0
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "tokens": args.tokens, "iters": args.iters, "format": FORMAT}
    results, sweeps = [], []
    for w in widths:
        inp = make_inputs(args.tokens, w)
        for op in ops:
            new_fn = dataflow_call(dataflow, op, inp)
            row = {"width": w, "operator": op, "cols": 4 * w if op.startswith("gelu") else w,
                   "bf16_ms": kernel_ms(bf16_call(op, inp), args.iters, args.warmup),
                   "new_ms": kernel_ms(new_fn, args.iters, args.warmup)}
            ref = new_fn()
            if baseline is not None:
                old_fn = dataflow_call(baseline, op, inp)
                row["old_ms"] = kernel_ms(old_fn, args.iters, args.warmup)
                row["new_vs_old"] = compare(ref, old_fn())
            results.append(row)
            print(f"{w} {op}: bf16 {row['bf16_ms']:.3f} ms, new {row['new_ms']:.3f} ms"
                  + (f", old {row['old_ms']:.3f} ms {row['new_vs_old']}" if "old_ms" in row else ""), flush=True)
            if args.sweep:
                for cfg in sweep_configs(op, w, args.tokens):
                    entry = {"width": w, "operator": op, "config": cfg}
                    try:
                        with dataflow.config_override(**cfg):
                            fn = dataflow_call(dataflow, op, inp)
                            entry["check"] = compare(fn(), ref)
                            entry["ms"] = kernel_ms(fn, max(5, args.iters // 3), 1)
                    except Exception as e:
                        entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    sweeps.append(entry)
                    print(f"  {cfg}: " + (f"{entry['ms']:.3f} ms {entry['check']}" if "ms" in entry
                                          else entry["error"]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "sweep": sweeps},
                                                      indent=1))
            del ref
            torch.cuda.empty_cache()
    print(table(results, meta))
    return 0


def table(results: list[dict], meta: dict) -> str:
    lines = [f"{meta['gpu']}, {meta['date']}, {meta['tokens']} tokens, median of {meta['iters']} (ms)", "",
             "| width | operator | cols | BF16 | old | new | new vs BF16 | new vs old |", "|" + " --- |" * 8]
    for r in results:
        old = r.get("old_ms")
        lines.append(f"| {r['width']} | {r['operator']} | {r['cols']} | {r['bf16_ms']:.3f} | "
                     + (f"{old:.3f}" if old else "—") + f" | {r['new_ms']:.3f} | {r['bf16_ms'] / r['new_ms']:.2f}× | "
                     + (f"{old / r['new_ms']:.2f}×" if old else "—") + " |")
    for w in sorted({r["width"] for r in results}):
        for name, parts in (("LN fwd+bwd (+res)", ("ln_fwd", "ln_bwd", "ln_fwd_res", "ln_bwd_res")),
                            ("GELU fwd+bwd", ("gelu_fwd", "gelu_bwd"))):
            rows = [r for r in results if r["width"] == w and r["operator"] in parts]
            if len(rows) != len(parts):
                continue
            tot = {k: sum(r.get(k) or 0.0 for r in rows) for k in ("bf16_ms", "old_ms", "new_ms")}
            lines.append(f"| {w} | **{name}** | | {tot['bf16_ms']:.3f} | "
                         + (f"{tot['old_ms']:.3f}" if tot["old_ms"] else "—")
                         + f" | {tot['new_ms']:.3f} | {tot['bf16_ms'] / tot['new_ms']:.2f}× | "
                         + (f"{tot['old_ms'] / tot['new_ms']:.2f}×" if tot["old_ms"] else "—") + " |")
    return "\n".join(lines) + "\n(× > 1: new is faster)"


if __name__ == "__main__":
    sys.exit(main())
