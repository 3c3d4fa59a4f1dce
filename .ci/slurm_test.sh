#!/usr/bin/env bash
# CI: megaq's sbatch scripts on a real (one-node, localhost) Slurm, CPU only, 2 tasks over gloo.
#   1. launch/slurm/pretrain.sbatch runs the tiny preset to completion (the uninterrupted reference).
#   2. The same job signalled mid-run (scancel --batch --signal=USR1, what --signal=B:USR1@120 does
#      before a time limit): the tasks save a checkpoint and exit 75, the script requeues the job, the
#      requeued job resumes from that checkpoint and finishes; its per-step losses must equal run 1's.
#   3. The same with launch/slurm/pretrain_deepspeed.sbatch (the deepspeed launcher, a hostfile);
#      SLURM_TEST_DEEPSPEED=0 skips it.
# Uses the active environment's python (the CI venv with megaq installed), a temporary directory for
# checkpoints and logs, and prints the jobs' log tails. Exits non-zero on any failure.
#   bash .ci/slurm_test.sh            (as root: .ci/slurm_setup.sh installs and starts Slurm)
# SLURM_TEST_KEEP=1 keeps the logs and checkpoints (they are kept anyway when the test fails).
# The first job on a fresh machine also pays DeepSpeed's one-time JIT build of its CPU communication
# op (cached in ~/.cache/torch_extensions for later runs and the pytest suite).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t0 ))s"; }
say() { echo "slurm_test [$(elapsed)]: $*"; }

bash .ci/slurm_setup.sh

python=$(command -v python)
"$python" -c "import megaq" || { echo "slurm_test: megaq is not importable by $python" >&2; exit 1; }
say "python $python"

