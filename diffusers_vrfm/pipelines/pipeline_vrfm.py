"""VRFMPipeline: sampling from a (variational) rectified-flow model, for vectors, pixels and VAE latents."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..hub import create_hub_repo, load_pipeline_components, upload_pipeline_folder, write_remote_code_files
from ..models.latent_prior import VRFMAggregatePosteriorPrior
from ..models.z_embedding import as_label_tensor
from ..objective import check_real, check_tensor, slerp
from ..schedulers.scheduling_vrfm import VRFMScheduler

OUTPUT_TYPES = ("pt", "np", "pil", "latent")


@dataclass
class VRFMPipelineOutput(BaseOutput):
    """Output of [`VRFMPipeline`].

    Args:
        samples (`torch.Tensor`, `np.ndarray` or `list[PIL.Image.Image]`): the generated samples. Images come in
            `[0, 1]` (`"pt"`: `(B, C, H, W)`; `"np"`: `(B, H, W, C)`), vectors as they are, `"latent"` in model space.
        z (`torch.Tensor` of shape `(B, latent_dim)` or `None`): the latent each trajectory was drawn with.
        num_function_evals (`int`): velocity-model calls per trajectory (a guided call counts once).
    """

    samples: torch.Tensor | np.ndarray | list[PIL.Image.Image]
    z: torch.Tensor | None = None
    num_function_evals: int = 0

    @property
    def images(self):
        """Alias of `samples`, under the name diffusers' image pipelines use."""
        return self.samples


