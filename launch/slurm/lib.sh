# shellcheck shell=bash
# Shared by megaq's sbatch scripts (pretrain.sbatch, pretrain_deepspeed.sbatch, pretrain_mpi.sbatch):
# finding the checkout and python, turning the script's arguments into the launcher's, the rendezvous
# address, tasks per node, forwarding stop signals to the training processes, and requeueing.
# Sourced, not run. Functions print with the prefix "megaq-slurm:".

# Exit code of launch/pretrain_gpt.py when a SIGUSR1/SIGTERM stopped it after saving a checkpoint
# (megaq.training.signals.EXIT_RESUMABLE, sysexits' EX_TEMPFAIL): run it again to continue.
MEGAQ_EXIT_RESUMABLE=75

megaq_say() { echo "megaq-slurm: $*"; }
megaq_die() { echo "megaq-slurm: ERROR: $*" >&2; exit 2; }

# megaq_in_container: true when the tasks run in a container (pyxis's srun --container-image through
# MEGAQ_SRUN_ARGS, or a MEGAQ_EXEC_PREFIX such as "apptainer exec --nv megaq.sif").
megaq_in_container() {
    [[ "${MEGAQ_SRUN_ARGS:-}" == *--container-* ]] || [ -n "${MEGAQ_EXEC_PREFIX:-}" ]
}

# megaq_locate: sets MEGAQ_HOME (the checkout holding launch/pretrain_gpt.py, as the tasks see it) and
# MEGAQ_PYTHON (the interpreter of the environment megaq is installed in).
megaq_locate() {
    MEGAQ_PYTHON=${MEGAQ_PYTHON:-python}
    if [ -z "${MEGAQ_HOME:-}" ]; then
        if [ -f "${SLURM_SUBMIT_DIR:-.}/launch/pretrain_gpt.py" ]; then
            MEGAQ_HOME=${SLURM_SUBMIT_DIR:-$PWD}
        else
            # An installed checkout (pip install -e): the directory above the megaq package.
            MEGAQ_HOME=$("$MEGAQ_PYTHON" -c 'import megaq, os; print(os.path.dirname(os.path.dirname(os.path.abspath(megaq.__file__))))' 2>/dev/null) || true
        fi
    fi
    if [ -z "${MEGAQ_HOME:-}" ] || [ ! -f "$MEGAQ_HOME/launch/pretrain_gpt.py" ]; then
        if [ -n "${MEGAQ_HOME:-}" ] && megaq_in_container; then
            # The path exists inside the container only.
            megaq_say "MEGAQ_HOME=$MEGAQ_HOME is not on this host; assuming it exists inside the container"
        else
            megaq_die "cannot find launch/pretrain_gpt.py: submit from the megaq checkout, or export MEGAQ_HOME=/path/to/megaq (and MEGAQ_PYTHON=/path/to/venv/bin/python)"
        fi
    fi
    export MEGAQ_HOME MEGAQ_PYTHON
}

