#!/usr/bin/env python
"""Train (or fine-tune) a Variational Rectified Flow Matching model and save it as a `VRFMPipeline`.

Runs with `python train_vrfm.py ...` or `accelerate launch train_vrfm.py ...`. With no dataset arguments it trains a
small UNet on scikit-learn's digits (embedded, no network needed) in a few minutes on 2 CPU cores:

    python train_vrfm.py --output_dir vrfm-digits

Two CPU processes (real gradient synchronisation over gloo):

    accelerate launch --multi_gpu --num_processes 2 train_vrfm.py --cpu --output_dir vrfm-digits-2p

This file is the table of contents: each stage is a function of `diffusers_vrfm.training`, and the math lives in
`diffusers_vrfm.objective`. Time convention: t in [0, 1], t = 0 is noise, t = 1 is data, x_t = (1 - t) x0 + t x1, the
model predicts v = x1 - x0.
"""

from __future__ import annotations

import argparse

from diffusers_vrfm.training.cli import check_args, parse_args, parse_args_or_exit, resolve_defaults

__all__ = ["main", "parse_args"]  # what tests and callers import from this script


def main(args: argparse.Namespace) -> dict:
    """Trains and saves; returns a small summary (`global_step`, `finished`, paths and final metrics).

    The main process holds the lock of `--output_dir` throughout: a second run on the same folder fails at once.
    """
    from diffusers_vrfm.training.lock import OutputDirLock, is_global_main_process

    check_args(args)
    with OutputDirLock(args.output_dir, enabled=is_global_main_process()):
        return run_training(args)


def run_training(args: argparse.Namespace) -> dict:
    """The stages of [`main`], run while the output folder is locked."""
    # The heavy modules (torch, diffusers, accelerate, datasets) load here, once the arguments are valid.
    from diffusers_vrfm.training import data_setup, environment, finish, loop, model_setup, resume
    from diffusers_vrfm.training.validation import Validator

    context = environment.set_up_run(args)  # threads, accelerator, logging, seed
    prepared = data_setup.prepare_data(args, context)  # pretrained model, VAE, resolution, dataset
    kl_target = resolve_defaults(args, prepared.kind, prepared.pretrained_latent_dim, prepared.data.num_examples)
    models = model_setup.build_training_models(args, prepared)
    layout = data_setup.plan_batches(args, prepared.data, context.accelerator)
    repo_id = finish.create_hub_repo_if_asked(args, context.accelerator)  # only once everything is checked
    models = model_setup.prepare_for_training(args, context, models, prepared, layout)  # optimiser, EMA, accelerate
    resumed = resume.resume_training(args, context, models, kl_target, layout.global_batch_size)
    validator = Validator(args, context.accelerator, models, prepared)
    result = loop.train_loop(args, context, prepared, layout, models, resumed, validator, kl_target)
    return finish.finish_run(args, context, prepared, models, result, validator, repo_id, kl_target)


if __name__ == "__main__":
    main(parse_args_or_exit())