tmp=$(mktemp -d /tmp/megaq-slurm-test.XXXXXX)
jobs_started=()
cleanup() {
    local rc=$?
    for j in "${jobs_started[@]}"; do scancel "$j" 2>/dev/null || true; done
    if [ "$rc" -ne 0 ]; then
        for log in "$tmp"/*.out; do
            [ -f "$log" ] || continue
            echo "===== $log (last 60 lines)"; tail -n 60 "$log"
        done
        echo "===== slurmctld.log"; tail -n 20 /var/log/slurm/slurmctld.log 2>/dev/null || true
        echo "===== slurmd.log"; tail -n 20 /var/log/slurm/slurmd.log 2>/dev/null || true
        echo "slurm_test: FAILED after $(elapsed) (logs kept in $tmp)"
    elif [ "${SLURM_TEST_KEEP:-0}" = 1 ]; then
        echo "slurm_test: logs kept in $tmp"
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT

STEPS=${SLURM_TEST_STEPS:-60}
SIGNAL_AT=${SLURM_TEST_SIGNAL_AT:-10}
overrides=(train.train_steps="$STEPS" logging.log_interval=1 checkpoint.save_interval=0)

# The tasks run with this python and write only under $tmp (MEGAQ_RUN_DIR: checkpoints + TensorBoard).
export MEGAQ_PYTHON=$python

# submit NAME SCRIPT: prints the job id.
submit() {
    local name=$1 script=$2
    MEGAQ_RUN_DIR=$tmp/$name sbatch --parsable --export=ALL --job-name="megaq-ci-$name" \
        --nodes=1 --ntasks-per-node=2 --time=15 --output="$tmp/$name.out" \
        "$script" configs/tiny_cpu.json "${overrides[@]}"
}

job_field() { scontrol show job "$1" 2>/dev/null | grep -o "$2=[^ ]*" | head -n1 | cut -d= -f2; }

# wait_for JOB TIMEOUT_S: until the job has ended; fails unless it COMPLETED with exit code 0.
wait_for() {
    local job=$1 deadline=$(( $(date +%s) + $2 )) state
    while :; do
        state=$(job_field "$job" JobState)
        case "$state" in
            COMPLETED) return 0 ;;
            FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED)
                say "job $job ended $state (exit $(job_field "$job" ExitCode))"; return 1 ;;
        esac
        [ "$(date +%s)" -lt "$deadline" ] || { say "job $job still $state after $2 s"; return 1; }
        sleep 0.5
    done
}

# signal_at JOB LOG STEP TIMEOUT_S: once the log shows STEP, SIGUSR1 to the job's batch script.
signal_at() {
    local job=$1 log=$2 step=$3 deadline=$(( $(date +%s) + $4 ))
    until grep -qE "step +$step/$STEPS \|" "$log" 2>/dev/null; do
        [ "$(job_field "$job" JobState)" = COMPLETED ] && { say "job $job completed before step $step was seen"; return 1; }
        [ "$(date +%s)" -lt "$deadline" ] || { say "job $job did not reach step $step in $4 s"; return 1; }
        sleep 0.1
    done
    say "job $job at step $step: scancel --batch --signal=USR1 $job"
    scancel --batch --signal=USR1 "$job"
}

# release_requeued JOB TIMEOUT_S: wait until the job is pending again after its requeue, then start it
# now (Slurm holds a requeued job back for AuthInfo cred_expire, 120 s by default).
release_requeued() {
    local job=$1 deadline=$(( $(date +%s) + $2 ))
    until [ "$(job_field "$job" Restarts)" = 1 ] && [ "$(job_field "$job" JobState)" = PENDING ]; do
        case "$(job_field "$job" JobState)" in
            COMPLETED|FAILED|CANCELLED|TIMEOUT) say "job $job ended $(job_field "$job" JobState) instead of being requeued"; return 1 ;;
        esac
        [ "$(date +%s)" -lt "$deadline" ] || { say "job $job was not requeued in $2 s"; return 1; }
        sleep 0.2
    done
    # slurmd rejects a launch whose credential is from the same second as the requeue ("Job
    # credential revoked"), so let a couple of seconds pass first.
    sleep 2
    say "job $job requeued (Restarts=1, $(job_field "$job" Reason)); scontrol update JobId=$job StartTime=now"
    scontrol update JobId="$job" StartTime=now
}

show_tail() {
    echo "----- $1: last ${2:-15} lines"
    grep -vE "FutureWarning|return func\(|real_accelerator.py" "$1" | tail -n "${2:-15}"
    echo "-----"
}

check() {  # check FULL_NAME RESUMED_NAME
    "$python" - "$tmp/$1.out" "$tmp/$1" "$tmp/$2.out" "$tmp/$2" "$STEPS" <<'PY'
import glob, os, re, sys

STEP_RE = re.compile(r"\bstep\s+(\d+)/(\d+) \| loss (\S+) \|")
RESTART_RE = re.compile(r"^megaq-slurm: job (\d+) \(.*\) restart (\d+) on ")
VAL_RE = re.compile(r"\bstep (\d+): validation loss (\S+) ")


def fail(msg):
    print(f"slurm_test: FAIL: {msg}")
    sys.exit(1)


def segments(path):
    """One entry per start of the batch script in the log (restarts append to the same file)."""
    runs = []
    with open(path, errors="replace") as f:
        for line in f:
            m = RESTART_RE.match(line)
            if m:
                runs.append({"restart": int(m.group(2)), "steps": [], "loss": {}, "val": {}, "text": ""})
            elif runs:
                runs[-1]["text"] += line
                if (m := STEP_RE.search(line)):
                    runs[-1]["steps"].append(int(m.group(1)))
                    runs[-1]["loss"][int(m.group(1))] = m.group(3)
                if (m := VAL_RE.search(line)):
                    runs[-1]["val"][int(m.group(1))] = m.group(2)
    return runs


def tensorboard_losses(run_dir):
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        from tensorboard.util import tensor_util
    except ImportError:
        return None
    out = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))):
        for event in EventFileLoader(path).Load():
            for v in event.summary.value:
                if v.tag == "train/loss":
                    out[event.step] = v.simple_value if v.HasField("simple_value") else \
                        float(tensor_util.make_ndarray(v.tensor))
    return out


full_log, full_dir, res_log, res_dir, steps = sys.argv[1:6]
steps = int(steps)
all_steps = list(range(1, steps + 1))

full = segments(full_log)
if len(full) != 1 or full[0]["steps"] != all_steps or "training finished (exit 0)" not in full[0]["text"]:
    fail(f"{full_log}: expected one run logging steps 1..{steps} and finishing with exit 0")
full = full[0]

runs = segments(res_log)
if len(runs) != 2 or [r["restart"] for r in runs] != [0, 1]:
    fail(f"{res_log}: expected two runs (restart 0 signalled, restart 1 requeued), found restarts "
         f"{[r['restart'] for r in runs]}")
first, second = runs
m = re.search(r"stopped at step (\d+) by a signal; exit code 75", first["text"])
if not m:
    fail("the signalled run did not stop on the signal with exit code 75")
saved = int(m.group(1))
tag = f"step_{saved:08d}"
checks = [
    (1 <= saved < steps, f"stopped at step {saved}, before the last step {steps}"),
    (re.search(rf"saved checkpoint \S*/{tag} ", first["text"]), f"the signalled run saved {tag}"),
    ("requeueing job" in first["text"], "the batch script requeued the job"),
    (first["steps"] == list(range(1, saved + 1)), f"the signalled run logged steps 1..{saved}"),
    (re.search(rf"resumed from \S*/{tag} \(step {saved},", second["text"]),
     f"the requeued run resumed from {tag} (step {saved})"),
    (second["steps"] == list(range(saved + 1, steps + 1)), f"the requeued run logged steps {saved + 1}..{steps}"),
    ("training finished (exit 0)" in second["text"], "the requeued run finished with exit 0"),
]
ckpt = os.path.join(res_dir, "checkpoints")
latest = open(os.path.join(ckpt, "latest")).read().strip() if os.path.exists(os.path.join(ckpt, "latest")) else None
checks += [(latest == f"step_{steps:08d}", f"checkpoints/latest is step_{steps:08d} (found {latest})"),
           (os.path.isdir(os.path.join(ckpt, tag)), f"checkpoints/{tag} exists")]
