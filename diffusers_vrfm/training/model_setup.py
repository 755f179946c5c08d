"""The model stage of `train_vrfm.py`: the velocity model, the posterior and the learned prior (built, or loaded from
`--pretrained_model_name_or_path`), the scheduler, then the optimiser, the EMA and accelerate's wrapping."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ..schedulers.scheduling_vrfm import VRFMScheduler
from . import step as training_step
from .checkpointing import EMA_DIR, POSTERIOR_ENCODER_DIR, PRIOR_DIR, VELOCITY_MODEL_DIR, make_state_hooks
from .data_setup import BatchLayout, PreparedData
from .environment import TRACKER_PROJECT, RunContext, tracker_config
from .factory import build_models, count_parameters, parse_json_config
from .step import fused_optimizer_supported


@dataclass
class TrainingModels:
    """The models of a run and what trains them. After [`prepare_for_training`] the models are accelerate's wrapped
    ones (use `accelerator.unwrap_model` for the plain modules).

    Args:
        velocity_model: the velocity model.
        posterior_encoder: the posterior `q(z | ...)`, or `None` for plain rectified flow.
        prior_model: the learned prior `p_psi(z | x0)` (`--learned_prior`), or `None`.
        noise_scheduler ([`VRFMScheduler`]): draws the training times.
        base_model (`str`, *optional*): the Hub id the run started from (for the model card).
        ema_model (`diffusers.training_utils.EMAModel`, *optional*): the EMA of the velocity model.
        optimizer, lr_scheduler: set by [`prepare_for_training`].
        velocity_parameters (`int`), posterior_parameters (`int`): parameter counts.
        compiled_loss (`Callable`, *optional*): under `--torch_compile`, `torch.compile` of the step's loss function,
            set by [`prepare_for_training`]; see [`training_loss`].
        clipped_parameters (`list`), ema_source_parameters (`list`): the parameters whose gradient norm every update
            clips, and the velocity model's (unwrapped) that the EMA averages; listed once by [`prepare_for_training`],
            since a step that lists them again (for a small model on a GPU, whose steps the host bounds) spends host
            time on each.
    """

    velocity_model: torch.nn.Module
    posterior_encoder: torch.nn.Module | None
    prior_model: torch.nn.Module | None
    noise_scheduler: VRFMScheduler
    base_model: str | None = None
    ema_model: EMAModel | None = None
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: object | None = None
    velocity_parameters: int = 0
    posterior_parameters: int = 0
    compiled_loss: Callable | None = None
    clipped_parameters: list = field(default_factory=list)
    ema_source_parameters: list = field(default_factory=list)

    @property
    def trained(self) -> tuple[torch.nn.Module, ...]:
        """The models the optimiser updates (velocity model, then posterior and prior when present)."""
        return tuple(m for m in (self.velocity_model, self.posterior_encoder, self.prior_model) if m is not None)

    @property
    def training_loss(self) -> Callable:
        """The training step's loss function, [`~diffusers_vrfm.training.step.vrfm_training_loss`]: compiled under
        `--torch_compile`."""
        return self.compiled_loss or training_step.vrfm_training_loss

    @property
    def checkpoint_dirs(self) -> tuple[str, ...]:
        """The component folders every checkpoint of this run must hold."""
        dirs = (VELOCITY_MODEL_DIR,)
        dirs += (POSTERIOR_ENCODER_DIR,) if self.posterior_encoder is not None else ()
        dirs += (PRIOR_DIR,) if self.prior_model is not None else ()
        dirs += (EMA_DIR,) if self.ema_model is not None else ()
        return dirs


def trainable_parameters(models) -> list[torch.nn.Parameter]:
    """The parameters of `models` that require gradients."""
    return [p for model in models for p in model.parameters() if p.requires_grad]


def build_training_models(args: argparse.Namespace, prepared: PreparedData) -> TrainingModels:
    """Builds (or loads) the models for the data's shape, the learned prior when asked, and the noise scheduler."""
    if args.backbone == "sd3":
        return _build_text_to_image_models(args, prepared)
    built = build_models(
        args.backbone,
        prepared.model_shape,
        args.latent_dim,
        args.posterior_inputs,
        num_classes=prepared.data.num_classes,
        model_config=parse_json_config(args.model_config, "--model_config"),
        posterior_config=parse_json_config(args.posterior_config, "--posterior_config"),
        pretrained=prepared.pretrained,
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
    if tuple(velocity_model.sample_shape) != prepared.model_shape:
        raise ValueError(
            f"The model expects samples of shape {tuple(velocity_model.sample_shape)}, but the data gives "
            f"{prepared.model_shape}; check `--resolution`."
        )
    noise_scheduler = training_noise_scheduler(args)
    return TrainingModels(velocity_model, posterior_encoder, prior_model, noise_scheduler, base_model=built.base_model)


def training_noise_scheduler(args: argparse.Namespace) -> VRFMScheduler:
    """The scheduler that draws training times from `--timestep_density`."""
    return VRFMScheduler(
        timestep_density=args.timestep_density,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        mode_scale=args.mode_scale,
        noise_end_fraction=args.noise_end_fraction,
    )


def _build_text_to_image_models(args: argparse.Namespace, prepared: PreparedData) -> TrainingModels:
    """The models of a text-to-image run (see [`~diffusers_vrfm.training.text_to_image.build_text_models`])."""
    from .factory import build_posterior
    from .text_to_image import build_text_models

    if args.learned_prior:
        raise ValueError("`--learned_prior` is not available for text-to-image runs; use the aggregate prior.")
    posterior_config = parse_json_config(args.posterior_config, "--posterior_config")

    def new_posterior():
        return build_posterior("image", prepared.model_shape, args.latent_dim, args.posterior_inputs, posterior_config)

    velocity_model, posterior = build_text_models(args, prepared, new_posterior)
    noise_scheduler = training_noise_scheduler(args)
    return TrainingModels(velocity_model, posterior, None, noise_scheduler, base_model=prepared.text.base_model)


def _make_ema(args: argparse.Namespace, velocity_model, device) -> EMAModel | None:
    if not args.use_ema:
        return None
    ema_model = EMAModel(
        velocity_model.parameters(),
        decay=args.ema_max_decay,
        min_decay=0.0,
        use_ema_warmup=True,
        inv_gamma=args.ema_inv_gamma,
        power=args.ema_power,
        foreach=True,  # one fused update over all parameters instead of a Python loop
        model_cls=type(velocity_model),
        model_config=velocity_model.config,
    )
    ema_model.to(device)
    return ema_model


def use_channels_last(args: argparse.Namespace, models: TrainingModels) -> None:
    """`--channels_last`: the image models' weights in channels-last memory format, in place."""
    if args.channels_last:
        for model in (models.velocity_model, models.posterior_encoder):
            if model is not None:
                model.to(memory_format=torch.channels_last)


def use_gradient_checkpointing(args: argparse.Namespace, models: TrainingModels) -> None:
    """`--gradient_checkpointing`: diffusers' activation checkpointing in the blocks of the backbone the velocity
    model wraps (the `z` paths and the posterior keep their activations: they are small)."""
    if not args.gradient_checkpointing:
        return
    velocity = models.velocity_model
    if not getattr(velocity, "_supports_gradient_checkpointing", False):
        raise ValueError(
            f"`--gradient_checkpointing` needs a velocity model with blocks to recompute, but got "
            f"{type(velocity).__name__}, which has none: leave it off for --backbone mlp."
        )
    velocity.enable_gradient_checkpointing()


def compile_for_training(args: argparse.Namespace) -> Callable | None:
    """`--torch_compile`: `torch.compile` (with `--torch_compile_mode`) of the training step's loss function,
    [`~diffusers_vrfm.training.step.vrfm_training_loss`]; `None` without the flag.

    The whole forward of a step is one graph, and so is its backward: the path point, the posterior and its draw of
    `z`, the learned prior, the velocity model and the loss with its KL terms. Where the host bounds a GPU's steps,
    every operator left outside the graph costs host time, and compiling the models alone left the loss's. The models
    are the prepared ones, passed in as they are, so checkpoints and the saved pipeline are unchanged. Validation, the
    aggregate prior's fit and saving call the models eagerly: they run at other batch sizes, which would recompile
    (and under `reduce-overhead` record new CUDA graphs; with torch 2.13 on the CPU, the posterior's own draw of `z`
    at a new batch size failed to compile)."""
    if not args.torch_compile:
        return None
    return torch.compile(training_step.vrfm_training_loss, mode=args.torch_compile_mode)


def prepare_for_training(
    args: argparse.Namespace, context: RunContext, models: TrainingModels, prepared: PreparedData, layout: BatchLayout
) -> TrainingModels:
    """Creates the optimiser, the learning-rate schedule and the EMA, registers the checkpoint hooks, wraps the models
    with accelerate and starts the trackers. Returns `models`, updated in place."""
    accelerator = context.accelerator
    num_processes = accelerator.num_processes
    optimizer = torch.optim.AdamW(
        trainable_parameters(models.trained),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        fused=fused_optimizer_supported(accelerator.device) or None,  # skips a non-finite update on the device
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
    )
    if prepared.vae is not None:
        prepared.vae.to(accelerator.device)
    models.ema_model = _make_ema(args, models.velocity_model, accelerator.device)
    save_hook, load_hook = make_state_hooks(accelerator, models.ema_model, prior_model=models.prior_model)
    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    use_channels_last(args, models)
    use_gradient_checkpointing(args, models)
    *wrapped, models.optimizer, models.lr_scheduler = accelerator.prepare(*models.trained, optimizer, lr_scheduler)
    models.velocity_model = wrapped[0]
    if models.posterior_encoder is not None:
        models.posterior_encoder = wrapped[1]
    if models.prior_model is not None:
        models.prior_model = wrapped[2]
    models.compiled_loss = compile_for_training(args)
    velocity = accelerator.unwrap_model(models.velocity_model)
    models.clipped_parameters = trainable_parameters(models.trained)
    models.ema_source_parameters = list(velocity.parameters()) if models.ema_model is not None else []

    if accelerator.is_main_process:
        accelerator.init_trackers(TRACKER_PROJECT, config=tracker_config(args))
    models.velocity_parameters = count_parameters(velocity)
    models.posterior_parameters = count_parameters(
        None if models.posterior_encoder is None else accelerator.unwrap_model(models.posterior_encoder)
    )
    data = prepared.data
    context.log.info(
        f"data={data.name} ({data.kind}, sample shape {data.sample_shape}, {data.num_examples or 'fresh'} examples); "
        f"velocity model {type(velocity).__name__} with {models.velocity_parameters:,} parameters, posterior "
        f"{models.posterior_parameters:,}; latent_dim={args.latent_dim} beta={args.beta} global batch "
        f"{layout.global_batch_size * args.gradient_accumulation_steps}, {args.max_train_steps} steps"
    )
    return models
