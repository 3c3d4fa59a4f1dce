"""Where a training step's memory goes, by recipe: bytes counted on the CPU (they do not depend on the
device), to explain the peak memory that tools/bench_e2e.py measures on a GPU.

    python tools/memory_breakdown.py --model gpt2 --seq 1024 --micro-batch 16 --recipes bf16,int8,int8_df
    python tools/memory_breakdown.py --model gpt2 --micro-batch 16 --recipes bf16,int8_df,int8_df_attn8
    python tools/memory_breakdown.py --model gpt2 --seq 1024 --micro-batch 16 --no-fused-ce

For one micro batch of a GPT preset in BF16 (the trainer's dtype on GPUs):
- saved activations: the bytes of the distinct storages autograd holds for backward at the end of the
  forward (`torch.autograd.graph.saved_tensors_hooks`), grouped by the innermost module that saved
  them (the quantized linears' operands, LayerNorms, attention: BF16 q, k, v and output with SDPA,
  INT8 copies in the `*_attn8` variants (`quant.attention_saves: int8`), the block itself for the
  INT8 data flow's functional operators and its attention, the model for the head and the cross
  entropy: with the fused head + loss (`model.fused_cross_entropy`, the default) the head input's
  and weight's gradients it computed in the forward, with `--no-fused-ce` the FP32 softmax and the
  head's input). Counted at `--count-batch` and twice as many sequences and extrapolated linearly
  to `--micro-batch` (saved bytes are a fixed part, the fused head's weight gradient, plus a part
  proportional to the tokens);
- model state: parameters in BF16 and the AdamW mixed-precision state at 16 bytes per parameter (BF16
  weight and gradient, FP32 master weight, exp_avg, exp_avg_sq), what DeepSpeed's BF16 optimizer
  keeps on one GPU, before its own buffers;
- the INT8 weight cache (`quant.cache_weights`, quantized recipes): W and Wᵀ in INT8 with FP32 scales
  for every block linear (padded to whole Hadamard blocks), counted from the cache's entries after a
  forward and backward.

What is not counted: transient buffers (unfused: the logits' gradient in the backward; fused: one
chunk's logits and their gradient in the forward, <= 256 MiB FP32 + its BF16 copy), the
caching allocator's slack and, with CUDA graphs, the graph pool (which holds the activations counted
here). Writes JSON with `--json`; prints a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaq.models.gpt import GPT, GPTConfig  # noqa: E402
from megaq.ops import weight_cache  # noqa: E402
from megaq.training.config import MODEL_PRESETS  # noqa: E402

GIB = 1024 ** 3
OPTIMIZER_BYTES_PER_PARAM = 16      # bf16 weight + bf16 grad + fp32 master + fp32 exp_avg + fp32 exp_avg_sq
# variant -> (recipe, data flow, attention saves); *_attn8: attention keeps INT8 q, k, v, output
VARIANTS = {"bf16": ("bf16", "bf16", "bf16"), "int8": ("int8", "bf16", "bf16"),
            "int8_df": ("int8", "int8", "bf16"), "int4": ("int4", "bf16", "bf16"),
            "bf16_attn8": ("bf16", "bf16", "int8"),
            "int8_attn8": ("int8", "bf16", "int8"), "int8_df_attn8": ("int8", "int8", "int8")}


def build(model: str, seq: int, variant: str, vocab: int, fused_cross_entropy: bool = True) -> GPT:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    if model not in MODEL_PRESETS:
        raise ValueError(f"unknown model {model!r}; choose from {sorted(MODEL_PRESETS)}")
    recipe, data_flow, attention_saves = VARIANTS[variant]
    preset = MODEL_PRESETS[model]
    cfg = GPTConfig(vocab_size=vocab, seq_len=seq, n_layer=preset["n_layer"], n_head=preset["n_head"],
                    n_embd=preset["n_embd"], recipe={"preset": recipe, "check_finite": False},
                    data_flow=data_flow, fused_cross_entropy=fused_cross_entropy,
                    attention_saves=attention_saves)
    return GPT(cfg, init_seed=0).bfloat16()


def saved_activation_bytes(model: GPT, ids: torch.Tensor) -> dict[str, int]:
    """Bytes of the distinct non-parameter storages saved for backward by one forward, by the class
    of the innermost module running when each was saved."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack: list[str] = [type(model).__name__]
    seen: dict[int, tuple[int, str]] = {}

    def push(module, _inputs):
        stack.append(type(module).__name__)

    def pop(module, _inputs, _output):
        stack.pop()

    handles = [m.register_forward_pre_hook(push) for m in model.modules() if m is not model]
    handles += [m.register_forward_hook(pop) for m in model.modules() if m is not model]

    def pack(t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (s.nbytes(), stack[-1])
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, torch.roll(ids, -1, 1))
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    by_owner: dict[str, int] = defaultdict(int)
    for nbytes, owner in seen.values():
        by_owner[owner] += nbytes
    return dict(by_owner)


