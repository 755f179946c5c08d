"""VRFMPipeline: sampling from a (variational) rectified-flow model, for vectors, pixels and VAE latents."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import (  # from the top level, as the safe loader resolves them (`hub.resolve_component_class`)
    AutoencoderKL,
    AutoencoderTiny,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from ..hub import (
    PIPELINE_CONFIG_ENTRIES,
    create_hub_repo,
    load_pipeline_components,
    resolve_pipeline_folder,
    upload_pipeline_folder,
    write_remote_code_files,
)
from ..models.flow_prior import VRFMFlowPrior
from ..models.latent_prior import VRFMAggregatePosteriorPrior, label_condition
from ..models.mlp import VRFMMLPModel
from ..models.posterior import VRFMPosteriorEncoder
from ..models.posterior_conv import VRFMConvPosteriorEncoder
from ..models.transformer_2d import VRFMDiTTransformer2DModel
from ..models.unet_2d import VRFMUNet2DConditionModel, VRFMUNet2DModel
from ..models.z_embedding import as_label_tensor, given_latent, given_tensor, skip_value_checks
from ..objective import check_generator, check_real, predicted_end_point, slerp
from ..schedulers.flow_scheduler_adapter import FlowSchedulerAdapter, check_flow_scheduler
from ..schedulers.scheduling_vrfm import VRFMScheduler

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pt", "np", "pil", "latent")

# The component types, as diffusers reads them from `__init__`'s hints: `from_pipe` carries a model over only when its
# class is named here.
VelocityModel = VRFMMLPModel | VRFMUNet2DModel | VRFMUNet2DConditionModel | VRFMDiTTransformer2DModel
PosteriorEncoder = VRFMPosteriorEncoder | VRFMConvPosteriorEncoder
Prior = VRFMAggregatePosteriorPrior | VRFMFlowPrior | VRFMPosteriorEncoder | VRFMConvPosteriorEncoder
FITTED_PRIORS = (VRFMAggregatePosteriorPrior, VRFMFlowPrior)  # fitted after training; they do not read x0
Autoencoder = AutoencoderKL | AutoencoderTiny
FlowScheduler = (
    VRFMScheduler
    | FlowMatchEulerDiscreteScheduler
    | FlowMatchHeunDiscreteScheduler
    | DPMSolverMultistepScheduler
    | UniPCMultistepScheduler
)


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


def resolve_dtype(dtype, torch_dtype):
    """The dtype to load in, from diffusers' two names for it (`dtype`, `torch_dtype`), refusing a conflict."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"`dtype` ({dtype}) and `torch_dtype` ({torch_dtype}) disagree; pass one of them.")
    chosen = dtype if dtype is not None else torch_dtype
    if chosen is not None and not isinstance(chosen, torch.dtype):
        raise TypeError(f"`dtype` must be a torch.dtype such as torch.float16, but got {chosen!r}.")
    return chosen


def check_device_map(device_map, low_cpu_mem_usage: bool) -> None:
    """Accepts a single device (every model is loaded onto it); diffusers' `"balanced"` split is not supported."""
    if device_map is None:
        return
    if not isinstance(device_map, str):
        raise TypeError(f"`device_map` must be a device name such as 'cpu' or 'cuda', but got {device_map!r}.")
    try:
        torch.device(device_map)
    except RuntimeError:
        raise ValueError(
            f"`device_map` must be a device name such as 'cpu' or 'cuda' (a VRFM pipeline is small enough to sit on "
            f"one device; 'balanced' is not supported), but got {device_map!r}."
        ) from None
    if not low_cpu_mem_usage:
        raise ValueError(f"`device_map={device_map!r}` needs `low_cpu_mem_usage=True`, as in diffusers.")


def batch_times(t: torch.Tensor | float, batch_size: int, device) -> torch.Tensor:
    """The scalar time `t` as a float32 tensor of shape `(batch_size,)` on `device`, one per trajectory."""
    return torch.as_tensor(t, device=device, dtype=torch.float32).reshape(()).expand(batch_size)


