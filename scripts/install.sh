#!/usr/bin/env bash
# Installs diffusers-vrfm with the given extras (default: train).
#   bash scripts/install.sh            # the package and what train_vrfm.py needs
#   bash scripts/install.sh test       # ... plus what the test suite needs
#
# torch: a torch that is already installed is kept, whatever its build (a CUDA build stays a CUDA build). Otherwise
# torch==${TORCH_VERSION:-2.13.0} is installed from your pip index. That is the CPU build only where the index serves
# one (PyPI on macOS and Windows); on Linux, PyPI serves the CUDA build (several GB). For the CPU build there, set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu. Either way torch is pinned, so no later step replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train}"

installed_torch="$(python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)"
if [[ -n "${installed_torch}" ]]; then
  echo "Keeping the installed torch ${installed_torch}."
  torch_pin="torch==${installed_torch%%+*}"
else
  torch_pin="torch==${TORCH_VERSION:-2.13.0}"
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    echo "Installing ${torch_pin} from ${TORCH_INDEX_URL}."
    python -m pip install --quiet --index-url "${TORCH_INDEX_URL}" "${torch_pin}"
  else
    echo "Installing ${torch_pin} from your pip index: the CPU build only where the index serves one (on Linux,"
    echo "PyPI serves the CUDA build; set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU build)."
    python -m pip install --quiet "${torch_pin}"
  fi
fi
constraints="$(mktemp)"
trap 'rm -f "${constraints}"' EXIT
echo "${torch_pin}" > "${constraints}"
python -m pip install --quiet -c "${constraints}" -e ".[${extras}]"
if [[ "${extras}" == *test* ]]; then
  # The toy benchmark's baselines. torchcfm's own requirements pull torchdyn -> torchvision, whose PyPI wheel fails
  # to import beside a CPU torch; the parts used here need only torch, numpy and POT (installed above).
  python -m pip install --quiet --no-deps "torchcfm>=1.0.5"
fi
