"""Soak: does memory stay flat over thousands of training steps with periodic checkpoints and sampling?

Runs `train_vrfm.py` as a subprocess on tiny configurations (the MLP on `toy:ring_2d`, and a tiny UNet on the 8x8
digits) for a few thousand steps each, writing a checkpoint every `--checkpoint-every` steps (the newest two kept)
and a validation figure or grid (sampling with the EMA weights at several step counts) every `--validation-every`
steps. While a run trains, this script reads the child's `/proc/<pid>/status` every `--sample-interval` seconds: the
resident set size now (`VmRSS`) and its peak so far (`VmHWM`), together with the last step the run logged. The
samples are bucketed into `--windows` equal windows of steps; the report compares the peak RSS of the first window
(which already includes a checkpoint and a validation) with that of the last window, and gives the least-squares
slope of RSS over the second half of the run. At exit, `os.wait4` returns the child's own `ru_maxrss`, the peak over
the whole run (including the final pipeline save and sampling). A leak of a few kilobytes per step, per checkpoint or
per validation shows up as a growth ratio above 1 and a positive slope.

Run from the repository root::

    python -m benchmarks.soak            # 8000 steps per backbone (about 5 minutes on 2 CPU cores)
    python -m benchmarks.soak --quick    # a smoke run: 60 steps of the MLP
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/soak.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    machine_description,
    markdown_table,
    pyplot,
    torch_threads,
    write_json,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "train_vrfm.py"
MAX_GROWTH = 1.10
MIB = 1024.0  # /proc and ru_maxrss report KiB on Linux

TINY_UNET = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "layers_per_block": 1,
}
TINY_POSTERIOR = {"block_out_channels": [8], "norm_num_groups": 4, "hidden_dim": 16}


def training_argv(backbone: str, output_dir: str, args) -> list[str]:
    """The `train_vrfm.py` command line of one soak run."""
    argv = [
        "--output_dir", output_dir, "--max_train_steps", args.steps, "--checkpointing_steps", args.checkpoint_every,
        "--checkpoints_total_limit", 2, "--validation_steps", args.validation_every, "--validation_inference_steps",
        "1,2,4", "--lr_warmup_steps", 10, "--report_to", "none", "--num_threads", args.threads, "--seed", args.seed,
    ]  # fmt: skip
    if backbone == "mlp":
        argv += ["--backbone", "mlp", "--train_batch_size", 64, "--num_validation_samples", 256]
    else:
        argv += [
            "--backbone", "unet", "--resolution", 8, "--model_config", json.dumps(TINY_UNET),
            "--posterior_config", json.dumps(TINY_POSTERIOR), "--train_batch_size", 16, "--class_conditional",
            "--num_validation_samples", 4,
        ]  # fmt: skip
    return [str(a) for a in argv]


def read_memory(pid: int) -> tuple[int, int] | None:
    """`(VmRSS, VmHWM)` in KiB of a live process, from `/proc/<pid>/status`; `None` once it is gone."""
    values = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, amount = line.split(":", 1)
                    values[name] = int(amount.split()[0])
    except (OSError, ValueError):
        return None
    if "VmRSS" not in values or "VmHWM" not in values:
        return None  # a zombie has no memory lines
    return values["VmRSS"], values["VmHWM"]


def last_logged_step(metrics_path: Path) -> int:
    """The step of the last complete line of `metrics.jsonl` (0 before the first)."""
    try:
        with open(metrics_path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 8192))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return 0
    for line in reversed(tail.splitlines() if tail.endswith("\n") else tail.splitlines()[:-1]):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def soak_one(backbone: str, work_dir: Path, args) -> dict:
    """Runs one soak training as a subprocess, sampling its memory; returns the samples and the child's rusage."""
    output_dir = work_dir / f"soak-{backbone}"
    argv = training_argv(backbone, str(output_dir), args)
    metrics_path = output_dir / "logs" / "metrics.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    samples = []  # (seconds since start, last logged step, VmRSS KiB, VmHWM KiB)
    log_path = work_dir / f"soak-{backbone}.log"
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *argv], stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env
        )
        try:
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                memory = read_memory(process.pid)
                if memory is not None:
                    samples.append((time.perf_counter() - start, last_logged_step(metrics_path), *memory))
                time.sleep(args.sample_interval)
        except BaseException:
            process.kill()
            process.wait()
            raise
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            tail = "".join(handle.readlines()[-30:])
        raise RuntimeError(f"the soak run of {backbone} exited with {process.returncode}:\n{tail}")
    with open(metrics_path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    with open(output_dir / "logs" / "summary.json", encoding="utf-8") as handle:
        summary = json.load(handle)
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        checkpoints = sum(1 for line in handle if "train_vrfm" in line and "Saved " in line and "checkpoint-" in line)
    losses = [r["loss"] for r in records]
    return {
        "argv": argv,
        "wall_seconds": wall,
        "training_seconds": summary["metrics"].get("training wall time (s)"),
        "steps_completed": records[-1]["step"] if records else 0,
        "checkpoints_written": checkpoints,
        "checkpoints_kept": sorted(p.name for p in output_dir.glob("checkpoint-*")),
        "validations_written": len(list((output_dir / "validation").glob("*.png"))),
        "loss_first_50": float(np.mean(losses[:50])) if losses else float("nan"),
        "loss_last_50": float(np.mean(losses[-50:])) if losses else float("nan"),
        "max_rss_kib_rusage": int(usage.ru_maxrss),
        "samples": samples,
    }


def analyse(run: dict, steps: int, windows: int) -> dict:
    """Buckets the memory samples into `windows` equal windows of steps and summarises start against end.

    Samples taken before the first logged step are the start-up; those taken after the last step are the finish
    (pipeline save, final sampling, model card). Both are reported but kept out of the windows.
    """
    buckets = [[] for _ in range(windows)]
    for sample in run["samples"]:
        if 0 < sample[1] < steps:
            buckets[(sample[1] - 1) * windows // steps].append(sample)
    rows = []
    for index, inside in enumerate(buckets):
        rss = [s[2] for s in inside]
        rows.append(
            {
                "window": index + 1,
                "steps": f"{index * steps // windows + 1}-{(index + 1) * steps // windows}",
                "num_samples": len(inside),
                "rss_peak_mib": max(rss) / MIB if rss else float("nan"),
                "rss_mean_mib": float(np.mean(rss)) / MIB if rss else float("nan"),
                "hwm_end_mib": inside[-1][3] / MIB if inside else float("nan"),
            }
        )
    startup = [s for s in run["samples"] if s[1] == 0]
    finish = [s for s in run["samples"] if s[1] >= steps]
    filled = [r for r in rows if r["num_samples"]]
    first, last = (filled[0], filled[-1]) if filled else ({}, {})
    half = [s for s in run["samples"] if steps / 2 < s[1] < steps]
    slope = float("nan")
    if len(half) >= 3 and len({s[1] for s in half}) >= 2:
        slope = float(np.polyfit([s[1] for s in half], [s[2] / MIB for s in half], 1)[0]) * 1000.0
    growth = last["rss_peak_mib"] / first["rss_peak_mib"] if filled else math.nan
    # The same ratio over the second half only: warm-up (allocator pools, caches filled by the first validations)
    # is over by then, so a steady leak shows here even when the start-up growth dominates the first ratio.
    middle = [r for r in filled if r["window"] <= max(1, windows // 2)]
    growth_second_half = last["rss_peak_mib"] / middle[-1]["rss_peak_mib"] if middle else math.nan
    return {
        "windows": rows,
        "startup_rss_peak_mib": max(s[2] for s in startup) / MIB if startup else float("nan"),
        "finish_rss_peak_mib": max(s[2] for s in finish) / MIB if finish else float("nan"),
        "first_window": first.get("window"),
        "last_window": last.get("window"),
        "rss_peak_first_window_mib": first.get("rss_peak_mib", float("nan")),
        "rss_peak_last_window_mib": last.get("rss_peak_mib", float("nan")),
        "rss_growth_ratio": growth,
        "middle_window": middle[-1]["window"] if middle else None,
        "rss_growth_ratio_second_half": growth_second_half,
        "hwm_after_first_window_mib": first.get("hwm_end_mib", float("nan")),
        "hwm_after_last_window_mib": last.get("hwm_end_mib", float("nan")),
        "hwm_growth_ratio": last["hwm_end_mib"] / first["hwm_end_mib"] if filled else math.nan,
        "max_rss_mib_rusage": run["max_rss_kib_rusage"] / MIB,
        "rss_slope_mib_per_1000_steps_second_half": slope,
        "num_samples": len(run["samples"]),
        "flat": bool(growth <= MAX_GROWTH) if math.isfinite(growth) else False,
    }


def run(args) -> dict:
    if args.quick:
        args.steps = min(args.steps, 60)
        args.checkpoint_every = min(args.checkpoint_every, 20)
        args.validation_every = min(args.validation_every, 25)
        args.windows = min(args.windows, 3)
        args.sample_interval = min(args.sample_interval, 0.05)
        if args.backbones == DEFAULT_BACKBONES:
            args.backbones = ["mlp"]
    results = {
        "meta": {
            "command": ("python -m benchmarks.soak " + " ".join(shlex.quote(a) for a in args.argv)).strip(),
            "machine": machine_description(),
            "steps": args.steps,
            "checkpoint_every": args.checkpoint_every,
            "validation_every": args.validation_every,
            "windows": args.windows,
            "sample_interval_s": args.sample_interval,
            "threads": args.threads,
            "max_growth": MAX_GROWTH,
            "quick": bool(args.quick),
        },
        "runs": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vrfm-soak-", dir=args.work_dir) as work_dir:
        for backbone in args.backbones:
            soaked = soak_one(backbone, Path(work_dir), args)
            soaked["analysis"] = analyse(soaked, args.steps, args.windows)
            results["runs"][backbone] = soaked
            a = soaked["analysis"]
            print(
                f"[{time.perf_counter() - start:6.1f}s] {backbone}: {soaked['steps_completed']} steps, peak RSS "
                f"{a['rss_peak_first_window_mib']:.1f} -> {a['rss_peak_last_window_mib']:.1f} MiB "
                f"({a['rss_growth_ratio']:.3f}x)",
                flush=True,
            )
    results["meta"]["total_seconds"] = time.perf_counter() - start
    output_dir = Path(args.output_dir)
    write_json(output_dir / "soak.json", results)
    (output_dir / "soak.md").write_text(render_report(results))
    plot_memory(results, output_dir / "soak.png")
    return results


SUMMARY_COLUMNS = {  # column after the backbone's -> its cell, from a run `r` and its analysis `a`
    "steps": lambda r, a: r["steps_completed"],
    "checkpoints written": lambda r, a: r["checkpoints_written"],
    "validations written": lambda r, a: r["validations_written"],
    "wall s": lambda r, a: f"{r['wall_seconds']:.0f}",
    "peak RSS, first window (MiB)": lambda r, a: f"{a['rss_peak_first_window_mib']:.1f}",
    "peak RSS, last window (MiB)": lambda r, a: f"{a['rss_peak_last_window_mib']:.1f}",
    "growth": lambda r, a: f"{a['rss_growth_ratio']:.3f}x",
    "growth, second half": lambda r, a: f"{a['rss_growth_ratio_second_half']:.3f}x",
    "VmHWM after first window (MiB)": lambda r, a: f"{a['hwm_after_first_window_mib']:.1f}",
    "VmHWM after last window (MiB)": lambda r, a: f"{a['hwm_after_last_window_mib']:.1f}",
    "ru_maxrss at exit (MiB)": lambda r, a: f"{a['max_rss_mib_rusage']:.1f}",
    "RSS slope, second half (MiB / 1000 steps)": lambda r, a: f"{a['rss_slope_mib_per_1000_steps_second_half']:+.2f}",
    "memory": lambda r, a: "flat" if a["flat"] else "NOT flat",
}


def summary_table(runs: dict) -> str:
    rows = [[name] + [cell(r, r["analysis"]) for cell in SUMMARY_COLUMNS.values()] for name, r in runs.items()]
    return markdown_table(["backbone", *SUMMARY_COLUMNS], rows)


def windows_section(name: str, r: dict) -> list[str]:
    """One backbone's RSS window by window of steps."""
    a = r["analysis"]
    header = ["window", "steps", "samples", "mean RSS (MiB)", "peak RSS (MiB)", "VmHWM at window end (MiB)"]
    rows = [
        [w["window"], w["steps"], w["num_samples"]]
        + [f"{w[key]:.1f}" for key in ("rss_mean_mib", "rss_peak_mib", "hwm_end_mib")]
        for w in a["windows"]
    ]
    return [
        f"## {name}: RSS by window of steps",
        "",
        f"Start-up (before the first logged step) peak {a['startup_rss_peak_mib']:.1f} MiB; finish (after the "
        f"last step) peak {a['finish_rss_peak_mib']:.1f} MiB; {a['num_samples']} samples; mean training loss "
        f"{r['loss_first_50']:.4f} over the first 50 steps, {r['loss_last_50']:.4f} over the last 50.",
        "",
        markdown_table(header, rows),
        "",
    ]


def render_report(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Soak: memory over a long training run with periodic checkpoints and sampling",
        "",
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['machine']}",
        f"- Each backbone: `train_vrfm.py` in a subprocess, {meta['steps']} steps, a checkpoint every "
        f"{meta['checkpoint_every']} steps (the newest 2 kept), validation sampling (EMA weights, Euler at 1, 2 and 4 "
        f"steps) every {meta['validation_every']} steps, {meta['threads']} torch thread(s). The child's `VmRSS` and "
        f"`VmHWM` are read from `/proc/<pid>/status` every {meta['sample_interval_s']} s and bucketed into "
        f"{meta['windows']} windows of steps by the last step the run had logged; `ru_maxrss` comes from `os.wait4` "
        "at exit.",
        f"- Memory counts as flat when the peak RSS of the last window is at most {meta['max_growth']}x that of the "
        "first window (which already includes a checkpoint and a validation). `growth, second half` is the peak RSS "
        "of the last window over that of the middle window: a steady leak shows there even when start-up growth "
        "(allocator pools, caches filled by the first validations) dominates the first ratio.",
        f"- Total wall time: {meta['total_seconds']:.0f} s.",
        "",
        "## Summary",
        "",
    ]
    lines += [
        summary_table(results["runs"]),
        "",
        "`ru_maxrss` includes the end of the run (the pipeline save, the final samples and, for the MLP, the toy "
        "metrics on 1000 samples), which comes after the last window.",
        "",
    ]
    for name, r in results["runs"].items():
        lines += windows_section(name, r)
    lines += ["Figure: `soak.png` (RSS and VmHWM against the step, per backbone).", ""]
    return "\n".join(lines)


def plot_memory(results: dict, path: Path) -> None:
    plt = pyplot()
    names = list(results["runs"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        samples = results["runs"][name]["samples"]
        steps = [s[1] for s in samples]
        ax.plot(steps, [s[2] / MIB for s in samples], ".", markersize=2, label="VmRSS")
        ax.plot(steps, [s[3] / MIB for s in samples], "-", linewidth=1, label="VmHWM")
        ax.set_xlabel("last logged step")
        ax.set_ylabel("MiB")
        ax.set_title(f"{name}: memory of the training process", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


DEFAULT_BACKBONES = ["mlp", "unet"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES, choices=DEFAULT_BACKBONES)
    parser.add_argument("--steps", type=int, default=8000, help="training steps per backbone")
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--validation-every", type=int, default=250)
    parser.add_argument("--windows", type=int, default=10, help="windows of steps the samples are bucketed into")
    parser.add_argument("--sample-interval", type=float, default=0.5, help="seconds between memory readings")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=str, default=None, help="where the runs write (a temporary folder)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--quick", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    for name in ("steps", "checkpoint_every", "validation_every", "windows", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, but got {getattr(args, name)}.")
    if not args.sample_interval > 0:
        raise ValueError(f"`--sample-interval` must be > 0, but got {args.sample_interval}.")
    if not os.path.isdir("/proc/self"):
        raise RuntimeError("The soak reads /proc/<pid>/status: it needs Linux.")
    with torch_threads(args.threads):  # this process only waits, but the machine line reports the thread count
        results = run(args)
    print((Path(args.output_dir) / "soak.md").read_text())
    return results


if __name__ == "__main__":
    main()
