"""The LM head + cross entropy, forward + backward: unfused (F.linear, -inf padding,
vocab_parallel_cross_entropy) vs fused and chunked (megaq.nn.fused_cross_entropy) through its torch
path and through its Triton kernels, on one GPU.

    python tools/bench_fused_ce.py --json bench_fused_ce.json
    python tools/bench_fused_ce.py --tokens 16384 --chunks 640,1280,2560 --iters 20 --sweep

For each token count (GPT-2 124M's micro batch of 16 x 1024 by default, and 4 x 1024) and variant, on
BF16 ``[tokens, hidden]`` activations and a BF16 ``[padded vocab, hidden]`` weight:
- unfused;
- fused-torch, chunk c: the torch path (``FUSED_KERNELS = False``), dW as a BF16 GEMM added to the FP32
  buffer (the path as committed before the kernels);
- fused-triton, chunk c: the kernels, dW accumulated into the FP32 buffer by the GEMM
  (``WGRAD_INTO_FP32``, where torch supports it; the JSON says whether it did);
- fused-triton, chunk c, dW BF16 + add: the kernels with the BF16 GEMM + add;
- time: median of CUDA-event timings of forward + backward (gradients reset between steps);
- peak memory: ``torch.cuda.max_memory_allocated`` during one step minus what was allocated before it
  (the input and the weight).
``--sweep``: first the two kernels alone on one chunk's logits (``[largest chunk, padded vocab]`` BF16)
for a few tile configurations (triton.testing.do_bench, median, L2 flushed; softmax_grad_ runs in
place on the same buffer every call), the fastest of which the fused-triton rows then use.
Writes JSON; prints markdown tables last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import megaq.nn.fused_cross_entropy as fce  # noqa: E402
from cuda_timing import event_times  # noqa: E402  (tools/, the script's directory)
from megaq.kernels import cross_entropy as ce_kernels  # noqa: E402
from megaq.kernels import dispatch  # noqa: E402
from megaq.nn import fused_linear_cross_entropy, vocab_parallel_cross_entropy  # noqa: E402

MIB = 2 ** 20
# (CE_BLOCK columns per tile, CE_WARPS); one row per program at a 50k vocabulary
SWEEP = [dict(CE_BLOCK=b, CE_TILE=b, CE_WARPS=w)
         for b, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8), (8192, 16))]


def unfused(hidden, weight, target, vocab_size, chunk_tokens=None):
    logits = torch.nn.functional.linear(hidden, weight)
    padding = torch.arange(weight.size(0), device=weight.device) >= vocab_size
    return vocab_parallel_cross_entropy(logits.masked_fill(padding, float("-inf")), target)


def fused(hidden, weight, target, vocab_size, chunk_tokens=None):
    return fused_linear_cross_entropy(hidden, weight, target, chunk_tokens=chunk_tokens,
                                      vocab_size=vocab_size)


@contextlib.contextmanager
def fused_path(kernels: bool, wgrad_into_fp32: bool, kernel_config: dict):
    old = fce.FUSED_KERNELS, fce.WGRAD_INTO_FP32
    fce.FUSED_KERNELS, fce.WGRAD_INTO_FP32 = kernels, wgrad_into_fp32
    try:
        with dispatch.config_override(**kernel_config):
            yield
    finally:
        fce.FUSED_KERNELS, fce.WGRAD_INTO_FP32 = old


def measure(fn, hidden, weight, target, vocab_size, chunk_tokens, warmup, iters) -> dict:
    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, target, vocab_size, chunk_tokens).backward()

    for _ in range(warmup):
        step()
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {"ms": statistics.median(event_times(step, iters)), "peak_mib": peak / MIB}


def sweep_kernels(rows: int, vocab: int, padded: int) -> list[dict]:
    """The two kernels alone on one BF16 chunk, per tile configuration: ms and the bytes they move
    (row_stats reads the chunk, softmax_grad_ reads and writes it) per second."""
    import triton
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(rows, padded, device="cuda", generator=g) * 3).bfloat16()
    target = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    scale = torch.full((rows,), 1.0 / rows, device="cuda")
    chunk_bytes = logits.numel() * logits.element_size()
    results = []
    for cfg in SWEEP:
        try:
            with dispatch.config_override(**cfg):
                stats = ce_kernels.row_stats(logits, target, vocab)
                stats_ms = triton.testing.do_bench(lambda: ce_kernels.row_stats(logits, target, vocab),
                                                   return_mode="median")
                grad_ms = triton.testing.do_bench(
                    lambda: ce_kernels.softmax_grad_(logits, target, vocab, stats[0], stats[1], scale),
                    return_mode="median")
            results.append({**cfg, "row_stats_ms": stats_ms, "softmax_grad_ms": grad_ms,
                            "total_ms": stats_ms + grad_ms,
                            "row_stats_gbps": chunk_bytes / stats_ms / 1e6,
                            "softmax_grad_gbps": 2 * chunk_bytes / grad_ms / 1e6})
        except Exception as e:  # a configuration that does not compile is a row, not the end
            results.append({**cfg, "error": f"{type(e).__name__}: {e}"[:300]})
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="16384,4096")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--padded-vocab", type=int, default=50304)
    ap.add_argument("--chunks", default="1280,2560", help="fused chunk sizes, e.g. 640,1280,2560")
    ap.add_argument("--sweep", action="store_true", help="time kernel tile configurations first")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    chunks = [int(c) for c in args.chunks.split(",") if c]
    device = torch.device("cuda", torch.cuda.current_device())
    wgrad_into_fp32 = fce._addmm_into_fp32_supported(device, torch.bfloat16)
    kernel_default_chunk = fce.default_chunk_tokens(args.padded_vocab, 2)

    sweep, kernel_config = [], {}
    if args.sweep:
        sweep = sweep_kernels(max(chunks), args.vocab, args.padded_vocab)
        timed = [r for r in sweep if "error" not in r]
        if timed:
            best = min(timed, key=lambda r: r["total_ms"])
            kernel_config = {k: best[k] for k in ("CE_BLOCK", "CE_TILE", "CE_WARPS")}

    variants = [("unfused", unfused, None, None)]
    for c in chunks:
        variants.append((f"fused-torch, chunk {c}", fused, c, (False, False)))
    for c in chunks:
        tag = " (default)" if c == kernel_default_chunk else ""
        variants.append((f"fused-triton, chunk {c}{tag}", fused, c, (True, True)))
        variants.append((f"fused-triton, chunk {c}, dW BF16 + add", fused, c, (True, False)))
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        hidden = torch.randn(tokens, args.hidden, device="cuda", generator=g).bfloat16().requires_grad_()
        weight = torch.randn(args.padded_vocab, args.hidden, device="cuda", generator=g) * 0.02
        weight[args.vocab:] = 0
        weight = weight.bfloat16().requires_grad_()
        target = torch.randint(0, args.vocab, (tokens,), device="cuda", generator=g)
        for name, fn, chunk, path in variants:
            setting = (fused_path(*path, kernel_config) if path is not None else contextlib.nullcontext())
            try:
                with setting:
                    result = measure(fn, hidden, weight, target, args.vocab, chunk, args.warmup, args.iters)
            except Exception as e:  # a failing variant is a row, not the end of the run
                result = {"error": f"{type(e).__name__}: {e}"[:300]}
            rows.append({"tokens": tokens, "variant": name, **result})
            torch.cuda.empty_cache()
        del hidden, weight, target
        torch.cuda.empty_cache()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": sys.argv,
           "wgrad_into_fp32_supported": wgrad_into_fp32, "kernel_config": kernel_config or "default"}
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "environment": env, "sweep": sweep,
                                               "results": rows}, indent=1))
    if sweep:
        print(f"\nkernels alone, BF16 chunk [{max(chunks)}, {args.padded_vocab}] (do_bench median)\n")
        print("| CE_BLOCK | warps | row_stats ms (GB/s) | softmax_grad_ ms (GB/s) | total ms |")
        print("|---|---|---|---|---|")
        for r in sweep:
            if "error" in r:
                print(f"| {r['CE_BLOCK']} | {r['CE_WARPS']} | {r['error']} | | |")
            else:
                print(f"| {r['CE_BLOCK']} | {r['CE_WARPS']} | {r['row_stats_ms']:.3f} ({r['row_stats_gbps']:.0f}) "
                      f"| {r['softmax_grad_ms']:.3f} ({r['softmax_grad_gbps']:.0f}) | {r['total_ms']:.3f} |")
    print(f"\n{env['gpu']}, hidden {args.hidden}, vocab {args.vocab} (padded {args.padded_vocab}), BF16, "
          f"forward + backward; dW into FP32 supported: {wgrad_into_fp32}; kernel tiles: "
          f"{kernel_config or 'default'}\n")
    print("| tokens | variant | ms | vs unfused | peak MiB |")
    print("|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['tokens']} | {row['variant']} | {row['error']} | | |")
            continue
        base = next(r for r in rows if r["tokens"] == row["tokens"] and r["variant"] == "unfused")
        speedup = f"{base['ms'] / row['ms']:.2f}×" if "ms" in base else "—"
        print(f"| {row['tokens']} | {row['variant']} | {row['ms']:.2f} | {speedup} | {row['peak_mib']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