# megaq_parse_args CONFIG [KEY=VALUE | --override KEY=VALUE | --flag ...]...
# Sets MEGAQ_CONFIG and the array MEGAQ_TRAIN_ARGS (the arguments of launch/pretrain_gpt.py).
# The config may also come from the environment (MEGAQ_CONFIG) with no positional argument.
# A relative config path is taken relative to MEGAQ_HOME when it does not exist from the submit dir.
megaq_parse_args() {
    MEGAQ_TRAIN_ARGS=()
    if [ $# -gt 0 ] && [ "${1#-}" = "$1" ] && [[ "$1" != *=* ]]; then
        MEGAQ_CONFIG=$1
        shift
    fi
    [ -n "${MEGAQ_CONFIG:-}" ] || megaq_die "no config: give it as the first argument (e.g. configs/gpt2_int8.json) or export MEGAQ_CONFIG"
    if [ ! -f "$MEGAQ_CONFIG" ] && [ -f "${MEGAQ_HOME:-.}/$MEGAQ_CONFIG" ]; then
        MEGAQ_CONFIG=$MEGAQ_HOME/$MEGAQ_CONFIG
    fi
    MEGAQ_TRAIN_ARGS+=(--config "$MEGAQ_CONFIG")
    while [ $# -gt 0 ]; do
        case "$1" in
            --override) [ $# -ge 2 ] || megaq_die "--override needs KEY=VALUE"
                        MEGAQ_TRAIN_ARGS+=(--override "$2"); shift 2 ;;
            --override=*) MEGAQ_TRAIN_ARGS+=(--override "${1#--override=}"); shift ;;
            -*) MEGAQ_TRAIN_ARGS+=("$1"); shift ;;
            *=*) MEGAQ_TRAIN_ARGS+=(--override "$1"); shift ;;
            *) megaq_die "unexpected argument '$1': after the config give overrides as section.key=value" ;;
        esac
    done
    # MEGAQ_RUN_DIR: one directory for the run's checkpoints and TensorBoard events.
    if [ -n "${MEGAQ_RUN_DIR:-}" ]; then
        MEGAQ_TRAIN_ARGS+=(--override "checkpoint.dir=$MEGAQ_RUN_DIR/checkpoints"
                           --override "logging.tensorboard_dir=$MEGAQ_RUN_DIR/tensorboard")
    fi
}

