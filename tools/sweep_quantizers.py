"""Launch settings of the per-row Hadamard quantizers, swept at the widths GPT training quantizes.

    python tools/sweep_quantizers.py --json sweep.json                     # H100: the cases below
    python tools/sweep_quantizers.py --tokens 256 --widths 256 --quick     # a smoke run (CPU: TRITON_INTERPRET=1)

The int8 recipe quantizes a linear's input X (nearest rounding) and its output gradient ∇Y (stochastic)
per row after a 128-point Hadamard rotation, in both orientations: rows of X for the forward GEMM
(`_quant_rows_resident_kernel`, one read), rows of Xᵀ for wgrad (the two-pass kernels, a read for the
abs-maxes and one to quantize). Their launch settings (`megaq.kernels.quantizers`: `_RESIDENT_TILE`,
`_PER_SM`, `_PERSISTENT_STAGES`, `_TWOPASS_STAGES`, the warps and the tile columns) were tuned on an
H100 at 8192×4096 (session 6). This script times the automatic choice and every plan of SWEEP
(`megaq.kernels.dispatch.config_override`) per (width, orientation, rounding) at `--tokens` rows, and
checks that each plan's output matches the automatic choice's (payload within one step on at most
1e-3 of its elements, scales within 1e-6: tiles may order the rotation's FP32 sums differently).

Widths: GPT-2 124M (768; fc1's 3072; qkv's 2304) and a 1.3B model (2048; qkv's 6144; fc1's 8192).
Rounding per width as training uses it: X is rounded to nearest at the linears' input widths, ∇Y
stochastically at their output widths (`--widths` runs both roundings at every width given).

`--orientations delayed` times `hadamard_quantize_delayed` (rows of x.T with scales predicted from an
earlier call: the int8_delayed recipe's wgrad operands, one read of x) with the transposed plans, against
the two-pass call of the same orientation, and checks that with the prediction equal to the abs-max (the
same x again) its output is the two-pass output.

`--orientations dual` times `hadamard_quantize_dual` (both orientations from two reads of x) against the
two single calls (three reads) that CUDA graph captures launch (`megaq.ops.linear.DUAL_IN_GRAPHS`), and
checks that the outputs agree.

Time: median of `--iters` CUDA-event timings, each call queued behind ~1 ms of GPU work (kernel time,
not launch time). Prints one line per case (automatic µs, best plan and its µs) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))   # cuda_timing, also when imported by the tests

from bench_env import environment  # noqa: E402  (tools/, the script's directory)
from cuda_timing import kernel_ms  # noqa: E402
from megaq import kernels  # noqa: E402
from megaq.kernels import dispatch  # noqa: E402

HADAMARD = 128
# (width, rounding): X at the linears' input widths, ∇Y at their output widths
DEFAULT_CASES = [(768, "nearest"), (3072, "nearest"), (2048, "nearest"), (8192, "nearest"),
                 (768, "stochastic"), (2304, "stochastic"), (3072, "stochastic"),
                 (2048, "stochastic"), (6144, "stochastic"), (8192, "stochastic")]
# programs per strip of the two-pass grid (`megaq.kernels.quantizers._programs_per_strip` picks one)
PER_STRIP_COUNTS = (1, 2, 3, 4, 5, 6, 8, 10, 11, 12, 16)
SWEEP = {
    # rows of x: the resident kernel (BR·NCH rows of 128 per program), warps, programs per SM, load stages
    # (each tile x warps compiles once per width: the stages stay at the default 3 to bound the compiles)
    "rows": [dict(ROW_KERNEL="resident", RESIDENT_TILE=t, QUANT_WARPS=w, QUANT_PER_SM=p)
             for t, w in ((32, 4), (64, 4), (64, 8), (128, 8)) for p in (1, 2, 4)],
    # rows of x.T: the two-pass kernels' tile columns (128 rows = one Hadamard block), warps, programs, stages
    "transposed": [dict(QUANT_COLS=c, QUANT_WARPS=w, QUANT_PER_SM=p, QUANT_STAGES=s)
                   for c, w in ((32, 4), (64, 4), (64, 8), (128, 8)) for p in (1, 2, 4) for s in (2, 3)]
    # programs per strip of the default tile (the automatic choice: `quantizers._programs_per_strip`)
    + [dict(QUANT_PER_STRIP=n) for n in PER_STRIP_COUNTS],
    # both orientations from one call (`hadamard_quantize_dual`: abs-maxes, scales, payloads over
    # [128, 128] tiles), against the two single calls above (`singles_us` of each case)
    # (the default 3 load stages take ~150 KB of shared memory per program: one program per SM)
    "dual": [dict(QUANT_WARPS=w, QUANT_PER_SM=p) for w in (8, 4) for p in (2, 1)]
    + [dict(QUANT_STAGES=s, QUANT_WARPS=8, QUANT_PER_SM=p) for s in (1, 2) for p in (2, 3)],
}
# the one-pass delayed-scaling kernel runs on the two-pass grid: the same plans
SWEEP["delayed"] = SWEEP["transposed"]
PER_STRIP_SWEEP = {"rows": [], "transposed": [dict(QUANT_PER_STRIP=n) for n in PER_STRIP_COUNTS], "dual": [],
                   "delayed": [dict(QUANT_PER_STRIP=n) for n in PER_STRIP_COUNTS]}
QUICK_SWEEP = {name: plans[:2] for name, plans in SWEEP.items()}


def quantize_call(x: torch.Tensor, orientation: str, rounding: str):
    """The quantizer as a thunk; stochastic calls draw their seed from a generator seeded alike every
    time, so every plan rounds with the same dither. "dual": (rows, rows of the transpose) from one
    `hadamard_quantize_dual` call; "singles": the same pair from the two single calls."""
    def gen():
        return torch.Generator(device=x.device).manual_seed(7) if rounding == "stochastic" else None

    def one(transpose: bool):
        return kernels.hadamard_quantize(x, HADAMARD, rounding=rounding, generator=gen(), check=False,
                                         transpose=transpose)

    def dual():
        return kernels.hadamard_quantize_dual(x, HADAMARD, rounding=rounding, generator=gen(), check=False)

    if orientation == "dual":
        return dual
    if orientation == "delayed":
        from megaq.quant import DelayedAmax
        state = DelayedAmax(x.shape[1], 0.95, x.device)

        def delayed():
            return kernels.hadamard_quantize_delayed(x, HADAMARD, state, rounding=rounding, generator=gen(),
                                                     check=False, transpose=True)
        delayed()   # seeds the prediction with x's own abs-maxes, which later calls keep
        return delayed
    if orientation == "singles":
        return lambda: (one(False), one(True))
    return lambda: one(orientation == "transposed")


def compare(out, ref) -> dict:
    """How far a plan's output is from the automatic choice's, and whether that is within tolerance
    (pairs: both members, the worse of the two reported)."""
    if isinstance(out, tuple):
        parts = [compare(o, r) for o, r in zip(out, ref)]
        return {"int8_max": max(p["int8_max"] for p in parts), "int8_frac": max(p["int8_frac"] for p in parts),
                "scale_rel": max(p["scale_rel"] for p in parts), "ok": all(p["ok"] for p in parts)}
    d = (out.data.int() - ref.data.int()).abs()
    frac = float((d > 0).float().mean())
    scale_rel = float(((out.scale - ref.scale).abs() / ref.scale.abs().clamp_min(1e-30)).max())
    ok = int(d.max()) <= 1 and frac <= 1e-3 and scale_rel <= 1e-6 and bool(torch.isfinite(out.scale).all())
    return {"int8_max": int(d.max()), "int8_frac": frac, "scale_rel": scale_rel, "ok": ok}


def time_us(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Median µs of one call: CUDA events on a GPU; wall time on the CPU (the interpreter's smoke run)."""
    if device.type == "cuda":
        return 1e3 * kernel_ms(fn, iters, warmup)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def run_case(tokens: int, width: int, orientation: str, rounding: str, plans: list[dict], iters: int,
             warmup: int, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(width)
    x = torch.randn(tokens, width, device=device, generator=gen)
    x[:, ::97] *= 10                                   # outlier channels, as activations have
    x = x.bfloat16()
    call = quantize_call(x, orientation, rounding)
    ref = call()
    row = {"tokens": tokens, "width": width, "orientation": orientation, "rounding": rounding,
           "auto_us": time_us(call, iters, warmup, device), "plans": []}
    if orientation == "dual":
        # the two single calls a CUDA graph capture would launch: their time, and how far the dual's
        # output is from theirs (nearest: within the near-tie tolerance; stochastic: the rows only,
        # since the dual draws x.T's dither from a second stream)
        singles = quantize_call(x, "singles", rounding)
        row["singles_us"] = time_us(singles, iters, warmup, device)
        against = compare(ref, singles()) if rounding == "nearest" else compare(ref[0], singles()[0])
        row["vs_singles"] = against
    if orientation == "delayed":
        # the two-pass call of the same orientation: its time, and its output (the same as the delayed
        # call's, whose prediction is x's own abs-max)
        twopass = quantize_call(x, "transposed", rounding)
        row["twopass_us"] = time_us(twopass, iters, warmup, device)
        row["vs_twopass"] = compare(ref, twopass())
    for plan in plans:
        entry = {"plan": plan}
        try:
            with dispatch.config_override(**plan):
                entry.update(compare(call(), ref))
                entry["us"] = time_us(call, iters, warmup, device)
        except Exception as e:  # a plan the kernel cannot take (registers, shared memory): a row, not a stop
            entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["plans"].append(entry)
    good = [p for p in row["plans"] if p.get("ok") and "us" in p]
    if good:
        best = min(good, key=lambda p: p["us"])
        row["best"] = {"plan": best["plan"], "us": best["us"], "speedup": row["auto_us"] / best["us"]}
    return row


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384, help="rows of every input")
    ap.add_argument("--widths", help="comma-separated widths, each in both roundings (default: the cases above)")
    ap.add_argument("--orientations", default="rows,transposed",
                    help="of rows,transposed,dual,delayed (dual: both from one call, timed against the two "
                    "single calls; delayed: x.T with predicted scales, timed against the two-pass call)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="two plans per orientation")
    ap.add_argument("--per-strip", action="store_true", help="only the two-pass kernels' programs per strip")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.widths:
        try:
            widths = [int(w) for w in args.widths.split(",") if w.strip()]
        except ValueError:
            ap.error(f"--widths: {args.widths!r} is not a comma-separated list of integers")
        if not widths or min(widths) < 1:
            ap.error("--widths needs positive integers")
        args.cases = [(w, r) for w in widths for r in ("nearest", "stochastic")]
    else:
        args.cases = DEFAULT_CASES
    args.orientation_list = [o.strip() for o in args.orientations.split(",") if o.strip()]
    unknown = set(args.orientation_list) - set(SWEEP)
    if unknown or not args.orientation_list:
        ap.error(f"--orientations: {sorted(unknown) or 'none given'}; choose from {sorted(SWEEP)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sweep = QUICK_SWEEP if args.quick else PER_STRIP_SWEEP if args.per_strip else SWEEP
    rows = []
    for width, rounding in args.cases:
        for orientation in args.orientation_list:
            row = run_case(args.tokens, width, orientation, rounding, sweep[orientation], args.iters,
                           args.warmup, device)
            rows.append(row)
            best = row.get("best")
            bad = [p["plan"] for p in row["plans"] if p.get("ok") is False]
            vs = (f" | singles {row['singles_us']:8.1f} µs, output {'as theirs' if row['vs_singles']['ok'] else 'DIFFERS'}"
                  if "singles_us" in row else "")
            if "twopass_us" in row:
                vs = (f" | two-pass {row['twopass_us']:8.1f} µs, output "
                      f"{'as its' if row['vs_twopass']['ok'] else 'DIFFERS'}")
            print(f"{width:>6} {orientation:<10} {rounding:<10} auto {row['auto_us']:8.1f} µs{vs} | "
                  + (f"best {best['us']:8.1f} µs ({best['speedup']:.2f}×) {json.dumps(best['plan'])}" if best
                     else "no plan ran") + (f" | {len(bad)} plans outside tolerance" if bad else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": environment(), "results": rows}, indent=1) + "\n")
    ok = (all("best" in r for r in rows) and all(r["vs_singles"]["ok"] for r in rows if "vs_singles" in r)
          and all(r["vs_twopass"]["ok"] for r in rows if "vs_twopass" in r))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
