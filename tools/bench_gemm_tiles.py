#!/usr/bin/env python
"""The sm_90 INT8 GEMM's (csrc/int8_gemm) row/column and block-128 modes on the same tiles, next to cuBLAS BF16.

    python tools/bench_gemm_tiles.py --json tiles.json

What limits the block-128 GEMM (a scale every K = 128, its INT32 partials promoted into FP32 sums per
K-block) is read off this table: each mode on the 128 × 128 tile with the register-stored epilogue
(`int8_gemm(tile=2)`; block-128 also with one accumulator set, `tile=3`), and the shipped launches
(`tile=0`: row/column 128 × 256 with TMA stores; block-128 128 × 128, two accumulator sets, TMA stores).
Same tile and epilogue, so the row/column to block-128 ratio is what the promotion costs.

Operands already quantized, random INT8 with positive scales, BF16 out; the issue's GEMM shapes
(M, N, K). TOPS = 2MNK / median time of `triton.testing.do_bench` (CUDA events, L2 flushed before each
call); ratios to cuBLAS BF16 (`torch.mm`) of the same run. Needs an sm_90 GPU and the CUDA extension.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_env import environment  # noqa: E402  (tools/, the script's directory)
from megaq.kernels import cuda_ext  # noqa: E402

SHAPES = [(8192, 4096, 4096), (8192, 16384, 4096), (8192, 4096, 16384), (16384, 6400, 1600), (16384, 1600, 6400)]
# column name -> (mode, tile)
CASES = {
    "rowcol 128x256 (shipped: 3 stages, TMA stores)": ("rowcol", 0),
    "rowcol 128x256, 4 stages, registers": ("rowcol", 1),
    "rowcol 128x128, 6 stages, registers": ("rowcol", 2),
    "blk128 128x128 (shipped: 5 stages, TMA stores, two sets)": ("block128", 0),
    "blk128 128x128, 6 stages, registers, two sets": ("block128", 2),
    "blk128 128x128, 6 stages, registers, one set": ("block128", 3),
}


def bench_shape(m: int, n: int, k: int) -> dict:
    import triton

    dev = "cuda"
    kb = -(-k // 128)
    a = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    scales = {"rowcol": (torch.rand(m, device=dev) * 0.01 + 1e-3, torch.rand(n, device=dev) * 0.01 + 1e-3),
              "block128": (torch.rand(m, kb, device=dev) * 0.01 + 1e-3,
                           torch.rand(-(-n // 128), kb, device=dev) * 0.01 + 1e-3)}
    out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
    xa = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    xb = torch.randn(n, k, device=dev, dtype=torch.bfloat16)

    def tops(fn) -> float:
        fn()
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        return 2 * m * n * k / ms / 1e9

    row = {"shape": [m, n, k], "cuBLAS bf16": tops(lambda: torch.mm(xa, xb.t(), out=out))}
    for name, (mode, tile) in CASES.items():
        sa, sb = scales[mode]
        rows_b = 128 if mode == "block128" else 1
        row[name] = tops(lambda: cuda_ext.int8_gemm(a, b, sa, sb, mode=mode, scale_b_rows=rows_b, out=out,
                                                     tile=tile))
    # the promotion's cost: block-128 against row/column on the same tile and epilogue
    row["blk128 / rowcol, 128x128 registers"] = (row["blk128 128x128, 6 stages, registers, two sets"]
                                                 / row["rowcol 128x128, 6 stages, registers"])
    return row


def table(rows: list[dict]) -> str:
    names = ["cuBLAS bf16", *CASES]
    lines = ["| M, N, K | " + " | ".join(names) + " | blk128 / rowcol (same tile) |",
             "|---" * (len(names) + 2) + "|"]
    for r in rows:
        bf16 = r["cuBLAS bf16"]
        cells = [f"{bf16:.0f}"] + [f"{r[c]:.0f} ({r[c] / bf16:.2f}×)" for c in CASES]
        lines.append(f"| {', '.join(map(str, r['shape']))} | " + " | ".join(cells)
                     + f" | {r['blk128 / rowcol, 128x128 registers']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help="M,N,K;M,N,K;... (default: the issue's five)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    if not (torch.cuda.is_available() and cuda_ext.int8_gemm_available()):
        print("bench_gemm_tiles: needs an sm_90 GPU and the megaq CUDA extension "
              f"({cuda_ext.extension_unavailable_reason() or 'no CUDA device'})", file=sys.stderr)
        return 2
    rows = []
    for m, n, k in shapes:
        rows.append(bench_shape(m, n, k))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": environment(), "rows": rows}, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
