#!/usr/bin/env python
"""Benchmark megaq's INT8 kernels on a CUDA GPU: one table, JSON out.

    python tools/bench_kernels.py [--json out.json] [--sweep] [--quick] [--no-linear]

Sections
1. GEMM (M, N, K) shapes of the issue: cuBLAS BF16 (`a @ b.t()`), `torch._int_mm`, `torch._scaled_mm`
   FP8 row-wise, and every megaq INT8 variant (operands already quantized):
     rowcol   per-row × per-column scales in the epilogue (the GEMM of the Hadamard recipe)
     blk128   1×128 activations · 128×128 weights, scale every K=128 (DeepSeek-V3 style)
     blk128r  1×128 · 1×128 (both per-row blocks: the wgrad operands of the int8 recipe)
     blk32    1×32 · 32×32;  jet32  32×32 · 32×32 (Jetfire)
   TOPS = 2MNK / median time; ratio to BF16 on the same shape in the same run. The megaq columns
   run the Triton kernel (MEGAQ_INT8_GEMM=triton); `<variant>_cuda` the sm_90 CUDA kernel of
   csrc/int8_gemm (MEGAQ_INT8_GEMM=cuda) for rowcol, blk128 and blk128r, where it is available.
   --sweep times a list of tile configurations per variant on two shapes first and uses the best.
2. Quantize kernels: bandwidth (bytes read + written / median time) on 16384×4096 BF16; the dual
   Hadamard quantizer (x and xᵀ at once) against two single calls at 8192×4096 and 16384×1600.
3. Forward GEMM including the quantization of both operands (x and W requantized every step).
4. Quantized linear forward + backward (megaq.ops.quantized_linear) against BF16 F.linear.
5. Kernel time per category of one linear step (torch.profiler): where the time goes.
6. Host time per call of the entry points and of a tiny linear step (Python dispatch + launch).
7. The INT4 recipe's kernels (quantizer, bit split, sampled GEMMs) and its linear against BF16.
8. Error on outlier-heavy inputs (a few input channels ×50) of each variant against FP64.
9. (`--sections epilogue`, not in the default list) The CUDA rowcol GEMM's output epilogues at the
   training shapes (fc1 at widths 1600, 2048 (1.3B) and 4096; 1.3B's qkv and fc2): BF16 out and INT8
   out (per (1, 128) block, the data flow's fc1), each through the default launch's TMA stores and
   through the 4-stage kernel's register stores (tile 1), next to cuBLAS BF16.
Timings: triton.testing.do_bench (CUDA events, L2 flushed before each call), median.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench_env, also when imported by the tests

from bench_env import checkout_commit  # noqa: E402
from megaq import kernels  # noqa: E402
from megaq.kernels import cuda_ext, dispatch, gemm  # noqa: E402
from megaq.kernels.quantizers import ROW_KERNELS  # noqa: E402
from megaq.quant import quantize_blockwise  # noqa: E402

SHAPES = [(8192, 4096, 4096), (8192, 16384, 4096), (8192, 4096, 16384), (16384, 6400, 1600),
          (16384, 1600, 6400)]
VARIANTS = {  # name: (A block, B block, Hadamard rotation before quantizing)
    "rowcol": ((1, -1), (1, -1), 0),
    "hadamard": ((1, -1), (1, -1), 128),
    "blk128": ((1, 128), (128, 128), 0),
    "blk128r": ((1, 128), (1, 128), 0),
    "blk32": ((1, 32), (32, 32), 0),
    "jet32": ((32, 32), (32, 32), 0),
}
SWEEP = {
    "rowcol": [dict(BM=128, BN=256, BK=128, num_warps=8, num_stages=3),
               dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=3),
               dict(BM=128, BN=128, BK=128, num_warps=4, num_stages=3),
               dict(BM=128, BN=128, BK=128, num_warps=4, num_stages=4),
               dict(BM=128, BN=128, BK=128, num_warps=4, num_stages=2),
               dict(BM=128, BN=128, BK=128, num_warps=4, num_stages=3, GROUP_M=16),
               dict(BM=64, BN=128, BK=128, num_warps=4, num_stages=4),
               dict(BM=128, BN=64, BK=128, num_warps=4, num_stages=4),
               dict(BM=128, BN=256, BK=128, num_warps=8, num_stages=3, WS=True)],
    "blk128": [dict(BM=128, BN=128, num_warps=8, num_stages=4, CVT=0),
               dict(BM=64, BN=128, num_warps=4, num_stages=4, CVT=0),
               dict(BM=64, BN=128, num_warps=4, num_stages=3, CVT=0),
               dict(BM=64, BN=128, num_warps=4, num_stages=2, CVT=0),
               dict(BM=64, BN=128, num_warps=4, num_stages=3, CVT=1),
               dict(BM=64, BN=128, num_warps=4, num_stages=3, CVT=0, GROUP_M=16),
               dict(BM=64, BN=64, num_warps=4, num_stages=4, CVT=0),
               dict(BM=128, BN=64, num_warps=4, num_stages=3, CVT=0),
               dict(BM=64, BN=128, num_warps=4, num_stages=3, CVT=0, USE_TMA=False)],
    "blk32": [dict(BM=64, BN=128, num_warps=4, num_stages=6, CVT=0, J=1),
              dict(BM=64, BN=128, num_warps=4, num_stages=4, CVT=0, J=1),
              dict(BM=64, BN=64, num_warps=4, num_stages=6, CVT=0, J=1)],
}
SWEEP["blk128r"] = SWEEP["blk128"]
SWEEP["jet32"] = SWEEP["blk32"]
SWEEP["hadamard"] = SWEEP["rowcol"]


def bench_ms(fn, quick=False):
    import triton
    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                   return_mode="median")


def rand(shape, dtype=torch.bfloat16, seed=0, outliers=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda")
    if outliers:
        x[:, ::97] *= 50
    return x.to(dtype)


def quantize_variant(name, x, w, check=True):
    ab, bb, had = VARIANTS[name]
    if had:
        return (kernels.hadamard_quantize(x, had, ab, check=check),
                kernels.hadamard_quantize(w, had, bb, check=check))
    return kernels.quantize(x, ab, check=check), kernels.quantize(w, bb, check=check)


CUDA_GEMM_VARIANTS = ("rowcol", "blk128", "blk128r")   # the plans csrc/int8_gemm runs


def int8_gemm_path(choice):
    """MEGAQ_INT8_GEMM=choice (triton / cuda) for the calls inside (a context manager)."""
    return mock.patch.dict(os.environ, {"MEGAQ_INT8_GEMM": choice})


def gemm_section(args, results):
    rows = []
    best_cfg = {}
    variants = [v for v in VARIANTS if v != "hadamard"]  # same GEMM as rowcol
    if args.sweep:
        for v in ("rowcol", "blk128", "blk32"):
            best, best_t = None, float("inf")
            for cfg in SWEEP[v]:
                tot = 0.0
                try:
                    for (M, N, K) in (SHAPES[0], SHAPES[3]):
                        x, w = rand((M, K), seed=1), rand((N, K), seed=2)
                        qa, qb = quantize_variant(v, x, w)
                        with kernels.config_override(**cfg):
                            fn = lambda: kernels.scaled_mm(qa, qb, out_dtype=torch.bfloat16)  # noqa
                            fn()
                            torch.cuda.synchronize()
                            t = bench_ms(fn, quick=True)
                        tot += t
                        results["sweep"].append(dict(variant=v, cfg=cfg, shape=(M, N, K), ms=t,
                                                     tops=2 * M * N * K / t / 1e9))
                        print(f"sweep {v:8s} {str(cfg):90s} {M}x{N}x{K}: {2*M*N*K/t/1e9:7.1f} TOPS",
                              flush=True)
                except Exception as e:
                    results["sweep"].append(dict(variant=v, cfg=cfg, error=repr(e)[:500]))
                    print(f"sweep {v} {cfg}: FAILED {repr(e)[:300]}", flush=True)
                    continue
                if tot < best_t:
                    best, best_t = cfg, tot
            best_cfg[v] = best
            print(f"best {v}: {best}", flush=True)
        best_cfg["hadamard"] = best_cfg.get("rowcol")
        best_cfg["blk128r"] = best_cfg.get("blk128")
        best_cfg["jet32"] = best_cfg.get("blk32")
    results["best_cfg"] = best_cfg

    for (M, N, K) in SHAPES:
        flop = 2 * M * N * K
        row = dict(shape=(M, N, K))
        x, w = rand((M, K), seed=1), rand((N, K), seed=2)
        t = bench_ms(lambda: x @ w.t())
        row["bf16"] = flop / t / 1e9
        bf16_t = t
        try:
            xi = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
            wi = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
            row["int_mm"] = flop / bench_ms(lambda: torch._int_mm(xi, wi.t())) / 1e9
        except Exception as e:
            row["int_mm_error"] = repr(e)[:200]
        try:
            xf = x.to(torch.float8_e4m3fn)
            wf = w.to(torch.float8_e4m3fn)
            sa = torch.rand(M, 1, device="cuda") + 0.5
            sb = torch.rand(1, N, device="cuda") + 0.5
            fp8 = lambda: torch._scaled_mm(xf, wf.t(), sa, sb, out_dtype=torch.bfloat16,  # noqa
                                           use_fast_accum=True)
            fp8()
            row["fp8_rowwise"] = flop / bench_ms(fp8) / 1e9
        except Exception as e:
            row["fp8_error"] = repr(e)[:200]
        for v in variants:
            try:
                qa, qb = quantize_variant(v, x, w)
                cfg = best_cfg.get(v) or {}
                with kernels.config_override(**cfg), int8_gemm_path("triton"):
                    fn = lambda: kernels.scaled_mm(qa, qb, out_dtype=torch.bfloat16)  # noqa
                    fn()
                    row[v] = flop / bench_ms(fn) / 1e9
                    if cfg:   # the shipped default too, for comparison
                        with kernels.config_override():
                            row[v + "_default"] = flop / bench_ms(fn) / 1e9
                if v in CUDA_GEMM_VARIANTS and cuda_ext.int8_gemm_available():
                    with int8_gemm_path("cuda"):
                        fn = lambda: kernels.scaled_mm(qa, qb, out_dtype=torch.bfloat16)  # noqa
                        fn()
                        row[v + "_cuda"] = flop / bench_ms(fn) / 1e9
            except Exception as e:
                row[v + "_error"] = repr(e)[:300]
                traceback.print_exc()
        row["bf16_ms"] = bf16_t
        rows.append(row)
        print("gemm", json.dumps(row), flush=True)
    results["gemm"] = rows


def quant_section(args, results):
    R, C = 16384, 4096
    x = rand((R, C), seed=3)
    cases = [
        ("(1,128)", lambda: kernels.quantize(x, (1, 128), check=False), 3, {}),
        ("(1,128) rows16", lambda: kernels.quantize(x, (1, 128), check=False), 3, dict(QUANT_ROWS=16)),

        ("(1,128) check", lambda: kernels.quantize(x, (1, 128)), 3, {}),
        ("(1,128) SR", lambda: kernels.quantize(x, (1, 128), rounding="stochastic", check=False), 3, {}),
        ("(1,128)ᵀ", lambda: kernels.quantize(x, (1, 128), transpose=True, check=False), 3, {}),
        ("dual (1,128)+(1,128)ᵀ", lambda: kernels.quantize_dual(x, (1, 128), (1, 128), check=False), 4, {}),
        ("dual fused (one read)", lambda: kernels.quantize_dual(x, (1, 128), (1, 128), check=False), 4,
         dict(DUAL_FUSED=True, QUANT_WARPS=4)),
        ("(128,128)ᵀ", lambda: kernels.quantize(x, (128, 128), transpose=True, check=False), 3, {}),
        ("(1,-1)ᵀ cols128", lambda: kernels.quantize(x, (1, -1), transpose=True, check=False), 3,
         dict(QUANT_COLS=128)),

        ("(128,128)", lambda: kernels.quantize(x, (128, 128), check=False), 3, {}),
        ("(32,32)", lambda: kernels.quantize(x, (32, 32), check=False), 3, {}),
        ("(1,32)", lambda: kernels.quantize(x, (1, 32), check=False), 3, {}),
        ("(1,-1)", lambda: kernels.quantize(x, (1, -1), check=False), 3, {}),
        ("(1,-1)ᵀ", lambda: kernels.quantize(x, (1, -1), transpose=True, check=False), 3, {}),
        ("hadamard128 (1,-1)", lambda: kernels.hadamard_quantize(x, 128, check=False), 3, {}),
        *[(f"hadamard128 (1,-1) {kernel}", lambda: kernels.hadamard_quantize(x, 128, check=False), 3,
           dict(ROW_KERNEL=kernel)) for kernel in ROW_KERNELS],
        *[(f"hadamard128 SR {kernel}",
           lambda: kernels.hadamard_quantize(x, 128, rounding="stochastic", check=False), 3,
           dict(ROW_KERNEL=kernel)) for kernel in ROW_KERNELS],
        *[(f"hadamard128 (1,-1) resident tile{tile} w{warps}",
           lambda: kernels.hadamard_quantize(x, 128, check=False), 3,
           dict(ROW_KERNEL="resident", RESIDENT_TILE=tile, QUANT_WARPS=warps))
          for tile in (32, 64, 128) for warps in (4, 8)],
        ("hadamard128 (1,-1)ᵀ SR",
         lambda: kernels.hadamard_quantize(x, 128, rounding="stochastic", transpose=True, check=False), 3, {}),
        ("(1,128)ᵀ SR", lambda: kernels.quantize(x, (1, 128), rounding="stochastic", transpose=True,
                                                 check=False), 3, {}),
        ("hadamard128 (1,-1)ᵀ", lambda: kernels.hadamard_quantize(x, 128, transpose=True, check=False), 3, {}),
        ("hadamard128 SR", lambda: kernels.hadamard_quantize(x, 128, rounding="stochastic", check=False),
         3, {}),
        ("torch reference (1,128)", lambda: quantize_blockwise(x, (1, 128), check=False), 3,
         dict(_ref=True)),
        ("dequantize bf16", None, 3, {}),
    ]
    q128 = kernels.quantize(x, (1, 128))
    t_copy = bench_ms(lambda: x.clone())
    out = [dict(name="copy (read+write bf16)", ms=t_copy, GBps=2 * R * C * 2 / t_copy / 1e6)]
    for name, fn, bytes_per, cfg in cases:
        try:
            if fn is None:
                fn = lambda: kernels.dequantize(q128, torch.bfloat16)  # noqa
            ref = cfg.pop("_ref", False) if cfg else False
            if ref:
                os.environ["MEGAQ_KERNELS"] = "reference"
            with kernels.config_override(**cfg):
                fn()
                t = bench_ms(fn)
            os.environ.pop("MEGAQ_KERNELS", None)
            out.append(dict(name=name, ms=t, GBps=bytes_per * R * C / t / 1e6))
        except Exception as e:
            os.environ.pop("MEGAQ_KERNELS", None)
            out.append(dict(name=name, error=repr(e)[:300]))
        print("quant", json.dumps(out[-1]), flush=True)
    out.extend(hadamard_row_kernels(args))
    out.extend(hadamard_dual_rows(args))
    out.extend(bias_sum_fusion(args))
    results["quant"] = out


def _quantizations_match(outs, refs, stochastic):
    """The self-check of a benchmark row: its quantized outputs (rows, then cols) against the reference
    calls' — the problems found, none when they match (the bounds of tests/test_kernels_int8.py;
    stochastic with independent draws: the same scales, values within one step)."""
    problems = []
    for orient, q, r in zip(("rows", "cols"), outs, refs):
        if q.shape != r.shape or q.block != r.block:
            problems.append(f"{orient}: shape/block {q.shape}/{q.block} vs {r.shape}/{r.block}")
            continue
        scale_err = float(((q.scale - r.scale).abs() / r.scale).max())
        diff = (q.data.int() - r.data.int()).abs()
        limit, share = (1, 1.0) if stochastic else (1, 1e-3)
        if scale_err > 1e-6 or int(diff.max()) > limit or float((diff > 0).float().mean()) > share:
            problems.append(f"{orient}: scale rel err {scale_err:.2e}, payload max diff {int(diff.max())} on "
                            f"{float((diff > 0).float().mean()):.2e} of the elements")
    return problems


# X / ∇Y of the linears of GPT-2 124M, XL, 1.3B (fc2's input 4·d), d=4096 and its fc1's ∇Y (4·d wide)
ROW_QUANT_SHAPES = ((16384, 768), (16384, 1600), (16384, 2048), (16384, 6400), (8192, 4096), (8192, 16384),
                    (16384, 16384))
# Rows of more than 64 Hadamard blocks: a resident program holds one whole row, so its warps (and the
# programs per SM sharing the register file) decide whether it fits in registers; timed beside the default
LONG_ROW_RESIDENT = tuple(dict(QUANT_WARPS=w, QUANT_PER_SM=p) for w in (4, 8, 16) for p in (1, 2)
                          if (w, p) != (4, 2))


def hadamard_row_kernels(args, shapes=ROW_QUANT_SHAPES):
    """Hadamard-128 per-row quantization of x (the forward's X, the dgrad's ∇Y) by kernel: the one-read
    resident kernel against the two-pass grid and the strip kernel, nearest and stochastic, beside a
    BF16 copy of x (the bandwidth bound); rows of more than 64 blocks also the resident kernel with
    the `LONG_ROW_RESIDENT` warps / programs per SM. Bytes: the BF16 input read once + the INT8 payload
    written. Each row says whether its output matches the two-pass kernel's (scales, payload up to
    near-ties)."""
    rows = []
    had = 128
    for (R, C) in shapes:
        x = rand((R, C), seed=6, outliers=True)
        nbytes = 2 * R * C + R * (-(-C // had) * had)
        t_copy = bench_ms(lambda: x.clone(), args.quick)
        rows.append(dict(name=f"copy {R}x{C} (read+write bf16)", ms=t_copy, GBps=4 * R * C / t_copy / 1e6))
        variants = [(kernel, {}) for kernel in ("twopass", "resident", "strip", "auto")]
        if C > 64 * had:
            variants += [("resident", cfg) for cfg in LONG_ROW_RESIDENT]
        for rounding in ("nearest", "stochastic"):
            base = base_ms = None
            for kernel, cfg in variants:
                label = f"hadamard128 rows {R}x{C} {rounding}: {kernel}" + "".join(f" {k}={v}" for k, v in cfg.items())
                try:
                    def fn():
                        return kernels.hadamard_quantize(x, had, rounding=rounding, check=False)
                    with kernels.config_override(ROW_KERNEL=kernel, **cfg):
                        torch.manual_seed(0)
                        out = fn()
                        t = bench_ms(fn, args.quick)
                    row = dict(name=label, ms=t, GBps=nbytes / t / 1e6, of_copy_bw=t_copy / t * nbytes / (4 * R * C))
                    if base is None:
                        base, base_ms = out, t
                    else:   # the same Philox counters: stochastic rounding matches up to near-ties too
                        row["matches_twopass"] = not _quantizations_match((out,), (base,), stochastic=False)
                        row["speedup_vs_twopass"] = base_ms / t
                except Exception as e:
                    row = dict(name=label, error=repr(e)[:300])
                rows.append(row)
                print("quant", json.dumps(row), flush=True)
    return rows


DUAL_SHAPES = ((8192, 4096), (16384, 1600))   # X of the d=4096 and the GPT-2 XL (d=1600) linears
# ∇Y of GPT-2 124M's proj / fc2 and fc1, of GPT-2 XL's, of d=4096's and its fc1
BIAS_SUM_SHAPES = ((16384, 768), (16384, 3072), (16384, 1600), (8192, 4096), (8192, 16384))
BIAS_SUM_LINEARS = ((8192, 4096, 4096), (8192, 16384, 4096))   # (tokens, out, in)


def bias_sum_fusion(args, shapes=BIAS_SUM_SHAPES, linears=BIAS_SUM_LINEARS):
    """The bias gradient ∇Y.sum(0) from the quantizer pass that reads ∇Y for the wgrad operand ∇Yᵀ
    (`column_sums_out`; the kernels sum at every width here, COLUMN_SUMS_MIN_COLS=0), against that
    quantization followed by torch's sum, for the single transposed quantizer (what a CUDA graph runs)
    and the dual one (eager); stochastic rounding as the recipe's gradients. Then a linear fwd+bwd with a
    bias, int8 recipe, `FUSE_BIAS_GRAD` on / off (default widths), eager and replayed from a CUDA graph.
    µs; saving = unfused - fused."""
    from megaq.ops import linear as linear_mod
    from megaq.ops import quantized_linear
    rows = []
    had = 128
    for (R, C) in shapes:
        g = rand((R, C), seed=8)
        out = torch.empty(C, dtype=torch.float32, device="cuda")
        calls = {
            "single": lambda **k: kernels.hadamard_quantize(g, had, rounding="stochastic", check=False,
                                                            transpose=True, **k),
            "dual": lambda **k: kernels.hadamard_quantize_dual(g, had, rounding="stochastic", check=False, **k)}
        row = dict(name=f"bias sum {R}x{C}")
        try:
            row["torch_sum_us"] = 1e3 * bench_ms(lambda: g.sum(0, dtype=torch.float32), args.quick)
            ref = g.double().sum(0)
            for name, fn in calls.items():
                with kernels.config_override(COLUMN_SUMS_MIN_COLS=0):
                    fn(column_sums_out=out)
                    bound = float((out.double() - ref).abs().max() / g.double().abs().sum(0).max())
                    unfused = 1e3 * bench_ms(lambda: (fn(), g.sum(0, dtype=torch.float32)), args.quick)
                    fused = 1e3 * bench_ms(lambda: fn(column_sums_out=out), args.quick)
                row.update({f"{name}_unfused_us": unfused, f"{name}_fused_us": fused,
                            f"{name}_saving_us": unfused - fused, f"{name}_max_err_over_abs_sum": bound})
        except Exception as e:
            row["error"] = repr(e)[:300]
        rows.append(row)
        print("quant", json.dumps(row), flush=True)
    for (M, N, K) in linears:
        x = rand((M, K), seed=1).requires_grad_(True)
        w = (rand((N, K), seed=2) / math.sqrt(K)).requires_grad_(True)
        b = torch.zeros(N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = rand((M, N), seed=4)
        spec = {"preset": "int8", "check_finite": False}
        row = dict(name=f"linear fwd+bwd with bias {M}x{N}x{K}")
        old = linear_mod.FUSE_BIAS_GRAD
        try:
            for fuse in (False, True):
                linear_mod.FUSE_BIAS_GRAD = fuse

                def step():
                    x.grad = w.grad = b.grad = None
                    quantized_linear(x, w, b, spec).backward(gy)
                step()
                row[f"eager_{'fused' if fuse else 'unfused'}_us"] = 1e3 * bench_ms(step, args.quick)
                with linear_mod.graph_warmup():
                    graphed = torch.cuda.make_graphed_callables(
                        lambda a, c, d: quantized_linear(a, c, d, spec),
                        (x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True),
                         b.detach().clone().requires_grad_(True)))

                def graphed_step():
                    graphed(x, w, b).backward(gy)
                graphed_step()
                row[f"graph_{'fused' if fuse else 'unfused'}_us"] = 1e3 * bench_ms(graphed_step, args.quick)
            row["eager_saving_us"] = row["eager_unfused_us"] - row["eager_fused_us"]
            row["graph_saving_us"] = row["graph_unfused_us"] - row["graph_fused_us"]
        except Exception as e:
            row["error"] = repr(e)[:300]
        finally:
            linear_mod.FUSE_BIAS_GRAD = old
        rows.append(row)
        print("quant", json.dumps(row), flush=True)
    return rows


def hadamard_dual_rows(args):
    """Hadamard-128 per-row quantization of x and of xᵀ (the int8 recipe's X / ∇Y operands): the dual
    call (two kernels, one read of x each) against the two single calls (two kernels each). Bytes:
    the BF16 input read once + both INT8 payloads written (padded to whole Hadamard blocks)."""
    rows = []
    had = 128
    for (R, C) in DUAL_SHAPES:
        x = rand((R, C), seed=5, outliers=True)
        nbytes = 2 * R * C + R * (-(-C // had) * had) + C * (-(-R // had) * had)
        near = (kernels.hadamard_quantize(x, had, check=False),
                kernels.hadamard_quantize(x, had, check=False, transpose=True))
        for rounding in ("nearest", "stochastic"):
            def single():
                return (kernels.hadamard_quantize(x, had, rounding=rounding, check=False),
                        kernels.hadamard_quantize(x, had, rounding=rounding, check=False, transpose=True))

            def dual():
                return kernels.hadamard_quantize_dual(x, had, rounding=rounding, check=False)
            single_ms = None
            # the dual's default (8 warps per 128×128 tile) and 16 warps (fewer registers per thread)
            for name, fn, cfg in (("two single calls", single, {}), ("dual", dual, {}),
                                  ("dual 16 warps", dual, dict(QUANT_WARPS=16))):
                label = f"hadamard128 x + xᵀ {R}x{C} {rounding}: {name}"
                try:
                    row = dict(name=label)
                    with kernels.config_override(**cfg):
                        if fn is dual:
                            problems = _quantizations_match(dual(), near, rounding == "stochastic")
                            row["matches_single"] = not problems
                            if problems:
                                row["mismatch"] = problems
                        fn()
                        t = bench_ms(fn, args.quick)
                    row.update(ms=t, GBps=nbytes / t / 1e6)
                    if fn is single:
                        single_ms = t
                    elif single_ms:
                        row["speedup_vs_single"] = single_ms / t
                except Exception as e:
                    row = dict(name=label, error=repr(e)[:300])
                rows.append(row)
                print("quant", json.dumps(row), flush=True)
    return rows


def fwd_section(args, results):
    rows = []
    for (M, N, K) in SHAPES:
        x, w = rand((M, K), seed=1), rand((N, K), seed=2)
        flop = 2 * M * N * K
        row = dict(shape=(M, N, K), bf16=flop / bench_ms(lambda: x @ w.t()) / 1e9)
        for v in VARIANTS:
            cfg = results["best_cfg"].get(v) or {}
            try:
                def fn():  # check=False: the NaN check costs one host sync per operand
                    qa, qb = quantize_variant(v, x, w, check=False)
                    return kernels.scaled_mm(qa, qb, out_dtype=torch.bfloat16)
                with kernels.config_override(**cfg):
                    fn()
                    row[v] = flop / bench_ms(fn) / 1e9
            except Exception as e:
                row[v + "_error"] = repr(e)[:300]
        rows.append(row)
        print("fwd", json.dumps(row), flush=True)
    results["fwd_with_quant"] = rows


def pipeline_section(args, results):
    """The three GEMMs of a linear layer's step with every operand quantized by megaq.kernels
    (check=False, no autograd): what megaq.ops can reach when it calls the fused kernels. BF16:
    the same three matmuls. dgrad/wgrad operands quantized along their reduction axis, gradients
    with stochastic rounding."""
    rows = []
    for (M, N, K) in SHAPES[:2] + SHAPES[3:4]:
        x, w, gy = rand((M, K), seed=1), rand((N, K), seed=2), rand((M, N), seed=4)
        flop = 3 * 2 * M * N * K

        def bf16():
            y = x @ w.t()
            gx = gy @ w
            gw = gy.t() @ x
            return y, gx, gw

        def int8_blk128():
            q = kernels.quantize
            y = kernels.scaled_mm(q(x, (1, 128), check=False), q(w, (128, 128), check=False),
                                  out_dtype=torch.bfloat16)
            gx = kernels.scaled_mm(q(gy, (1, 128), rounding="stochastic", check=False),
                                   q(w, (128, 128), transpose=True, check=False), out_dtype=torch.bfloat16)
            gw = kernels.scaled_mm(q(gy, (1, 128), rounding="stochastic", transpose=True, check=False),
                                   q(x, (1, 128), transpose=True, check=False), out_dtype=torch.bfloat16)
            return y, gx, gw

        def int8_hadamard():
            hq = kernels.hadamard_quantize
            y = kernels.scaled_mm(hq(x, 128, check=False), hq(w, 128, check=False),
                                  out_dtype=torch.bfloat16)
            gx = kernels.scaled_mm(hq(gy, 128, rounding="stochastic", check=False),
                                   hq(w, 128, transpose=True, check=False), out_dtype=torch.bfloat16)
            gw = kernels.scaled_mm(hq(gy, 128, rounding="stochastic", transpose=True, check=False),
                                   hq(x, 128, transpose=True, check=False), out_dtype=torch.bfloat16)
            return y, gx, gw

        row = dict(shape=(M, N, K))
        for name, fn in (("bf16", bf16), ("int8_blk128", int8_blk128), ("int8_hadamard", int8_hadamard)):
            try:
                fn()
                row[name] = flop / bench_ms(fn) / 1e9
            except Exception as e:
                row[name + "_error"] = repr(e)[:300]
        rows.append(row)
        print("pipeline", json.dumps(row), flush=True)
    results["pipeline"] = rows


# int8_delayed: int8 with the wgrad operands' scales predicted from the earlier calls (the benchmark's
# repeated steps on the same weight keep its predictions warm, as training's micro batches do)
LINEAR_RECIPES = ("bf16", "int8", "int8_delayed", "int8_block128", "int8_block32", "int8_jetfire", "int4")
GRAPHED_RECIPES = ("bf16", "int8", "int8_delayed", "int8_block128", "int4")


def linear_section(args, results):
    try:
        from megaq.ops import quantized_linear
        from megaq.ops.linear import graph_warmup
    except Exception as e:
        results["linear_error"] = repr(e)
        return
    rows = []
    for (M, N, K) in SHAPES[:2] + SHAPES[3:4]:
        x = rand((M, K), seed=1).requires_grad_(True)
        w = (rand((N, K), seed=2) / math.sqrt(K)).requires_grad_(True)
        gy = rand((M, N), seed=4)
        flop = 3 * 2 * M * N * K
        row = dict(shape=(M, N, K))
        for recipe in args.linear_recipes:
            # as the trainer runs them: no per-operand NaN check (a host sync), the loss is checked
            spec = {"preset": recipe, "check_finite": False}

            def step():
                x.grad = w.grad = None
                y = quantized_linear(x, w, None, spec)
                y.backward(gy)
            try:
                step()
                row[recipe] = flop / bench_ms(step) / 1e9
            except Exception as e:
                row[recipe + "_error"] = repr(e)[:300]
            if recipe in GRAPHED_RECIPES:
                # the same step replayed from a CUDA graph: what it costs without host launch overhead
                try:
                    with graph_warmup():   # warm up the kernels the capture runs (no dual quantizer)
                        graphed = torch.cuda.make_graphed_callables(
                            lambda a, b, spec=spec: quantized_linear(a, b, None, spec),
                            (x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)))

                    def graphed_step():
                        graphed(x, w).backward(gy)
                    graphed_step()
                    row[recipe + "_graph"] = flop / bench_ms(graphed_step) / 1e9
                except Exception as e:
                    row[recipe + "_graph_error"] = repr(e)[:300]
        rows.append(row)
        print("linear", json.dumps(row), flush=True)
    results["linear"] = rows


def _kernel_category(name: str) -> str:
    n = name.lower()
    if "scaled_mm" in n or "gemm" in n or "nvjet" in n or "xmma" in n or "cutlass" in n:
        return "gemm"
    if "quant" in n or "amax" in n:
        return "quantize"
    if "rand" in n or "philox" in n:
        return "rng"
    return "other"


def _parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'8192x4096x4096,16384x2304x768' -> [(M, N, K), ...]"""
    shapes = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        dims = item.lower().split("x")
        if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ValueError(f"--profile-shapes: {item!r} is not MxNxK with positive integers")
        shapes.append(tuple(int(d) for d in dims))
    return shapes


def linear_profile_section(args, results):
    """Where a quantized linear's step goes: CUDA kernel time per kernel name and per category
    (GEMM / quantize / RNG / other) from torch.profiler, per fwd+bwd step, at each of
    --profile-shapes (default 8192×4096×4096). `int8` runs the kernels of an eager step (the dual
    quantizer), `int8_graphed` those a CUDA graph capture launches (megaq.ops.linear.graph_warmup:
    the single quantizers), which is what train.cuda_graphs replays."""
    from torch.profiler import ProfilerActivity, profile

    from megaq.ops import quantized_linear
    from megaq.ops.linear import graph_warmup

    steps = 10
    per_shape = []
    for M, N, K in _parse_shapes(args.profile_shapes):
        x = rand((M, K), seed=1).requires_grad_(True)
        w = (rand((N, K), seed=2) / math.sqrt(K)).requires_grad_(True)
        gy = rand((M, N), seed=4)
        out = {}
        for recipe in ("bf16", "int8", "int8_graphed", "int4"):
            spec = {"preset": recipe.removesuffix("_graphed"), "check_finite": False}
            kernels_choice = graph_warmup if recipe.endswith("_graphed") else contextlib.nullcontext

            def step():
                x.grad = w.grad = None
                quantized_linear(x, w, None, spec).backward(gy)
            with kernels_choice():
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(steps):
                        step()
                    torch.cuda.synchronize()
            kernels_us: dict[str, float] = {}
            for evt in prof.key_averages():
                t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
                if t:
                    kernels_us[evt.key] = kernels_us.get(evt.key, 0.0) + t / steps
            cats: dict[str, float] = {}
            for k, t in kernels_us.items():
                cats[_kernel_category(k)] = cats.get(_kernel_category(k), 0.0) + t
            top = sorted(kernels_us.items(), key=lambda kv: -kv[1])[:12]
            out[recipe] = dict(total_us=sum(kernels_us.values()), categories=cats,
                               top_kernels=[(k[:90], round(t, 1)) for k, t in top])
            print("linear_profile", (M, N, K), recipe, json.dumps(out[recipe])[:700], flush=True)
        per_shape.append(dict(shape=(M, N, K), per_step=out))
    results["linear_profile"] = per_shape


def host_section(args, results):
    """Host (CPU) time per call of the kernel entry points and of a whole linear step on a tiny
    problem (256×256, GPU time negligible): what the Python dispatch and the Triton launch cost. A
    step is host-bound whenever this exceeds its GPU time."""
    import megaq.ops.linear as linear_module
    from megaq.ops import quantized_linear

    def per_call_us(fn, n=200):
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - t0
        torch.cuda.synchronize()
        return elapsed / n * 1e6

    x = rand((256, 256), seed=1)
    w = rand((256, 256), seed=2)
    qa = kernels.quantize(x, (1, -1), check=False)
    qb = kernels.quantize(w, (1, -1), check=False)
    rows = {
        "torch add (one ATen kernel)": per_call_us(lambda: x + 1),
        "quantize (1,128)": per_call_us(lambda: kernels.quantize(x, (1, 128), check=False)),
        "quantize (1,128) stochastic": per_call_us(
            lambda: kernels.quantize(x, (1, 128), rounding="stochastic", check=False)),
        "hadamard_quantize per-row": per_call_us(lambda: kernels.hadamard_quantize(x, 128, check=False)),
        "hadamard_quantize per-row of xT": per_call_us(
            lambda: kernels.hadamard_quantize(x, 128, check=False, transpose=True)),
        "hadamard_quantize_dual (x and xT, two kernels)": per_call_us(
            lambda: kernels.hadamard_quantize_dual(x, 128, check=False)),
        "hadamard_quantize_dual stochastic": per_call_us(
            lambda: kernels.hadamard_quantize_dual(x, 128, rounding="stochastic", check=False)),
        "scaled_mm rowcol -> bf16": per_call_us(lambda: kernels.scaled_mm(qa, qb, out_dtype=torch.bfloat16)),
    }
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    gy = rand((256, 256), seed=3)
    for recipe in ("bf16", "int8", "int8 dual off", "int8_block128", "int4"):
        spec = {"preset": recipe.split()[0], "check_finite": False}

        def step():
            quantized_linear(xs, ws, None, spec).backward(gy)
        linear_module.DUAL_QUANTIZE = recipe != "int8 dual off"   # one call per GEMM operand instead
        try:
            rows[f"linear fwd+bwd {recipe}"] = per_call_us(step, 50)
        finally:
            linear_module.DUAL_QUANTIZE = True
    results["host"] = rows
    print("host", json.dumps(rows), flush=True)


def error_section(args, results):
    """Relative Frobenius error of out = X Wᵀ against FP64, X with outlier channels ×50."""
    M, N, K = 4096, 4096, 4096
    x = rand((M, K), torch.float32, seed=7, outliers=True)
    w = rand((N, K), torch.float32, seed=8) / math.sqrt(K)
    ref = x.double() @ w.double().t()
    out = {}
    for v in VARIANTS:
        qa, qb = quantize_variant(v, x, w)
        y = kernels.scaled_mm(qa, qb, out_dtype=torch.float32)
        out[v] = float((y.double() - ref).norm() / ref.norm())
    out["bf16 operands"] = float(((x.bfloat16() @ w.bfloat16().t()).double() - ref).norm() / ref.norm())
    results["outlier_error"] = out
    print("error", json.dumps(out), flush=True)


INT4_GRAD_MM_SWEEP = [dict(BM=128, BN=128, BK=128, GROUP_M=16, num_warps=4, num_stages=3),
                      dict(BM=128, BN=128, BK=128, GROUP_M=16, num_warps=8, num_stages=3),
                      dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=4, num_stages=4),
                      dict(BM=128, BN=256, BK=128, GROUP_M=8, num_warps=8, num_stages=3),
                      dict(BM=128, BN=128, BK=64, GROUP_M=16, num_warps=4, num_stages=4)]


