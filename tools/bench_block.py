"""One GPT transformer block, forward + backward: BF16 vs INT8 (data flow off / on) vs INT4.

    python tools/bench_block.py --json bench_block.json
    python tools/bench_block.py --widths 1600,4096 --variants bf16,int8_df --iters 30

For each width (GPT-2 124M 768, GPT-2 XL 1600, 1.3B 2048, a 7B-class 4096; head dim 64, 64, 128, 128)
and variant, on `[seq, batch, width]` BF16 activations and BF16 parameters:
- time: median of CUDA-event timings of forward + backward (gradients reset between steps);
- peak memory: `torch.cuda.max_memory_allocated` during one step, minus what was allocated before
  it (parameters, input, output gradient);
- saved activations: bytes of the distinct storages autograd keeps for backward (parameters excluded);
- per-operator breakdown: the GPU kernels of a few profiled steps (torch.profiler) grouped by name
  into the trainer profiler's categories (GEMMs, quantize, attention, LayerNorm, GELU, ...:
  `megaq.training.profiling.KERNEL_CATEGORIES`), in ms per step.

Variants: `bf16` (the reference), `int8` (recipe int8, data flow off: every linear quantizes its
BF16 input), `int8_df` (recipe int8 with `data_flow: int8`), `int8_df_int8grad` (the same with the
LayerNorm backward reading the INT8 gradient the next linear's dgrad wrote:
`megaq.ops.dataflow.INT8_LAYERNORM_GRAD`), `int8_df_keepgelu` (the data flow with fc2 keeping its
INT8 input for backward instead of recomputing it from the GELU's: `RECOMPUTE_GELU_OPERAND` off), `int8_attn8` / `int8_df_attn8` (int8 / int8_df with
attention keeping INT8 copies of q, k, v and its output for backward: `attention_saves: int8`),
`int8_delayed` / `int8_df_delayed` (int8 / int8_df with delayed scaling of the wgrad operands: recipe
`int8_delayed`, the predictions warmed up by the warm-up steps), `int8_df_delayed_attn8` (with INT8
attention saves) and `int8_df_delayed_attn8_keepgelu` (and fc2 keeping its INT8 input: the GELU's
recompute traded for the bytes the attention saves free), `int4` (recipe int4). Recipes run with
`check_finite` off, as the trainer runs them. Writes JSON; prints a markdown table last.

A variant may carry switches after `+`, each turning one of the data flow's defaults off (SWITCHES):
`+gelu2` — the GELU's backward as its own kernel, not in fc2's dgrad epilogue (`FUSED_GELU_BACKWARD`
off); `+gelu32` — the FP32 GELU output rotated for fc2 (two products), not its BF16 rounding
(`GELU_OUTPUT_BF16` off); `+ln32` — the FP32 LayerNorm output rotated for qkv and fc1, not its BF16
rounding (`LAYERNORM_OUTPUT_BF16` off);
`+wrot` — ∇W computed in Hadamard space and rotated back after the GEMM (`ROTATE_WGRAD_OPERAND`
off). E.g. `int8_df_delayed+gelu2+gelu32+wrot+ln32` is the data flow as of commit 640dd8a.

`--accumulation N` times the block as a trainer with N micro batches per optimizer step runs it: the
quantized weights are cached across the micro batches (`quant.cache_weights`, on by default in the
trainer; megaq.ops.weight_cache) and made stale once per N steps, so the weight quantizers run once per
window. Each timing is then one window of N steps (the first one requantizing the weights), reported
per step. N = 1 (the default) quantizes the weights in every step.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_timing import event_times  # noqa: E402  (tools/, the script's directory)
from megaq.models.gpt import GPTConfig  # noqa: E402
from megaq.models.transformer import TransformerBlock  # noqa: E402
from megaq.ops import dataflow as dataflow_ops  # noqa: E402
import megaq.ops.dataflow_linear  # noqa: E402,F401  (the module: megaq.ops.dataflow_linear is also a function's name)
from megaq.ops import weight_cache  # noqa: E402
from megaq.training.profiling import KERNEL_CATEGORIES, OTHER, kernel_category  # noqa: E402

HEADS = {768: 12, 1600: 25, 2048: 16, 4096: 32}
# variant -> (recipe, data flow, LayerNorm backward reads an INT8 incoming gradient, attention saves,
# fc2 recomputes its INT8 input from the GELU's in backward)
VARIANTS = {"bf16": ("bf16", "bf16", False, "bf16", True), "int8": ("int8", "bf16", False, "bf16", True),
            "int8_attn8": ("int8", "bf16", False, "int8", True),
            "int8_df": ("int8", "int8", False, "bf16", True),
            "int8_df_keepgelu": ("int8", "int8", False, "bf16", False),
            "int8_df_attn8": ("int8", "int8", False, "int8", True),
            "int8_df_int8grad": ("int8", "int8", True, "bf16", True),
            "int8_delayed": ("int8_delayed", "bf16", False, "bf16", True),
            "int8_df_delayed": ("int8_delayed", "int8", False, "bf16", True),
            "int8_df_delayed_attn8": ("int8_delayed", "int8", False, "int8", True),
            "int8_df_delayed_attn8_keepgelu": ("int8_delayed", "int8", False, "int8", False),
            "int4": ("int4", "bf16", False, "bf16", True)}


# switch suffix -> (module, module attribute set to False): the data flow's defaults, one at a time
SWITCHES = {"gelu2": (dataflow_ops, "FUSED_GELU_BACKWARD"), "gelu32": (dataflow_ops, "GELU_OUTPUT_BF16"),
            "ln32": (dataflow_ops, "LAYERNORM_OUTPUT_BF16"),
            "wrot": (sys.modules["megaq.ops.dataflow_linear"], "ROTATE_WGRAD_OPERAND")}


def parse_variant(variant: str) -> tuple[str, list[str]]:
    """`base+switch+...` -> (base, switches); ValueError naming what is unknown."""
    base, *switches = variant.split("+")
    unknown = [s for s in switches if s not in SWITCHES]
    if base not in VARIANTS or unknown:
        raise ValueError(f"unknown variant {variant!r}: base one of {sorted(VARIANTS)}, switches after '+' "
                         f"from {sorted(SWITCHES)}")
    return base, switches


def build(width: int, seq: int, variant: str) -> TransformerBlock:
    base, switches = parse_variant(variant)
    recipe, data_flow, int8_ln_grad, attention_saves, recompute_gelu = VARIANTS[base]
    dataflow_ops.INT8_LAYERNORM_GRAD = int8_ln_grad     # read by each LayerNorm forward
    dataflow_ops.RECOMPUTE_GELU_OPERAND = recompute_gelu  # read by each GELU forward
    for name, (module, attr) in SWITCHES.items():       # read by each GELU forward / linear backward
        setattr(module, attr, name not in switches)
    cfg = GPTConfig(vocab_size=256, seq_len=seq, n_layer=1, n_head=HEADS.get(width, width // 64),
                    n_embd=width, recipe={"preset": recipe, "check_finite": False}, data_flow=data_flow,
                    attention_saves=attention_saves)
    torch.manual_seed(0)
    blk = TransformerBlock(cfg)
    with torch.no_grad():
        for name, p in blk.named_parameters():
            if name.startswith("ln_"):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02)
    return blk.to(device="cuda", dtype=torch.bfloat16)


def step(blk, x, g):
    for p in blk.parameters():
        p.grad = None
    x.grad = None
    blk(x).backward(g)


def peak_memory(blk, x, g) -> int:
    for p in blk.parameters():
        p.grad = None
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    blk(x).backward(g)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def saved_bytes(blk, x) -> int:
    params = {p.untyped_storage().data_ptr() for p in blk.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = blk(x)
    del y
    return sum(storages.values())


def breakdown(blk, x, g, steps: int = 3, accumulation: int = 1, top: int = 0) -> tuple[dict[str, float], list]:
    """GPU ms per step by kernel category over `steps` profiled steps (with accumulation > 1: one
    window of that many steps, the weights quantized in its first), and the `top` kernels by time:
    [name, ms per step, calls per step, category]."""
    from torch.profiler import ProfilerActivity, profile
    with weight_cache.caching(accumulation > 1):
        if accumulation > 1:
            steps = accumulation
            step(blk, x, g)   # the cache's entries exist before the profiled window
            weight_cache.weights_updated()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(blk, x, g)
            torch.cuda.synchronize()
    groups: dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", None)
        if device_us is None:
            device_us = evt.self_cuda_time_total
        if not device_us:
            continue
        group = kernel_category(evt.key)
        groups[group] = groups.get(group, 0.0) + device_us / 1000.0 / steps
        kernels.append([evt.key[:100], device_us / 1000.0 / steps, evt.count / steps, group])
    kernels.sort(key=lambda k: -k[1])
    return groups, kernels[:top]


def step_times(blk, x, g, iters: int, warmup: int, accumulation: int) -> list[float]:
    """Milliseconds per step of forward + backward. accumulation > 1: timed in windows of that many
    steps with the weight cache on, the weights made stale at the start of each window (as after an
    optimizer step), each window's time divided by its steps."""
    if accumulation <= 1:
        return event_times(functools.partial(step, blk, x, g), iters, warmup)

    def window():
        weight_cache.weights_updated()
        for _ in range(accumulation):
            step(blk, x, g)

    with weight_cache.caching():
        windows = event_times(window, max(3, -(-iters // accumulation)), max(1, -(-warmup // accumulation)))
    return [t / accumulation for t in windows]


def graphed_times(width: int, seq: int, variant: str, x, g, warmup: int, iters: int,
                  accumulation: int = 1) -> list[float]:
    """Step times of a fresh block whose forward and backward replay CUDA graphs, as the trainer runs
    its blocks (`train.cuda_graphs`: megaq.training.cuda_graphs.BlockGraphs; the first call captures)."""
    from megaq.training.cuda_graphs import BlockGraphs
    blk = build(width, seq, variant)
    BlockGraphs([blk])
    with weight_cache.caching(accumulation > 1):   # captured with the cache as the timed steps run it
        step(blk, x, g)    # warm-up and capture, outside the timed calls
        times = step_times(blk, x, g, iters, warmup, accumulation)
    del blk
    return times


def run(width: int, seq: int, batch: int, variant: str, warmup: int, iters: int, profile: bool,
        graphs: bool = False, accumulation: int = 1, top_kernels: int = 0) -> dict:
    blk = build(width, seq, variant)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(seq, batch, width, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    g = torch.randn(seq, batch, width, device="cuda", dtype=torch.bfloat16, generator=gen)
    if variant == "int4":          # eagerly host-bound (~3 ms of launches per linear): fewer steps
        warmup, iters = 1, max(3, iters // 5)
    times = step_times(blk, x, g, iters, warmup, accumulation)
    out = {"width": width, "heads": HEADS.get(width, width // 64), "seq": seq, "batch": batch,
           "variant": variant, "accumulation": accumulation, "ms": statistics.median(times), "ms_all": times,
           "peak_bytes": peak_memory(blk, x, g), "saved_bytes": saved_bytes(blk, x)}
    if profile:
        out["breakdown_ms"], kernels = breakdown(blk, x, g, accumulation=accumulation, top=top_kernels)
        if top_kernels:
            out["top_kernels"] = kernels
    del blk
    if graphs:
        times = graphed_times(width, seq, variant, x, g, warmup, iters, accumulation)
        out["ms_graphs"], out["ms_graphs_all"] = statistics.median(times), times
    del x, g
    torch.cuda.empty_cache()
    return out


def table(results: list[dict]) -> str:
    base = {(r["width"]): r for r in results if r["variant"] == "bf16"}
    found = {c for r in results for c in r.get("breakdown_ms", {})}
    cols = [name for name, _ in KERNEL_CATEGORIES + [(OTHER, None)] if name in found]
    graphed = any("ms_graphs" in r for r in results)
    lines = ["| width | tokens | variant | ms | vs BF16 | " + ("graphs ms | vs BF16 | " if graphed else "")
             + "peak MiB | vs BF16 | saved MiB | vs BF16 |" + "".join(f" {c} ms |" for c in cols),
             "|" + " --- |" * (9 + 2 * graphed + len(cols))]
    for r in results:
        b = base.get(r["width"])
        ratio = lambda key, inverse=False: (f"{(b[key] / r[key] if inverse else r[key] / b[key]):.2f}×"
                                            if b else "—")
        parts = [str(r["width"]), str(r["seq"] * r["batch"]), r["variant"], f"{r['ms']:.2f}",
                 ratio("ms", inverse=True)]
        if graphed:
            parts += ([f"{r['ms_graphs']:.2f}", ratio("ms_graphs", inverse=True)] if "ms_graphs" in r
                      else ["—", "—"])
        parts += [f"{r['peak_bytes'] / 2**20:.0f}", ratio("peak_bytes"),
                 f"{r['saved_bytes'] / 2**20:.0f}", ratio("saved_bytes")]
        bd = r.get("breakdown_ms", {})
        parts += [f"{bd[c]:.2f}" if c in bd else "—" for c in cols]
        lines.append("| " + " | ".join(parts) + " |")
    accumulation = max((r.get("accumulation", 1) for r in results), default=1)
    note = (f"; ms per step with the weights quantized once per {accumulation} steps" if accumulation > 1
            else "")
    return "\n".join(lines) + f"\n(vs BF16: speed-up for time, fraction for memory{note})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="768,1600,2048,4096")
    ap.add_argument("--variants", default="bf16,int8,int8_df,int4")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch = tokens / seq)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-profile", action="store_true", help="skip the per-operator breakdown")
    ap.add_argument("--graphs", action="store_true",
                    help="also time each block replayed from CUDA graphs, as train.cuda_graphs runs it")
    ap.add_argument("--accumulation", type=int, default=1,
                    help="micro batches per optimizer step: the weights are quantized once per this many "
                         "steps (weight cache, as the trainer runs); 1 = in every step")
    ap.add_argument("--kernels", type=int, default=0,
                    help="with the breakdown: also list each case's N longest kernels (ms and calls per step)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_block needs a CUDA GPU", file=sys.stderr)
        return 2
    variants = args.variants.split(",")
    for variant in variants:
        try:
            parse_variant(variant)
        except ValueError as e:
            ap.error(str(e))
    if args.accumulation < 1:
        ap.error(f"--accumulation must be >= 1; got {args.accumulation}")
    batch = max(1, args.tokens // args.seq)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "seq": args.seq, "tokens": batch * args.seq, "accumulation": args.accumulation}
    results = []
    for width in (int(w) for w in args.widths.split(",")):
        for variant in variants:
            r = run(width, args.seq, batch, variant, args.warmup, args.iters, not args.no_profile, args.graphs,
                    args.accumulation, args.kernels)
            results.append(r)
            print(f"width {width} {variant}: {r['ms']:.2f} ms"
                  + (f" (graphs {r['ms_graphs']:.2f} ms)" if "ms_graphs" in r else "")
                  + f", peak {r['peak_bytes'] / 2**20:.0f} MiB, saved {r['saved_bytes'] / 2**20:.0f} MiB", flush=True)
            for name, ms, calls, group in r.get("top_kernels", []):
                print(f"    {ms:7.3f} ms  {calls:5.1f}x  {group:<14} {name}", flush=True)
            if args.json:       # after every run: a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
