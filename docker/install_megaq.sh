#!/usr/bin/env bash
# Installs megaq from a source checkout into the active Python environment: the README's install
# command. CI and the Docker image both run this script, so what CI tests is what the image ships.
#   bash docker/install_megaq.sh [checkout-dir]
# PyTorch must already be installed (the CPU build in CI, the CUDA build in the image): megaq takes
# whatever torch it finds rather than pulling a several-GB build of its own.
set -euo pipefail
src=${1:-.}
python -c "import torch" 2>/dev/null || {
    echo "install_megaq.sh: PyTorch is not installed; install the build for your machine first" >&2
    exit 1
}
# With a CUDA build of torch, build csrc/ against that torch: pip's isolated build environment would
# not see it (and must never download another one). pip >= 25.1 isolates editable builds by default.
if [ "${MEGAQ_BUILD_EXT:-}" = "1" ] || python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
    python -m pip install --no-build-isolation -e "$src[test]"
else
    python -m pip install -e "$src[test]"
fi
python -c "import megaq, torch; print(f'megaq {megaq.__version__} installed (torch {torch.__version__})')"