class VRFMPipeline(DiffusionPipeline):
    """Generates samples by integrating ``dx/dt = v(x, t, z)`` from noise (``t = 0``) to data (``t = 1``).

    ``z ~ N(0, I)`` is drawn **once per trajectory** and held fixed along it. The posterior encoder is not used to
    sample; it is kept as a component so that a saved pipeline is everything needed to resume training.

    Components:
        velocity_model ([`VRFMMLPModel`], [`VRFMUNet2DModel`], ...): predicts ``v(x_t, t, z, class_labels)``.
        scheduler ([`VRFMScheduler`]): the time grid and solver.
        posterior_encoder (*optional*): ``q(z | x0, x1, x_t, t)``, used for training only.
        vae ([`~diffusers.AutoencoderKL`], *optional*): decodes latent-space samples to images.
        prior (*optional*): the distribution each trajectory draws its ``z`` from instead of ``N(0, I)``: a
            [`VRFMAggregatePosteriorPrior`] fitted to the trained posterior (the default of `train_vrfm.py`, which
            closes the prior hole), or a learned conditional prior ``p_psi(z | x0)`` (a posterior-encoder class with
            `posterior_inputs=("x0",)`, trained through ``KL(q || p_psi)``), drawn at the trajectory's source point.

    Saved folders load with `VRFMPipeline.from_pretrained(folder)`, and with
    `DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` through one-line re-export files that
    [`~VRFMPipeline.save_pretrained`] writes every time.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import VRFMMLPModel, VRFMPipeline, VRFMScheduler
    >>> pipe = VRFMPipeline(velocity_model=VRFMMLPModel(sample_size=2, latent_dim=4), scheduler=VRFMScheduler())
    >>> out = pipe(batch_size=16, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    >>> out.samples.shape, out.z.shape, out.num_function_evals
    (torch.Size([16, 2]), torch.Size([16, 4]), 2)
    ```
    """

    model_cpu_offload_seq = "velocity_model->vae"
    _optional_components = ["posterior_encoder", "vae", "prior"]

    def __init__(
        self,
        velocity_model: ModelMixin,
        scheduler: VRFMScheduler,
        posterior_encoder: ModelMixin | None = None,
        vae: ModelMixin | None = None,
        prior: ModelMixin | None = None,
    ):
        super().__init__()
        if not isinstance(scheduler, VRFMScheduler):
            raise TypeError(f"`scheduler` must be a VRFMScheduler, but got {type(scheduler).__name__}.")
        for attribute in ("latent_dim", "sample_shape", "num_classes"):
            if not hasattr(velocity_model, attribute):
                raise TypeError(
                    f"`velocity_model` must be a VRFM velocity model exposing `{attribute}` (for example "
                    f"VRFMMLPModel or VRFMUNet2DModel), but got {type(velocity_model).__name__}."
                )
        if posterior_encoder is not None and posterior_encoder.latent_dim != velocity_model.latent_dim:
            raise ValueError(
                f"`posterior_encoder.latent_dim` ({posterior_encoder.latent_dim}) must equal "
                f"`velocity_model.latent_dim` ({velocity_model.latent_dim})."
            )
        if prior is not None:
            conditional = tuple(getattr(prior.config, "posterior_inputs", ())) == ("x0",)
            if not (conditional or isinstance(prior, VRFMAggregatePosteriorPrior)):
                raise ValueError(
                    "`prior` must be a VRFMAggregatePosteriorPrior or an encoder that reads only the source point, "
                    f"`posterior_inputs=('x0',)`, but got {type(prior).__name__} with posterior_inputs "
                    f"{getattr(prior.config, 'posterior_inputs', None)!r}."
                )
            if prior.latent_dim != velocity_model.latent_dim:
                raise ValueError(
                    f"`prior.latent_dim` ({prior.latent_dim}) must equal `velocity_model.latent_dim` "
                    f"({velocity_model.latent_dim})."
                )
        self.register_modules(
            velocity_model=velocity_model,
            scheduler=scheduler,
            posterior_encoder=posterior_encoder,
            vae=vae,
            prior=prior,
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True)

    # -------------------------------------------------------------------------------------------------------- helpers
    @property
    def is_image_model(self) -> bool:
        """Whether samples are images (a VAE is present, or the model's samples are `(C, H, W)`)."""
        return self.vae is not None or len(self.velocity_model.sample_shape) == 3

    def prepare_latents(self, batch_size, generator, device, dtype, latents=None):
        """Draws the source samples ``x0 ~ N(0, I)`` (or checks the given ones)."""
        shape = (batch_size, *self.velocity_model.sample_shape)
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"`latents` must be a torch.Tensor, but got {type(latents).__name__}.")
        if tuple(latents.shape) != shape:
            raise ValueError(
                f"`latents` must have shape {shape} (`batch_size`, *sample_shape), but got {tuple(latents.shape)}."
            )
        check_tensor(latents, "latents")  # floating point, not on the meta device; any other device is moved
        latents = latents.to(device=device, dtype=dtype)
        if not torch.isfinite(latents).all():
            raise ValueError(f"`latents` must be a finite floating-point tensor (in the model's dtype {dtype}).")
        return latents

    def prepare_z(self, batch_size, generator, device, dtype, z=None, source=None):
        """Draws one ``z`` per trajectory (or checks the given ones). `None` for plain rectified flow.

        ``z ~ N(0, I)``, or a draw from the pipeline's `prior` component when it has one (a conditional prior reads
        `source`, the trajectory's starting point ``x0``; an unconditional one takes only its batch size).
        """
        latent_dim = self.velocity_model.latent_dim
        if latent_dim == 0:
            if z is not None:
                raise ValueError("`z` was given, but the velocity model has `latent_dim=0` (plain rectified flow).")
            return None
        if z is None and self.prior is not None:
            return self.prior(x0=source.to(self.prior.dtype), generator=generator).sample.to(dtype)
        if z is None:
            return randn_tensor((batch_size, latent_dim), generator=generator, device=device, dtype=dtype)
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"`z` must be a torch.Tensor, but got {type(z).__name__}.")
        if z.ndim == 1:
            z = z.unsqueeze(0).expand(batch_size, -1)
        if tuple(z.shape) != (batch_size, latent_dim):
            raise ValueError(
                f"`z` must have shape ({batch_size}, {latent_dim}) (`batch_size`, latent_dim) or ({latent_dim},), but "
                f"got {tuple(z.shape)}."
            )
        check_tensor(z, "z")  # floating point, not on the meta device; any other device is moved
        z = z.to(device=device, dtype=dtype)
        if not torch.isfinite(z).all():
            raise ValueError(f"`z` must be a finite floating-point tensor (in the model's dtype {dtype}).")
        return z

    def velocity(self, sample, t, z=None, class_labels=None, guidance_scale: float = 1.0) -> torch.Tensor:
        """One velocity evaluation at scalar time `t`, with classifier-free guidance when `guidance_scale != 1`."""
        batch_size = sample.shape[0]
        t_batch = torch.as_tensor(t, device=sample.device, dtype=torch.float32).reshape(()).expand(batch_size)
        if class_labels is None or guidance_scale == 1.0:
            return self.velocity_model(sample, t_batch, z=z, class_labels=class_labels).sample
        null_labels = torch.full_like(class_labels, self.velocity_model.num_classes)
        velocity = self.velocity_model(
            torch.cat([sample, sample]),
            torch.cat([t_batch, t_batch]),
            z=None if z is None else torch.cat([z, z]),
            class_labels=torch.cat([class_labels, null_labels]),
        ).sample
        conditional, unconditional = velocity.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Maps model-space samples to data space: through the VAE (undoing its scaling) when there is one."""
        if self.vae is None:
            return samples
        scaling = getattr(self.vae.config, "scaling_factor", 1.0)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = samples.to(self.vae.dtype) / scaling + shift
        return self.vae.decode(latents).sample

    def _check_call_arguments(
        self, batch_size, num_inference_steps, output_type, guidance_scale, generator, class_labels
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, but got {batch_size!r}.")
        if not self.scheduler.is_adaptive:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
                raise TypeError(f"`num_inference_steps` must be an int, but got {num_inference_steps!r}.")
            if num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be >= 1, but got {num_inference_steps}.")
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, but got {output_type!r}.")
        if output_type == "pil" and not self.is_image_model:
            raise ValueError(
                "`output_type='pil'` needs an image model; this pipeline makes vectors: use 'pt' or 'np'."
            )
        check_real(guidance_scale, "guidance_scale")
        if guidance_scale != 1.0 and class_labels is None:
            raise ValueError(
                f"`guidance_scale={guidance_scale}` needs `class_labels`: classifier-free guidance contrasts the "
                "class-conditional velocity with the unconditional one."
            )
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(f"`generator` is a list of {len(generator)}, but `batch_size` is {batch_size}.")
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise TypeError("`generator` must be a torch.Generator or a list of them.")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"`generator` must be a torch.Generator or a list of them, but got {type(generator).__name__}."
            )

    def _prepare_class_labels(self, class_labels, batch_size, device):
        num_classes = self.velocity_model.num_classes
        if class_labels is None:
            return None
        if num_classes is None:
            raise ValueError(
                "`class_labels` were given, but the velocity model is unconditional (`num_classes=None`)."
            )
        labels = as_label_tensor(class_labels, device)
        if labels.ndim == 0:
            labels = labels.expand(batch_size)
        if labels.shape != (batch_size,):
            raise ValueError(f"`class_labels` must be {batch_size} (`batch_size`) integers, but got {class_labels!r}.")
        if (labels < 0).any() or (labels >= num_classes).any():
            raise ValueError(f"`class_labels` must lie in [0, {num_classes - 1}], but got {labels.tolist()}.")
        return labels.long()

    # ----------------------------------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 8,
        generator: torch.Generator | list[torch.Generator] | None = None,
        z: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        class_labels: torch.Tensor | list[int] | int | None = None,
        guidance_scale: float = 1.0,
        timesteps: list[float] | None = None,
        output_type: str | None = None,
        return_dict: bool = True,
    ) -> VRFMPipelineOutput | tuple:
        """Samples `batch_size` trajectories.

        Args:
            batch_size (`int`, defaults to 1): the number of samples.
            num_inference_steps (`int`, defaults to 8): solver steps (grid intervals); ignored by adaptive solvers.
            generator (`torch.Generator` or a list of `batch_size` of them, *optional*): makes the draw of the source
                samples and of `z` reproducible; with a list, sample `i` depends on generator `i` only.
            z (`torch.Tensor` of shape `(batch_size, latent_dim)` or `(latent_dim,)`, *optional*): latents to use
                instead of drawing them.
            latents (`torch.Tensor` of shape `(batch_size, *sample_shape)`, *optional*): source samples ``x0`` to use
                instead of drawing them.
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*): labels for a class-conditional model.
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance; 1 turns it off.
            timesteps (`list[float]`, *optional*): a custom time grid (see [`VRFMScheduler.set_timesteps`]); refused
                with an adaptive solver, which picks its own times.
            output_type (`str`, *optional*): `"pt"`, `"np"`, `"pil"` or `"latent"`; defaults to `"pil"` for image
                models and `"pt"` otherwise.
            return_dict (`bool`, defaults to `True`): return a [`VRFMPipelineOutput`] rather than a tuple
                `(samples, z)`.
        """
        if output_type is None:
            output_type = "pil" if self.is_image_model else "pt"
        if timesteps is not None:
            if self.scheduler.is_adaptive:
                raise ValueError(
                    f"`timesteps` sets a fixed grid, but the scheduler's solver {self.scheduler.config.solver!r} is "
                    "adaptive; drop `timesteps` or use a scheduler with solver='euler', 'heun' or 'midpoint'."
                )
            self.scheduler.set_timesteps(timesteps=timesteps)  # checks the grid before anything is drawn
            num_inference_steps = self.scheduler.num_inference_steps
        self._check_call_arguments(
            batch_size, num_inference_steps, output_type, guidance_scale, generator, class_labels
        )
        guidance_scale = float(guidance_scale)  # an int beyond int64 would not multiply a tensor
        device = self._execution_device
        dtype = self.velocity_model.dtype

        x = self.prepare_latents(batch_size, generator, device, dtype, latents)
        z = self.prepare_z(batch_size, generator, device, dtype, z, source=x)
        labels = self._prepare_class_labels(class_labels, batch_size, device)

        if self.scheduler.is_adaptive:
            result = self.scheduler.integrate_adaptive(
                lambda sample, t: self.velocity(sample, t, z, labels, guidance_scale), x
            )
            x, num_function_evals = result.prev_sample, result.num_function_evals
        else:
            if timesteps is not None:
                self.scheduler.set_timesteps(timesteps=timesteps, device=device)
            else:
                self.scheduler.set_timesteps(num_inference_steps, device=device)
            num_function_evals = self.scheduler.num_function_evals
            for t in self.progress_bar(self.scheduler.timesteps):
                velocity = self.velocity(x, t, z, labels, guidance_scale)
                x = self.scheduler.step(velocity, t, x).prev_sample
        if not torch.isfinite(x).all():
            raise ValueError(
                f"Sampling produced non-finite values (NaN or inf) in {x.dtype}, from finite `latents` and `z`: an "
                f"extreme input magnitude or `guidance_scale` ({guidance_scale}) overflowed, or the velocity model's "
                "weights are not finite."
            )

        if output_type == "latent":
            samples = x
        else:
            samples = self.decode(x)
            if self.is_image_model:
                samples = self.image_processor.postprocess(samples.float(), output_type=output_type)
            elif output_type == "np":
                samples = samples.float().cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (samples, z)
        return VRFMPipelineOutput(samples=samples, z=z, num_function_evals=num_function_evals)

    # --------------------------------------------------------------------------------------------------- z utilities
    @staticmethod
    def interpolate_z(z_start: torch.Tensor, z_end: torch.Tensor, num_points: int = 8) -> torch.Tensor:
        """`num_points` latents on the great circle from `z_start` to `z_end` (slerp): shape `(num_points, dim)`.

        Pass the result as `z` with the same `latents` repeated to see what `z` controls.
        """
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
            raise ValueError(f"`num_points` must be an integer >= 2, but got {num_points!r}.")
        return slerp(z_start.flatten(), z_end.flatten(), torch.linspace(0, 1, num_points))

    # ------------------------------------------------------------------------------------------------ saving, loading
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs):
        """Saves the pipeline like [`~DiffusionPipeline.save_pretrained`], then writes the one-line re-export files
        that let `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` load it from the Hub.

        Only safetensors are written: `safe_serialization=False` is refused.
        """
        if not safe_serialization:
            raise ValueError("`safe_serialization=False` is not supported: diffusers-vrfm writes safetensors only.")
        push_to_hub = kwargs.pop("push_to_hub", False)
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        write_remote_code_files(save_directory, self)
        if push_to_hub:
            repo_id = create_hub_repo(
                kwargs.get("repo_id", os.path.basename(os.path.normpath(save_directory))),
                token=kwargs.get("token"),
                private=kwargs.get("private"),
            )
            upload_pipeline_folder(
                save_directory,
                repo_id,
                token=kwargs.get("token"),
                commit_message=kwargs.get("commit_message", "Upload VRFMPipeline"),
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        allow_pickle: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
        **components,
    ) -> VRFMPipeline:
        """Loads a pipeline from a local folder or a Hub repository, executing no file from it.

        Every class named in `model_index.json` must be one a VRFM pipeline uses; weights load from safetensors only
        (pass `allow_pickle=True` to accept `.bin` files you trust). Components passed as keyword arguments (for
        example `scheduler=VRFMScheduler(solver="heun")`) replace the saved ones.

        Example:

        ```py
        >>> import tempfile
        >>> from diffusers_vrfm import VRFMMLPModel, VRFMPipeline, VRFMScheduler
        >>> pipe = VRFMPipeline(velocity_model=VRFMMLPModel(sample_size=2), scheduler=VRFMScheduler())
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     pipe.save_pretrained(folder)
        ...     reloaded = VRFMPipeline.from_pretrained(folder)
        >>> type(reloaded.velocity_model).__name__
        'VRFMMLPModel'
        ```
        """
        folder = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            patterns = ["*.json", "*.safetensors", "*.md", "*.txt", "*.model"] + (["*.bin"] if allow_pickle else [])
            folder = snapshot_download(
                folder, revision=revision, token=token, cache_dir=cache_dir, allow_patterns=patterns
            )
        loaded = load_pipeline_components(
            folder, torch_dtype=torch_dtype, allow_pickle=allow_pickle, pipeline_class=cls.__name__
        )
        unknown = sorted(set(components) - set(loaded) - set(cls._optional_components))
        if unknown:
            raise TypeError(f"`from_pretrained` got unexpected arguments {unknown}; components are {sorted(loaded)}.")
        loaded.update(components)
        pipeline = cls(**loaded)
        pipeline.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
        return pipeline

    # ---------------------------------------------------------------------------------------------------- likelihood
    def log_likelihood(self, x: torch.Tensor, **kwargs):
        """The log-likelihood of `x` under this pipeline's velocity model: a thin wrapper of
        [`diffusers_vrfm.likelihood.log_likelihood`] (see it for every argument: `z`, `num_z_samples`, `divergence`,
        `num_inference_steps`, `solver`, `generator`, `class_labels`, `enable_grad`, ...).

        `x` is in model space (for a pipeline with a VAE: its latents, on which bits per dimension are not computed
        unless asked for). Returns a [`~diffusers_vrfm.likelihood.VRFMLikelihoodOutput`].

        Example:

        ```py
        >>> import torch
        >>> from diffusers_vrfm import VRFMMLPModel, VRFMPipeline, VRFMScheduler
        >>> pipe = VRFMPipeline(velocity_model=VRFMMLPModel(sample_size=2, latent_dim=0), scheduler=VRFMScheduler())
        >>> pipe.log_likelihood(torch.zeros(3, 2), num_inference_steps=4).log_prob.shape
        torch.Size([3])
        ```
        """
        from ..likelihood import log_likelihood

        if isinstance(self.prior, VRFMAggregatePosteriorPrior):  # the marginal over z uses the sampling prior
            kwargs.setdefault("prior", self.prior)
        if self.vae is not None:
            kwargs.setdefault("compute_bits_per_dim", False)
        return log_likelihood(self.velocity_model, x, **kwargs)
