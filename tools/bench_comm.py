#!/usr/bin/env python
"""Benchmark BF16 vs INT8 collectives (megaq.parallel.quantized_comm): one table, JSON out.

    torchrun --nproc_per_node 4 tools/bench_comm.py [--json out.json] [--preset gpt2-xl,1.3b]
    torchrun --nproc_per_node 2 tools/bench_comm.py --preset tiny --iters 5      # CPU / gloo smoke

The whole world is one group (the tensor-parallel group for the activation collectives, the
data-parallel group for the gradient all-reduce). Backend: NCCL when CUDA is available, else gloo.

Rows, for each activation shape [T, B, H] of the preset (sequence parallel: each rank holds
[T/w, B, H]):
  all_gather       [T/w, B, H] -> [T, B, H]   (column-parallel input under sequence parallelism)
  reduce_scatter   [T, B, H] -> [T/w, B, H]   (row-parallel output under sequence parallelism)
  all_reduce       [T, B, H]                  (row-parallel output without sequence parallelism)
and a data-parallel gradient bucket:
  grad_all_reduce  N FP32 gradients, averaged: BF16 all-reduce (DeepSpeed's communication_data_type
                   bf16) vs megaq's INT8 error-feedback all-reduce (parallel.grad_compression int8_ef)
Each collective runs as:
  bf16        the exact collective on the BF16 tensor
  int8        the quantized collective end to end (quantize, exchange, dequantize, FP32 sum)
  int8-wire   only the exchange: the same collective on a uint8 buffer of the INT8 path's byte
              count (what the quantized path would cost with free quantization kernels)
Columns: bytes this rank sends (CommStats wire bytes), median time over --iters (after --warmup,
a barrier before each), bus bandwidth (wire bytes / time), and the INT8 / BF16 time ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaq.parallel.grad_compression import GradCompressionState, compressed_all_reduce_  # noqa: E402
from megaq.parallel.quantized_comm import (exact_all_gather, exact_all_reduce,  # noqa: E402
                                           exact_reduce_scatter, quantized_all_gather,
                                           quantized_all_reduce, quantized_reduce_scatter,
                                           track_comm)

# (name, hidden, [(seq, micro_batch)], gradient bucket elements)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

PRESETS = {
    "gpt2-xl": ("GPT-2 XL", 1600, [(1024, 4), (1024, 8), (2048, 4), (2048, 8)], 1 << 25),
    "1.3b": ("1.3B", 2048, [(2048, 4), (2048, 8)], 1 << 25),
    "tiny": ("tiny (CPU smoke)", 1600, [(256, 2), (1024, 4)], 1 << 21),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _wire(fn) -> tuple[int, dict]:
    with track_comm() as stats:
        fn()
    return stats.wire_bytes(), stats.as_dict()


def _uint8_twin(kind: str, nbytes_send: int, world: int, device):
    """The exact collective of `kind` on a uint8 buffer whose wire bytes equal `nbytes_send`."""
    if kind == "all_gather":
        n = max(1, nbytes_send // (world - 1))
        buf = torch.zeros(n, dtype=torch.uint8, device=device)
        out = torch.empty(world * n, dtype=torch.uint8, device=device)
        return lambda: _all_gather_single(out, buf)
    n = max(world, nbytes_send * world // (world - 1) // world * world)
    buf = torch.zeros(n, dtype=torch.uint8, device=device)
    out = torch.empty_like(buf)
    if kind == "reduce_scatter":
        return lambda: dist.all_to_all_single(out, buf)
    # all-reduce = reduce-scatter + all-gather: an all-to-all then an all-gather, half the bytes each
    half = torch.zeros(max(world, n // 2 // world * world), dtype=torch.uint8, device=device)
    half_out = torch.empty_like(half)
    shard = torch.zeros(half.numel() // world, dtype=torch.uint8, device=device)
    gathered = torch.empty(shard.numel() * world, dtype=torch.uint8, device=device)

    def run():
        dist.all_to_all_single(half_out, half)
        _all_gather_single(gathered, shard)
    return run


def bench(args) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        raise SystemExit("run with at least 2 processes (torchrun --nproc_per_node N)")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rows = []
    g = torch.Generator(device=device).manual_seed(1234 + rank)
    for preset in args.preset.split(","):
        label, hidden, shapes, grad_numel = PRESETS[preset]
        if args.grad_numel:
            grad_numel = args.grad_numel
        cases = []
        for seq, mb in shapes:
            full = torch.randn(seq, mb, hidden, generator=g, device=device).to(torch.bfloat16)
            shard = full[: seq // world].contiguous()
            shape = f"T={seq} B={mb} H={hidden}"
            cases += [
                ("all_gather", shape, lambda s=shard: exact_all_gather(s, 0),
                 lambda s=shard: quantized_all_gather(s, 0, block=args.block)),
                ("reduce_scatter", shape, lambda f=full: exact_reduce_scatter(f, 0),
                 lambda f=full: quantized_reduce_scatter(f, 0, block=args.block)),
                ("all_reduce", shape, lambda f=full: exact_all_reduce(f),
                 lambda f=full: quantized_all_reduce(f, block=args.block)),
            ]
        grads = torch.randn(grad_numel, generator=g, device=device) * 1e-3
        state = GradCompressionState(block=args.block)
        cases.append(("grad_all_reduce", f"N={grad_numel} fp32",
                      lambda: exact_all_reduce(grads.to(torch.bfloat16), average=True),
                      lambda: compressed_all_reduce_([grads.clone()], None, state)))
        for kind, shape, exact_fn, int8_fn in cases:
            bf16_bytes, _ = _wire(exact_fn)
            int8_bytes, detail = _wire(int8_fn)
            t_bf16 = _time(exact_fn, device, args.iters, args.warmup)
            t_int8 = _time(int8_fn, device, args.iters, args.warmup)
            twin = _uint8_twin("all_reduce" if kind == "grad_all_reduce" else kind, int8_bytes, world, device)
            t_wire = _time(twin, device, args.iters, args.warmup)
            rows.append(dict(model=label, collective=kind, shape=shape, world=world,
                             bf16_bytes=bf16_bytes, int8_bytes=int8_bytes,
                             byte_ratio=int8_bytes / bf16_bytes,
                             bf16_ms=t_bf16 * 1e3, int8_ms=t_int8 * 1e3, int8_wire_ms=t_wire * 1e3,
                             bf16_busbw_gbs=bf16_bytes / t_bf16 / 1e9,
                             int8_wire_busbw_gbs=int8_bytes / t_wire / 1e9,
                             int8_over_bf16_time=t_int8 / t_bf16,
                             int8_wire_over_bf16_time=t_wire / t_bf16, int8_detail=detail))
            if rank == 0 and args.verbose:
                print(f"done {label} {kind} {shape}", flush=True)
    return dict(rows=rows, meta=_meta(device, world, args))


def _meta(device, world, args) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=commit,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                backend=dist.get_backend(), world=world, torch=torch.__version__, block=args.block,
                iters=args.iters, warmup=args.warmup)


def print_table(result: dict) -> None:
    m = result["meta"]
    print(f"# bench_comm: {m['device']} x{m['world']}, backend {m['backend']}, torch {m['torch']}, "
          f"block {m['block']}, {m['date']}, commit {m['commit'] or '?'}  (median of {m['iters']})")
    head = ("model", "collective", "shape", "BF16 MB", "INT8 MB", "bytes", "BF16 ms", "INT8 ms",
            "wire ms", "INT8/BF16", "wire/BF16", "BF16 GB/s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in result["rows"]:
        print(f"| {r['model']} | {r['collective']} | {r['shape']} | {r['bf16_bytes'] / 1e6:.2f} | "
              f"{r['int8_bytes'] / 1e6:.2f} | {r['byte_ratio']:.3f}x | {r['bf16_ms']:.3f} | "
              f"{r['int8_ms']:.3f} | {r['int8_wire_ms']:.3f} | {r['int8_over_bf16_time']:.2f}x | "
              f"{r['int8_wire_over_bf16_time']:.2f}x | {r['bf16_busbw_gbs']:.1f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt2-xl,1.3b", help=f"comma-separated of {sorted(PRESETS)}")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grad-numel", type=int, default=0, help="gradient bucket elements (default: preset)")
    p.add_argument("--json", default="", help="write the rows and metadata here (rank 0)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    for preset in args.preset.split(","):
        if preset not in PRESETS:
            p.error(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        result = bench(args)
        if dist.get_rank() == 0:
            print_table(result)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1))
                print(f"wrote {args.json}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
