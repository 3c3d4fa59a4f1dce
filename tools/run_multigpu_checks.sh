#!/usr/bin/env bash
# The multi-GPU evidence in one call on a host with 2 or 4 GPUs: the collective benchmark
# (tools/bench_comm.py on all GPUs and on 2), the 200-step loss match and the trainer's TP x DP grid
# (tools/bench_scaling.py); logs, JSON and Markdown tables under OUT, the tables printed last.
#   bash tools/run_multigpu_checks.sh [wheel-dir]
# wheel-dir: wheels to install first (deepspeed, pydantic, ... for a machine without a registry).
# Time: the stages run in this order; the grid, last, starts only the cases that fit in what is left
# of TOTAL_BUDGET_S (default 510 s) and names the ones it skipped (run them with GRID_CASES).
# Knobs (environment): OUT (./multigpu_results), STAGES ("comm loss grid"), TOTAL_BUDGET_S,
# LOSS_BUDGET_S (150), LOSS_MULTI (the loss match's multi-GPU runs, e.g. "1x2:int4"),
# GRID_CASES (e.g. "1x2,2x1"), GRID_ZERO (1), COMM_PRESET (gpt2-xl),
# COMM_ITERS (10), GRID_ARGS / LOSS_ARGS (more tools/bench_scaling.py flags), PYTHON (python3).
# CPU dry run of the script itself (2 gloo processes, tiny model):
#   ALLOW_CPU=1 COMM_PRESET=tiny COMM_ITERS=2 GRID_CASES=1x2:int8,2x1:int8 \
#   GRID_ARGS="--config configs/tiny_cpu.json --model tiny --seq 64 --micro-batch 4 --steps 3 --warmup 1" \
#   LOSS_ARGS="--config configs/tiny_cpu.json --model tiny --seq 64 --steps 6 --window 3 --global-batch 8" \
#   bash tools/run_multigpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
out=${OUT:-multigpu_results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
if [ -n "${1:-}" ]; then
    "$py" -m pip install -q --upgrade --no-index --no-deps --target /tmp/megaq_site "$1"/*.whl || exit 1
    export PYTHONPATH=/tmp/megaq_site:${PYTHONPATH:-}
fi
# MEGAQ_JIT=0: no CUDA-extension build inside the time budget (the int8 recipes run the Triton GEMM here;
# these checks compare communication modes, not GEMMs); MEGAQ_JIT=1 builds it on first use.
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 MEGAQ_JIT=${MEGAQ_JIT:-0} MEGAQ_IGNORE_SLURM=1
stages=${STAGES:-comm loss grid}
total_budget=${TOTAL_BUDGET_S:-510}
read -ra grid_args <<< "${GRID_ARGS:-}"
read -ra loss_args <<< "${LOSS_ARGS:-}"

ngpu=$("$py" -c "import torch; print(torch.cuda.device_count())") || exit 1
if [ "$ngpu" -ge 2 ]; then
    nproc=$ngpu
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
    nvidia-smi topo -m > "$out/topology.txt" 2>&1
elif [ "${ALLOW_CPU:-0}" = 1 ] && [ "$ngpu" -eq 0 ]; then
    nproc=2
    echo "cpu: $nproc gloo processes" | tee "$out/gpu.txt"
    grid_args+=(--max-world 2)
    loss_args+=(--max-world 2)
else
    echo "run_multigpu_checks: needs at least 2 GPUs, found $ngpu (ALLOW_CPU=1 for a CPU dry run)" >&2
    exit 1
fi
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/gpu.txt"
: > "$out/timing.txt"

status=0
# stage NAME COMMAND...: run it, log to OUT/NAME.log, record its time
stage() {
    local name=$1 began=$SECONDS
    shift
    echo "=== $name: start at $((began - start)) s"
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name: exit $rc, $((SECONDS - began)) s (at $((SECONDS - start)) s)" | tee -a "$out/timing.txt"
    [ "$rc" -eq 0 ] || status=1
}
left() { echo $((total_budget - (SECONDS - start))); }
# the first N devices of those visible to this script
devices() {
    local visible
    IFS=, read -ra visible <<< "${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((nproc - 1)))}"
    (IFS=,; echo "${visible[*]:0:$1}")
}

if [[ " $stages " == *" comm "* ]]; then
    for n in $(printf '%s\n' "$nproc" 2 | sort -rnu); do
        stage "bench_comm_${n}gpu" env CUDA_VISIBLE_DEVICES="$(devices "$n")" "$py" -m torch.distributed.run \
            --standalone --nproc_per_node "$n" tools/bench_comm.py --preset "${COMM_PRESET:-gpt2-xl}" \
            --iters "${COMM_ITERS:-10}" --warmup 2 --json "$out/bench_comm_${n}gpu.json"
        grep -E '^(# bench_comm|\|)' "$out/bench_comm_${n}gpu.log" > "$out/bench_comm_${n}gpu.md"
    done
fi

if [[ " $stages " == *" loss "* ]]; then
    if [ "$nproc" -ge 4 ]; then multi="2x2:int8,1x4:bf16"; else multi="2x1:int8,1x2:bf16"; fi
    multi=${LOSS_MULTI:-$multi}
    budget=${LOSS_BUDGET_S:-150}
    [ "$(left)" -lt "$budget" ] && budget=$(left)
    stage loss_match "$py" tools/bench_scaling.py --loss-match --multi "$multi" --noise-seeds $((nproc - 1)) \
        --time-budget-s "$budget" --json "$out/loss_match.json" ${loss_args[@]+"${loss_args[@]}"}
fi

if [[ " $stages " == *" grid "* ]]; then
    [ -n "${GRID_CASES:-}" ] && grid_args+=(--cases "$GRID_CASES")
    stage scaling_grid "$py" tools/bench_scaling.py --zero-stage "${GRID_ZERO:-1}" --time-budget-s "$(left)" \
        --json "$out/bench_scaling.json" ${grid_args[@]+"${grid_args[@]}"}
fi

echo
echo "=== time per stage (total $((SECONDS - start)) s)"
cat "$out/timing.txt"
for table in "$out"/bench_comm_*gpu.md "$out/loss_match.md" "$out/bench_scaling.md"; do
    [ -s "$table" ] && { echo; cat "$table"; }
done
exit $status