def breakdown(model_name: str, seq: int, micro_batch: int, count_batch: int, variant: str,
              vocab: int, fused_cross_entropy: bool = True) -> dict:
    torch.manual_seed(0)
    model = build(model_name, seq, variant, vocab, fused_cross_entropy)
    ids = torch.randint(0, vocab, (2 * count_batch, seq))
    weight_cache.clear()
    with weight_cache.caching(variant != "bf16"):
        once = saved_activation_bytes(model, ids[:count_batch])
        twice = saved_activation_bytes(model, ids)
        # the saved-tensor hooks hand backward new tensor objects, which the cache (entries on the
        # weight's own object) does not recognise: fill it with one step as the trainer runs it
        model(ids, torch.roll(ids, -1, 1)).backward()
        cache = weight_cache.cached_bytes()
    weight_cache.clear()
    n_params = sum(p.numel() for p in model.parameters())
    acts = {}
    for owner in once.keys() | twice.keys():  # bytes = fixed + per_batch x sequences
        per_batch = (twice.get(owner, 0) - once.get(owner, 0)) / count_batch
        acts[owner] = once.get(owner, 0) + per_batch * (micro_batch - count_batch)
    out = {"model": model_name, "seq": seq, "micro_batch": micro_batch, "variant": variant,
           "fused_cross_entropy": fused_cross_entropy, "parameters": n_params, "activations_by_module": acts,
           "activations": sum(acts.values()), "model_state": n_params * OPTIMIZER_BYTES_PER_PARAM,
           "weight_cache": cache}
    out["total"] = out["activations"] + out["model_state"] + out["weight_cache"]
    return out


def table(rows: list[dict]) -> str:
    owners = sorted({k for r in rows for k in r["activations_by_module"]},
                    key=lambda k: -max(r["activations_by_module"].get(k, 0) for r in rows))
    head = ["item"] + [r["variant"] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(name, values):
        lines.append("| " + " | ".join([name] + [f"{v / GIB:.2f}" for v in values]) + " |")
    for owner in owners:
        line(f"saved by {owner}", [r["activations_by_module"].get(owner, 0) for r in rows])
    line("**saved activations**", [r["activations"] for r in rows])
    line("model + AdamW state (16 B/param)", [r["model_state"] for r in rows])
    line("INT8 weight cache", [r["weight_cache"] for r in rows])
    line("**total counted**", [r["total"] for r in rows])
    base = rows[0]
    lines.append("| vs " + base["variant"] + " (activations / total) | " + " | ".join(
        f"{r['activations'] / base['activations']:.2f}× / {r['total'] / base['total']:.2f}×" for r in rows) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2", help=f"one of {sorted(MODEL_PRESETS)}")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--count-batch", type=int, default=1,
                    help="sequences actually run (and twice as many; extrapolated to --micro-batch)")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--recipes", default="bf16,int8,int8_df", help=f"from {sorted(VARIANTS)}")
    ap.add_argument("--no-fused-ce", action="store_true",
                    help="the unfused lm_head + cross entropy (model.fused_cross_entropy=false)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = [breakdown(args.model, args.seq, args.micro_batch, args.count_batch, v, args.vocab,
                      fused_cross_entropy=not args.no_fused_ce)
            for v in args.recipes.split(",")]
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    head = "unfused head + cross entropy" if args.no_fused_ce else "fused head + cross entropy"
    print(f"\n{args.model}, seq {args.seq}, micro batch {args.micro_batch}, {head} (GiB; counted on the "
          f"CPU, see the module doc for what is not counted)\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
