"""Text-to-image runs of `train_vrfm.py`: the base pipeline (a stock SD3 pipeline converted, a VRFM text-to-image
pipeline, or a small one built from scratch), captioned data whose text embeddings (and, with `--cache_latents`, VAE
latents) are computed once, LoRA, and what a run saves (an adapter folder, or the whole pipeline).

The training loop itself is the one of every run: each batch carries the cached `encoder_hidden_states` and
`pooled_projections`, which the loss passes to the velocity model.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass

import torch

from .data import TrainImageDataset, TrainingData, load_training_data
from .factory import (
    DEFAULT_LATENT_DIM,
    DEFAULT_MODEL_CONFIGS,
    PretrainedSource,
    clean_copy,
    default_z_map,
    parse_json_config,
    refuse_model_config,
    wrapper_options,
)
from .text_data import TextEmbeddingCache, encode_vae_latents, source_captions

TEXT_MODEL_KWARGS = ("encoder_hidden_states", "pooled_projections")
# The frozen, randomly initialised CLIP text encoder of a model trained from scratch (`--backbone sd3`).
SCRATCH_TEXT_ENCODER_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}


@dataclass
class TextToImageSetup:
    """The text side of a text-to-image run.

    Args:
        pipeline ([`VRFMTextToImagePipeline`]): the base pipeline: frozen text encoders, tokenizers, VAE (if any),
            scheduler, and the velocity model that training starts from.
        cache ([`TextEmbeddingCache`]): the embeddings of every distinct caption and of `""`.
        empty_caption (`dict`): `""`'s embeddings on the training device, one row per model input (what caption
            dropout trains on).
        base_model (`str`, *optional*): what the run started from (the SD3 or VRFM pipeline), for the card.
    """

    pipeline: object
    cache: TextEmbeddingCache
    empty_caption: dict[str, torch.Tensor]
    base_model: str | None = None

    def validation_prompts(self, count: int) -> list[str]:
        """`count` prompts cycling over the distinct training captions (for validation grids)."""
        captions = sorted(caption for caption in self.cache.index if caption)
        return [captions[i % len(captions)] for i in range(count)]


class CaptionedDataset(torch.utils.data.Dataset):
    """Training items `(pixel_values, encoder_hidden_states, pooled_projections)` addressed by `(index,
    augmentation_seed)` like [`TrainImageDataset`]: the image (or its cached latent) and the cached embeddings of its
    caption. Caption dropout happens in the training step, for the whole batch at once ([`drop_captions`]).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm.training.text_to_image import CaptionedDataset
    >>> class Cache:  # stands in for a TextEmbeddingCache
    ...     def lookup(self, captions):
    ...         from diffusers_vrfm.text_encoding import VRFMPromptEmbeddings
    ...         rows = torch.tensor([[float(len(c))] for c in captions])
    ...         return VRFMPromptEmbeddings(prompt_embeds=rows[:, None], pooled_prompt_embeds=rows)
    >>> data = CaptionedDataset(["a one", "a seven"], Cache(), latents=torch.zeros(2, 1, 4, 4))
    >>> item = data[(1, 123)]
    >>> item["pixel_values"].shape, item["pooled_projections"].tolist()
    (torch.Size([1, 4, 4]), [7.0])
    ```
    """

    def __init__(
        self,
        captions: list[str],
        cache,
        images: TrainImageDataset | None = None,
        latents: torch.Tensor | None = None,
    ):
        if (images is None) == (latents is None):
            raise ValueError("Pass exactly one of `images` and `latents`.")
        self.captions, self.cache, self.images, self.latents = list(captions), cache, images, latents

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, key) -> dict:
        index = key[0]
        if self.latents is not None:
            item = {"pixel_values": self.latents[index]}
        else:
            item = {"pixel_values": self.images[key]["pixel_values"]}
        text = self.cache.lookup([self.captions[index]])
        item["encoder_hidden_states"] = text.prompt_embeds[0]
        item["pooled_projections"] = text.pooled_prompt_embeds[0]
        return item


def empty_caption_inputs(cache: TextEmbeddingCache, device) -> dict[str, torch.Tensor]:
    """The empty caption's cached embeddings as the velocity model's text inputs, one row each, on `device`."""
    empty = cache.lookup([""])
    return {
        key: value.to(device)
        for key, value in zip(TEXT_MODEL_KWARGS, (empty.prompt_embeds, empty.pooled_prompt_embeds))
    }


def drop_captions(model_kwargs: dict, drop: torch.Tensor, empty: dict) -> dict:
    """Caption dropout on a batch: `model_kwargs` (the text embeddings, one row per example) with the rows where
    `drop` is true replaced by the empty caption's `empty` (one row each, as [`empty_caption_inputs`] makes them).

    ```py
    >>> import torch
    >>> from diffusers_vrfm.training.text_to_image import drop_captions
    >>> batch = {"pooled_projections": torch.tensor([[1.0], [2.0], [3.0]])}
    >>> drop_captions(batch, torch.tensor([False, True, False]), {"pooled_projections": torch.zeros(1, 1)})
    {'pooled_projections': tensor([[1.],
            [0.],
            [3.]])}
    ```
    """
    return {
        key: torch.where(drop.view(-1, *[1] * (value.ndim - 1)), empty[key].to(value.dtype), value)
        for key, value in model_kwargs.items()
    }


def caption_words(captions: list[str]) -> list[str]:
    """The distinct words of `captions`, split as [`~diffusers_vrfm.word_level_tokenizer`] splits them.

    ```py
    >>> from diffusers_vrfm.training.text_to_image import caption_words
    >>> caption_words(["a handwritten seven", "a red, round thing"])
    [',', 'a', 'handwritten', 'red', 'round', 'seven', 'thing']
    ```
    """
    from tokenizers.pre_tokenizers import Whitespace

    splitter = Whitespace()
    return sorted({word for caption in captions for word, _ in splitter.pre_tokenize_str(caption)})


def build_scratch_text_pipeline(
    captions: list[str], sample_shape: tuple[int, int, int], latent_dim: int, model_config: dict | None = None
):
    """A small text-to-image pipeline to train from scratch: a word-level tokenizer over the captions' words, a
    frozen random CLIP text encoder ([`SCRATCH_TEXT_ENCODER_CONFIG`]) and a [`VRFMSD3Transformer2DModel`] in pixel
    space (`DEFAULT_MODEL_CONFIGS["sd3"]` updated with `model_config`), with a ``z`` map as the script's other
    from-scratch image models have ([`default_z_map`])."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffusers_vrfm import VRFMScheduler, VRFMSD3Transformer2DModel, VRFMTextToImagePipeline, word_level_tokenizer

    words = caption_words(captions)
    if not words:
        raise ValueError("The training captions are all empty: a text-to-image model needs captions.")
    from tokenizers.pre_tokenizers import Whitespace

    longest = max(len(Whitespace().pre_tokenize_str(caption)) for caption in captions)
    tokenizer = word_level_tokenizer(words, model_max_length=longest + 2)  # + <bos>, <eos>
    text_config = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=longest + 2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SCRATCH_TEXT_ENCODER_CONFIG,
    )
    text_encoder = CLIPTextModelWithProjection(text_config).eval().requires_grad_(False)
    config = {
        **DEFAULT_MODEL_CONFIGS["sd3"],
        "joint_attention_dim": text_config.hidden_size,
        "pooled_projection_dim": text_config.projection_dim,
        **(model_config or {}),
    }
    config.setdefault("caption_projection_dim", config["num_attention_heads"] * config["attention_head_dim"])
    config.setdefault("pos_embed_max_size", sample_shape[1] // config["patch_size"])
    if latent_dim > 0:
        config.update(default_z_map(tuple(sample_shape[1:]), model_config or {}))
    channels, size = sample_shape[0], sample_shape[1]
    velocity_model = VRFMSD3Transformer2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, latent_dim=latent_dim, **config
    )
    return VRFMTextToImagePipeline(
        velocity_model=velocity_model, scheduler=VRFMScheduler(), text_encoder=text_encoder, tokenizer=tokenizer
    )


def load_base_pipeline(args: argparse.Namespace, pretrained: PretrainedSource, dtype: torch.dtype):
    """The pipeline `--pretrained_model_name_or_path` names: a stock SD3 pipeline converted with `--latent_dim`
    (default `DEFAULT_LATENT_DIM["sd3"]`) and the z map `--model_config` asks for ([`wrapper_options`]), or a VRFM
    text-to-image pipeline."""
    from diffusers_vrfm import VRFMTextToImagePipeline

    load_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir, "torch_dtype": dtype}
    model_config = parse_json_config(args.model_config, "--model_config")
    if pretrained.kind == "sd3_pipeline":
        # components saved as absent (e.g. a pipeline saved without its T5) must be passed as None to load
        load_kwargs.update({name: None for name in _absent_components(pretrained.path)})
        latent_dim = DEFAULT_LATENT_DIM["sd3"] if args.latent_dim is None else args.latent_dim
        options = wrapper_options(model_config, "SD3 transformer")
        return VRFMTextToImagePipeline.from_stable_diffusion_3(
            args.pretrained_model_name_or_path, latent_dim=latent_dim, **options, **load_kwargs
        )
    refuse_model_config(model_config)
    return VRFMTextToImagePipeline.from_pretrained(args.pretrained_model_name_or_path, **load_kwargs)


def _absent_components(folder: str) -> list[str]:
    """The components a pipeline folder's `model_index.json` records as `[null, null]`."""
    import json

    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as handle:
        index = json.load(handle)
    return [name for name, value in index.items() if isinstance(value, list) and value == [None, None]]


def base_dtype(args: argparse.Namespace, accelerator) -> torch.dtype:
    """The dtype the base pipeline loads in: float32 for full fine-tuning (the weights train), the mixed-precision
    dtype for LoRA (the backbone's weights are frozen; LoRA weights are upcast to float32)."""
    if args.rank is None or accelerator.mixed_precision == "no":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[accelerator.mixed_precision]


def _sample_shape(args: argparse.Namespace, pipeline) -> tuple[int, int, int]:
    """`(C, h, w)` of one training example in model space, checked against the patch size."""
    model, factor = pipeline.velocity_model, pipeline.vae_scale_factor
    patch = model.config.patch_size
    resolution = args.resolution or model.config.sample_size * factor
    if resolution % (patch * factor):
        raise ValueError(
            f"`--resolution` {resolution} must be a multiple of {patch * factor} (the transformer's patch size "
            f"{patch}{f' times the VAE factor {factor}' if factor > 1 else ''})."
        )
    args.resolution = resolution
    return (model.config.in_channels, resolution // factor, resolution // factor)


@torch.no_grad()
def _cache_latents(images: TrainImageDataset, vae, device, batch_size: int = 32) -> torch.Tensor:
    vae.to(device)
    pixels = torch.stack([images[(index, 0)]["pixel_values"] for index in range(len(images))])
    return encode_vae_latents(pixels, vae, batch_size=batch_size)


def prepare_text_to_image_data(args: argparse.Namespace, context, pretrained: PretrainedSource | None):
    """The data stage of a text-to-image run: the base pipeline, the captions, the text-embedding cache and (with
    `--cache_latents`) the latents. Returns a [`~diffusers_vrfm.training.data_setup.PreparedData`] with `text` set."""
    from .data_setup import PreparedData

    _check_text_to_image_arguments(args, pretrained)
    if pretrained is not None:
        pipeline = load_base_pipeline(args, pretrained, base_dtype(args, context.accelerator))
        resolution_shape = _sample_shape(args, pipeline)
    else:
        pipeline, args.resolution = None, args.resolution or 16
    with context.accelerator.main_process_first():
        data = load_training_data(
            args.dataset_name, "unet", train_data_dir=args.train_data_dir,
            dataset_config_name=args.dataset_config_name, dataset_split=args.dataset_split, cache_dir=args.cache_dir,
            image_column=args.image_column, resolution=args.resolution, center_crop=args.center_crop,
            random_flip=args.random_flip, max_train_samples=args.max_train_samples,
        )  # fmt: skip
    captions = source_captions(data.dataset.source, args.caption_column)
    if pipeline is None:
        latent_dim = DEFAULT_LATENT_DIM["sd3"] if args.latent_dim is None else args.latent_dim
        model_config = parse_json_config(args.model_config, "--model_config")
        pipeline = build_scratch_text_pipeline(captions, tuple(data.sample_shape), latent_dim, model_config)
        resolution_shape = _sample_shape(args, pipeline)
    vae = pipeline.vae
    data.dataset.transform.num_channels = resolution_shape[0] if vae is None else vae.config.in_channels
    if args.cache_latents and vae is None:
        raise ValueError("`--cache_latents` needs a pipeline with a VAE; this one works in pixel space.")
    device = context.accelerator.device
    cache = _encode_captions_once(pipeline, captions, device)
    latents = _cache_latents(data.dataset, vae, device) if args.cache_latents else None
    data.dataset = CaptionedDataset(
        captions, cache, images=None if latents is not None else data.dataset, latents=latents
    )  # fmt: skip
    data.sample_shape = resolution_shape if vae is not None else (resolution_shape[0], *data.sample_shape[1:])
    args.dataset_name = data.name
    context.log.info(
        f"text-to-image: {len(captions)} captions ({len(cache) - 1} distinct) encoded once; "
        f"{'latents cached' if latents is not None else 'VAE encodes each batch' if vae is not None else 'pixels'}"
    )
    base_model = args.pretrained_model_name_or_path
    return PreparedData(
        data=TrainingData(
            kind="image", sample_shape=tuple(data.sample_shape), name=data.name, num_examples=len(captions),
            dataset=data.dataset, hub_dataset_id=data.hub_dataset_id,
        ),
        model_shape=resolution_shape,
        pretrained=pretrained,
        vae=None if latents is not None else vae,
        text=TextToImageSetup(pipeline, cache, empty_caption_inputs(cache, device), base_model=base_model),
    )  # fmt: skip


def _check_text_to_image_arguments(args: argparse.Namespace, pretrained: PretrainedSource | None) -> None:
    if args.vae_name_or_path is not None:
        raise ValueError("`--vae_name_or_path` does not apply to text-to-image runs: the pipeline brings its VAE.")
    if args.class_conditional:
        raise ValueError("`--class_conditional` does not apply to text-to-image runs: they are conditioned on text.")
    if args.rank is not None and pretrained is None:
        raise ValueError("`--rank` (LoRA) needs a pretrained model: pass `--pretrained_model_name_or_path`.")


def _encode_captions_once(pipeline, captions: list[str], device) -> TextEmbeddingCache:
    """The embeddings of every distinct caption, with the text encoders on `device` only while they encode."""
    encoders = _text_encoders(pipeline)
    modules = [encoder for _, encoder in encoders.clip + ([encoders.t5] if encoders.t5 else [])]
    for encoder in modules:
        encoder.to(device)
    cache = TextEmbeddingCache(captions, encoders, device=device)
    for encoder in modules:
        encoder.to("cpu")  # no longer needed: free the accelerator
    return cache


def _text_encoders(pipeline):
    from diffusers_vrfm import VRFMTextEncoders

    return VRFMTextEncoders.from_pipeline(pipeline)


def build_text_models(args: argparse.Namespace, prepared, posterior_for):
    """The velocity model (the base pipeline's), the posterior (the base's, or a new one from `posterior_for`) and,
    with `--rank`, LoRA on the transformer. Returns `(velocity_model, posterior_encoder)`."""
    from .lora import prepare_lora_training

    base = prepared.text.pipeline
    velocity_model = base.velocity_model
    if velocity_model.latent_dim != args.latent_dim:
        raise ValueError(
            f"`--latent_dim` {args.latent_dim} differs from the pipeline's velocity model "
            f"({velocity_model.latent_dim}); leave `--latent_dim` unset to continue the pipeline."
        )
    posterior = base.posterior_encoder if base.posterior_encoder is not None else posterior_for()
    if args.rank is not None:
        if velocity_model.latent_dim == 0:
            raise ValueError("`--rank` needs a z path (`--latent_dim` > 0): LoRA trains the velocity model's z path.")
        prepare_lora_training(velocity_model, posterior, rank=args.rank)
    else:
        velocity_model.requires_grad_(True)
    return velocity_model, posterior


def trained_velocity_model(velocity_model, ema_model=None):
    """The velocity model a pipeline gets: a clean copy holding the EMA weights, or the model itself (LoRA runs,
    which keep no EMA)."""
    if ema_model is None:
        return velocity_model
    copy = clean_copy(velocity_model)
    ema_model.copy_to(copy.parameters())
    return copy


def make_text_pipeline(setup: TextToImageSetup, velocity_model, posterior_encoder=None, prior=None, device=None):
    """A [`VRFMTextToImagePipeline`] with the base's text encoders, VAE and scheduler, and the given models; with
    `device`, everything but the text encoders (which training no longer needs) is moved there."""
    base = setup.pipeline
    components = {**base.components, "velocity_model": velocity_model}
    components.update(posterior_encoder=clean_copy(posterior_encoder), prior=clean_copy(prior))
    pipeline = type(base)(**components)
    converted_from = base.config.get("_base_model")
    if converted_from:
        pipeline.register_to_config(_base_model=converted_from)
    pipeline.set_progress_bar_config(disable=True)
    if device is not None:
        for name in ("velocity_model", "vae", "posterior_encoder", "prior"):
            module = getattr(pipeline, name, None)
            if module is not None:
                module.to(device)
    return pipeline


def build_text_to_image_pipeline(prepared, velocity_model, posterior, prior, ema_model=None):
    """The trained text-to-image pipeline (the EMA weights when kept) on the run's frozen text encoders and VAE."""
    return make_text_pipeline(prepared.text, trained_velocity_model(velocity_model, ema_model), posterior, prior)


def save_text_to_image_run(args: argparse.Namespace, prepared, pipeline) -> None:
    """Saves a finished run's `pipeline` in `--output_dir`: with `--rank`, a VRFM adapter folder (LoRA + z path +
    posterior + prior; `VRFMTextToImagePipeline.from_vrfm_adapter(output_dir)` loads it on top of the base), else the
    whole pipeline. Logs, checkpoints and validation figures already there are kept."""
    from ..lora import save_vrfm_adapter

    if args.rank is None:
        pipeline.save_pretrained(args.output_dir)
        return
    staging = os.path.join(args.output_dir, ".adapter-staging")
    save_vrfm_adapter(staging, pipeline, base_model=prepared.text.base_model)
    for name in os.listdir(staging):
        target = os.path.join(args.output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)


@torch.no_grad()
def text_validation_grid(pipeline, prompts: list[str], cache, x0: torch.Tensor, z, steps_list, seed: int):
    """One row per step count (NFE), one column per fixed `(prompt, x0, z)` (without guidance); a PIL image."""
    from .determinism import make_generator
    from .visuals import _to_uint8_images, labelled_grid

    text, empty = cache.lookup(prompts), cache.lookup([""] * len(prompts))
    rows = []
    for steps in steps_list:
        generator = None if pipeline.prior is None else make_generator(seed, "validation", 1)
        images = pipeline(
            prompt_embeds=text.prompt_embeds, pooled_prompt_embeds=text.pooled_prompt_embeds,
            negative_prompt_embeds=empty.prompt_embeds, negative_pooled_prompt_embeds=empty.pooled_prompt_embeds,
            guidance_scale=1.0, latents=x0, z=z if pipeline.prior is None else None, generator=generator,
            num_inference_steps=steps, output_type="pt",
        ).samples  # fmt: skip
        rows.append(_to_uint8_images(images * 2 - 1))
    return labelled_grid(rows, [f"{s} step{'s' if s > 1 else ''}" for s in steps_list])