for ok, what in checks:
    if not ok:
        fail(what)
    print(f"slurm_test: ok: {what}")

combined = {**first["loss"], **second["loss"]}
print(f"slurm_test: step  uninterrupted  signalled+requeued")
for s in sorted({1, saved - 1, saved, saved + 1, saved + 2, steps} & set(all_steps)):
    mark = "  <- saved, stopped" if s == saved else ("  <- first step after the requeue" if s == saved + 1 else "")
    print(f"slurm_test: {s:4d}  {full['loss'][s]:>13}  {combined.get(s, '-'):>18}{mark}")
bad = [s for s in all_steps if combined.get(s) != full["loss"][s]]
if bad:
    fail(f"losses differ at steps {bad[:10]}")
if {**first["val"], **second["val"]} != full["val"]:
    fail(f"validation losses differ: {full['val']} vs {first['val']} + {second['val']}")
print(f"slurm_test: ok: the loss of every step 1..{steps} equals the uninterrupted run's (4 decimals), "
      f"validation losses too {full['val']}")
tb_full, tb_res = tensorboard_losses(full_dir), tensorboard_losses(res_dir)
if tb_full is None:
    print("slurm_test: tensorboard not importable: no full-precision comparison")
else:
    if sorted(tb_full) != all_steps or sorted(tb_res) != all_steps:
        fail(f"TensorBoard train/loss has {len(tb_full)} and {len(tb_res)} steps, expected {steps} each")
    worst = max(abs(tb_full[s] - tb_res[s]) for s in all_steps)
    if worst > 1e-6:
        fail(f"TensorBoard train/loss differs by up to {worst:.3g}")
    print(f"slurm_test: ok: TensorBoard train/loss (full precision) of all {steps} steps: max |difference| {worst:.3g}")
PY
}

# --- 1. uninterrupted ------------------------------------------------------------------------------
say "1. launch/slurm/pretrain.sbatch, 2 tasks, $STEPS steps of configs/tiny_cpu.json"
t_job=$(date +%s)
full=$(submit full launch/slurm/pretrain.sbatch); jobs_started+=("$full")
# Generous: the first DeepSpeed start on a fresh machine JIT-compiles its CPU communication op.
wait_for "$full" 600
show_tail "$tmp/full.out" 12
say "1. job $full completed in $(( $(date +%s) - t_job )) s"

# --- 2. signalled, requeued, resumed ---------------------------------------------------------------
run_resume_test() {  # NAME SCRIPT
    local name=$1 script=$2 job t_job
    t_job=$(date +%s)
    job=$(submit "$name" "$script"); jobs_started+=("$job")
    signal_at "$job" "$tmp/$name.out" "$SIGNAL_AT" 300
    release_requeued "$job" 120
    wait_for "$job" 300
    show_tail "$tmp/$name.out" 40
    check full "$name"
    say "job $job: signalled, requeued, resumed, completed in $(( $(date +%s) - t_job )) s (both runs)"
}
say "2. launch/slurm/pretrain.sbatch signalled at step $SIGNAL_AT"
run_resume_test resumed launch/slurm/pretrain.sbatch

if [ "${SLURM_TEST_DEEPSPEED:-1}" != 0 ]; then
    say "3. launch/slurm/pretrain_deepspeed.sbatch signalled at step $SIGNAL_AT"
    run_resume_test deepspeed launch/slurm/pretrain_deepspeed.sbatch
fi

say "passed"
