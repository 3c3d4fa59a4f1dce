#!/usr/bin/env bash
# Entry point of the megaq image (docker/Dockerfile).
#   docker run ... megaq                     -> prints how to use the image
#   docker run ... megaq COMMAND [ARGS...]   -> runs COMMAND (the working directory is /opt/megaq),
#                                               e.g. deepspeed launch/pretrain_gpt.py --config ...
#   docker run ... megaq --config FILE ...   -> shorthand: trains with launch/pretrain_gpt.py on every local GPU
#                                               (deepspeed launcher), or as one process without GPUs
# The command replaces this script (exec), so `docker stop` delivers SIGTERM to it: megaq then finishes
# the step, saves a checkpoint and exits 75 (give it time: docker stop -t 120).
set -euo pipefail

home=${MEGAQ_HOME:-/opt/megaq}

usage() {
    cat <<EOF
megaq $(python -c 'import megaq; print(megaq.__version__)' 2>/dev/null || echo '?') in ${home}: GPT pretraining with INT8/INT4 linear layers.
$(python -c 'import torch; print(f"PyTorch {torch.__version__}, CUDA {torch.version.cuda}, GPUs visible: {torch.cuda.device_count()}")' 2>/dev/null || true)
CUDA extension megaq._C: $(python -c 'import importlib.util as u; print("built" if u.find_spec("megaq._C") else "missing")' 2>/dev/null || echo '?')

Train on all GPUs of this machine (mount data and checkpoints from the host):
  docker run --rm --gpus all --ipc=host -v /data:/data -v /ckpt:/ckpt megaq \\
      deepspeed launch/pretrain_gpt.py --config configs/gpt2_int8.json \\
      --override data.path=/data/corpus --override checkpoint.dir=/ckpt/gpt2_int8

Shorthand (same as above without 'deepspeed launch/pretrain_gpt.py'):
  docker run --rm --gpus all --ipc=host megaq --config configs/tiny_cpu.json

A minute on a CPU, no GPU needed:
  docker run --rm megaq python launch/pretrain_gpt.py --config configs/tiny_cpu.json

Configs in ${home}/configs: $(for f in "${home}"/configs/*.json; do printf '%s ' "${f##*/}"; done)
Multi-node (SLURM with enroot/pyxis or Apptainer): ${home}/docker/README.md
EOF
}

if [ $# -eq 0 ] || [ "$1" = "--help" ] || [ "$1" = "-h" ] || [ "$1" = "help" ]; then
    usage
    exit 0
fi

if [ "${1#-}" != "$1" ]; then
    # Options only: train. One process per GPU through the deepspeed launcher, or one CPU process.
    if python -c 'import sys, torch; sys.exit(0 if torch.cuda.device_count() > 0 else 1)' 2>/dev/null; then
        exec deepspeed "$home/launch/pretrain_gpt.py" "$@"
    fi
    exec python "$home/launch/pretrain_gpt.py" "$@"
fi
exec "$@"
