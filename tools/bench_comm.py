#!/usr/bin/env python
"""Benchmark BF16 vs INT8 collectives (megaq.parallel.quantized_comm): one table, JSON out.

    torchrun --nproc_per_node 4 tools/bench_comm.py [--json out.json] [--preset gpt2-xl,1.3b]
    torchrun --nproc_per_node 2 tools/bench_comm.py --preset tiny --iters 5      # CPU / gloo smoke
    python tools/bench_comm.py --kernels-only [--json out.json]                  # one GPU, no exchange

The whole world is one group (the tensor-parallel group for the activation collectives, the
data-parallel group for the gradient all-reduce). Backend: NCCL when CUDA is available, else gloo.

Rows, for each activation shape [T, B, H] of the preset (sequence parallel: each rank holds
[T/w, B, H]):
  all_gather       [T/w, B, H] -> [T, B, H]   (column-parallel input under sequence parallelism)
  reduce_scatter   [T, B, H] -> [T/w, B, H]   (row-parallel output under sequence parallelism)
  all_reduce       [T, B, H]                  (row-parallel output without sequence parallelism)
and a data-parallel gradient bucket:
  grad_all_reduce  N FP32 gradients, averaged: BF16 all-reduce (DeepSpeed's communication_data_type
                   bf16) vs megaq's INT8 error-feedback all-reduce (parallel.grad_compression int8_ef);
                   grad_all_reduce[int4] the same with INT4 payloads (int4_ef). On GPUs these run
                   the fused kernels (megaq.kernels.grad_comm); `unfused_ms` times the torch path
                   (grad_compression.FUSED_KERNELS = False) and `fused_matches_torch` says whether
                   both gave the same bits (outputs and residuals of two steps; None: not fused)
Each collective runs as:
  bf16        the exact collective on the BF16 tensor
  int8        the quantized collective end to end (quantize, exchange, dequantize, FP32 sum)
  int8-wire   only the exchange: the same collective on a uint8 buffer of the INT8 path's byte
              count (what the quantized path would cost with free quantization kernels)
Columns: bytes this rank sends (CommStats wire bytes), median time over --iters (after --warmup,
a barrier before each), bus bandwidth (wire bytes / time), and the INT8 / BF16 time ratio.

--kernels-only (one process, one GPU, no torchrun): the compute of the compressed gradient
all-reduce without the exchange, for a simulated group of 2 and 4 ranks (the all-to-all hands each
rank its own send buffer back, the all-gather repeats its segment): `_compressed_all_reduce_flat`
fused and unfused (torch path), and the fused passes one by one (worker quantize, server
sum + requantize, dequantize, residual drop), with the bytes each pass moves over its time; a plain
FP32 copy of the bucket gives the memory bandwidth for scale.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench_env, also when imported by the tests

import megaq.parallel.grad_compression as grad_compression  # noqa: E402
from bench_env import checkout_commit  # noqa: E402
import megaq.parallel.quantized_comm as quantized_comm  # noqa: E402
from megaq import kernels  # noqa: E402
from megaq.kernels import grad_comm  # noqa: E402
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


def _time(fn, device, iters: int, warmup: int, barrier: bool = True) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if barrier:
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
        for bits, kind in ((8, "grad_all_reduce"), (4, "grad_all_reduce[int4]")):
            state = GradCompressionState(block=args.block, bits=bits)
            cases.append((kind, f"N={grad_numel} fp32",
                          lambda: exact_all_reduce(grads.to(torch.bfloat16), average=True),
                          lambda state=state: compressed_all_reduce_([grads.clone()], None, state)))
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
            if kind.startswith("grad_all_reduce"):
                bits = 4 if kind.endswith("[int4]") else 8
                with _fused_kernels(False):
                    rows[-1]["unfused_ms"] = _time(int8_fn, device, args.iters, args.warmup) * 1e3
                rows[-1]["fused_matches_torch"] = _fused_matches_torch(grads, args.block, bits)
            if rank == 0 and args.verbose:
                print(f"done {label} {kind} {shape}", flush=True)
    return dict(rows=rows, meta=_meta(device, world, args))


@contextlib.contextmanager
def _fused_kernels(enabled: bool):
    """Run the compressed gradient all-reduce through the fused kernels (where they apply) or not."""
    old = grad_compression.FUSED_KERNELS
    grad_compression.FUSED_KERNELS = enabled
    try:
        yield
    finally:
        grad_compression.FUSED_KERNELS = old


def _fused_matches_torch(grads: torch.Tensor, block: int, bits: int):
    """Two steps of the compressed all-reduce of `grads` (the second with live residuals) through
    the fused kernels and through the torch path: the same bits in outputs and residuals? None
    where the fused kernels do not run."""
    if not grad_comm.fused_supported(grads, block, bits):
        return None
    runs = []
    for enabled in (True, False):
        state = GradCompressionState(block=block, bits=bits)
        with _fused_kernels(enabled):
            outs = [compressed_all_reduce_([grads.clone()], None, state)[0] for _ in range(2)]
        runs.append(outs + [t for pair in state.residuals.values() for t in pair])
    return all(torch.equal(a, b) for a, b in zip(*runs))


@contextlib.contextmanager
def _loopback(world: int):
    """A simulated group of `world` ranks in this process: the all-to-all copies the send buffer into
    the receive buffer, the all-gather repeats this rank's segment, this rank is rank 0."""
    def all_to_all(out, inp, group):
        out.copy_(inp)
        return 0

    def all_gather(out, inp, group=None):
        out.view(world, -1).copy_(inp.reshape(1, -1).expand(world, -1))

    patches = [(quantized_comm, "_world", lambda group=None: world),
               (grad_compression, "_world", lambda group=None: world),
               (quantized_comm, "_all_to_all_equal", all_to_all),
               (quantized_comm, "_all_gather_single", all_gather),
               (grad_compression, "dist", SimpleNamespace(get_rank=lambda group=None: 0))]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def kernels_only(args) -> dict:
    """The compressed gradient all-reduce's compute on one GPU, world simulated (see the docstring)."""
    if not torch.cuda.is_available():
        raise SystemExit("--kernels-only times the GPU kernels: it needs a CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=checkout_commit(),
                device=torch.cuda.get_device_name(device), torch=torch.__version__, block=args.block,
                iters=args.iters, warmup=args.warmup, mode="kernels-only")
    return dict(rows=_kernels_only_rows(args, device), meta=meta)


