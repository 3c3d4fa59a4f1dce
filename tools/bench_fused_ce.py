"""The LM head + cross entropy, forward + backward: unfused (F.linear, -inf padding,
vocab_parallel_cross_entropy) vs fused and chunked (megaq.nn.fused_cross_entropy), on one GPU.

    python tools/bench_fused_ce.py --json bench_fused_ce.json
    python tools/bench_fused_ce.py --tokens 16384 --chunks 640,1280,2560 --iters 20

For each token count (GPT-2 124M's micro batch of 16 x 1024 by default, and 4 x 1024) and variant, on
BF16 ``[tokens, hidden]`` activations and a BF16 ``[padded vocab, hidden]`` weight:
- time: median of CUDA-event timings of forward + backward (gradients reset between steps);
- peak memory: ``torch.cuda.max_memory_allocated`` during one step minus what was allocated before it
  (the input and the weight).
Writes JSON; prints a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaq.nn import fused_linear_cross_entropy, vocab_parallel_cross_entropy  # noqa: E402
from megaq.nn.fused_cross_entropy import default_chunk_tokens  # noqa: E402

MIB = 2 ** 20


def unfused(hidden, weight, target, vocab_size, chunk_tokens=None):
    logits = torch.nn.functional.linear(hidden, weight)
    padding = torch.arange(weight.size(0), device=weight.device) >= vocab_size
    return vocab_parallel_cross_entropy(logits.masked_fill(padding, float("-inf")), target)


def fused(hidden, weight, target, vocab_size, chunk_tokens=None):
    return fused_linear_cross_entropy(hidden, weight, target, chunk_tokens=chunk_tokens,
                                      vocab_size=vocab_size)


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
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": statistics.median(times), "peak_mib": peak / MIB}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="16384,4096")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--padded-vocab", type=int, default=50304)
    ap.add_argument("--chunks", default="", help="fused chunk sizes besides the default, e.g. 640,2560")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    default_chunk = default_chunk_tokens(args.padded_vocab)
    variants = [("unfused", unfused, None), (f"fused, chunk {default_chunk} (default)", fused, None)]
    variants += [(f"fused, chunk {c}", fused, int(c)) for c in args.chunks.split(",") if c]
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        hidden = torch.randn(tokens, args.hidden, device="cuda", generator=g).bfloat16().requires_grad_()
        weight = torch.randn(args.padded_vocab, args.hidden, device="cuda", generator=g) * 0.02
        weight[args.vocab:] = 0
        weight = weight.bfloat16().requires_grad_()
        target = torch.randint(0, args.vocab, (tokens,), device="cuda", generator=g)
        for name, fn, chunk in variants:
            result = measure(fn, hidden, weight, target, args.vocab, chunk, args.warmup, args.iters)
            rows.append({"tokens": tokens, "variant": name, **result})
        del hidden, weight, target
        torch.cuda.empty_cache()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": sys.argv}
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "environment": env, "results": rows},
                                              indent=1))
    print(f"\n{env['gpu']}, hidden {args.hidden}, vocab {args.vocab} (padded {args.padded_vocab}), BF16, "
          f"forward + backward\n")
    print("| tokens | variant | ms | vs unfused | peak MiB |")
    print("|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["tokens"] == row["tokens"] and r["variant"] == "unfused")
        print(f"| {row['tokens']} | {row['variant']} | {row['ms']:.2f} | {base['ms'] / row['ms']:.2f}× | "
              f"{row['peak_mib']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
