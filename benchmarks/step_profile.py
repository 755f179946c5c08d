"""`python -m benchmarks.train_throughput --profile-steps N`: a torch.profiler record of N whole training steps of
`train_vrfm.py` (randomness, forward, backward, update, EMA and the loop's bookkeeping), from the middle of the run.

Where the host bounds a GPU's steps (issue 12), the time goes to host work: dispatching operators and calling the
CUDA runtime (kernel launches, copies, synchronisations). The record gives, per step, the profiled wall time, the
device time of the kernels and their number, the calls that take the most host time, and the calls that wait for the
device (`cudaStreamSynchronize`, `cudaDeviceSynchronize`, blocking `cudaMemcpy`): where `--sync-debug` names the
source line of a wait, this says what every call costs. `install` hooks it into the training loop;
`train_throughput` runs the script under it.
"""

from __future__ import annotations

import json
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


def install(path: str, start_call: int, steps: int) -> None:
    """Profiles the training loop from its `start_call`-th micro-step (1-based) for `steps` micro-steps and writes
    [`summarise`]'s figures to `path` as JSON. The profiler starts and stops at the draw of a micro-step's batch, the
    first thing each step does, after the device has finished all queued work."""
    from torch.profiler import ProfilerActivity, profile

    from diffusers_vrfm.training import loop

    draw_micro_batch = loop.draw_micro_batch
    state = {"calls": 0, "profiler": None, "start": 0.0}

    def profiled(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] == start_call:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            _synchronize()
            state["profiler"] = profile(activities=activities).__enter__()
            state["start"] = time.perf_counter()
        elif state["calls"] == start_call + steps and state["profiler"] is not None:
            _synchronize()
            wall = time.perf_counter() - state["start"]
            state["profiler"].__exit__(None, None, None)
            Path(path).write_text(json.dumps(summarise(state["profiler"].key_averages(), steps, wall)))
            state["profiler"] = None
        return draw_micro_batch(*args, **kwargs)

    loop.draw_micro_batch = profiled
