"""The data stage of `train_vrfm.py`: what the pretrained model (if any) decides, the VAE (if any), the resolution, the
dataset, and how each micro-step's batch is split over processes."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .cli import check_data_fits_backbone
from .data import MicroBatchPlan, TrainingData, load_training_data, parse_dataset_name
from .environment import RunContext
from .factory import DEFAULT_MODEL_CONFIGS, PretrainedSource, downsample_factor, inspect_pretrained, parse_json_config


@dataclass
class PreparedData:
    """The data of a run and the shape the models work in.

    Args:
        data ([`TrainingData`]): the training data.
        model_shape (`tuple[int, ...]`): the shape of one model input: the image, its VAE latent, or the vector.
        pretrained ([`PretrainedSource`], *optional*): what `--pretrained_model_name_or_path` points at.
        vae (`diffusers.AutoencoderKL`, *optional*): the frozen VAE of latent-space training (encoding each batch).
        text ([`~diffusers_vrfm.training.text_to_image.TextToImageSetup`], *optional*): the base pipeline and the
            caption embeddings of a text-to-image run.
    """

    data: TrainingData
    model_shape: tuple[int, ...]
    pretrained: PretrainedSource | None = None
    vae: object | None = None
    text: object | None = None

    @property
    def kind(self) -> str:
        return self.data.kind

    @property
    def pretrained_latent_dim(self) -> int | None:
        """The `latent_dim` of the VRFM pipeline that training continues from, if any (for text-to-image runs, the
        base pipeline's, which `--latent_dim` chose when it was built)."""
        if self.text is not None:
            return self.text.pipeline.velocity_model.latent_dim
        if self.pretrained is None or self.pretrained.kind != "pipeline":
            return None
        return int(self.pretrained.config.get("latent_dim", 0))


@dataclass
class BatchLayout:
    """How a micro-step's global batch is split over processes.

    Args:
        global_batch_size (`int`): examples per micro-step over all processes.
        rows (`slice`): the rows of a global batch that belong to this process.
        plan ([`MicroBatchPlan`], *optional*): which examples each micro-step loads (image data; `None` for vectors,
            which are drawn afresh).
    """

    global_batch_size: int
    rows: slice
    plan: MicroBatchPlan | None = None


def inspect_backbone(args: argparse.Namespace, log) -> PretrainedSource | None:
    """Reads `--pretrained_model_name_or_path` (if any), which decides `args.backbone`, and checks the data fits it."""
    pretrained = None
    if args.pretrained_model_name_or_path is not None:
        pretrained = inspect_pretrained(
            args.pretrained_model_name_or_path, subfolder=args.pretrained_subfolder, revision=args.revision
        )
        if pretrained.backbone != args.backbone:
            log.info(f"--backbone {args.backbone} ignored: the pretrained model is a {pretrained.backbone}.")
            args.backbone = pretrained.backbone
        args._pretrained_kind = pretrained.kind
    check_data_fits_backbone(args.dataset_name, args.backbone)
    return pretrained


def load_vae(args: argparse.Namespace):
    """The frozen `--vae_name_or_path` and its downsampling factor, or `(None, 1)`."""
    if args.vae_name_or_path is None:
        return None, 1
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(
        args.vae_name_or_path, subfolder=args.vae_subfolder, revision=args.revision, cache_dir=args.cache_dir
    )
    vae.requires_grad_(False).eval()
    return vae, 2 ** (len(vae.config.block_out_channels) - 1)


def resolve_resolution(
    args: argparse.Namespace, pretrained: PretrainedSource | None, vae, vae_factor: int
) -> tuple[int, int | None]:
    """The image resolution (`--resolution`, the pretrained model's, or 16), checked against the backbone's and the
    VAE's downsampling, and the number of channels the model needs (`None`: the data's)."""
    backbone, kind = args.backbone, "vector" if args.backbone == "mlp" else "image"
    model_config = {**DEFAULT_MODEL_CONFIGS[backbone], **parse_json_config(args.model_config, "--model_config")}
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
    return resolution, num_channels


def prepare_data(args: argparse.Namespace, context: RunContext) -> PreparedData:
    """Loads the pretrained model's description, the VAE and the data; sets `args.backbone`, `args.resolution` and
    `args.dataset_name` to what the run uses."""
    pretrained = inspect_backbone(args, context.log)
    backbone = args.backbone
    if backbone == "sd3":  # text-to-image: the pipeline brings its text encoders and VAE
        from .text_to_image import prepare_text_to_image_data

        return prepare_text_to_image_data(args, context, pretrained)
    kind = "vector" if backbone == "mlp" else "image"
    vae, vae_factor = load_vae(args)
    resolution, num_channels = resolve_resolution(args, pretrained, vae, vae_factor)
    args.resolution = resolution if kind == "image" else None

    with context.accelerator.main_process_first():
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
    model_shape = tuple(data.sample_shape)
    if vae is not None:
        model_shape = (vae.config.latent_channels, resolution // vae_factor, resolution // vae_factor)
    return PreparedData(data=data, model_shape=model_shape, pretrained=pretrained, vae=vae)


def plan_batches(args: argparse.Namespace, data: TrainingData, accelerator) -> BatchLayout:
    """The batch layout of this process; with `--num_train_epochs` (image data) it also sets `args.max_train_steps`."""
    num_processes, process_index = accelerator.num_processes, accelerator.process_index
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
    return BatchLayout(global_batch_size=args.train_batch_size * num_processes, rows=rows, plan=plan)
