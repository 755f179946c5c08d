"""One VRFM training step, separated from the accelerate loop so that it can be tested on its own.

The math comes from [`diffusers_vrfm.objective`]: [`interpolate`], [`target_velocity`], [`vrfm_loss`] and
[`dropout_mask`]; training times come from [`VRFMScheduler.sample_training_timesteps`]. This module only decides
*which* random numbers each example gets (see [`draw_step_randomness`]) and calls the models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..objective import (
    ACTIVE_UNIT_THRESHOLD,
    VRFMLossOutput,
    dropout_mask,
    interpolate,
    target_velocity,
    vrfm_loss,
)
from .determinism import make_generator


def beta_at_step(beta: float, global_step: int, warmup_steps: int = 0) -> float:
    """The KL weight at an optimisation step: a linear ramp from 0 to `beta` over `warmup_steps`, then `beta`.

    Example:

    ```py
    >>> from diffusers_vrfm.training.step import beta_at_step
    >>> [beta_at_step(0.1, step, warmup_steps=4) for step in (0, 2, 4, 10)]
    [0.0, 0.05, 0.1, 0.1]
    ```
    """
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"`beta` must be a finite number >= 0, but got {beta!r}.")
    if warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be >= 0, but got {warmup_steps!r}.")
    if warmup_steps == 0 or global_step >= warmup_steps:
        return float(beta)
    return float(beta) * max(global_step, 0) / warmup_steps


@dataclass
class StepRandomness:
    """The random inputs of one micro-step for the examples of this process, on the training device.

    Args:
        t (`torch.Tensor` of shape `(B,)`): training times.
        x0 (`torch.Tensor` of shape `(B, ...)`): source samples (noise), or `None` when the data supplies them.
        label_drop (`torch.Tensor` of shape `(B,)`, bool, *optional*): which labels to replace by the null label.
        caption_drop (`torch.Tensor` of shape `(B,)`, bool, *optional*): which captions to replace by the empty one.
        posterior_noise (`torch.Tensor` of shape `(B, latent_dim)`, *optional*): the standard-normal draw of the
            posterior's reparameterised `z`.
        prior_noise (`torch.Tensor` of shape `(B, latent_dim)`, *optional*): the standard-normal draw of the prior's
            `z` (a learned prior's, or `N(0, I)` itself); only drawn with `prior_mix > 0` or a learned prior.
        prior_mask (`torch.Tensor` of shape `(B,)`, bool, *optional*): which examples take their `z` from the prior
            instead of the posterior (`--prior_mix`); `None` when `prior_mix` is 0.
    """

    t: torch.Tensor
    x0: torch.Tensor | None
    label_drop: torch.Tensor | None
    posterior_noise: torch.Tensor | None
    prior_noise: torch.Tensor | None = None
    prior_mask: torch.Tensor | None = None
    caption_drop: torch.Tensor | None = None


def draw_step_randomness(
    scheduler,
    seed: int,
    micro_step: int,
    global_batch_size: int,
    rows: slice,
    sample_shape: tuple[int, ...] | None,
    label_dropout: float = 0.0,
    num_classes: int | None = None,
    caption_dropout: float = 0.0,
    latent_dim: int = 0,
    prior_mix: float = 0.0,
    learned_prior: bool = False,
    device: str | torch.device = "cpu",
) -> StepRandomness:
    """Draws the randomness of micro-step `micro_step` for the whole global batch on `device`, then keeps this
    process's `rows`.

    Each purpose has one generator for the whole global batch, seeded with `derive_seed(seed, purpose, micro_step)`:
    `"times"` for `t`, `"noise"` for `x0`, `"label_dropout"`, `"caption_dropout"`, `"posterior"` for the posterior's
    draw of `z` and `"prior"` for the prior's draw and the `--prior_mix` mask. Every process draws the same global
    numbers, so a run on `N` processes uses the numbers of a 1-process run with the same global batch, and a resumed
    run those of an uninterrupted one (on the same device type: CPU and CUDA generators give different streams). No
    per-example generator is made.

    Args:
        scheduler ([`VRFMScheduler`]): draws `t` from its configured `timestep_density`.
        seed (`int`), micro_step (`int`): the run's seed and the micro-step counter.
        global_batch_size (`int`): examples per micro-step over all processes.
        rows (`slice`): the rows of the global batch that belong to this process.
        sample_shape (`tuple[int, ...]`, *optional*): the shape of one example; `None` when the data supplies `x0`.
        label_dropout (`float`): the probability of replacing a label by the null label.
        num_classes (`int`, *optional*): the number of classes (the null label); `None` when unconditional.
        caption_dropout (`float`): the probability of replacing a caption by the empty one (text-to-image runs).
        latent_dim (`int`): the dimension of `z`; 0 means no posterior draws.
        prior_mix (`float`): the probability that an example takes its `z` from the prior (issue 6); 0 draws nothing
            more.
        learned_prior (`bool`): whether a learned prior `p_psi(z | x0)` is trained (it then needs its noise even when
            `prior_mix` is 0, for its reparameterised draw).
        device (`str` or `torch.device`): where the generators live and the numbers are drawn.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import VRFMScheduler
    >>> from diffusers_vrfm.training.step import draw_step_randomness
    >>> full = draw_step_randomness(VRFMScheduler(), 0, 3, 8, slice(0, 8), (2,), latent_dim=4)
    >>> mine = draw_step_randomness(VRFMScheduler(), 0, 3, 8, slice(4, 8), (2,), latent_dim=4)
    >>> torch.equal(mine.posterior_noise, full.posterior_noise[4:]), mine.x0.shape
    (True, torch.Size([4, 2]))
    ```
    """

    def generator(purpose: str) -> torch.Generator:
        return make_generator(seed, purpose, micro_step, device=device)

    def dropped(probability: float, purpose: str) -> torch.Tensor:
        return dropout_mask(global_batch_size, probability, generator(purpose), device)[rows]

    t = scheduler.sample_training_timesteps(global_batch_size, device=device, generator=generator("times"))[rows]
    x0 = None
    if sample_shape is not None:
        x0 = torch.randn((global_batch_size, *sample_shape), generator=generator("noise"), device=device)[rows]
    label_drop = dropped(label_dropout, "label_dropout") if num_classes is not None and label_dropout > 0 else None
    caption_drop = dropped(caption_dropout, "caption_dropout") if caption_dropout > 0 else None
    posterior_noise = prior_noise = prior_mask = None
    if latent_dim > 0:
        shape = (global_batch_size, latent_dim)
        posterior_noise = torch.randn(shape, generator=generator("posterior"), device=device)[rows]
        if prior_mix > 0 or learned_prior:
            prior_generator = generator("prior")
            prior_noise = torch.randn(shape, generator=prior_generator, device=device)[rows]
            if prior_mix > 0:
                uniform = torch.rand(global_batch_size, generator=prior_generator, device=device)
                prior_mask = (uniform < prior_mix)[rows]
    return StepRandomness(
        t=t,
        x0=x0,
        label_drop=label_drop,
        posterior_noise=posterior_noise,
        prior_noise=prior_noise,
        prior_mask=prior_mask,
        caption_drop=caption_drop,
    )


def fused_optimizer_supported(device: str | torch.device) -> bool:
    """Whether torch has fused Adam/AdamW kernels for `device`'s type (CUDA; CPU and others in recent torch)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # an old torch: CUDA only
        return torch.device(device).type == "cuda"
    return torch.device(device).type in _get_fused_kernels_supported_devices()


def optimizer_step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor, scaler_skips: bool = False) -> None:
    """Takes the optimiser step unless `skip` (a bool tensor, on the device) is true, leaving the weights and the
    optimiser's state (moments and step count) exactly as they were, without reading `skip` on the host when the
    optimiser can skip on the device.

    torch's fused Adam/AdamW (`fused=True`) read a `found_inf` tensor in their kernel and skip the whole update when
    it is 1; this is how `torch.amp.GradScaler` drives them, and it is used here the same way. Other optimisers cost
    one read of `skip` per update. With `scaler_skips` (fp16 through accelerate's `GradScaler`) the scaler finds the
    non-finite gradients itself, so the step is always taken.

    `optimizer` may be accelerate's wrapper (`AcceleratedOptimizer`) or a torch optimiser.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm.training.step import optimizer_step_unless
    >>> weight = torch.nn.Parameter(torch.ones(2))
    >>> optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    >>> weight.grad = torch.tensor([float("nan"), 1.0])
    >>> optimizer_step_unless(optimizer, torch.tensor(True))
    >>> weight.detach(), optimizer.state[weight]["step"]
    (tensor([1., 1.]), tensor(0.))
    ```
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    if scaler_skips:
        optimizer.step()
    elif getattr(inner, "_step_supports_amp_scaling", False) and all(g.get("fused") for g in inner.param_groups):
        inner.found_inf = skip.to(torch.float32)
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not bool(skip):
        optimizer.step()


@dataclass
class TrainingStepOutput:
    """What [`vrfm_training_loss`] returns: the loss parts and the posterior means (for active-unit counts)."""

    loss: VRFMLossOutput
    posterior_mean: torch.Tensor | None


def vrfm_training_loss(
    velocity_model,
    posterior_encoder,
    x0: torch.Tensor,
    x1: torch.Tensor,
    t: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    posterior_noise: torch.Tensor | None = None,
    beta: float = 1.0,
    reduction: str = "mean",
    free_bits: float = 0.0,
    prior_encoder=None,
    prior_noise: torch.Tensor | None = None,
    prior_mask: torch.Tensor | None = None,
    model_kwargs: dict | None = None,
) -> TrainingStepOutput:
    """The VRFM loss of one batch: path point, posterior draw of `z`, velocity prediction and the ELBO terms.

    With `posterior_encoder=None` this is plain rectified flow (the velocity model must have `latent_dim=0`).

    Prior-hole remedies (issue 6): a learned conditional prior `prior_encoder` (`posterior_inputs=("x0",)`) replaces
    `N(0, I)` in the KL, `KL(q(z | ...) || p_psi(z | x0))`, and is trained through it; `prior_mask` (bool, `(B,)`)
    marks the examples whose `z` is drawn from the prior (learned or `N(0, I)`, with `prior_noise`) instead of
    the posterior, so that the velocity net also learns on the latents inference feeds it.

    `posterior_noise` and `prior_noise` (`(B, latent_dim)`) are the standard-normal draws of the reparameterised `z`
    (see [`draw_step_randomness`]); left out, the encoders draw from the global generator.

    `model_kwargs` go to the velocity model as they are: the text of a text-conditioned model
    (`encoder_hidden_states`, `pooled_projections`).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import VRFMMLPModel, VRFMPosteriorEncoder
    >>> from diffusers_vrfm.training.step import vrfm_training_loss
    >>> model, encoder = VRFMMLPModel(sample_size=2, latent_dim=3), VRFMPosteriorEncoder(sample_size=2, latent_dim=3)
    >>> out = vrfm_training_loss(model, encoder, torch.randn(8, 2), torch.randn(8, 2), torch.rand(8), beta=0.1)
    >>> out.loss.kl_per_dim.shape, out.posterior_mean.shape
    (torch.Size([3]), torch.Size([8, 3]))
    ```
    """
    x_t = interpolate(x0, x1, t)
    target = target_velocity(x0, x1)
    mean = logvar = z = None
    if posterior_encoder is not None:
        # A tuple rather than the output dataclass: accelerate's mixed-precision wrapper rebuilds mapping outputs with
        # a single positional argument, which a dataclass with several required fields does not accept.
        mean, logvar, z, _ = posterior_encoder(x0=x0, x1=x1, x_t=x_t, t=t, noise=posterior_noise, return_dict=False)
    prior_mean = prior_logvar = None
    if posterior_encoder is not None and (prior_encoder is not None or prior_mask is not None):
        if prior_encoder is not None:
            prior_mean, prior_logvar, prior_z, _ = prior_encoder(x0=x0, noise=prior_noise, return_dict=False)
        else:  # N(0, I): the draw is the noise itself
            prior_z = prior_noise if prior_noise is not None else torch.randn_like(z)
        if prior_mask is not None:
            z = torch.where(prior_mask.to(z.device).reshape(-1, 1), prior_z.to(z.dtype), z)
    prediction = velocity_model(x_t, t, z=z, class_labels=class_labels, **(model_kwargs or {})).sample
    loss = vrfm_loss(
        prediction,
        target,
        posterior_mean=mean,
        posterior_logvar=logvar,
        beta=beta,
        reduction=reduction,
        free_bits=free_bits,
        prior_mean=prior_mean,
        prior_logvar=prior_logvar,
    )
    return TrainingStepOutput(loss=loss, posterior_mean=None if mean is None else mean.detach())


POSTERIOR_STATISTICS = ("active_units", "mu_mean_norm", "mu_var")


def posterior_mean_statistics(posterior_means: torch.Tensor) -> torch.Tensor:
    """Collapse and prior-hole diagnostics of one batch (issue 6), as a tensor on the means' device (nothing is read
    back): the values named by `POSTERIOR_STATISTICS`.

    - ``active_units``: dimensions whose mean varies over the batch with variance above `ACTIVE_UNIT_THRESHOLD`
      ([`count_active_units`]);
    - ``mu_mean_norm``: the norm of the batch mean of ``mu`` (0 when the aggregate posterior is centred like the
      prior);
    - ``mu_var``: the variance of ``mu`` over the batch averaged over latent dimensions (the aggregate posterior's
      variance is ``mu_var`` plus the mean posterior variance; far above 1 means a prior hole).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm.training.step import posterior_mean_statistics
    >>> posterior_mean_statistics(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    tensor([1., 2., 1.])
    ```
    """
    if not isinstance(posterior_means, torch.Tensor) or posterior_means.ndim != 2 or posterior_means.shape[0] < 2:
        shape = tuple(posterior_means.shape) if isinstance(posterior_means, torch.Tensor) else type(posterior_means)
        raise ValueError(f"`posterior_means` must be a tensor of shape (N >= 2, latent_dim), but got {shape}.")
    means = posterior_means.detach().float()
    variances = means.var(dim=0)
    active_units = (variances > ACTIVE_UNIT_THRESHOLD).sum().float()
    return torch.stack([active_units, means.mean(dim=0).norm(), variances.mean()])