# 16,384 tokens: fc1 at widths 1600, 2048 (1.3B) and 4096, and 1.3B's qkv and fc2
EPILOGUE_SHAPES = [(16384, 6400, 1600), (16384, 8192, 2048), (16384, 16384, 4096), (16384, 6144, 2048),
                   (16384, 2048, 8192)]
EPILOGUE_CASES = (("bf16_out_tma", torch.bfloat16, 0), ("bf16_out_regs", torch.bfloat16, 1),
                  ("int8_out_tma", torch.int8, 0), ("int8_out_regs", torch.int8, 1))


def epilogue_section(args, results):
    if not cuda_ext.int8_gemm_available():
        results["epilogue_error"] = "the CUDA INT8 GEMM is not available on this GPU"
        return
    rows = []
    for (M, N, K) in EPILOGUE_SHAPES:
        flop = 2 * M * N * K
        a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
        b = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
        sa = torch.rand(M, device="cuda") * 0.01 + 1e-3
        sb = torch.rand(N, device="cuda") * 0.01 + 1e-3
        bias = torch.randn(N, device="cuda")
        x, w = rand((M, K), seed=1), rand((N, K), seed=2)
        row = dict(shape=(M, N, K), bf16_cublas=flop / bench_ms(lambda: x @ w.t()) / 1e9)
        for name, dtype, tile in EPILOGUE_CASES:
            fn = lambda: cuda_ext.int8_gemm(a, b, sa, sb, bias=bias, out_dtype=dtype, tile=tile)  # noqa: E731
            fn()
            row[name] = flop / bench_ms(fn) / 1e9
        rows.append(row)
        print("epilogue", json.dumps(row), flush=True)
    results["epilogue"] = rows


