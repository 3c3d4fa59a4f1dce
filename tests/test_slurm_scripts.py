"""The SLURM launch scripts (launch/slurm/) without a SLURM: fake srun / scontrol / scancel / deepspeed /
mpirun on PATH record how the scripts call them. The real end-to-end test on a one-node Slurm is
.ci/slurm_test.sh."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "launch" / "slurm"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# Each fake logs "NAME arg1 arg2 ..." (one line per call, arguments separated by \x1f) to $FAKE_LOG.
FAKE = r'''#!/usr/bin/env bash
name=$(basename "$0")
( IFS=$'\x1f'; echo "$name$IFS$*" ) >>"$FAKE_LOG"
case "$name" in
  scontrol)
    if [ "$1 $2" = "show hostnames" ]; then printf '%s\n' ${FAKE_HOSTS:-node01}; fi
    exit 0 ;;
  scancel) exit "${FAKE_SCANCEL_RC:-0}" ;;
  srun|deepspeed|mpirun)
    if [ -n "${FAKE_SLEEP:-}" ]; then
      trap 'echo "$name got USR1" >>"$FAKE_LOG"; exit "${FAKE_USR1_RC:-75}"' USR1
      trap 'echo "$name got TERM" >>"$FAKE_LOG"; exit 75' TERM
      for _ in $(seq 100); do sleep 0.05; done
    fi
    exit "${FAKE_RC:-0}" ;;
esac
'''


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "scancel", "deepspeed", "mpirun"):
        path = bin_dir / name
        path.write_text(FAKE)
        path.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGAQ_", "MASTER_", "OMP_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), MEGAQ_PYTHON=sys.executable,
               MEGAQ_CHECK_CONFIG="0", MEGAQ_REQUEUE_GRACE="0", SLURM_JOB_ID="4242", SLURM_JOB_NAME="megaq",
               SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node01", SLURM_SUBMIT_DIR=str(ROOT),
               SLURM_CPUS_ON_NODE="16", TMPDIR=str(tmp_path))

    def calls() -> list[list[str]]:
        if not log.exists():
            return []
        return [line.split("\x1f") for line in log.read_text().splitlines()]

    return env, calls


def run_script(script: str, args: list[str], env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM / script), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def the_call(calls, name: str) -> list[str]:
    found = [c[1:] for c in calls() if c[0] == name]
    assert found, f"{name} was not called; calls: {calls()}"
    return found[0]


def test_srun_command_one_task_per_gpu(fake_slurm):
    env, calls = fake_slurm
    env.update(SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[01-02]", SLURM_GPUS_PER_NODE="h100:4",
               FAKE_HOSTS="gpu01 gpu02")
    r = run_script("pretrain.sbatch", ["configs/tiny_cpu.json", "train.train_steps=5",
                                       "--override", "train.lr=0.001"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    srun = the_call(calls, "srun")
    assert "--nodes=2" in srun and "--ntasks-per-node=4" in srun and "--ntasks=8" in srun
    i = srun.index(sys.executable)
    assert srun[i:] == [sys.executable, "-u", str(ROOT / "launch/pretrain_gpt.py"), "--config",
                        "configs/tiny_cpu.json", "--override", "train.train_steps=5", "--override", "train.lr=0.001"]
    assert "rendezvous gpu01:24242" in r.stdout          # first host; 20000 + job id % 20000
    assert "OMP_NUM_THREADS=4" in r.stdout               # 16 CPUs / 4 tasks
    assert "training finished (exit 0)" in r.stdout
    assert not [c for c in calls() if c[:2] == ["scontrol", "requeue"]]


def test_cpu_nodes_use_ntasks_per_node_and_run_dir(fake_slurm):
    env, calls = fake_slurm
    env.update(SLURM_NTASKS_PER_NODE="2", MEGAQ_RUN_DIR="/shared/run1", MEGAQ_CONFIG="configs/tiny_cpu.json")
    r = run_script("pretrain.sbatch", [], env)
    assert r.returncode == 0, r.stdout + r.stderr
    srun = the_call(calls, "srun")
    assert "--ntasks-per-node=2" in srun and "--ntasks=2" in srun
    assert "checkpoint.dir=/shared/run1/checkpoints" in srun
    assert "logging.tensorboard_dir=/shared/run1/tensorboard" in srun


def test_exit_75_requeues_and_other_failures_do_not(fake_slurm):
    env, calls = fake_slurm
    env["FAKE_RC"] = "75"
    r = run_script("pretrain.sbatch", ["configs/tiny_cpu.json"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ["scontrol", "requeue", "4242"] in calls()
    env["MEGAQ_REQUEUE"] = "0"
    r = run_script("pretrain.sbatch", ["configs/tiny_cpu.json"], env)
    assert r.returncode == 75
    env.pop("MEGAQ_REQUEUE")
    env["FAKE_RC"] = "1"
    before = len([c for c in calls() if c[:2] == ["scontrol", "requeue"]])
    r = run_script("pretrain.sbatch", ["configs/tiny_cpu.json"], env)
    assert r.returncode == 1 and "not requeueing" in r.stdout
    assert len([c for c in calls() if c[:2] == ["scontrol", "requeue"]]) == before


def _signal_once_srun_runs(env, calls, sig) -> subprocess.Popen:
    """Start pretrain.sbatch under the fake SLURM, wait until it has started srun, send `sig` to it."""
    p = subprocess.Popen(["bash", str(SLURM / "pretrain.sbatch"), "configs/tiny_cpu.json"], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 20
    while not any(c[0] == "srun" for c in calls()):
        assert time.time() < deadline and p.poll() is None, "srun was not started"
        time.sleep(0.05)
    time.sleep(0.2)
    p.send_signal(sig)
    return p


def test_usr1_to_batch_script_is_forwarded_then_requeued(fake_slurm):
    """The trap: SIGUSR1 to the batch shell -> scancel --signal=USR1 <job> (here failing, so the
    fallback signals srun directly) -> the step exits 75 -> scontrol requeue."""
    env, calls = fake_slurm
    env.update(FAKE_SLEEP="1", FAKE_SCANCEL_RC="1")
    p = _signal_once_srun_runs(env, calls, signal.SIGUSR1)
    out, _ = p.communicate(timeout=20)
    assert p.returncode == 0, out
    names = [c[0] for c in calls()]
    assert ["scancel", "--signal=USR1", "4242"] in calls()
    assert "srun got USR1" in names
    assert ["scontrol", "requeue", "4242"] in calls()
    assert "SIGUSR1: asking the training processes to save and stop" in out


def test_sigterm_saves_but_does_not_requeue(fake_slurm):
    """scancel (or preemption) sends SIGTERM: forwarded, the tasks save and exit 75, and the script
    ends without requeueing (a cancelled job must stay cancelled)."""
    env, calls = fake_slurm
    env.update(FAKE_SLEEP="1", FAKE_SCANCEL_RC="1")
    p = _signal_once_srun_runs(env, calls, signal.SIGTERM)
    out, _ = p.communicate(timeout=20)
    assert p.returncode == 75, out
    assert "srun got TERM" in [c[0] for c in calls()]
    assert not [c for c in calls() if c[:2] == ["scontrol", "requeue"]]
    assert "not requeueing" in out


def test_usr1_during_start_up_still_requeues(fake_slurm):
    """Processes killed by the SIGUSR1 itself (exit 128+10: no handler yet) after the batch script
    forwarded it: the newest complete checkpoint is intact, so the job is requeued."""
    env, calls = fake_slurm
    env.update(FAKE_SLEEP="1", FAKE_SCANCEL_RC="1", FAKE_USR1_RC="138")
    p = _signal_once_srun_runs(env, calls, signal.SIGUSR1)
    out, _ = p.communicate(timeout=20)
    assert p.returncode == 0, out
    assert "died of SIGUSR1" in out
    assert ["scontrol", "requeue", "4242"] in calls()


def test_bad_arguments_fail_before_srun(fake_slurm):
    env, calls = fake_slurm
    r = run_script("pretrain.sbatch", [], env)
    assert r.returncode == 2 and "no config" in r.stderr
    r = run_script("pretrain.sbatch", ["configs/tiny_cpu.json", "stray"], env)
    assert r.returncode == 2 and "unexpected argument 'stray'" in r.stderr
    assert not any(c[0] == "srun" for c in calls())


def test_config_is_checked_on_the_batch_host(fake_slurm):
    env, calls = fake_slurm
    env["MEGAQ_CHECK_CONFIG"] = "1"
    r = run_script("pretrain.sbatch", ["configs/tiny_cpu.json", "train.no_such_key=1"], env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no_such_key" in r.stderr
    assert not any(c[0] == "srun" for c in calls())


def test_container_prefix_and_srun_args(fake_slurm):
    env, calls = fake_slurm
    env.update(MEGAQ_HOME="/opt/megaq", MEGAQ_PYTHON="/usr/local/bin/megaq-python",
               MEGAQ_SRUN_ARGS="--container-image=/shared/megaq.sqsh --container-mounts=/shared:/shared",
               MEGAQ_CHECK_CONFIG="1", SLURM_SUBMIT_DIR="/nonexistent")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    r = subprocess.run(["bash", str(SLURM / "pretrain.sbatch"), "configs/gpt2_int8.json"], env=env, cwd="/",
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    srun = the_call(calls, "srun")
    assert "--container-image=/shared/megaq.sqsh" in srun
    assert srun[srun.index("/usr/local/bin/megaq-python"):][:3] == [
        "/usr/local/bin/megaq-python", "-u", "/opt/megaq/launch/pretrain_gpt.py"]


def test_deepspeed_single_node_hostfile(fake_slurm):
    env, calls = fake_slurm
    env.update(SLURM_NTASKS_PER_NODE="2", MEGAQ_DEEPSPEED="deepspeed")
    r = run_script("pretrain_deepspeed.sbatch", ["configs/tiny_cpu.json"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    ds = the_call(calls, "deepspeed")
    assert ds[ds.index("--master_addr") + 1] == "node01"
    assert "--no_ssh" in ds and "--node_rank=0" in ds
    assert "hostfile: node01 slots=2" in r.stdout


def test_deepspeed_multi_node_one_launcher_per_node(fake_slurm):
    env, calls = fake_slurm
    env.update(SLURM_JOB_NUM_NODES="3", SLURM_JOB_NODELIST="n[1-3]", FAKE_HOSTS="n1 n2 n3",
               SLURM_GPUS_PER_NODE="8", MEGAQ_DEEPSPEED="deepspeed")
    r = run_script("pretrain_deepspeed.sbatch", ["configs/gpt2_int8.json"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    srun = the_call(calls, "srun")
    assert "--nodes=3" in srun and "--ntasks-per-node=1" in srun
    assert "hostfile: n1 slots=8,n2 slots=8,n3 slots=8" in r.stdout
    env["MEGAQ_DS_LAUNCHER"] = "pdsh"
    r = run_script("pretrain_deepspeed.sbatch", ["configs/gpt2_int8.json"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--launcher" in the_call(calls, "deepspeed")  # the pdsh run calls deepspeed directly


def test_mpirun_command(fake_slurm):
    env, calls = fake_slurm
    env.update(SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="n[1-2]", FAKE_HOSTS="n1 n2", SLURM_GPUS_ON_NODE="4")
    r = run_script("pretrain_mpi.sbatch", ["configs/gpt2_int8.json"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    mpirun = the_call(calls, "mpirun")
    assert mpirun[mpirun.index("-np") + 1] == "8"
    assert "ppr:4:node" in mpirun and "MEGAQ_IGNORE_SLURM=1" in mpirun and "MASTER_ADDR" in mpirun


def test_signal_trainers_pattern_matches_only_training_processes():
    """The pgrep pattern of lib.sh's megaq_forward_to_trainers: the training processes, not launchers."""
    text = (SLURM / "lib.sh").read_text()
    pattern = text.split('pgrep -u "$(id -u)" -f "', 1)[1].split('"', 1)[0].replace("\\.", ".")
    import re

    rx = re.compile(pattern.replace("pretrain_gpt.py", r"pretrain_gpt\.py"))
    trainers = ["/venv/bin/python3 -u /src/launch/pretrain_gpt.py --local_rank=0 --config c.json",
                "python -u /opt/megaq/launch/pretrain_gpt.py --config c.json",
                "/usr/local/bin/megaq-python launch/pretrain_gpt.py"]
    launchers = ["/venv/bin/python3 -u -m deepspeed.launcher.launch --world_info=x /src/launch/pretrain_gpt.py --config c",
                 "/venv/bin/python3 /venv/bin/deepspeed --hostfile h /src/launch/pretrain_gpt.py --config c",
                 "mpirun -np 2 python -u launch/pretrain_gpt.py", "bash -c exec python launch/pretrain_gpt.py"]
    assert all(rx.search(c) for c in trainers)
    assert not any(rx.search(c) for c in launchers)
