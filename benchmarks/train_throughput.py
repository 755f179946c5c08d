"""Training throughput of `train_vrfm.py` itself: VRFM against plain rectified flow, side by side in one run.

Each cell runs the real training script (a subprocess, as a user runs it) on the embedded digits for `--steps` steps
and reads the wall-clock time of every step from its `logs/metrics.jsonl`. Throughput is measured over the second half
of the steps, after warm-up (kernel selection, caches). VRFM (the default `latent_dim` and convolutional posterior)
and RF (`--latent_dim 0`: the same backbone, no posterior, no KL) run back to back for every backbone, model size and
precision, and the report gives the ratio of their step times.

Model sizes: `default` is the training script's own small configuration (sized for CPUs); `large` is a GPU-sized one
(a 4-level UNet with 128-256 channels, a DiT with 12 blocks of width 384).

Run from the repository root::

    python -m benchmarks.train_throughput                                   # CUDA if present, bf16 there
    python -m benchmarks.train_throughput --quick                           # a smoke run on CPU in well under a minute
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmarks/train_throughput.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, machine_description, markdown_table, write_json  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "default": {"unet": None, "dit": None},
    "large": {
        "unet": {
            "block_out_channels": [128, 256, 256, 256],
            "layers_per_block": 2,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
            "norm_num_groups": 32,
            "attention_head_dim": 64,
        },
        "dit": {"num_layers": 12, "num_attention_heads": 6, "attention_head_dim": 64, "patch_size": 2},
    },
}
METHODS = {"VRFM": [], "RF": ["--latent_dim", "0"]}


def throughput(records: list[dict], batch_size: int) -> dict:
    """Steps and samples per second over the second half of the logged steps."""
    records = sorted(records, key=lambda r: r["step"])
    half = records[len(records) // 2 - 1] if len(records) >= 4 else records[0]
    last = records[-1]
    seconds = last["seconds"] - half["seconds"]
    steps = last["step"] - half["step"]
    if steps < 1 or seconds <= 0:
        raise ValueError(f"Too few logged steps to time ({len(records)}); raise --steps.")
    return {
        "steps_per_second": steps / seconds,
        "samples_per_second": steps * batch_size / seconds,
        "ms_per_step": 1000.0 * seconds / steps,
        "timed_steps": steps,
        "final_loss": records[-1]["loss"],
        "first_loss": records[0]["loss"],
    }


def count_saved_parameters(folder: Path) -> int:
    """The number of parameters in the safetensors files of a saved model folder."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def run_cell(backbone: str, size: str, method: str, precision: str, args, workdir: Path) -> dict:
    """One training run of `train_vrfm.py`; returns its throughput and losses."""
    output_dir = workdir / f"{backbone}-{size}-{method}-{precision}"
    command = [
        sys.executable,
        str(REPO_ROOT / "train_vrfm.py"),
        "--backbone",
        backbone,
        "--dataset_name",
        "builtin:digits",
        "--resolution",
        str(args.resolution),
        "--train_batch_size",
        str(args.batch_size),
        "--max_train_steps",
        str(args.steps),
        "--mixed_precision",
        precision,
        "--checkpointing_steps",
        str(10 * args.steps),
        "--validation_steps",
        str(10 * args.steps),
        "--report_to",
        "none",
        "--output_dir",
        str(output_dir),
        *METHODS[method],
    ]
    if SIZES[size][backbone] is not None:
        command += ["--model_config", json.dumps(SIZES[size][backbone])]
    command += ["--num_threads", str(args.threads)]  # also on CUDA: host threads for data and bookkeeping
    if args.cpu:
        command += ["--cpu"]
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{completed.stderr[-4000:]}")
    with open(output_dir / "logs" / "metrics.jsonl", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    with open(output_dir / "velocity_model" / "config.json", encoding="utf-8") as handle:
        config_name = json.load(handle)["_class_name"]
    return {
        "backbone": backbone,
        "size": size,
        "method": method,
        "precision": precision,
        "velocity_class": config_name,
        "velocity_parameters": count_saved_parameters(output_dir / "velocity_model"),
        "process_wall_seconds": wall,
        **throughput(records, args.batch_size),
    }


def render(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Training throughput of train_vrfm.py: VRFM against rectified flow",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Device: {meta['device']}; batch {meta['batch_size']}, digits at {meta['resolution']}x{meta['resolution']}, "
        f"{meta['steps']} steps per cell, timed over the second half. Total {meta['total_seconds']:.0f} s."
        + (" **QUICK smoke run: not a result.**" if meta["quick"] else ""),
        "",
    ]
    headers = [
        "backbone",
        "size",
        "precision",
        "velocity params",
        "RF ms/step",
        "VRFM ms/step",
        "VRFM / RF time",
        "VRFM samples/s",
        "VRFM loss first -> last",
    ]
    rows = []
    cells = {(c["backbone"], c["size"], c["precision"], c["method"]): c for c in results["cells"]}
    for backbone, size, precision in dict.fromkeys(
        (c["backbone"], c["size"], c["precision"]) for c in results["cells"]
    ):
        vrfm, rf = cells.get((backbone, size, precision, "VRFM")), cells.get((backbone, size, precision, "RF"))
        if vrfm is None or rf is None:
            continue
        rows.append(
            [
                backbone,
                size,
                precision,
                f"{vrfm['velocity_parameters']:,}",
                rf["ms_per_step"],
                vrfm["ms_per_step"],
                vrfm["ms_per_step"] / rf["ms_per_step"],
                vrfm["samples_per_second"],
                f"{vrfm['first_loss']:.3f} -> {vrfm['final_loss']:.3f}",
            ]
        )
    lines += [markdown_table(headers, rows), ""]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["unet", "dit"], choices=["unet", "dit"])
    parser.add_argument("--sizes", nargs="+", default=["default", "large"], choices=list(SIZES))
    parser.add_argument("--precisions", nargs="+", default=None, help="default: bf16 on CUDA, no on CPU")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--cpu", action="store_true", help="force CPU (implied without CUDA)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each training process")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="train_throughput")
    parser.add_argument("--quick", action="store_true", help="a smoke run on CPU (not a result)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.steps < 8:
        raise ValueError(f"`--steps` must be >= 8 (half of them are timed), but got {args.steps}.")
    args.cpu = args.cpu or args.quick or not torch.cuda.is_available()
    if args.quick:
        args.steps, args.batch_size, args.resolution, args.sizes = 8, 8, 16, ["default"]
    precisions = args.precisions or (["no"] if args.cpu else ["bf16"])
    device = "CPU" if args.cpu else torch.cuda.get_device_name(0)
    results = {
        "meta": {
            "command": ("python -m benchmarks.train_throughput " + shlex.join(argv)).strip(),
            "machine": machine_description(),
            "device": device,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "resolution": args.resolution,
            "quick": bool(args.quick),
        },
        "cells": [],
    }
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    with tempfile.TemporaryDirectory() as workdir:
        for backbone in args.backbones:
            for size in args.sizes:
                for precision in precisions:
                    for method in METHODS:
                        cell = run_cell(backbone, size, method, precision, args, Path(workdir))
                        results["cells"].append(cell)
                        print(
                            f"[{time.perf_counter() - start:5.0f}s] {backbone} {size} {precision} {method}: "
                            f"{cell['ms_per_step']:.1f} ms/step, {cell['samples_per_second']:.0f} samples/s, "
                            f"loss {cell['first_loss']:.3f} -> {cell['final_loss']:.3f}",
                            flush=True,
                        )
                        results["meta"]["total_seconds"] = time.perf_counter() - start
                        write_json(output_dir / f"{args.name}.json", results)  # a run cut short keeps its cells
    write_json(output_dir / f"{args.name}.json", results)
    (output_dir / f"{args.name}.md").write_text(render(results))
    print(render(results))
    return results


if __name__ == "__main__":
    main()