def int4_section(args, results):
    """The INT4 recipe (megaq.kernels.int4) at tokens × out × in = 8192×4096×4096: the fused Hadamard +
    INT4 quantizer and the bit split (bandwidth), the sampling weights, the sampled dgrad / wgrad
    INT8 GEMMs (TOPS = 2·M·N·K with K the live reduction; with and without the fused inverse
    Hadamard epilogue; a small tile sweep), the whole backward; then the linear fwd+bwd against BF16
    `F.linear` at the linear section's shapes and the bytes kept for backward against BF16's."""
    from megaq.kernels import int4 as k4
    from megaq.ops import quantized_linear
    from megaq.quant import leverage_score_weights
    out = results["int4"] = {}     # filled as it goes: a failing step keeps the earlier numbers
    T, O, I = SHAPES[0]
    x = rand((T, I), seed=1)
    w = rand((O, I), seed=2) / math.sqrt(I)
    gy = rand((T, O), seed=4)
    q_bytes = T * I * 2 + T * I + T * I // 2          # read bf16, write int8 values + packed copy
    for name, fn, nbytes in (
            ("hq_quantize x (row)", lambda: k4.hq_quantize_int4(x, 32, check=False), q_bytes),
            ("hq_quantize x (lsq)", lambda: k4.hq_quantize_int4(x, 32, "lsq", check=False), q_bytes + T * I * 2),
            ("hq_quantize x, previous path (2-pass + torch pack)",
             lambda: kernels.hadamard_quantize(x, 32, (1, -1), bits=4, check=False), q_bytes),
            ("hq_quantize w (row)", lambda: k4.hq_quantize_int4(w, 32, check=False), O * I * 7 // 2),
            ("bit_split dy", lambda: k4.bit_split_int4(gy, check=False), T * O * 3)):
        ms = bench_ms(fn, args.quick)
        out[name] = dict(us=ms * 1e3, GBps=nbytes / ms / 1e6)
    xq, xv, x_norm_sq = k4.hq_quantize_int4(x, 32, check=False)
    wq, wv, _ = k4.hq_quantize_int4(w, 32, check=False)
    split = k4.bit_split_int4(gy, check=False)
    x_norms = xq.scale.reshape(-1) * x_norm_sq.sqrt()

    def weights(keep=0.5, mode="sample"):
        norms = split.row_norms()
        return (leverage_score_weights(norms, keep, mode),
                leverage_score_weights(norms * torch.cat((x_norms, x_norms)), keep, mode))
    out["sampling weights (both GEMMs)"] = dict(us=bench_ms(weights, args.quick) * 1e3)
    out["forward GEMM (int4 values on INT8 TC)"] = dict(
        TOPS=2 * T * O * I / bench_ms(lambda: k4.int4_mm(xq, wq, xv, wv, torch.bfloat16), args.quick) / 1e9)
    for keep, mode in ((0.5, "sample"), (0.2, "sample"), (1.0, "drop_zero")):
        wd, ww = weights(keep, mode)
        kept = int(((ww[:T] != 0) | (ww[T:] != 0)).sum())
        bw = {}
        for name, args_ in (("dgrad", (wd, None)), ("wgrad", (None, ww)), ("both", (wd, ww))):
            bw[name + "_us"] = bench_ms(lambda: k4.int4_sampled_gradients(
                split, *args_, xq, wq, 32, I, torch.bfloat16, torch.bfloat16), args.quick) * 1e3
        out[f"backward products keep={keep} {mode}"] = dict(kept_tokens=kept, **bw)
    # the GEMMs alone on ready operands: dgrad T×Ip×O, wgrad O×Ip×kept
    g = torch.Generator(device="cuda").manual_seed(0)
    a_d = torch.randint(-127, 128, (T, O), device="cuda", dtype=torch.int8, generator=g)
    b_d = torch.randint(-7, 8, (I, O), device="cuda", dtype=torch.int8, generator=g)
    a_w = torch.randint(-127, 128, (O, T), device="cuda", dtype=torch.int8, generator=g)
    b_w = torch.randint(-7, 8, (I, T), device="cuda", dtype=torch.int8, generator=g)
    v, u = torch.rand(T, device="cuda"), torch.rand(O, device="cuda")
    kept = torch.tensor([int(0.9 * T) // 128 * 128], dtype=torch.int32, device="cuda")
    gemms = out["sampled_mm"] = []
    for cfg in INT4_GRAD_MM_SWEEP:
        row = dict(cfg=cfg)
        try:
            for had in (32, 0):
                with dispatch.config_override(**cfg):
                    c = k4.grad_mm_config(had)
                gx = torch.empty((T, I), dtype=torch.bfloat16, device="cuda")
                gw = torch.empty((O, I), dtype=torch.bfloat16, device="cuda")
                row[f"dgrad_TOPS_had{had}"] = 2 * T * I * O / bench_ms(
                    lambda: k4._sampled_mm(a_d, b_d, v, gx, None, had, c), args.quick) / 1e9
                row[f"wgrad_TOPS_had{had}"] = 2 * O * I * int(kept) / bench_ms(
                    lambda: k4._sampled_mm(a_w, b_w, u, gw, kept, had, c), args.quick) / 1e9
        except Exception as e:
            row["error"] = repr(e)[:300]
        gemms.append(row)
        print("int4 grad_mm", json.dumps(row), flush=True)
    # linear fwd+bwd against BF16, as the trainer runs it (no per-operand NaN check)
    linear = out["linear"] = []
    for (M, N, K) in SHAPES[:2] + SHAPES[3:4]:
        xl = rand((M, K), seed=1).requires_grad_(True)
        wl = (rand((N, K), seed=2) / math.sqrt(K)).requires_grad_(True)
        gl = rand((M, N), seed=4)
        row = dict(shape=(M, N, K))
        for recipe in ("bf16", "int4", "int4_drop_zero", "int4_keep0.2"):
            spec = {"preset": recipe, "check_finite": False}
            if recipe == "int4_keep0.2":      # fewer kept rows: the wgrad reduction shrinks with them
                spec = {"preset": "int4", "int4_backward": {"keep_ratio": 0.2}, "check_finite": False}

            def step():
                xl.grad = wl.grad = None
                quantized_linear(xl, wl, None, spec).backward(gl)

            def fwd():
                with torch.no_grad():
                    quantized_linear(xl, wl, None, spec)
            try:
                row[recipe + "_ms"] = bench_ms(step, args.quick)
                row[recipe + "_fwd_ms"] = bench_ms(fwd, args.quick)
                row[recipe] = 6 * M * N * K / row[recipe + "_ms"] / 1e9
            except Exception as e:
                row[recipe + "_error"] = repr(e)[:300]
        if "bf16" in row and "int4" in row:
            row["int4_vs_bf16"] = row["int4"] / row["bf16"]
        y = quantized_linear(xl, wl, None, {"preset": "int4", "check_finite": False})
        node = y.grad_fn
        while node is not None and not hasattr(node, "xq"):     # step over the reshape's view node
            node = node.next_functions[0][0]
        kept = node.xq.nbytes() + node.x_norm_sq.numel() * 4
        row["saved_activation_bytes_vs_bf16"] = kept / (xl.numel() * 2)
        row["saved_bytes_vs_bf16 (x and w)"] = (kept + node.wq.nbytes()) / ((xl.numel() + wl.numel()) * 2)
        del y, node
        linear.append(row)
        print("int4 linear", json.dumps(row), flush=True)
    print("int4", json.dumps({k: v for k, v in out.items() if k not in ("sampled_mm", "linear")}), flush=True)


def print_table(results):
    print("\n## GEMM TOPS (median; ratio to cuBLAS BF16 in brackets)")
    cols = ["bf16", "int_mm", "fp8_rowwise", "rowcol", "rowcol_cuda", "blk128", "blk128_cuda", "blk128r",
            "blk128r_cuda", "blk32", "jet32"]
    print("| M,N,K | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in results.get("gemm", []):
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else (f"{v:.0f}" if c == "bf16" else f"{v:.0f} ({v / r['bf16']:.2f}×)"))
        print(f"| {r['shape']} | " + " | ".join(cells) + " |")
    if results.get("fwd_with_quant"):
        print("\n## forward incl. quantizing both operands (TOPS-equivalent)")
        cols = ["bf16"] + list(VARIANTS)
        print("| M,N,K | " + " | ".join(cols) + " |")
        for r in results["fwd_with_quant"]:
            print(f"| {r['shape']} | " + " | ".join(
                "-" if r.get(c) is None else f"{r[c]:.0f} ({r[c] / r['bf16']:.2f}×)" for c in cols) + " |")
    if results.get("pipeline"):
        print("\n## fwd+bwd GEMMs with fused quantizers, no autograd (TFLOPS-equivalent, 6MNK)")
        for r in results["pipeline"]:
            print(f"| {r['shape']} | " + " | ".join(
                "-" if r.get(c) is None else f"{c} {r[c]:.0f} ({r[c] / r['bf16']:.2f}×)"
                for c in ("bf16", "int8_blk128", "int8_hadamard")) + " |")
    if results.get("linear"):
        print("\n## quantized linear fwd+bwd (TFLOPS-equivalent, 6MNK)")
        measured = [r for r in LINEAR_RECIPES if any(r in row for row in results["linear"])]
        cols = measured + [f"{r}_graph" for r in GRAPHED_RECIPES if r in measured]
        for r in results["linear"]:
            # graphed rows against the graphed BF16 step
            base = {c: r.get("bf16_graph") if c.endswith("_graph") else r.get("bf16") for c in cols}
            print(f"| {r['shape']} | " + " | ".join(
                "-" if r.get(c) is None or not base[c] else f"{c} {r[c]:.0f} ({r[c] / base[c]:.2f}×)"
                for c in cols) + " |")
    for prof in results.get("linear_profile") or []:
        print(f"\n## kernel time per fwd+bwd step at {prof['shape']} (µs, torch.profiler)")
        for recipe, p in prof["per_step"].items():
            cats = ", ".join(f"{k} {v:.0f}" for k, v in sorted(p["categories"].items()))
            print(f"| {recipe} | total {p['total_us']:.0f} | {cats} |")
    if results.get("host"):
        print("\n## host time per call (µs; 256×256 operands, GPU time negligible)")
        for name, us in results["host"].items():
            print(f"| {name} | {us:.0f} |")
    if results.get("quant"):
        print("\n## quantize kernels, 16384×4096 bf16")
        for q in results["quant"]:
            print(f"| {q['name']} | " + (f"{q['ms'] * 1e3:.0f} µs | {q['GBps']:.0f} GB/s |" if "ms" in q
                                         else q.get("error", ""))
                  + (f" {q['speedup_vs_single']:.2f}× |" if "speedup_vs_single" in q else "")
                  + (f" MISMATCH {q['mismatch']}" if q.get("matches_single") is False else ""))
    if results.get("epilogue"):
        print("\n## CUDA rowcol GEMM epilogues, TOPS (ratio to cuBLAS BF16)")
        print("| M, N, K | cuBLAS BF16 | " + " | ".join(c[0] for c in EPILOGUE_CASES) + " |")
        print("|---" * (len(EPILOGUE_CASES) + 2) + "|")
        for r in results["epilogue"]:
            base = r["bf16_cublas"]
            cells = " | ".join(f"{r[c[0]]:.0f} ({r[c[0]] / base:.2f}×)" for c in EPILOGUE_CASES)
            print(f"| {', '.join(map(str, r['shape']))} | {base:.0f} | {cells} |")
    if results.get("outlier_error"):
        print("\n## error vs fp64 on outlier inputs:", json.dumps(results["outlier_error"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="bench_kernels.json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-linear", action="store_true")
    ap.add_argument("--linear-recipes", default=",".join(LINEAR_RECIPES),
                    help="recipes of the linear section (comma-separated; default: all of LINEAR_RECIPES)")
    ap.add_argument("--sections", default="gemm,quant,fwd,pipeline,linear,linear_profile,host,int4,error")
    ap.add_argument("--profile-shapes", default="8192x4096x4096",
                    help="linear_profile: MxNxK,... (e.g. GPT-2 124M's fc1 at micro batch 16: 16384x3072x768)")
    args = ap.parse_args()
    args.linear_recipes = [r.strip() for r in args.linear_recipes.split(",") if r.strip()]
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU")
        return 1
    import triton
    results = dict(gpu=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                   torch=torch.__version__, triton=triton.__version__, commit=checkout_commit(),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   sweep=[], best_cfg={}, default_configs={str(k): v for k, v in
                                                           gemm.GEMM_CONFIGS.items()})
    t0 = time.time()
    sections = args.sections.split(",")
    for name, fn in (("gemm", gemm_section), ("quant", quant_section), ("fwd", fwd_section),
                     ("pipeline", pipeline_section), ("linear", linear_section),
                     ("linear_profile", linear_profile_section), ("host", host_section),
                     ("int4", int4_section), ("error", error_section), ("epilogue", epilogue_section)):
        if name not in sections or (name == "linear" and args.no_linear):
            continue
        try:
            fn(args, results)
        except Exception as e:
            results[name + "_error"] = repr(e)[:500]
            traceback.print_exc()
        results["elapsed_s"] = time.time() - t0
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
