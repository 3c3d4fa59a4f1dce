#!/usr/bin/env bash
# Compile-checks every csrc/**/*.cu with nvcc for sm_80, sm_89 and sm_90a (no GPU, no torch needed:
# the .cu files keep PyTorch headers out). One line per (file, arch); exits non-zero on any failure.
#   bash .ci/check_cuda.sh                 # all files, all three archs
#   MEGAQ_CHECK_ARCHS="sm_80" bash .ci/check_cuda.sh csrc/int4_gemm/int4_gemm_sm80.cu
# nvcc is $NVCC, else the one on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin. Without nvcc it
# fails, unless MEGAQ_SKIP_NVCC=1 (then it says so and exits 0).
set -uo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
    if command -v nvcc >/dev/null 2>&1; then NVCC=$(command -v nvcc)
    elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC=$CUDA_HOME/bin/nvcc
    elif [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc
    fi
fi
if [ -n "$NVCC" ] && ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "check_cuda: NVCC=$NVCC is not an executable" >&2
    NVCC=
fi
if [ -z "$NVCC" ]; then
    if [ "${MEGAQ_SKIP_NVCC:-0}" = "1" ]; then
        echo "check_cuda: nvcc not found; SKIPPED because MEGAQ_SKIP_NVCC=1"
        exit 0
    fi
    echo "check_cuda: nvcc not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin). Install the CUDA" \
         "toolkit's compiler, or set MEGAQ_SKIP_NVCC=1 to skip this check." >&2
    exit 1
fi

archs=${MEGAQ_CHECK_ARCHS:-"sm_80 sm_89 sm_90a"}
if [ $# -gt 0 ]; then
    files=("$@")
else
    mapfile -t files < <(find csrc -name '*.cu' | sort)
fi
if [ ${#files[@]} -eq 0 ]; then
    echo "check_cuda: no .cu files under csrc/" >&2
    exit 1
fi

echo "check_cuda: $("$NVCC" --version | tail -n 2 | head -n 1)"
failed=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for f in "${files[@]}"; do
    for arch in $archs; do
        # sm_90a features (wgmma, setmaxnreg) need the -gencode spelling with nvcc 13.0.
        gencode="-gencode=arch=compute_${arch#sm_},code=${arch}"
        start=$(date +%s)
        if "$NVCC" -c -std=c++17 -O3 -Icsrc $gencode "$f" -o /dev/null >"$log" 2>&1; then
            warn=$(grep -c -i 'warning' "$log" || true)
            note=""
            [ "$warn" -gt 0 ] && note=", $warn warning lines"
            echo "ok    $arch  $f  ($(( $(date +%s) - start )) s$note)"
            [ "$warn" -gt 0 ] && sed 's/^/      /' "$log"
        else
            echo "FAIL  $arch  $f"
            sed 's/^/      /' "$log"
            failed=1
        fi
    done
done
exit $failed