def _kernels_only_rows(args, device) -> list[dict]:
    n, block = args.grad_numel or (1 << 25), args.block
    x = torch.randn(n, generator=torch.Generator(device=device).manual_seed(1234), device=device) * 1e-3
    copy_out = torch.empty_like(x)
    t_copy = _time(lambda: copy_out.copy_(x), device, args.iters, args.warmup, barrier=False)
    rows = []
    for world in (int(w) for w in args.worlds.split(",")):
        for bits in (int(b) for b in args.bits.split(",")):
            if not grad_comm.fused_supported(x, block, bits):
                raise SystemExit(f"the fused kernels do not take block {block} at {bits} bits")
            row = dict(world=world, bits=bits, numel=n, block=block, copy_fp32_ms=t_copy * 1e3)
            with _loopback(world):
                for enabled, name in ((True, "fused_ms"), (False, "unfused_ms")):
                    state = GradCompressionState(block=block, bits=bits)
                    with _fused_kernels(enabled):
                        fn = lambda state=state: grad_compression._compressed_all_reduce_flat(  # noqa: E731
                            x, None, state, "bench", True)
                        row[name] = _time(fn, device, args.iters, args.warmup, barrier=False) * 1e3
            rc = quantized_comm._padded_numel(n, world, block) // block // world
            padded = world * rc * block
            send = grad_comm.exchange_buffer(world, rc, block, bits, device)
            seg = grad_comm.exchange_buffer(1, rc, block, bits, device)
            worker, server = (torch.zeros(padded, device=device), torch.zeros(padded // world, device=device))
            out = torch.empty(n, device=device)
            flag = torch.zeros(1, dtype=torch.int32, device=device)
            passes = {
                # name: (function, bytes read + written)
                "worker": (lambda: grad_comm.worker_quantize(x, worker, send, rc, block, bits),
                           4 * n + 8 * padded + send.numel()),
                "server": (lambda: grad_comm.server_quantize(send, server, seg, rc, block, bits),
                           send.numel() + 8 * padded // world + seg.numel()),
                "dequantize": (lambda: grad_comm.dequantize_gathered(send, out, rc, block, bits),
                               send.numel() + 4 * n),
                "zero_residuals": (lambda: grad_comm.zero_residuals_if_flag(flag, worker, server), 0),
            }
            for name, (fn, nbytes) in passes.items():
                t = _time(fn, device, args.iters, args.warmup, barrier=False)
                row[f"{name}_ms"] = t * 1e3
                if nbytes:
                    row[f"{name}_gbs"] = nbytes / t / 1e9
            row["copy_fp32_gbs"] = 8 * n / t_copy / 1e9
            if args.sweep:   # tile sizes (elements per program) x warps of the three data passes
                row["sweep"] = []
                for tile in (2048, 4096, 8192, 16384):
                    for warps in (4, 8):
                        with kernels.config_override(COMM_TILE=tile, COMM_WARPS=warps):
                            times = {name: _time(fn, device, args.iters, args.warmup, barrier=False) * 1e3
                                     for name, (fn, _) in passes.items() if name != "zero_residuals"}
                        row["sweep"].append(dict(tile=tile, warps=warps, **times))
            rows.append(row)
    return rows


def print_kernels_table(result: dict) -> None:
    m = result["meta"]
    print(f"# bench_comm --kernels-only: {m['device']}, torch {m['torch']}, block {m['block']}, "
          f"{m['date']}, commit {m['commit'] or '?'}  (median of {m['iters']}; no exchange)")
    head = ("world", "bits", "N", "fused ms", "unfused ms", "speed-up", "worker ms (GB/s)",
            "server ms (GB/s)", "dequant ms (GB/s)", "zero ms", "fp32 copy ms (GB/s)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in result["rows"]:
        print(f"| {r['world']} | {r['bits']} | {r['numel']} | {r['fused_ms']:.3f} | {r['unfused_ms']:.3f} | "
              f"{r['unfused_ms'] / r['fused_ms']:.2f}x | {r['worker_ms']:.3f} ({r['worker_gbs']:.0f}) | "
              f"{r['server_ms']:.3f} ({r['server_gbs']:.0f}) | {r['dequantize_ms']:.3f} "
              f"({r['dequantize_gbs']:.0f}) | {r['zero_residuals_ms']:.3f} | {r['copy_fp32_ms']:.3f} "
              f"({r['copy_fp32_gbs']:.0f}) |")
    for r in result["rows"]:
        for c in r.get("sweep", []):
            print(f"# sweep world {r['world']} bits {r['bits']} tile {c['tile']} warps {c['warps']}: worker "
                  f"{c['worker']:.3f} ms, server {c['server']:.3f} ms, dequantize {c['dequantize']:.3f} ms")


def _meta(device, world, args) -> dict:
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=checkout_commit(),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                backend=dist.get_backend(), world=world, torch=torch.__version__, block=args.block,
                iters=args.iters, warmup=args.warmup)


def print_table(result: dict) -> None:
    m = result["meta"]
    print(f"# bench_comm: {m['device']} x{m['world']}, backend {m['backend']}, torch {m['torch']}, "
          f"block {m['block']}, {m['date']}, commit {m['commit'] or '?'}  (median of {m['iters']})")
    head = ("model", "collective", "shape", "BF16 MB", "INT8 MB", "bytes", "BF16 ms", "INT8 ms",
            "unfused ms", "wire ms", "INT8/BF16", "wire/BF16", "BF16 GB/s", "fused = torch")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in result["rows"]:
        unfused = f"{r['unfused_ms']:.3f}" if "unfused_ms" in r else "-"
        same = {True: "yes", False: "**NO**", None: "-"}[r.get("fused_matches_torch")]
        print(f"| {r['model']} | {r['collective']} | {r['shape']} | {r['bf16_bytes'] / 1e6:.2f} | "
              f"{r['int8_bytes'] / 1e6:.2f} | {r['byte_ratio']:.3f}x | {r['bf16_ms']:.3f} | "
              f"{r['int8_ms']:.3f} | {unfused} | {r['int8_wire_ms']:.3f} | {r['int8_over_bf16_time']:.2f}x | "
              f"{r['int8_wire_over_bf16_time']:.2f}x | {r['bf16_busbw_gbs']:.1f} | {same} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt2-xl,1.3b", help=f"comma-separated of {sorted(PRESETS)}")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grad-numel", type=int, default=0, help="gradient bucket elements (default: preset)")
    p.add_argument("--json", default="", help="write the rows and metadata here (rank 0)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--kernels-only", action="store_true",
                   help="one GPU, no torchrun: the gradient all-reduce's kernels without the exchange")
    p.add_argument("--worlds", default="2,4", help="--kernels-only: simulated group sizes")
    p.add_argument("--bits", default="8,4", help="--kernels-only: payload bits")
    p.add_argument("--sweep", action="store_true",
                   help="--kernels-only: also time the passes per tile size and warp count")
    args = p.parse_args(argv)
    for preset in args.preset.split(","):
        if preset not in PRESETS:
            p.error(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if args.kernels_only:
        result = kernels_only(args)
        print_kernels_table(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
            print(f"wrote {args.json}")
        return

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
