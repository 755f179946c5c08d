#!/usr/bin/env bash
# Installs diffusers-vrfm with the given extras (default: train), CPU torch first.
#   bash scripts/install.sh            # the package and what train_vrfm.py needs
#   bash scripts/install.sh test       # ... plus what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train}"

# A bare `torch` requirement would pull a multi-GB CUDA build: install the CPU build first and pin it for the rest.
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
python -m pip install --quiet "torch==${TORCH_VERSION}"
constraints="$(mktemp)"
echo "torch==${TORCH_VERSION}" > "${constraints}"
python -m pip install --quiet -c "${constraints}" -e ".[${extras}]"
if [[ "${extras}" == *test* ]]; then
  # The toy benchmark's baselines. torchcfm's own requirements pull torchdyn -> torchvision, whose PyPI wheel fails
  # to import beside a CPU torch; the parts used here need only torch, numpy and POT (installed above).
  python -m pip install --quiet --no-deps "torchcfm>=1.0.5"
fi
rm -f "${constraints}"
