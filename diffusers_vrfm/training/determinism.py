"""Counter-based randomness for training: every random draw is a pure function of the seed and a position.

A training run that keeps generator *state* must checkpoint that state and restore it exactly, and a run on two
processes draws different numbers than a run on one. Here every draw instead comes from a generator seeded from
``(seed, purpose, position)``: the noise of micro-step ``m`` comes from ``(seed, "noise", m)`` whatever happened
before, and its posterior noise from ``(seed, "posterior", m)``. Each such generator draws the whole global batch
(on the training device) and every process keeps its rows. Resuming at step ``m`` is therefore exact with no
generator state to save, and a 2-process run sees the numbers of a 1-process run with the same global batch.
"""

from __future__ import annotations

import numpy as np
import torch

PURPOSES = {
    "noise": 1,
    "posterior": 2,
    "augment": 3,
    "order": 4,
    "validation": 5,
    "vae": 6,
    "prior": 7,
    "aggregate_prior": 8,
    "times": 9,
    "label_dropout": 10,
    "caption_dropout": 11,
}


def derive_seed(seed: int, purpose: str, *positions: int) -> int:
    """A 63-bit seed that depends only on `seed`, a named `purpose` and integer `positions`.

    Example:

    ```py
    >>> from diffusers_vrfm.training.determinism import derive_seed
    >>> derive_seed(0, "noise", 3) == derive_seed(0, "noise", 3) != derive_seed(0, "noise", 4)
    True
    ```
    """
    if purpose not in PURPOSES:
        raise ValueError(f"`purpose` must be one of {sorted(PURPOSES)}, but got {purpose!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, but got {seed!r}.")
    entropy = [int(seed), PURPOSES[purpose], *(int(p) for p in positions)]
    if any(value < 0 for value in entropy):
        raise ValueError(f"`positions` must be non-negative integers, but got {positions!r}.")
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def make_generator(seed: int, purpose: str, *positions: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A `torch.Generator` seeded with [`derive_seed`]."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, purpose, *positions))
