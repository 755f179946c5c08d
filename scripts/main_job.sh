#!/usr/bin/env bash
# The main job: install, train a VRFM UNet on scikit-learn's digits (embedded, no network), then sample from it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR="${OUTPUT_DIR:-vrfm-digits}"

bash scripts/install.sh train
python train_vrfm.py --output_dir "${OUTPUT_DIR}" --num_threads 1 "$@"
python examples/sample.py "${OUTPUT_DIR}" --num_inference_steps 1 2 4 16 --output "${OUTPUT_DIR}/samples.png"
