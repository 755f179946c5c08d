"""VRFMTextToImagePipeline: prompts to images with a text-conditioned (variational) rectified-flow model."""

from __future__ import annotations

import os

import torch
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor

from ..models.transformer_sd3 import VRFMSD3Transformer2DModel
from ..objective import check_generator, check_real, check_tensor
from ..schedulers.scheduling_vrfm import VRFMScheduler
from ..text_encoding import VRFMPromptEmbeddings, VRFMTextEncoders, as_prompt_list
from .pipeline_vrfm import OUTPUT_TYPES, VRFMPipeline, VRFMPipelineOutput


class VRFMTextToImagePipeline(VRFMPipeline):
    """Generates images from prompts by integrating ``dx/dt = v(x, t, z, text)`` from noise (``t = 0``) to data.

    ``z`` is drawn **once per trajectory** (from the `prior` component when there is one, else ``N(0, I)``) and held
    fixed along it. Classifier-free guidance contrasts the prompt with the negative prompt (`""` by default).
    Text is encoded by [`VRFMTextEncoders`] in SD3's layout, so a stock `StableDiffusion3Pipeline` converts with one
    call, [`~VRFMTextToImagePipeline.from_stable_diffusion_3`].

    Components:
        velocity_model ([`VRFMSD3Transformer2DModel`] or [`VRFMUNet2DConditionModel`]): the text-conditioned velocity.
        scheduler ([`VRFMScheduler`]): the time grid and solver.
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

    def __init__(
        self,
        velocity_model: ModelMixin,
        scheduler: VRFMScheduler,
        text_encoder,
        tokenizer,
        vae: ModelMixin | None = None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        posterior_encoder: ModelMixin | None = None,
        prior: ModelMixin | None = None,
    ):
        super().__init__(velocity_model, scheduler, posterior_encoder=posterior_encoder, vae=vae, prior=prior)
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
    def text_velocity(
        self,
        sample: torch.Tensor,
        t: torch.Tensor | float,
        z: torch.Tensor | None,
        text: VRFMPromptEmbeddings,
        negative_text: VRFMPromptEmbeddings | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """The velocity at time `t`, guided (``v_neg + g * (v_text - v_neg)``) when `negative_text` is given."""
        batch_size = sample.shape[0]
        t_batch = torch.as_tensor(t, device=sample.device, dtype=torch.float32).reshape(()).expand(batch_size)
        texts = [text] if negative_text is None else [text, negative_text]
        text_inputs = {"encoder_hidden_states": torch.cat([part.prompt_embeds for part in texts])}
        if self.velocity_model.pooled_projection_dim is not None:
            text_inputs["pooled_projections"] = torch.cat([part.pooled_prompt_embeds for part in texts])
        if negative_text is not None:
            sample, t_batch = torch.cat([sample, sample]), torch.cat([t_batch, t_batch])
            z = None if z is None else torch.cat([z, z])
        text_inputs = {name: value.to(self.velocity_model.dtype) for name, value in text_inputs.items()}
        velocity = self.velocity_model(sample, t_batch, z=z, **text_inputs).sample
        if negative_text is None:
            return velocity
        conditional, unconditional = velocity.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

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

    def _integrate(self, velocity_fn, x, num_inference_steps, timesteps, device) -> tuple[torch.Tensor, int]:
        """Integrates from `x` at ``t = 0`` to ``t = 1``; returns the end point and the function evaluations."""
        if self.scheduler.is_adaptive:
            result = self.scheduler.integrate_adaptive(velocity_fn, x)
            return result.prev_sample, result.num_function_evals
        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=timesteps, device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            x = self.scheduler.step(velocity_fn(x, t), t, x).prev_sample
        return x, self.scheduler.num_function_evals

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
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
    ) -> VRFMPipelineOutput | tuple:
        """Generates `num_images_per_prompt` images for each prompt.

        Args:
            prompt (`str` or `list[str]`): the prompts; or pass `prompt_embeds` (and `pooled_prompt_embeds`).
            negative_prompt (`str` or `list[str]`, *optional*): what guidance steers away from; `""` when unset.
            height, width (`int`, *optional*): the image size in pixels; the model's `sample_size` by default.
            num_inference_steps (`int`, defaults to 28): solver steps; ignored by adaptive solvers.
            guidance_scale (`float`, defaults to 7.0): classifier-free guidance on the text; 1 turns it off.
            num_images_per_prompt (`int`, defaults to 1): images (trajectories, each with its own ``z``) per prompt.
            generator (`torch.Generator` or a list of one per image, *optional*): makes the draws reproducible.
            z (`torch.Tensor` of shape `(num_images, latent_dim)`, *optional*): latents instead of drawing them.
            latents (`torch.Tensor` of shape `(num_images, C, h, w)`, *optional*): the source noise ``x0``.
            prompt_embeds, pooled_prompt_embeds (`torch.Tensor`, *optional*): precomputed text embeddings (one row
                per prompt), for example from [`VRFMTextEncoders`].
            negative_prompt_embeds, negative_pooled_prompt_embeds (`torch.Tensor`, *optional*): the same for the
                negative prompts.
            timesteps (`list[float]`, *optional*): a custom time grid in this package's clock (see
                [`VRFMScheduler.set_timesteps`]).
            max_sequence_length (`int`, defaults to 256): the number of T5 tokens (with a T5 encoder).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): return a [`VRFMPipelineOutput`] rather than `(images, z)`.
        """
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, but got {output_type!r}.")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int):
            raise TypeError(f"`num_images_per_prompt` must be an int, but got {num_images_per_prompt!r}.")
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, but got {num_images_per_prompt}.")
        guidance_scale = check_real(guidance_scale, "guidance_scale")
        shape = self.sample_shape_for(height, width)
        device = self._execution_device
        positive, negative = self.encode_prompt(
            prompt, negative_prompt, guidance_scale != 1.0, prompt_embeds, pooled_prompt_embeds,
            negative_prompt_embeds, negative_pooled_prompt_embeds, max_sequence_length, device,
        )  # fmt: skip
        positive = positive.repeat_each(num_images_per_prompt)
        negative = negative.repeat_each(num_images_per_prompt) if negative is not None else None
        batch_size = positive.prompt_embeds.shape[0]
        check_generator(generator, batch_size=batch_size)
        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=timesteps)  # checks the grid before anything is drawn
        elif not self.scheduler.is_adaptive:
            steps = num_inference_steps
            if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
                raise ValueError(f"`num_inference_steps` must be a positive integer, but got {steps!r}.")

        dtype = self.velocity_model.dtype
        x = self._prepare_source(batch_size, shape, generator, device, dtype, latents)
        z = self.prepare_z(batch_size, generator, device, dtype, z, source=x)
        positive, negative = (
            None if text is None else VRFMPromptEmbeddings(*(value.to(device) for value in text.to_tuple()))
            for text in (positive, negative)
        )

        def velocity_fn(sample, t):
            return self.text_velocity(sample, t, z, positive, negative, guidance_scale)

        x, num_function_evals = self._integrate(velocity_fn, x, num_inference_steps, timesteps, device)
        if not torch.isfinite(x).all():
            raise ValueError(
                f"Sampling produced non-finite values (NaN or inf) in {x.dtype}: an extreme `guidance_scale` "
                f"({guidance_scale}) or input overflowed, or the velocity model's weights are not finite."
            )
        images = x if output_type == "latent" else self.decode(x)
        if output_type != "latent":
            images = self.image_processor.postprocess(images.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, z)
        return VRFMPipelineOutput(samples=images, z=z, num_function_evals=num_function_evals)

    def _prepare_source(self, batch_size, shape, generator, device, dtype, latents=None) -> torch.Tensor:
        """Draws the source noise ``x0 ~ N(0, I)`` of shape `(batch_size, *shape)`, or checks the given one."""
        full_shape = (batch_size, *shape)
        if latents is None:
            return randn_tensor(full_shape, generator=generator, device=device, dtype=dtype)
        check_tensor(latents, "latents")
        if tuple(latents.shape) != full_shape:
            raise ValueError(
                f"`latents` must have shape {full_shape} (prompts x `num_images_per_prompt`, *sample shape), but got "
                f"{tuple(latents.shape)}."
            )
        return latents.to(device=device, dtype=dtype)

    # ------------------------------------------------------------------------------------------------- conversion
    @classmethod
    def from_stable_diffusion_3(
        cls,
        pipeline_or_path,
        latent_dim: int = 16,
        z_embed_hidden_dim: int | None = None,
        scheduler: VRFMScheduler | None = None,
        posterior_encoder: ModelMixin | None = None,
        prior: ModelMixin | None = None,
        **load_kwargs,
    ) -> VRFMTextToImagePipeline:
        """A VRFM text-to-image pipeline from a stock `StableDiffusion3Pipeline` (an object, a folder or a Hub id).

        The transformer is wrapped by [`VRFMSD3Transformer2DModel.from_backbone`] (its ``z`` path starts at zero, so
        the converted pipeline samples what the stock one does until it is fine-tuned); the VAE, text encoders and
        tokenizers are reused as they are. The scheduler defaults to a [`VRFMScheduler`] with the stock scheduler's
        `shift`. `load_kwargs` (e.g. `torch_dtype`, `text_encoder_3=None`) go to
        `StableDiffusion3Pipeline.from_pretrained` when a path is given.
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
            stock.transformer, latent_dim=latent_dim, z_embed_hidden_dim=z_embed_hidden_dim
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
        cls, adapter_folder: str | os.PathLike, base_model: str | os.PathLike | None = None, **load_kwargs
    ) -> VRFMTextToImagePipeline:
        """Loads the base pipeline and a VRFM LoRA adapter folder on top of it, in one call.

        The base is the one the adapter records (a stock SD3 pipeline, converted with the adapter's `latent_dim`, or
        a VRFM text-to-image pipeline folder) unless `base_model` names another. `load_kwargs` (e.g.
        `torch_dtype`) go to the base's loader. See [`diffusers_vrfm.lora`] for the folder format.
        """
        from ..lora import load_vrfm_adapter, read_vrfm_adapter_config

        record = read_vrfm_adapter_config(adapter_folder)
        base_model = base_model or record["base_model"]
        if base_model is None:
            raise ValueError("The adapter records no base pipeline: pass `base_model` (a folder or a Hub id).")
        if record["base_format"] == "stable_diffusion_3":
            pipeline = cls.from_stable_diffusion_3(
                base_model, latent_dim=record["latent_dim"], z_embed_hidden_dim=record["z_embed_hidden_dim"],
                **load_kwargs,
            )  # fmt: skip
        else:
            pipeline = cls.from_pretrained(base_model, **load_kwargs)
        return load_vrfm_adapter(pipeline, adapter_folder)

    # ---------------------------------------------------------------------------------------------------- not here
    def log_likelihood(self, x: torch.Tensor, **kwargs):
        """Not available for text-conditioned pipelines yet: the likelihood would need the text."""
        raise NotImplementedError("`log_likelihood` does not take text yet; call it on an unconditional VRFMPipeline.")
