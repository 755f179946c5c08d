"""VRFMTextToImagePipeline: prompts to images with a text-conditioned (variational) rectified-flow model."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from ..models.transformer_sd3 import VRFMSD3Transformer2DModel
from ..models.unet_2d import VRFMUNet2DConditionModel
from ..objective import check_tensor
from ..schedulers.scheduling_vrfm import VRFMScheduler
from ..text_encoding import VRFMPromptEmbeddings, VRFMTextEncoders, as_prompt_list
from .pipeline_vrfm import (
    Autoencoder,
    FlowScheduler,
    PosteriorEncoder,
    Prior,
    VRFMPipeline,
    VRFMPipelineOutput,
)


class VRFMTextToImagePipeline(VRFMPipeline):
    """Generates images from prompts by integrating ``dx/dt = v(x, t, z, text)`` from noise (``t = 0``) to data.

    ``z`` is drawn **once per trajectory** (from the `prior` component when there is one, else ``N(0, I)``) and held
    fixed along it. Classifier-free guidance contrasts the prompt with the negative prompt (`""` by default).
    Text is encoded by [`VRFMTextEncoders`] in SD3's layout, so a stock `StableDiffusion3Pipeline` converts with one
    call, [`~VRFMTextToImagePipeline.from_stable_diffusion_3`].

    Components:
        velocity_model ([`VRFMSD3Transformer2DModel`] or [`VRFMUNet2DConditionModel`]): the text-conditioned velocity.
        scheduler ([`VRFMScheduler`], or a diffusers flow scheduler as in [`VRFMPipeline`]): the time grid and
            solver.
        text_encoder (`CLIPTextModelWithProjection`), tokenizer: the CLIP text encoder.
        text_encoder_2, tokenizer_2 (*optional*): a second CLIP (SD3's CLIP-G).
        text_encoder_3 (`T5EncoderModel`), tokenizer_3 (*optional*): a T5 encoder.
        vae ([`~diffusers.AutoencoderKL`], *optional*): decodes latents to images; without one the model works in
            pixel space.
        posterior_encoder, prior (*optional*): as in [`VRFMPipeline`].

    Saved folders load with `VRFMTextToImagePipeline.from_pretrained(folder)` and with
    `DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)`.

    Example (tiny random components: the images are noise, the shapes are real):

    ```py
    >>> import torch
    >>> from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    >>> from diffusers_vrfm import (
    ...     VRFMScheduler, VRFMSD3Transformer2DModel, VRFMTextToImagePipeline, word_level_tokenizer,
    ... )
    >>> tokenizer = word_level_tokenizer(["a", "handwritten", "seven", "three"], model_max_length=6)
    >>> text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
    ...     vocab_size=tokenizer.vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
    ...     num_attention_heads=2, max_position_embeddings=6, projection_dim=4, eos_token_id=tokenizer.eos_token_id,
    ... ))
    >>> velocity_model = VRFMSD3Transformer2DModel(
    ...     sample_size=8, in_channels=1, out_channels=1, latent_dim=4, num_layers=1, attention_head_dim=8,
    ...     num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=16, pooled_projection_dim=4,
    ...     pos_embed_max_size=8,
    ... )
    >>> pipe = VRFMTextToImagePipeline(
    ...     velocity_model=velocity_model, scheduler=VRFMScheduler(), text_encoder=text_encoder, tokenizer=tokenizer
    ... )
    >>> out = pipe(
    ...     ["a handwritten seven", "a handwritten three"], negative_prompt="", guidance_scale=2.0,
    ...     num_images_per_prompt=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
    ...     output_type="pt",
    ... )
    >>> out.images.shape, out.z.shape
    (torch.Size([4, 1, 8, 8]), torch.Size([4, 4]))
    >>> prompts = ["a handwritten seven"] * 2 + ["a handwritten three"] * 2  # log p(x | prompt), one per image
    >>> pipe.log_likelihood(out.images * 2 - 1, prompt=prompts, num_inference_steps=4).log_prob.shape
    torch.Size([4])
    ```
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->velocity_model->vae"
    _optional_components = [
        "posterior_encoder",
        "vae",
        "prior",
        "text_encoder_2",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
    ]
    default_num_inference_steps = 28  # as in diffusers' text-to-image pipelines

    def __init__(
        self,
        velocity_model: VRFMSD3Transformer2DModel | VRFMUNet2DConditionModel,
        scheduler: FlowScheduler,
        text_encoder,
        tokenizer,
        vae: Autoencoder | None = None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        posterior_encoder: PosteriorEncoder | None = None,
        prior: Prior | None = None,
        reencode_z_at: float | None = None,
    ):
        super().__init__(
            velocity_model, scheduler, posterior_encoder=posterior_encoder, vae=vae, prior=prior,
            reencode_z_at=reencode_z_at,
        )  # fmt: skip
        for attribute in ("context_dim", "pooled_projection_dim"):
            if not hasattr(velocity_model, attribute):
                raise TypeError(
                    f"`velocity_model` must be a text-conditioned VRFM model exposing `{attribute}` (for example "
                    f"VRFMSD3Transformer2DModel or VRFMUNet2DConditionModel), but got {type(velocity_model).__name__}."
                )
        self.register_modules(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        encoders = VRFMTextEncoders.from_pipeline(self)  # checks the pairs and the context width
        pooled_dim = velocity_model.pooled_projection_dim
        if pooled_dim is not None and encoders.pooled_dim != pooled_dim:
            raise ValueError(
                f"The text encoders' pooled width ({encoders.pooled_dim}) must equal "
                f"`velocity_model.pooled_projection_dim` ({pooled_dim})."
            )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    # ------------------------------------------------------------------------------------------------------------ text
    def encode_prompt(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 256,
        device=None,
    ) -> tuple[VRFMPromptEmbeddings, VRFMPromptEmbeddings | None]:
        """The prompts' embeddings and (with guidance) the negative prompts', one row per prompt.

        Embeddings passed in are used as they are; prompts are encoded by [`VRFMTextEncoders`]. The negative prompt
        defaults to `""`. Returns `(positive, negative)`, `negative` being `None` without guidance.
        """
        self.check_prompt_inputs(
            prompt, negative_prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
            negative_pooled_prompt_embeds,
        )  # fmt: skip
        device = device if device is not None else self._execution_device
        encoders = VRFMTextEncoders.from_pipeline(self, max_sequence_length=max_sequence_length)
        if prompt_embeds is not None:
            positive = self._given_embeddings(prompt_embeds, pooled_prompt_embeds)
        else:
            positive = encoders.encode(prompt, device=device)
        if not do_classifier_free_guidance:
            return positive, None
        if negative_prompt_embeds is not None:
            negative = self._given_embeddings(negative_prompt_embeds, negative_pooled_prompt_embeds)
        else:
            negative_prompts = as_prompt_list(negative_prompt or "", "negative_prompt")
            if len(negative_prompts) == 1:
                negative_prompts = negative_prompts * len(positive.prompt_embeds)
            negative = encoders.encode(negative_prompts, device=device)
        if negative.prompt_embeds.shape != positive.prompt_embeds.shape:
            raise ValueError(
                f"`negative_prompt_embeds` must have the shape of `prompt_embeds` "
                f"{tuple(positive.prompt_embeds.shape)}, but got {tuple(negative.prompt_embeds.shape)}."
            )
        return positive, negative

    def _given_embeddings(self, prompt_embeds, pooled_prompt_embeds) -> VRFMPromptEmbeddings:
        if pooled_prompt_embeds is None:  # a model that reads no pooled vector (the check asked for it otherwise)
            pooled_prompt_embeds = prompt_embeds.new_zeros(prompt_embeds.shape[0], 0)
        return VRFMPromptEmbeddings(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds)

    def check_prompt_inputs(
        self,
        prompt,
        negative_prompt,
        prompt_embeds,
        pooled_prompt_embeds,
        negative_prompt_embeds,
        negative_pooled_prompt_embeds,
    ) -> int:
        """Checks the text inputs and returns the number of prompts."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError(
                "Pass exactly one of `prompt` and `prompt_embeds`, but got "
                f"{'both' if prompt is not None else 'neither'}."
            )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`, but got both.")
        reads_pooled = self.velocity_model.pooled_projection_dim is not None
        width, pooled_width = self.velocity_model.context_dim, self.velocity_model.pooled_projection_dim
        for name, embeds, pooled in (
            ("prompt_embeds", prompt_embeds, pooled_prompt_embeds),
            ("negative_prompt_embeds", negative_prompt_embeds, negative_pooled_prompt_embeds),
        ):
            pooled_name = name.replace("prompt_embeds", "pooled_prompt_embeds")
            if embeds is None:
                if pooled is not None:
                    raise ValueError(f"`{pooled_name}` was given without `{name}`; pass both or neither.")
                continue
            check_tensor(embeds, name)
            if embeds.ndim != 3 or (width is not None and embeds.shape[-1] != width):
                raise ValueError(f"`{name}` must have shape (B, L, {width}), but got {tuple(embeds.shape)}.")
            if reads_pooled and pooled is None:
                raise ValueError(f"`{name}` needs `{pooled_name}` too: the velocity model reads a pooled embedding.")
            if pooled is not None:
                check_tensor(pooled, pooled_name)
                if pooled.shape != (embeds.shape[0], pooled_width or pooled.shape[-1]):
                    raise ValueError(
                        f"`{pooled_name}` must have shape ({embeds.shape[0]}, {pooled_width}) (the batch size of "
                        f"`{name}`), but got {tuple(pooled.shape)}."
                    )
        num_prompts = len(as_prompt_list(prompt)) if prompt is not None else prompt_embeds.shape[0]
        if negative_prompt is not None:
            num_negative = len(as_prompt_list(negative_prompt, "negative_prompt"))
            if num_negative not in (1, num_prompts):
                raise ValueError(
                    f"`negative_prompt` has {num_negative} prompts, but there are {num_prompts} prompts: pass one "
                    f"negative prompt or {num_prompts}."
                )
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != num_prompts:
            raise ValueError(
                f"`negative_prompt_embeds` has batch size {negative_prompt_embeds.shape[0]}, but there are "
                f"{num_prompts} prompts."
            )
        return num_prompts

    # ---------------------------------------------------------------------------------------------------- sampling
    def text_inputs(self, text: VRFMPromptEmbeddings, device=None) -> dict[str, torch.Tensor]:
        """The velocity model's text inputs (`encoder_hidden_states`, and `pooled_projections` when it reads them)
        from prompt embeddings, on `device` in the model's dtype: the `conditioning` of
        [`~VRFMPipeline.guided_velocity`]."""
        inputs = {"encoder_hidden_states": text.prompt_embeds}
        if self.velocity_model.pooled_projection_dim is not None:
            inputs["pooled_projections"] = text.pooled_prompt_embeds
        return {name: value.to(device=device, dtype=self.velocity_model.dtype) for name, value in inputs.items()}

    def sample_shape_for(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        """The model-space shape of one image of `height` x `width` pixels (the model's default when unset)."""
        channels, default_height, default_width = self.velocity_model.sample_shape
        factor = self.vae_scale_factor
        shape = [channels]
        for name, value, default in (("height", height, default_height), ("width", width, default_width)):
            if value is None:
                shape.append(default)
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor:
                raise ValueError(
                    f"`{name}` must be a positive multiple of the VAE's scale factor ({factor}), but got {value!r}."
                )
            shape.append(value // factor)
        return tuple(shape)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 7.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        z: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        timesteps: list[float] | None = None,
        max_sequence_length: int = 256,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        reencode_z_at: float | None = None,
    ) -> VRFMPipelineOutput | tuple:
        """Generates `num_images_per_prompt` images for each prompt.

        Sampling runs through the same loop as [`VRFMPipeline`], so every scheduler it takes works here too
        (`pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)`, DPM-Solver++ or
        UniPC with flow sigmas), as do `callback_on_step_end`, `pipe.interrupt`, `pipe.num_timesteps` and
        `pipe.guidance_scale`.

        Args:
            prompt (`str` or `list[str]`): the prompts; or pass `prompt_embeds` (and `pooled_prompt_embeds`).
            negative_prompt (`str` or `list[str]`, *optional*): what guidance steers away from; `""` when unset.
            height, width (`int`, *optional*): the image size in pixels; the model's `sample_size` by default.
            num_inference_steps (`int`, *optional*, defaults to 28): solver steps on the scheduler's default grid;
                ignored by adaptive solvers. 28 (the default of diffusers' text-to-image pipelines) applies only when
                neither `num_inference_steps` nor `timesteps` is passed; passing both is refused.
            guidance_scale (`float`, defaults to 7.0): classifier-free guidance on the text; 1 turns it off.
            num_images_per_prompt (`int`, defaults to 1): images (trajectories, each with its own ``z``) per prompt.
            generator (`torch.Generator` or a list of one per image, *optional*): makes the draws reproducible.
            z (`torch.Tensor` of shape `(num_images, latent_dim)`, *optional*): latents instead of drawing them.
            latents (`torch.Tensor` of shape `(num_images, C, h, w)`, *optional*): the source noise ``x0``.
            prompt_embeds, pooled_prompt_embeds (`torch.Tensor`, *optional*): precomputed text embeddings (one row
                per prompt), for example from [`VRFMTextEncoders`].
            negative_prompt_embeds, negative_pooled_prompt_embeds (`torch.Tensor`, *optional*): the same for the
                negative prompts.
            timesteps (`list[float]`, *optional*): a custom time grid in this package's clock (0 = noise, 1 = data;
                see [`VRFMScheduler.set_timesteps`]); a diffusers scheduler receives it as `sigmas = 1 - t`.
            max_sequence_length (`int`, defaults to 256): the number of T5 tokens (with a T5 encoder).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): return a [`VRFMPipelineOutput`] rather than `(images, z)`.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called
                after every scheduler step as `callback_on_step_end(pipe, step_index, t, callback_kwargs)`, `t` in
                this package's clock; a returned `"latents"` replaces the current state. Set `pipe._interrupt = True`
                in it to skip the remaining steps. Fixed-step schedulers only.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): the tensors in
                `callback_kwargs`; see `pipe._callback_tensor_inputs`.
            reencode_z_at (`float` in `[0, 1]`, *optional*): at the first model evaluation at or after this time,
                replace each image's `z` by the posterior mean for the end point that (guided) evaluation predicts,
                as in [`VRFMPipeline`]. Needs the `posterior_encoder` and a fixed-step scheduler. Defaults to the
                pipeline's `config.reencode_z_at` (`None`: off); `1` turns it off.
        """
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int):
            raise TypeError(f"`num_images_per_prompt` must be an int, but got {num_images_per_prompt!r}.")
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, but got {num_images_per_prompt}.")
        num_prompts = self.check_prompt_inputs(
            prompt, negative_prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
            negative_pooled_prompt_embeds,
        )  # fmt: skip
        batch_size = num_prompts * num_images_per_prompt
        guidance_scale = self._check_call_arguments(batch_size, output_type, guidance_scale, generator)
        shape = self.sample_shape_for(height, width)
        device = self._execution_device
        adapter, tensor_inputs = self._prepare_integration(
            num_inference_steps, timesteps, guidance_scale, callback_on_step_end, callback_on_step_end_tensor_inputs,
            device,
        )  # fmt: skip
        reencode_index = self._reencode_index(adapter, reencode_z_at)
        positive, negative = self.encode_prompt(
            prompt, negative_prompt, guidance_scale != 1.0, prompt_embeds, pooled_prompt_embeds,
            negative_prompt_embeds, negative_pooled_prompt_embeds, max_sequence_length, device,
        )  # fmt: skip
        positive, negative = (
            None if text is None else text.repeat_each(num_images_per_prompt) for text in (positive, negative)
        )
        conditioning, unconditional = (
            None if text is None else self.text_inputs(text, device) for text in (positive, negative)
        )

        dtype = self.velocity_model.dtype
        x = self.prepare_latents(batch_size, generator, device, dtype, latents, sample_shape=shape)
        condition = positive.pooled_prompt_embeds  # the key of a conditional prior
        z = self.prepare_z(batch_size, generator, device, dtype, z, source=x, condition=condition)

        def velocity_given_z(sample, t, z_now):
            return self.guided_velocity(sample, t, z_now, conditioning, unconditional, guidance_scale)

        velocity_fn = self._velocity_fn(velocity_given_z, z, x, reencode_index)
        x, num_function_evals = self._integrate(velocity_fn, x, adapter, callback_on_step_end, tensor_inputs)
        return self._finish_call(x, z, num_function_evals, output_type, return_dict)

    # ------------------------------------------------------------------------------------------------- conversion
    @classmethod
    def from_stable_diffusion_3(
        cls,
        pipeline_or_path,
        latent_dim: int = 16,
        z_embed_hidden_dim: int | None = None,
        z_map_channels: int = 0,
        z_map_stride: int = 1,
        scheduler: FlowScheduler | None = None,
        posterior_encoder: PosteriorEncoder | None = None,
        prior: Prior | None = None,
        **load_kwargs,
    ) -> VRFMTextToImagePipeline:
        """A VRFM text-to-image pipeline from a stock `StableDiffusion3Pipeline` (an object, a folder or a Hub id).

        The transformer is wrapped by [`VRFMSD3Transformer2DModel.from_backbone`] (its ``z`` path starts at zero, so
        the converted pipeline samples what the stock one does until it is fine-tuned), with a ``z`` map of
        `z_map_channels` channels when that is positive; the VAE, text encoders and tokenizers are reused as they are.
        The scheduler defaults to a [`VRFMScheduler`] with the stock scheduler's `shift`. `load_kwargs` (e.g.
        `torch_dtype`, `text_encoder_3=None`) go to `StableDiffusion3Pipeline.from_pretrained` when a path is given.
        """
        from diffusers import StableDiffusion3Pipeline

        if isinstance(pipeline_or_path, (str, os.PathLike)):
            stock = StableDiffusion3Pipeline.from_pretrained(pipeline_or_path, **load_kwargs)
        elif isinstance(pipeline_or_path, StableDiffusion3Pipeline):
            if load_kwargs:
                raise ValueError(f"{sorted(load_kwargs)} only apply when loading from a path.")
            stock = pipeline_or_path
        else:
            raise TypeError(
                "`pipeline_or_path` must be a StableDiffusion3Pipeline, a folder or a Hub id, but got "
                f"{type(pipeline_or_path).__name__}."
            )
        if scheduler is None:
            scheduler = VRFMScheduler(
                shift=float(stock.scheduler.config.get("shift", 1.0)),
                num_train_timesteps=stock.scheduler.config.get("num_train_timesteps", 1000),
            )
        velocity_model = VRFMSD3Transformer2DModel.from_backbone(
            stock.transformer,
            latent_dim=latent_dim,
            z_embed_hidden_dim=z_embed_hidden_dim,
            z_map_channels=z_map_channels,
            z_map_stride=z_map_stride,
        )
        pipeline = cls(
            velocity_model=velocity_model,
            scheduler=scheduler,
            vae=stock.vae,
            text_encoder=stock.text_encoder,
            tokenizer=stock.tokenizer,
            text_encoder_2=stock.text_encoder_2,
            tokenizer_2=stock.tokenizer_2,
            text_encoder_3=stock.text_encoder_3,
            tokenizer_3=stock.tokenizer_3,
            posterior_encoder=posterior_encoder,
            prior=prior,
        )
        name = stock.config.get("_name_or_path")
        if name:
            pipeline.register_to_config(_base_model=name)
        return pipeline

    @classmethod
    def from_vrfm_adapter(
        cls,
        adapter: str | os.PathLike,
        base_model: str | os.PathLike | None = None,
        *,
        adapter_revision: str | None = None,
        **load_kwargs,
    ) -> VRFMTextToImagePipeline:
        """Loads the base pipeline and a VRFM LoRA adapter on top of it, in one call.

        Args:
            adapter (`str` or `os.PathLike`): an adapter folder written by [`~diffusers_vrfm.save_vrfm_adapter`], or
                the Hub id of a repository holding one (its configs and safetensors are fetched; nothing is run).
            base_model (`str` or `os.PathLike`, *optional*): the base pipeline, a folder or a Hub id; defaults to
                the one the adapter records (a stock SD3 pipeline, converted with the adapter's `latent_dim`, or a
                VRFM text-to-image pipeline).
            adapter_revision (`str`, *optional*): the revision of a Hub adapter (`load_kwargs["revision"]` is the
                base's).
            load_kwargs: go to the base's loader (e.g. `torch_dtype`). Those that say how to reach the Hub
                (`token`, `cache_dir`, `local_files_only`, `force_download`) apply to the adapter too.

        See [`diffusers_vrfm.lora`] for the folder format.
        """
        from ..lora import load_vrfm_adapter, read_vrfm_adapter_config, recorded_z_map, resolve_adapter_folder

        hub_kwargs = {
            name: load_kwargs[name]
            for name in ("token", "cache_dir", "local_files_only", "force_download")
            if name in load_kwargs
        }
        adapter_folder = resolve_adapter_folder(adapter, revision=adapter_revision, **hub_kwargs)
        record = read_vrfm_adapter_config(adapter_folder)
        base_model = base_model or record["base_model"]
        if base_model is None:
            raise ValueError("The adapter records no base pipeline: pass `base_model` (a folder or a Hub id).")
        if record["base_format"] == "stable_diffusion_3":
            pipeline = cls.from_stable_diffusion_3(
                base_model, latent_dim=record["latent_dim"], z_embed_hidden_dim=record["z_embed_hidden_dim"],
                **recorded_z_map(record), **load_kwargs,
            )  # fmt: skip
        else:
            pipeline = cls.from_pretrained(base_model, **load_kwargs)
        return load_vrfm_adapter(pipeline, adapter_folder)

    # ---------------------------------------------------------------------------------------------------- likelihood
    def log_likelihood(
        self,
        x: torch.Tensor,
        prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 256,
        **kwargs,
    ):
        """``log p(x | prompt)`` under this pipeline's velocity model, each example with its prompt: the velocity
        reads the prompt's text inputs along the whole path, and with a conditional prior the marginal over `z` draws
        from ``p(z | prompt)`` (keyed by the pooled embedding, as sampling does). Without guidance: it is the density
        of the conditional model, not of a guided sampler.

        `x` is in model space (with a VAE: its latents, on which bits per dimension are not computed unless asked
        for). `prompt` (or `prompt_embeds` and `pooled_prompt_embeds`) gives one prompt for every example or one per
        example; `""` gives the unconditional density. The other arguments are those of
        [`~diffusers_vrfm.likelihood.log_likelihood`] (`z`, `num_z_samples`, `divergence`, `num_inference_steps`,
        `generator`, `proposal`, ...). Returns a [`~diffusers_vrfm.likelihood.VRFMLikelihoodOutput`].
        """
        from ..likelihood import check_samples

        batch_size = check_samples(self.velocity_model, x)
        num_prompts = self.check_prompt_inputs(prompt, None, prompt_embeds, pooled_prompt_embeds, None, None)
        if num_prompts not in (1, batch_size):
            raise ValueError(
                f"Pass one prompt for all of `x` or one per example ({batch_size}), but got {num_prompts} prompts."
            )
        text, _ = self.encode_prompt(
            prompt, None, False, prompt_embeds, pooled_prompt_embeds, None, None, max_sequence_length, x.device
        )
        text = text.repeat_each(batch_size // num_prompts)
        if getattr(self.prior, "condition_dim", 0) > 0:
            kwargs.setdefault("prior_condition", text.pooled_prompt_embeds.to(x.device))
        return super().log_likelihood(x, model_kwargs=self.text_inputs(text, x.device), **kwargs)
