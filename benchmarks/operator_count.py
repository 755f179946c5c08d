"""`python -m benchmarks.train_throughput --count-ops`: the aten operators one training step of `train_vrfm.py`
dispatches.

Where the host bounds a GPU's steps (issue 12: the bare loop keeps an H200 36% busy on a 6.5M-parameter UNet), each
operator costs host time whatever its size, so their number per step measures that cost, exactly and on any machine,
a CPU one included. `install` wraps the training loop's parts in a counting `TorchDispatchMode` and writes every call's
count to a JSON file when the process exits; `train_throughput` runs the script under it.
"""

from __future__ import annotations

import atexit
import collections
import json
import statistics
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

# the parts of a step that are counted: forward, backward and update; the draw of the batch's randomness; the EMA
STEP_PARTS = ("step", "draw", "ema")


class OperatorCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside the block (backward ones included): `count` in all, `names` by
    operator (`"convolution"`, `"_local_scalar_dense"`, ...)."""

    def __init__(self):
        super().__init__()
        self.count, self.names = 0, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.names[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def install(path: str) -> None:
    """Counts the operators of every call of the training loop's parts (`STEP_PARTS`) from now on, and writes
    `{part: [count per call]}` to `path` when the process exits."""
    from diffusers.training_utils import EMAModel

    from diffusers_vrfm.training import loop

    counts = {part: [] for part in STEP_PARTS}

    def counted(function, part: str):
        def wrapper(*args, **kwargs):
            with OperatorCounter() as counter:
                out = function(*args, **kwargs)
            counts[part].append(counter.count)
            return out

        return wrapper

    loop.accumulate_micro_step = counted(loop.accumulate_micro_step, "step")
    loop.draw_micro_batch = counted(loop.draw_micro_batch, "draw")
    EMAModel.step = counted(EMAModel.step, "ema")
    atexit.register(lambda: Path(path).write_text(json.dumps(counts)))


def operators_per_step(path: str | Path) -> dict[str, float]:
    """The median count per call of each part over the second half of the calls in `path` (after warm-up), and their
    sum as `"total"`."""
    counts = json.loads(Path(path).read_text())
    medians = {part: float(statistics.median(calls[len(calls) // 2 :])) for part, calls in counts.items() if calls}
    return {**medians, "total": sum(medians.values())}
