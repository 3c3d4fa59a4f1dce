#!/usr/bin/env bash
# One GPU session's checks in one go: the GPU tests, the quantized-linear benchmark and the end-to-end
# trainer throughput, logs and JSON under OUT (default ./gpu_results).
#   bash tools/run_gpu_checks.sh [wheel-dir]
# wheel-dir: extra wheels to install first (deepspeed, pydantic, ... for a machine without a registry).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
if [ -n "${1:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/megaq_site "$1"/*.whl || exit 1
    export PYTHONPATH=/tmp/megaq_site:${PYTHONPATH:-}
fi
# The CUDA extension (csrc/) is JIT-built on first use (about a minute, cached): on sm_90 it holds the
# INT8 GEMM the int8 recipes run; MEGAQ_JIT=0 leaves it out (the Triton GEMM runs instead).
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 MEGAQ_JIT=${MEGAQ_JIT:-1}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/gpu.txt"
status=0
python -m pytest -m gpu tests -q -ra 2>&1 | tee "$out/gpu_tests.log" || status=1
python tools/bench_kernels.py --sections "${BENCH_SECTIONS:-linear}" --json "$out/bench_kernels.json" \
    2>&1 | tee "$out/bench_kernels.log" || status=1
python tools/bench_e2e.py --models "${E2E_MODELS:-gpt2}" --seq "${E2E_SEQ:-1024}" \
    --recipes "${E2E_RECIPES:-bf16,int8,int4}" --micro-batch "${E2E_MICRO:-16}" --steps "${E2E_STEPS:-25}" \
    --warmup 10 --json "$out/bench_e2e.json" 2>&1 | tee "$out/bench_e2e.log" || status=1
exit $status