def check_weights_loaded(component, name: str) -> None:
    """Refuses a model component with weights left on the `meta` device, which is how diffusers' loader leaves the
    keys a weights file lacked (offload hooks from accelerate, which move weights in per call, are fine)."""
    if not isinstance(component, torch.nn.Module):
        return
    if any(hasattr(module, "_hf_hook") for module in component.modules()):
        return
    missing = [key for key, tensor in component.state_dict(keep_vars=True).items() if tensor.is_meta]
    if missing:
        raise ValueError(
            f"`{name}` ({type(component).__name__}) has weights that were never loaded (left on the meta device): "
            f"{missing}. Its weights file lacks these keys; a saved pipeline must load completely."
        )


class VRFMPipeline(DiffusionPipeline):
    """Generates samples by integrating ``dx/dt = v(x, t, z)`` from noise (``t = 0``) to data (``t = 1``).

    ``z ~ N(0, I)`` is drawn **once per trajectory** and held fixed along it. The posterior encoder is kept as a
    component so that a saved pipeline is everything needed to resume training; sampling uses it only to re-encode
    ``z`` along the way when asked to (`reencode_z_at`).

    Components:
        velocity_model ([`VRFMMLPModel`], [`VRFMUNet2DModel`], ...): predicts ``v(x_t, t, z, class_labels)``.
        scheduler ([`VRFMScheduler`]): the time grid and solver.
        posterior_encoder (*optional*): ``q(z | x0, x1, x_t, t)``, used for training, and to sample only with
            `reencode_z_at`.
        vae ([`~diffusers.AutoencoderKL`], *optional*): decodes latent-space samples to images.
        prior (*optional*): the distribution each trajectory draws its ``z`` from instead of ``N(0, I)``: a
            [`VRFMAggregatePosteriorPrior`] fitted to the trained posterior (the default of `train_vrfm.py`, which
            closes the prior hole), a [`VRFMFlowPrior`] fitted to the same posteriors, or a learned conditional prior
            ``p_psi(z | x0)`` (a posterior-encoder class with `posterior_inputs=("x0",)`, trained through
            ``KL(q || p_psi)``), drawn at the trajectory's source point.

    Other arguments:
        reencode_z_at (`float` in `[0, 1]`, *optional*): the default of `__call__`'s `reencode_z_at`, saved in
            `model_index.json` (`train_vrfm.py --reencode_z_at` sets it); needs the `posterior_encoder`. `None` (the
            default): no re-encoding unless a call asks for it.

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

    model_cpu_offload_seq = "prior->velocity_model->vae"
    _optional_components = ["posterior_encoder", "vae", "prior"]
    _exclude_from_cpu_offload = ["posterior_encoder"]  # small, and used to sample only with `reencode_z_at`
    _callback_tensor_inputs = ["latents"]
    default_num_inference_steps = 8  # when neither `num_inference_steps` nor `timesteps` is given
    _guidance_scale = 1.0
    _num_timesteps = None
    _interrupt = False

    def __init__(
        self,
        velocity_model: VelocityModel,
        scheduler: FlowScheduler,
        posterior_encoder: PosteriorEncoder | None = None,
        vae: Autoencoder | None = None,
        prior: Prior | None = None,
        reencode_z_at: float | None = None,
    ):
        super().__init__()
        check_flow_scheduler(scheduler)
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
            if not (conditional or isinstance(prior, FITTED_PRIORS)):
                raise ValueError(
                    "`prior` must be a VRFMAggregatePosteriorPrior, a VRFMFlowPrior or an encoder that reads only the "
                    "source point, "
                    f"`posterior_inputs=('x0',)`, but got {type(prior).__name__} with posterior_inputs "
                    f"{getattr(prior.config, 'posterior_inputs', None)!r}."
                )
            if prior.latent_dim != velocity_model.latent_dim:
                raise ValueError(
                    f"`prior.latent_dim` ({prior.latent_dim}) must equal `velocity_model.latent_dim` "
                    f"({velocity_model.latent_dim})."
                )
        components = dict(velocity_model=velocity_model, posterior_encoder=posterior_encoder, vae=vae, prior=prior)
        for name, component in components.items():
            check_weights_loaded(component, name)
        self.register_modules(scheduler=scheduler, **components)
        self.set_default_reencode_z_at(reencode_z_at)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True)

    def set_default_reencode_z_at(self, reencode_z_at: float | None) -> None:
        """Sets the `reencode_z_at` this pipeline's calls use unless they pass one (`None`: off), kept in its config
        and so in `model_index.json`; it needs the `posterior_encoder`."""
        if reencode_z_at is not None:
            reencode_z_at = check_real(reencode_z_at, "reencode_z_at", 0.0, 1.0)
            if self.posterior_encoder is None:
                raise ValueError(
                    f"`reencode_z_at={reencode_z_at}` re-encodes `z` with the posterior encoder; pass "
                    "`posterior_encoder` too, or leave `reencode_z_at` unset."
                )
        self.register_to_config(reencode_z_at=reencode_z_at)

    def __setattr__(self, name, value):
        if name == "scheduler":  # `pipe.scheduler = X.from_config(...)` is refused at once when X cannot integrate
            check_flow_scheduler(value)
        super().__setattr__(name, value)

    # ------------------------------------------------------------------------------------------------ call properties
    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale of the current (or last) call."""
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int | None:
        """Model evaluations per trajectory of the current (or last) call (`None` before the first call)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` from a `callback_on_step_end` to skip the remaining steps."""
        return self._interrupt

    # -------------------------------------------------------------------------------------------------------- helpers
    @property
    def is_image_model(self) -> bool:
        """Whether samples are images (a VAE is present, or the model's samples are `(C, H, W)`)."""
        return self.vae is not None or len(self.velocity_model.sample_shape) == 3

    def prepare_latents(self, batch_size, generator, device, dtype, latents=None, sample_shape=None):
        """Draws the source samples ``x0 ~ N(0, I)`` of shape `(batch_size, *sample_shape)` (or checks the given
        ones); `sample_shape` defaults to the velocity model's."""
        shape = (batch_size, *(sample_shape or self.velocity_model.sample_shape))
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return given_tensor(latents, "latents", shape, device, dtype, " (`batch_size`, *sample_shape)")

    def prepare_z(self, batch_size, generator, device, dtype, z=None, source=None, condition=None):
        """Draws one ``z`` per trajectory (or checks the given ones). `None` for plain rectified flow.

        ``z ~ N(0, I)``, or a draw from the pipeline's `prior` component when it has one (a learned prior reads
        `source`, the trajectory's starting point ``x0``; a conditional [`VRFMAggregatePosteriorPrior`] or
        [`VRFMFlowPrior`] reads `condition`, the class labels' or the prompt's key; an unconditional one takes only
        its batch size).
        """
        latent_dim = self.velocity_model.latent_dim
        if latent_dim == 0:
            if z is not None:
                raise ValueError("`z` was given, but the velocity model has `latent_dim=0` (plain rectified flow).")
            return None
        if z is None and self.prior is not None:
            kwargs = {"x0": source.to(device, self.prior.dtype), "generator": generator}
            if condition is not None and getattr(self.prior, "condition_dim", 0) > 0:
                kwargs["condition"] = condition.to(device)
            return self.prior(**kwargs).sample.to(dtype)
        if z is None:
            return randn_tensor((batch_size, latent_dim), generator=generator, device=device, dtype=dtype)
        return given_latent(z, batch_size, latent_dim, device, dtype)

    def velocity(self, sample, t, z=None, class_labels=None, guidance_scale: float = 1.0) -> torch.Tensor:
        """One velocity evaluation at scalar time `t`, with classifier-free guidance when `guidance_scale != 1`."""
        if class_labels is None or guidance_scale == 1.0:
            return self.guided_velocity(sample, t, z, {"class_labels": class_labels})
        null_labels = torch.full_like(class_labels, self.velocity_model.num_classes)
        return self.guided_velocity(
            sample, t, z, {"class_labels": class_labels}, {"class_labels": null_labels}, guidance_scale
        )

    def guided_velocity(
        self,
        sample: torch.Tensor,
        t: torch.Tensor | float,
        z: torch.Tensor | None,
        conditioning: dict[str, torch.Tensor | None],
        unconditional: dict[str, torch.Tensor] | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """The velocity at scalar time `t` given the model inputs `conditioning` (e.g. `class_labels`, or
        `encoder_hidden_states`); with `unconditional` inputs of the same names, classifier-free guidance
        ``v_u + g * (v_c - v_u)`` from one batched call in which each trajectory keeps its `z`."""
        batch_size = sample.shape[0]
        t_batch = batch_times(t, batch_size, sample.device)
        if unconditional is None:
            return self.velocity_model(sample, t_batch, z=z, **conditioning).sample
        inputs = {name: torch.cat([value, unconditional[name]]) for name, value in conditioning.items()}
        velocity = self.velocity_model(
            torch.cat([sample, sample]),
            torch.cat([t_batch, t_batch]),
            z=None if z is None else torch.cat([z, z]),
            **inputs,
        ).sample
        conditional_velocity, unconditional_velocity = velocity.chunk(2)
        return unconditional_velocity + guidance_scale * (conditional_velocity - unconditional_velocity)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Maps model-space samples to data space: through the VAE (undoing its scaling) when there is one."""
        if self.vae is None:
            return samples
        scaling = getattr(self.vae.config, "scaling_factor", 1.0)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = samples.to(self.vae.dtype) / scaling + shift
        return self.vae.decode(latents).sample

    def reencode_z(
        self, sample: torch.Tensor, t: torch.Tensor | float, velocity: torch.Tensor, source: torch.Tensor
    ) -> torch.Tensor:
        """The posterior mean of ``q(z | x0, x1_hat, x_t, t)``, where ``x1_hat = x_t + (1 - t) v`` is the end point
        one Euler step predicts from the state `sample` at scalar time `t` ([`predicted_end_point`]) and `source` is
        the trajectory's starting point ``x0``: a `z` the posterior would give the image the trajectory is heading
        for. Returned on `sample`'s device, in the velocity model's dtype. See `reencode_z_at` in `__call__`."""
        encoder = self.posterior_encoder
        device, dtype = encoder.device, encoder.dtype  # a CPU-offloaded pipeline keeps the (small) encoder on the CPU
        t_batch = batch_times(t, sample.shape[0], device)
        x_t = sample.to(device, dtype)
        end = predicted_end_point(x_t, t_batch, velocity.to(device, dtype))
        no_noise = torch.zeros(sample.shape[0], encoder.latent_dim, device=device, dtype=dtype)  # the mean only
        posterior = encoder(x0=source.to(device, dtype), x1=end, x_t=x_t, t=t_batch, noise=no_noise)
        return posterior.mean.to(sample.device, self.velocity_model.dtype)

    def _velocity_fn(self, velocity_given_z, z, source, reencode_index: int | None):
        """The `velocity_fn(sample, t)` that `_integrate` calls: `velocity_given_z(sample, t, z)` with each
        trajectory's `z`, which [`reencode_z`] replaces once, after the evaluation numbered `reencode_index`
        (`source` is the trajectories' ``x0``); `None` keeps the drawn `z` throughout."""
        current_z, evaluations = z, itertools.count()

        def velocity_fn(sample, t):
            nonlocal current_z
            velocity = velocity_given_z(sample, t, current_z)
            if reencode_index is not None and next(evaluations) == reencode_index:
                current_z = self.reencode_z(sample, t, velocity, source)
            return velocity

        return velocity_fn

    def _reencode_index(self, adapter, reencode_z_at: float | None) -> int | None:
        """Checks `reencode_z_at` (`None`: the pipeline's config) against this pipeline and the schedule (set by
        `_prepare_integration`); returns the index of the first model evaluation at a time at or after it (`None`:
        off, or no such evaluation). The config's default is skipped where an adaptive solver picks the times."""
        if reencode_z_at is None:
            reencode_z_at = self.config.get("reencode_z_at")
            if reencode_z_at is None or adapter.is_adaptive:
                return None
        reencode_z_at = check_real(reencode_z_at, "reencode_z_at", 0.0, 1.0)
        if reencode_z_at == 1.0:  # no evaluation lies at t = 1: off
            return None
        if self.velocity_model.latent_dim == 0 or self.posterior_encoder is None:
            raise ValueError(
                f"`reencode_z_at={reencode_z_at}` re-encodes `z` with the posterior encoder, but this pipeline has "
                + ("no `z` (`latent_dim=0`)." if self.velocity_model.latent_dim == 0 else "no `posterior_encoder`.")
            )
        if adapter.is_adaptive:
            raise ValueError(
                f"`reencode_z_at={reencode_z_at}` needs a fixed-step scheduler; the adaptive solver "
                f"{adapter.scheduler.config.solver!r} picks its own times."
            )
        index = int((adapter.times < reencode_z_at).sum())  # one read of the (small) grid, before the first step
        return index if index < len(adapter.times) else None

    @staticmethod
    def _infer_batch_size(batch_size, class_labels, latents, z) -> int:
        """`batch_size` when given, else the length of `class_labels`, `latents` or a batch of `z` (in that order),
        else 1; as diffusers' pipelines infer it from their prompts."""
        if batch_size is not None:
            return batch_size
        if isinstance(class_labels, (list, tuple)) or getattr(class_labels, "ndim", 0) >= 1:
            return len(class_labels)
        for tensor, batched_ndim in ((latents, 1), (z, 2)):
            if isinstance(tensor, torch.Tensor) and tensor.ndim >= batched_ndim:
                return tensor.shape[0]
        return 1

    def _resolve_num_inference_steps(self, adapter, num_inference_steps, timesteps) -> int | None:
        """The number of solver steps: `num_inference_steps`, else `default_num_inference_steps` when no `timesteps`
        grid is given. Refuses `timesteps` together with `num_inference_steps` (the contract of diffusers'
        `retrieve_timesteps`: a custom schedule sets the number of steps itself) or an adaptive solver."""
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError(
                    f"Pass either `num_inference_steps` ({num_inference_steps!r}) or `timesteps`, not both: the "
                    "custom `timesteps` grid sets the number of steps itself."
                )
            if adapter.is_adaptive:
                raise ValueError(
                    "`timesteps` sets a fixed grid, but the scheduler's solver "
                    f"{adapter.scheduler.config.solver!r} is adaptive; drop `timesteps` or use a scheduler with "
                    "solver='euler', 'heun' or 'midpoint'."
                )
            return None
        if num_inference_steps is None:
            return self.default_num_inference_steps
        if not adapter.is_adaptive:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
                raise TypeError(f"`num_inference_steps` must be an int, but got {num_inference_steps!r}.")
            if num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be >= 1, but got {num_inference_steps}.")
        return num_inference_steps

    def _check_call_arguments(self, batch_size, output_type, guidance_scale, generator) -> float:
        """Checks the arguments every VRFM pipeline call shares; returns `guidance_scale` as a float."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, but got {batch_size!r}.")
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, but got {output_type!r}.")
        if output_type == "pil" and not self.is_image_model:
            raise ValueError(
                "`output_type='pil'` needs an image model; this pipeline makes vectors: use 'pt' or 'np'."
            )
        check_generator(generator, batch_size=batch_size)
        return check_real(guidance_scale, "guidance_scale")  # a float: an int beyond int64 would not multiply

    def _prepare_integration(
        self, num_inference_steps, timesteps, guidance_scale, callback, callback_tensor_inputs, device
    ) -> tuple[FlowSchedulerAdapter, list[str]]:
        """Starts a call: checks the step arguments and the callback, resets the call properties
        (`guidance_scale`, `interrupt`) and sets the schedule, all before anything is drawn. Returns the scheduler
        adapter and the tensor names the callback receives."""
        adapter = FlowSchedulerAdapter(self.scheduler)
        num_inference_steps = self._resolve_num_inference_steps(adapter, num_inference_steps, timesteps)
        tensor_inputs = self._check_callback(callback, callback_tensor_inputs, adapter)
        self._guidance_scale = guidance_scale
        self._interrupt = False
        if not adapter.is_adaptive:
            adapter.set_timesteps(num_inference_steps, timesteps=timesteps, device=device)
        return adapter, tensor_inputs

    def _integrate(self, velocity_fn, x, adapter, callback=None, tensor_inputs=()) -> tuple[torch.Tensor, int]:
        """Integrates ``dx/dt = velocity_fn(x, t)`` from `x` at ``t = 0`` to ``t = 1`` with the scheduler behind
        `adapter` (set by `_prepare_integration`), calling `callback` after each fixed step and honouring
        `interrupt`. Returns the end point and the velocity evaluations per trajectory (also `num_timesteps`);
        raises when the end point is not finite."""

        def evaluate(sample, t):  # the times come from a checked grid and the labels were checked once: checking
            with skip_value_checks():  # their values at every evaluation would make the host wait for the device
                return velocity_fn(sample, t)

        if adapter.is_adaptive:
            result = adapter.integrate_adaptive(evaluate, x)
            x, num_function_evals = result.prev_sample, result.num_function_evals
        else:
            num_function_evals = self._num_timesteps = adapter.num_function_evals
            for index, t in enumerate(self.progress_bar(adapter.times)):
                if self.interrupt:
                    continue
                x = adapter.step(evaluate(x, t), index, x)
                if callback is not None:
                    x = self._run_callback(callback, tensor_inputs, index, t, x)
        self._num_timesteps = num_function_evals
        if not torch.isfinite(x).all():
            raise ValueError(
                f"Sampling produced non-finite values (NaN or inf) in {x.dtype}, from finite `latents` and `z`: an "
                f"extreme input magnitude or `guidance_scale` ({self.guidance_scale}) overflowed, or the velocity "
                "model's weights are not finite."
            )
        return x, num_function_evals

    def _finish_call(self, x, z, num_function_evals, output_type, return_dict) -> VRFMPipelineOutput | tuple:
        """Decodes and post-processes the end points for `output_type`, frees offload hooks, and builds the output."""
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

    def _check_callback(self, callback, tensor_inputs, adapter) -> list[str]:
        """Checks `callback_on_step_end` and returns the tensor names it receives."""
        if callback is None:
            return []
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        elif not callable(callback):
            raise TypeError(f"`callback_on_step_end` must be callable, but got {type(callback).__name__}.")
        unknown = [name for name in tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, but got "
                f"{unknown}."
            )
        if adapter.is_adaptive:
            raise ValueError(
                "`callback_on_step_end` runs after each solver step, but the adaptive solver "
                f"{adapter.scheduler.config.solver!r} takes its steps inside torchdiffeq; use a fixed-step solver."
            )
        return list(tensor_inputs)

    def _run_callback(self, callback, tensor_inputs, index, t, latents) -> torch.Tensor:
        """Calls `callback_on_step_end(self, index, t, {"latents": ...})` and returns the latents it hands back."""
        outputs = callback(self, index, t, {"latents": latents} if "latents" in tensor_inputs else {})
        new_latents = (outputs or {}).get("latents", latents)
        if not isinstance(new_latents, torch.Tensor) or new_latents.shape != latents.shape:
            raise ValueError(
                f"`callback_on_step_end` must return `latents` as a tensor of shape {tuple(latents.shape)}, but got "
                f"{getattr(new_latents, 'shape', type(new_latents).__name__)}."
            )
        return new_latents.to(device=latents.device, dtype=latents.dtype)

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
        batch_size: int | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        z: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        class_labels: torch.Tensor | list[int] | int | None = None,
        guidance_scale: float = 1.0,
        timesteps: list[float] | None = None,
        output_type: str | None = None,
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        reencode_z_at: float | None = None,
    ) -> VRFMPipelineOutput | tuple:
        """Samples `batch_size` trajectories.

        Args:
            batch_size (`int`, *optional*): the number of samples; defaults to the length of `class_labels`,
                `latents` or a batch of `z` when one is given, else 1.
            num_inference_steps (`int`, *optional*, defaults to 8): solver steps (grid intervals) on the scheduler's
                default grid; ignored by adaptive solvers. Refused together with `timesteps`, which set the number of
                steps themselves (the contract of diffusers' `retrieve_timesteps`).
            generator (`torch.Generator` or a list of `batch_size` of them, *optional*): makes the draw of the source
                samples and of `z` reproducible; with a list, sample `i` depends on generator `i` only.
            z (`torch.Tensor` of shape `(batch_size, latent_dim)` or `(latent_dim,)`, *optional*): latents to use
                instead of drawing them. Each trajectory keeps its `z` from start to end, whatever the scheduler.
            latents (`torch.Tensor` of shape `(batch_size, *sample_shape)`, *optional*): source samples ``x0`` to use
                instead of drawing them.
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*): labels for a class-conditional model.
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance; 1 turns it off.
            timesteps (`list[float]`, *optional*): a custom time grid in this package's clock (0 = noise, 1 = data;
                see [`VRFMScheduler.set_timesteps`]); a diffusers scheduler receives it as `sigmas = 1 - t`. Refused
                with an adaptive solver, which picks its own times.
            output_type (`str`, *optional*): `"pt"`, `"np"`, `"pil"` or `"latent"`; defaults to `"pil"` for image
                models and `"pt"` otherwise.
            return_dict (`bool`, defaults to `True`): return a [`VRFMPipelineOutput`] rather than a tuple
                `(samples, z)`.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called
                after every scheduler step as `callback_on_step_end(pipe, step_index, t, callback_kwargs)`, with `t`
                in this package's clock; it may return a dict whose `"latents"` replace the current state. Set
                `pipe._interrupt = True` in it to skip the remaining steps. Fixed-step schedulers only.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): the tensors in
                `callback_kwargs`; see `pipe._callback_tensor_inputs`.
            reencode_z_at (`float` in `[0, 1]`, *optional*): at the first model evaluation at or after this time,
                replace each trajectory's `z` by the posterior mean for the end point that evaluation predicts
                ([`reencode_z`]), and keep that `z` to the end. The drawn `z` sets where the trajectory heads; the
                re-encoded one is a code the velocity model was trained on for that image, where a prior's draw may
                lie between the codes of training images. It costs one posterior-encoder call and no velocity
                evaluation, and changes no evaluation up to that one (so nothing with one step). Needs the
                `posterior_encoder` and a fixed-step scheduler; the output's `z` is the drawn one. Defaults to the
                pipeline's `config.reencode_z_at` (`None`: off), which adaptive solvers skip; `1` turns it off.

        Examples:

        ```py
        >>> import torch
        >>> from diffusers import FlowMatchEulerDiscreteScheduler
        >>> from diffusers_vrfm import VRFMMLPModel, VRFMPipeline, VRFMScheduler
        >>> pipe = VRFMPipeline(velocity_model=VRFMMLPModel(sample_size=2, latent_dim=4), scheduler=VRFMScheduler())
        >>> pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        >>> seen = []
        >>> def record(pipe, step_index, t, callback_kwargs):
        ...     seen.append(round(float(t), 3))
        ...     return callback_kwargs
        >>> out = pipe(batch_size=3, num_inference_steps=4, callback_on_step_end=record)
        >>> out.samples.shape, seen, pipe.num_timesteps
        (torch.Size([3, 2]), [0.0, 0.333, 0.666, 0.999], 4)
        ```
        """
        if output_type is None:
            output_type = "pil" if self.is_image_model else "pt"
        batch_size = self._infer_batch_size(batch_size, class_labels, latents, z)
        guidance_scale = self._check_call_arguments(batch_size, output_type, guidance_scale, generator)
        if guidance_scale != 1.0 and class_labels is None:
            raise ValueError(
                f"`guidance_scale={guidance_scale}` needs `class_labels`: classifier-free guidance contrasts the "
                "class-conditional velocity with the unconditional one."
            )
        device = self._execution_device
        adapter, tensor_inputs = self._prepare_integration(
            num_inference_steps, timesteps, guidance_scale, callback_on_step_end, callback_on_step_end_tensor_inputs,
            device,
        )  # fmt: skip
        reencode_index = self._reencode_index(adapter, reencode_z_at)
        dtype = self.velocity_model.dtype
        x = self.prepare_latents(batch_size, generator, device, dtype, latents)
        labels = self._prepare_class_labels(class_labels, batch_size, device)
        condition = None if labels is None else label_condition(labels, self.velocity_model.num_classes)
        z = self.prepare_z(batch_size, generator, device, dtype, z, source=x, condition=condition)
        velocity_fn = self._velocity_fn(
            lambda sample, t, z_now: self.velocity(sample, t, z_now, labels, guidance_scale), z, x, reencode_index
        )
        x, num_function_evals = self._integrate(velocity_fn, x, adapter, callback_on_step_end, tensor_inputs)
        return self._finish_call(x, z, num_function_evals, output_type, return_dict)

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
        """Saves the pipeline like [`~DiffusionPipeline.save_pretrained`] (every argument of it, `variant` included),
        then writes the one-line re-export files that let `DiffusionPipeline.from_pretrained(...,
        trust_remote_code=True)` load it from the Hub.

        `safe_serialization=False` writes pickle (`.bin`) weights, as in diffusers; loading them back needs
        `from_pretrained(..., allow_pickle=True)`.
        """
        push_to_hub = kwargs.pop("push_to_hub", False)
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
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
        *,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        device_map: str | None = None,
        low_cpu_mem_usage: bool = True,
        **components,
    ) -> VRFMPipeline:
        """Loads a pipeline from a local folder or a Hub repository, executing no file from it.

        Every class named in `model_index.json` must be one a VRFM pipeline uses; weights load from safetensors only
        unless you pass `allow_pickle=True` for `.bin` files you trust, and must match their classes exactly (a
        missing or unexpected key raises, naming the component). Components passed as keyword arguments (for example
        `scheduler=VRFMScheduler(solver="heun")`) replace the saved ones.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a local folder, or a Hub repository id.
            torch_dtype, dtype (`torch.dtype`, *optional*): the dtype to load models in (`dtype` is the name diffusers
                now prefers; pass one of the two).
            allow_pickle (`bool`, defaults to `False`): accept pickle (`.bin`) weights.
            revision, token, cache_dir, local_files_only, force_download: as in `huggingface_hub.snapshot_download`,
                for a Hub repository.
            variant (`str`, *optional*): load the `*.<variant>.safetensors` weights written by
                `save_pretrained(variant=...)`.
            use_safetensors (`bool`, *optional*): `True` requires safetensors; `False` loads `.bin` files (and needs
                `allow_pickle=True`); `None` prefers safetensors.
            device_map (`str`, *optional*): a device to load every model onto, e.g. `"cpu"` or `"cuda"`.
            low_cpu_mem_usage (`bool`, defaults to `True`): diffusers' low-memory loading.

        Example:

        ```py
        >>> import tempfile
        >>> import torch
        >>> from diffusers_vrfm import VRFMMLPModel, VRFMPipeline, VRFMScheduler
        >>> pipe = VRFMPipeline(velocity_model=VRFMMLPModel(sample_size=2), scheduler=VRFMScheduler())
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     pipe.save_pretrained(folder, variant="fp16")
        ...     reloaded = VRFMPipeline.from_pretrained(folder, variant="fp16", dtype=torch.float16)
        >>> type(reloaded.velocity_model).__name__, reloaded.velocity_model.dtype
        ('VRFMMLPModel', torch.float16)
        ```
        """
        torch_dtype = resolve_dtype(dtype, torch_dtype)
        check_device_map(device_map, low_cpu_mem_usage)
        folder = resolve_pipeline_folder(
            os.fspath(pretrained_model_name_or_path),
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
            allow_pickle=allow_pickle,
        )
        logger.info(f"Loading {cls.__name__} from {folder}.")
        loaded = load_pipeline_components(
            folder,
            torch_dtype=torch_dtype,
            allow_pickle=allow_pickle,
            variant=variant,
            use_safetensors=use_safetensors,
            device_map=device_map,
            low_cpu_mem_usage=low_cpu_mem_usage,
            pipeline_class=cls.__name__,
        )
        unknown = sorted(set(components) - set(loaded) - {*cls._optional_components, *PIPELINE_CONFIG_ENTRIES})
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

        if isinstance(self.prior, FITTED_PRIORS):  # the marginal over z uses the sampling prior
            kwargs.setdefault("prior", self.prior)
        if self.vae is not None:
            kwargs.setdefault("compute_bits_per_dim", False)
        return log_likelihood(self.velocity_model, x, **kwargs)
