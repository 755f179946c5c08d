"""The resume stage of `train_vrfm.py`: `--resume_from_checkpoint` restores the models, the optimiser, the EMA and the
adapted KL weight from a verified checkpoint."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from . import checkpointing
from .environment import RunContext
from .model_setup import TrainingModels


@dataclass
class ResumeState:
    """Where training (re)starts.

    Args:
        global_step (`int`): the number of updates already made (0 for a fresh run).
        adaptive_beta (`float`): the KL weight of the next step when `--kl_target` adapts it.
    """

    global_step: int
    adaptive_beta: float


def warn_on_changed_layout(manifest: dict, current: dict, log) -> None:
    """Warns for each of `seed`, `global_batch_size`, `gradient_accumulation_steps` that differs from the checkpoint's:
    the continuation then cannot repeat the data and noise of an uninterrupted run."""
    for key, value in current.items():
        if manifest.get(key) != value:
            log.warning(
                f"The checkpoint was written with {key}={manifest.get(key)}, this run has {value}: the "
                "continuation will not repeat the data and noise of an uninterrupted run."
            )


def resume_training(
    args: argparse.Namespace,
    context: RunContext,
    models: TrainingModels,
    kl_target: float | None,
    global_batch_size: int,
) -> ResumeState:
    """Loads the checkpoint `--resume_from_checkpoint` names (if any) into the prepared models; returns where training
    continues."""
    log = context.log
    state = ResumeState(global_step=0, adaptive_beta=args.beta)
    if not args.resume_from_checkpoint:
        return state
    path = checkpointing.resolve_resume_path(
        args.resume_from_checkpoint, args.output_dir, models.checkpoint_dirs, log=lambda m: log.warning(m)
    )
    if path is None:
        log.warning(
            f"--resume_from_checkpoint latest: no intact checkpoint in {args.output_dir!r}, so training starts from "
            "step 0."
        )
        return state
    with open(os.path.join(path, checkpointing.MANIFEST_NAME), encoding="utf-8") as handle:
        manifest = json.load(handle)
    current = {
        "seed": args.seed,
        "global_batch_size": global_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
    }
    warn_on_changed_layout(manifest, current, log)
    context.accelerator.load_state(path)
    state.global_step = int(manifest["global_step"])
    if kl_target is not None and "adaptive_beta" in manifest:
        state.adaptive_beta = float(manifest["adaptive_beta"])
    log.info(f"Resumed from {path} at step {state.global_step}.")
    return state
