"""`python -m benchmarks.train_throughput --profile-steps N`: a torch.profiler record of N whole training steps of
`train_vrfm.py` (randomness, forward, backward, update, EMA and the loop's bookkeeping), from the middle of the run.

Where the host bounds a GPU's steps (issue 12), the time goes to host work: dispatching operators and calling the
CUDA runtime (kernel launches, copies, synchronisations). The record gives, per step, the profiled wall time, the
device time of the kernels and their number, the calls that take the most host time, and the calls that wait for the
device (`cudaStreamSynchronize`, `cudaDeviceSynchronize`, blocking `cudaMemcpy`): where `--sync-debug` names the
source line of a wait, this says what every call costs. The same number of steps after them run under cProfile, which
says which Python functions the host's time goes to (torch.profiler sees operators and CUDA calls, not the Python
around them). `install` hooks both into the training loop; `train_throughput` runs the script under it.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import re
import time
from pathlib import Path

import torch

# runtime calls that make the host wait for the device: the synchronisations (stream, device, event) and the blocking
# copies (`cudaMemcpyAsync` does not wait, unless its host memory is pageable)
WAITS = re.compile(r"Synchronize|^cudaMemcpy(2D)?$")


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarise(events, steps: int, wall_seconds: float, top: int = 12) -> dict:
    """Per-step figures of a profiler's `key_averages()` over `steps` steps that took `wall_seconds`: host events by
    self CPU time (`top` of them), the waits among them, the device time and number of the kernels, and the `top`
    operators by the device time of the kernels they launch."""
    from torch.autograd import DeviceType

    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    host = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: -e.self_cpu_time_total)
    launching = sorted(host, key=lambda e: -e.self_device_time_total)[:top]

    def per_step(event) -> dict:
        return {"ms": event.self_cpu_time_total / 1000.0 / steps, "calls": event.count / steps}

    return {
        "steps": steps,
        "wall_ms_per_step": 1000.0 * wall_seconds / steps,
        "host_ms_per_step": sum(e.self_cpu_time_total for e in host) / 1000.0 / steps,
        "device_ms_per_step": sum(e.self_device_time_total for e in kernels) / 1000.0 / steps,
        "kernels_per_step": sum(e.count for e in kernels) / steps,
        "top_host_calls": {e.key: per_step(e) for e in host[:top]},
        "waits": {e.key: per_step(e) for e in host if WAITS.search(e.key)},
        "top_operators_ms_per_step": {e.key: e.self_device_time_total / 1000.0 / steps for e in launching},
    }


def function_name(key: tuple[str, int, str]) -> str:
    """A cProfile function key `(file, line, name)` as `package/module.py:line(name)` (the last three parts of the
    path), or the name alone for a built-in (`<built-in method torch.conv2d>`)."""
    filename, line, name = key
    if filename == "~" or line == 0:
        return name
    return f"{'/'.join(Path(filename).parts[-3:])}:{line}({name})"


def summarise_python(stats: pstats.Stats, steps: int, wall_seconds: float, top: int = 12) -> dict:
    """Per-step figures of a cProfile record of `steps` steps that took `wall_seconds` (with the profiler's own
    overhead): the `top` functions by their own time and by their cumulative time (what they and their callees took),
    in ms per step."""

    def ranked(column: int) -> dict[str, float]:
        rows = sorted(stats.stats.items(), key=lambda item: -item[1][column])[:top]
        return {function_name(key): 1000.0 * row[column] / steps for key, row in rows}

    return {
        "steps": steps,
        "wall_ms_per_step": 1000.0 * wall_seconds / steps,
        "top_own_ms_per_step": ranked(2),  # a row is (primitive calls, calls, own time, cumulative time, callers)
        "top_cumulative_ms_per_step": ranked(3),
    }


def install(path: str, start_call: int, steps: int) -> None:
    """Profiles the training loop from its `start_call`-th micro-step (1-based) for `steps` micro-steps with
    torch.profiler, then for `steps` more with cProfile, and writes [`summarise`]'s figures to `path` as JSON, with
    [`summarise_python`]'s under `"python"`. Each profiler starts and stops at the draw of a micro-step's batch, the
    first thing each step does, after the device has finished all queued work."""
    from torch.profiler import ProfilerActivity, profile

    from diffusers_vrfm.training import loop

    draw_micro_batch = loop.draw_micro_batch
    state = {"calls": 0, "start": 0.0, "summary": None}
    torch_profiler, python_profiler = None, cProfile.Profile()

    def elapsed() -> float:
        _synchronize()
        return time.perf_counter() - state["start"]

    def profiled(*args, **kwargs):
        nonlocal torch_profiler
        state["calls"] += 1
        if state["calls"] == start_call:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            _synchronize()
            torch_profiler = profile(activities=activities).__enter__()
            state["start"] = time.perf_counter()
        elif state["calls"] == start_call + steps:
            wall = elapsed()
            torch_profiler.__exit__(None, None, None)
            state["summary"] = summarise(torch_profiler.key_averages(), steps, wall)
            state["start"] = time.perf_counter()
            python_profiler.enable()
        elif state["calls"] == start_call + 2 * steps:
            wall = elapsed()
            python_profiler.disable()
            python = summarise_python(pstats.Stats(python_profiler), steps, wall)
            Path(path).write_text(json.dumps({**state["summary"], "python": python}))
        return draw_micro_batch(*args, **kwargs)

    loop.draw_micro_batch = profiled
