#!/usr/bin/env bash
# A one-node Slurm cluster on this machine for CI: Debian's slurm-wlm and munge, slurmctld and slurmd on
# localhost, jobs run as root. Idempotent: a cluster that already answers with its node idle is reused.
#   bash .ci/slurm_setup.sh          (as root; installs the packages with apt-get when they are absent)
# Afterwards `sinfo`, `sbatch`, `srun`, `scontrol` work; logs are in /var/log/slurm/.
# Environment: SLURM_SETUP_CPUS (CPUs given to the node; default max(nproc, 2)).
set -euo pipefail

say() { echo "slurm_setup: $*"; }
die() { echo "slurm_setup: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts slurmd, which must be root)"

node_idle() {
    # The node answers and is idle (or mixed/allocated: usable). Drained/down/unknown nodes are not.
    local state
    state=$(timeout 10 sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -n1) || return 1
    case "$state" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

conf=/etc/slurm/slurm.conf
marker="# written by megaq .ci/slurm_setup.sh"

if command -v sinfo >/dev/null && [ -f "$conf" ] && grep -qF "$marker" "$conf" && node_idle; then
    say "Slurm already running: $(sinfo -h -N -o '%N %T %c CPUs')"
    exit 0
fi

# --- packages -------------------------------------------------------------------------------------
need=()
command -v munged >/dev/null || need+=(munge)
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # slurm-wlm pulls in the three Slurm packages; --no-install-recommends keeps it small.
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
fi
say "$(slurmctld -V)"

# --- munge ----------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --force >/dev/null
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; fi
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
chmod 700 /etc/munge /var/log/munge; chmod 600 /etc/munge/munge.key; chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    # As the munge user, like the Debian service does; --force ignores a stale socket of a dead daemon.
    if command -v runuser >/dev/null; then runuser -u munge -- munged --force
    else munged --force; fi
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged does not answer"
fi

# --- slurm.conf -----------------------------------------------------------------------------------
cpus=${SLURM_SETUP_CPUS:-$(nproc)}
[ "$cpus" -ge 2 ] || cpus=2   # the CI jobs run two tasks
if [ -f "$conf" ] && ! grep -qF "$marker" "$conf"; then
    die "$conf exists and was not written by this script; not touching a real cluster's configuration"
fi
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat >"$conf" <<EOF
$marker: one node (localhost), jobs as root.
ClusterName=megaq-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# The node's CPUs are taken from this file even where the machine has fewer cores.
SlurmdParameters=config_overrides
ReturnToService=2
# Requeued jobs (scontrol requeue, --requeue) are allowed and keep their job id.
JobRequeue=1
# Keep finished jobs visible to scontrol/squeue for a while (the tests read their state).
MinJobAge=600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

# --- daemons --------------------------------------------------------------------------------------
# Restart whatever runs so that the configuration above is the one in force. Only the daemons named in
# our own pid files are stopped (by pid).
for d in slurmd slurmctld; do
    pidfile=/run/$d.pid
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        say "stopping $d (pid $(cat "$pidfile"))"
        kill "$(cat "$pidfile")"
        for _ in $(seq 100); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
    fi
done
say "starting slurmctld and slurmd (CPUs=$cpus)"
# -c: ignore saved state (a fresh cluster); -N: this slurmd is the node called localhost.
slurmctld -c
slurmd -N localhost

for i in $(seq 120); do
    if node_idle; then
        say "node ready after ${i}x0.5 s: $(sinfo -h -N -o '%N %P %T %c CPUs')"
        exit 0
    fi
    # A node that registered DOWN/DRAINED (e.g. after an unclean restart) is put back in service.
    state=$(sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -n1 || true)
    case "$state" in down*|drain*|fail*) scontrol update NodeName=localhost State=RESUME 2>/dev/null || true ;; esac
    sleep 0.5
done
echo "--- sinfo"; sinfo -N -l || true
echo "--- slurmctld.log"; tail -n 30 /var/log/slurm/slurmctld.log || true
echo "--- slurmd.log"; tail -n 30 /var/log/slurm/slurmd.log || true
die "the node did not become idle in 60 s"