# megaq_check_config: validates the configuration on the batch host before any node starts (a typo
# fails in a second instead of after the allocation's start-up), and warns when a requeued job
# could not resume. Skipped when megaq is not importable here (e.g. it lives in a container only).
megaq_check_config() {
    [ "${MEGAQ_CHECK_CONFIG:-1}" = 0 ] && return 0
    if megaq_in_container; then
        megaq_say "tasks run in a container: the configuration is checked there, not on the batch host"
        return 0
    fi
    local overrides=() i
    for ((i = 0; i < ${#MEGAQ_TRAIN_ARGS[@]}; i++)); do
        [ "${MEGAQ_TRAIN_ARGS[i]}" = --override ] && overrides+=("${MEGAQ_TRAIN_ARGS[i + 1]}")
    done
    "$MEGAQ_PYTHON" -c 'import megaq.training.config' 2>/dev/null || {
        megaq_say "megaq is not importable by $MEGAQ_PYTHON on the batch host; skipping the config check"
        return 0
    }
    PYTHONPATH="$MEGAQ_HOME${PYTHONPATH:+:$PYTHONPATH}" "$MEGAQ_PYTHON" - "$MEGAQ_CONFIG" "${overrides[@]}" <<'EOF' || exit 2
import sys
from megaq.training.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except (ConfigError, OSError, ValueError) as e:
    print(f"megaq-slurm: ERROR: configuration {sys.argv[1]}: {e}", file=sys.stderr)
    sys.exit(2)
ck = cfg.checkpoint
if not ck.dir:
    print("megaq-slurm: WARNING: checkpoint.dir is not set: nothing is saved, and a requeued job starts "
          "over. Add checkpoint.dir=/shared/path (or export MEGAQ_RUN_DIR).")
else:
    print(f"megaq-slurm: checkpoints in {ck.dir} (auto_resume={ck.auto_resume}, save_interval={ck.save_interval})")
EOF
}

# megaq_gpus_per_node: GPUs per node of the allocation (0 when none were requested).
megaq_gpus_per_node() {
    local g=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    if [ -z "$g" ] && [ -n "${SLURM_JOB_GPUS:-}" ]; then
        g=$(echo "$SLURM_JOB_GPUS" | tr ',' '\n' | grep -c .)
    fi
    g=${g##*:}     # "a100:8" -> 8
    g=${g%%(*}     # "8(x2)"  -> 8
    case "$g" in ''|*[!0-9]*) g=0 ;; esac
    echo "$g"
}

# megaq_tasks_per_node: one task per GPU. MEGAQ_TASKS_PER_NODE, then --ntasks-per-node, then the GPU
# count; on CPU-only nodes without --ntasks-per-node, 1.
megaq_tasks_per_node() {
    local n=${MEGAQ_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-}}
    n=${n%%(*}
    if [ -z "$n" ]; then
        n=$(megaq_gpus_per_node)
        [ "$n" -gt 0 ] || n=1
    fi
    echo "$n"
}

# megaq_hosts: the job's hosts, one a line, in SLURM's order.
megaq_hosts() {
    if command -v scontrol >/dev/null; then
        scontrol show hostnames "${SLURM_JOB_NODELIST:?not in a SLURM job}"
    else
        "$MEGAQ_PYTHON" -c 'import sys; from megaq.training.distributed import expand_slurm_nodelist as e; print("\n".join(e(sys.argv[1])))' "$SLURM_JOB_NODELIST"
    fi
}

# megaq_rendezvous: exports MASTER_ADDR (the first host of the job) and MASTER_PORT (from the job id,
# the same formula as megaq.training.distributed, so every task agrees without talking).
megaq_rendezvous() {
    if [ -z "${MASTER_ADDR:-}" ]; then
        MASTER_ADDR=$(megaq_hosts | head -n 1)
    fi
    MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
    export MASTER_ADDR MASTER_PORT
}

# megaq_threads: OMP_NUM_THREADS = the node's CPUs shared among its tasks, unless set.
megaq_threads() {
    local tpn=$1 cpus=${SLURM_CPUS_ON_NODE:-}
    cpus=${cpus%%(*}
    if [ -z "${OMP_NUM_THREADS:-}" ] && [ -n "$cpus" ]; then
        OMP_NUM_THREADS=$((cpus / tpn)); [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
        export OMP_NUM_THREADS
    fi
}

# megaq_banner: what the job is about to do, for its log.
megaq_banner() {
    megaq_say "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0} on $(hostname) at $(date '+%F %T')"
    megaq_say "nodes ${SLURM_JOB_NUM_NODES:-1} [${SLURM_JOB_NODELIST:-}] x $1 tasks/node; gpus/node $(megaq_gpus_per_node); OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
    megaq_say "rendezvous ${MASTER_ADDR:-?}:${MASTER_PORT:-?}; megaq ${MEGAQ_HOME}; python $(command -v "$MEGAQ_PYTHON" || echo "$MEGAQ_PYTHON")"
}

# megaq_run_step FORWARD_FUNCTION COMMAND...: runs COMMAND (srun / deepspeed / mpirun) in the background
# and waits for it. A SIGUSR1 or SIGTERM to this batch shell (#SBATCH --signal=B:USR1@T, scancel
# --batch --signal=USR1, or the TERM of a time limit / preemption) is passed on by calling
# FORWARD_FUNCTION SIGNAL, whose job is to deliver it to the training processes: they finish the
# step, save a checkpoint and exit 75. Sets MEGAQ_STEP_RC to COMMAND's exit code.
megaq_run_step() {
    local forward=$1; shift
    MEGAQ_SIGNALLED=
    "$@" &
    MEGAQ_STEP_PID=$!
    # shellcheck disable=SC2064  # expand $forward now
    trap "MEGAQ_SIGNALLED=USR1; megaq_say 'SIGUSR1: asking the training processes to save and stop'; $forward USR1" USR1
    # shellcheck disable=SC2064
    trap "MEGAQ_SIGNALLED=TERM; megaq_say 'SIGTERM: asking the training processes to save and stop'; $forward TERM" TERM
    while :; do
        wait "$MEGAQ_STEP_PID"
        MEGAQ_STEP_RC=$?
        # wait returns early (status > 128) when a trapped signal arrives; the step still runs.
        kill -0 "$MEGAQ_STEP_PID" 2>/dev/null || break
    done
    trap - USR1 TERM
}

# megaq_forward_to_trainers SIGNAL NODES: delivers SIGNAL to megaq's training processes of this job on
# every node, through an extra `srun --overlap` step (one task per node). For launchers that must not
# receive the signal themselves (the deepspeed launcher dies on SIGUSR1; mpirun turns SIGTERM into a
# kill). Training processes: python running launch/pretrain_gpt.py as its script (launchers name the
# script further along their command line), with this job's SLURM_JOB_ID in their environment, or
# none (started by pdsh/ssh, on an exclusive node).
# shellcheck disable=SC2016  # run by bash on each node
MEGAQ_SIGNAL_TRAINERS='sig=$1 job=$2
for pid in $(pgrep -u "$(id -u)" -f "^[^ ]*python[^ ]* (-[^ ]+ )*[^ ]*pretrain_gpt\.py( |$)"); do
    env_job=$(tr "\0" "\n" </proc/"$pid"/environ 2>/dev/null | sed -n "s/^SLURM_JOB_ID=//p")
    if [ -z "$env_job" ] || [ "$env_job" = "$job" ]; then
        kill -s "$sig" "$pid" && echo "megaq-slurm: SIG$sig -> pid $pid on $(hostname)"
    fi
done'
megaq_forward_to_trainers() {
    local sig=$1 nodes=${2:-${SLURM_JOB_NUM_NODES:-1}}
    srun --overlap --nodes="$nodes" --ntasks-per-node=1 --ntasks="$nodes" --export=ALL \
        bash -c "$MEGAQ_SIGNAL_TRAINERS" megaq-signal "$sig" "${SLURM_JOB_ID:-}" \
        || bash -c "$MEGAQ_SIGNAL_TRAINERS" megaq-signal "$sig" "${SLURM_JOB_ID:-}" || true
}

# megaq_finish: exit the batch script according to the step's exit code. 75 (stopped after saving) ->
# `scontrol requeue` this job, which runs the same script again later and resumes from the checkpoint
# (MEGAQ_REQUEUE=0 disables this; at most MEGAQ_MAX_RESTARTS restarts).
megaq_finish() {
    local rc=$MEGAQ_STEP_RC restarts=${SLURM_RESTART_COUNT:-0}
    if [ "$rc" -eq 0 ]; then
        megaq_say "training finished (exit 0) at $(date '+%F %T')"
        exit 0
    fi
    if [ "$MEGAQ_SIGNALLED" = USR1 ] && [ "$rc" -eq $((128 + 10)) ]; then
        # SIGUSR1 reached processes that had not yet installed megaq's handler (still starting up):
        # they died of it without saving, but the newest complete checkpoint is intact: go on from it.
        megaq_say "the training processes died of SIGUSR1 before they could save (still starting?); requeueing from the last complete checkpoint"
        rc=$MEGAQ_EXIT_RESUMABLE
    fi
    if [ "$rc" -ne "$MEGAQ_EXIT_RESUMABLE" ]; then
        megaq_say "training failed with exit code $rc${MEGAQ_SIGNALLED:+ after SIG$MEGAQ_SIGNALLED}; not requeueing"
        exit "$rc"
    fi
    megaq_say "training stopped after saving a checkpoint (exit $rc)"
    if [ "$MEGAQ_SIGNALLED" = TERM ]; then
        # SIGTERM to the batch shell: scancel, a preemption (SLURM requeues by itself where the
        # partition's PreemptMode says so) or the time limit itself. Not ours to requeue.
        megaq_say "SIGTERM came from SLURM (scancel, preemption or the time limit): not requeueing; resubmit to continue"
        exit "$rc"
    fi
    if [ "${MEGAQ_REQUEUE:-1}" = 0 ]; then
        megaq_say "MEGAQ_REQUEUE=0: not requeueing; resubmit the same command to continue"
        exit "$rc"
    fi
    if [ "$restarts" -ge "${MEGAQ_MAX_RESTARTS:-100}" ]; then
        megaq_say "already restarted $restarts times (MEGAQ_MAX_RESTARTS=${MEGAQ_MAX_RESTARTS:-100}); not requeueing"
        exit "$rc"
    fi
    megaq_say "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))); it resumes from the latest checkpoint"
    # Slurm ends this batch script when the requeue takes effect; give it the time to.
    if scontrol requeue "$SLURM_JOB_ID"; then
        sleep "${MEGAQ_REQUEUE_GRACE:-60}"
        exit 0
    fi
    megaq_say "scontrol requeue failed (is the job --requeue able, JobRequeue=1?); resubmit to continue"
    exit "$rc"
}
