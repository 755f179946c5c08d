"""The VRFM objective as small, pure tensor functions.

Time convention (the only one used in this package)
---------------------------------------------------
``t`` lies in ``[0, 1]``. ``t = 0`` is the source (noise, ``x0 ~ N(0, I)``) and ``t = 1`` is data ``x1``:

    x_t = (1 - t) * x0 + t * x1,        v = dx_t / dt = x1 - x0.

diffusers' flow-matching schedulers run the opposite clock, ``sigma = 1 - t``, and their models predict
``noise - data = -v``. Use :func:`t_to_sigma`, :func:`sigma_to_t`, :func:`velocity_to_flow_match_output` and
:func:`flow_match_output_to_velocity` wherever the two meet; nothing else in the package converts clocks.

Reduction convention
--------------------
``reduction="sum"`` sums the squared error over data dimensions and the KL over latent dimensions, then averages over
the batch (the velocity ELBO per example). ``reduction="mean"`` divides that same quantity by the number of data
dimensions, so that it is on the scale of ``F.mse_loss``. Both reductions give ``beta`` the same meaning: with either,
the optimum is the same; only the overall scale of the loss (and so the effective learning rate) differs.

This module knows tensors only: it imports no model, scheduler or pipeline.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .options import LOSS_REDUCTIONS, TIMESTEP_DENSITIES, density_parameter_problem


def check_tensor(value, argument: str, floating: bool = True) -> torch.Tensor:
    """Refuses what is not a usable tensor, with a message that names `argument`: a non-tensor or (when `floating`)
    a tensor that is not floating-point raises `TypeError`; a tensor on the meta device, which holds no values,
    raises `ValueError`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{argument}` must be a torch.Tensor, but got {type(value).__name__}.")
    if floating and not value.is_floating_point():
        raise TypeError(f"`{argument}` must be a floating-point tensor, but got dtype {value.dtype}.")
    if value.is_meta:
        raise ValueError(f"`{argument}` must hold values, but got a tensor on the meta device.")
    return value


def check_integer(value, argument: str, minimum: int = 0) -> int:
    """Refuses what is not an integer (bools included) of at least `minimum`, with a message that names `argument`;
    returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{argument}` must be an integer >= {minimum}, but got {value!r}.")
    return value


def check_real(value, argument: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """Refuses what is not a finite real number (bools and strings included) or lies outside `[minimum, maximum]`,
    with a message that names `argument`; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{argument}` must be a real number, but got {type(value).__name__} {value!r}.")
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range, e.g. 10**400
        raise ValueError(
            f"`{argument}` must be finite, but got an integer of {int(value).bit_length()} bits, beyond the float "
            "range."
        ) from None
    if not math.isfinite(number):
        raise ValueError(f"`{argument}` must be finite, but got {value!r}.")
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        raise ValueError(f"`{argument}` must lie in [{low}, {high}], but got {value!r}.")
    return number


def check_generator(generator, argument: str = "generator", batch_size: int | None = None) -> None:
    """Refuses a `generator` that is neither `None`, a `torch.Generator` nor (when `batch_size` is given) a list of
    `batch_size` of them."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if batch_size is not None and isinstance(generator, list):
        if len(generator) != batch_size:
            raise ValueError(f"`{argument}` is a list of {len(generator)}, but the batch size is {batch_size}.")
        if all(isinstance(g, torch.Generator) for g in generator):
            return
    kinds = "a torch.Generator" + ("" if batch_size is None else " or a list of them")
    raise TypeError(f"`{argument}` must be None or {kinds}, but got {type(generator).__name__}.")


def _broadcast_time(t: torch.Tensor | float, like: torch.Tensor, like_name: str = "x0") -> torch.Tensor:
    """Reshapes per-example times ``(B,)`` (or a scalar) so that they broadcast against ``like`` ``(B, ...)``."""
    if isinstance(t, torch.Tensor):
        check_tensor(t, "t", floating=False)
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"`t` must be a real-valued tensor, but got dtype {t.dtype}.")
    else:
        t = check_real(t, "t")  # a float: an int beyond int64 would not convert
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or like.ndim == 0 or t.shape[0] != like.shape[0]:
        batch = f"({like.shape[0]},), the batch size of `{like_name}`" if like.ndim else f"(), as `{like_name}` is 0-d"
        raise ValueError(f"`t` must be a scalar or have shape {batch}, but got shape {tuple(t.shape)}.")
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The straight path ``x_t = (1 - t) * x0 + t * x1`` (``t = 0`` is noise, ``t = 1`` is data).

    Args:
        x0 (`torch.Tensor` of shape `(B, ...)`): source (noise) samples.
        x1 (`torch.Tensor` of shape `(B, ...)`): target (data) samples.
        t (`torch.Tensor` of shape `(B,)` or a scalar): times in `[0, 1]`.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import interpolate
    >>> interpolate(torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([0.25, 1.0]))[:, 0]
    tensor([0.2500, 1.0000])
    ```
    """
    check_tensor(x0, "x0")
    check_tensor(x1, "x1")
    if x0.shape != x1.shape:
        raise ValueError(f"`x0` and `x1` must have the same shape, but got {tuple(x0.shape)} and {tuple(x1.shape)}.")
    if x0.device != x1.device:
        raise ValueError(f"`x0` and `x1` must be on the same device, but got {x0.device} and {x1.device}.")
    t = _broadcast_time(t, x0)
    return (1 - t) * x0 + t * x1


def target_velocity(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The regression target of rectified flow, ``x1 - x0`` (the time derivative of :func:`interpolate`)."""
    if x0.shape != x1.shape:
        raise ValueError(f"`x0` and `x1` must have the same shape, but got {tuple(x0.shape)} and {tuple(x1.shape)}.")
    return x1 - x0


def predicted_end_point(x_t: torch.Tensor, t: torch.Tensor | float, velocity: torch.Tensor) -> torch.Tensor:
    """The data point ``x1_hat = x_t + (1 - t) * v`` that one Euler step from ``x_t`` to ``t = 1`` lands on: ``x1``
    itself when ``v`` is the straight path's velocity ``x1 - x0``.

    Args:
        x_t (`torch.Tensor` of shape `(B, ...)`): the state at time `t`.
        t (`torch.Tensor` of shape `(B,)` or a scalar): times in `[0, 1]`.
        velocity (`torch.Tensor` of shape `(B, ...)`): the velocity at ``(x_t, t)``.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import interpolate, predicted_end_point
    >>> x0, x1 = torch.zeros(1, 2), torch.tensor([[1.0, -2.0]])
    >>> predicted_end_point(interpolate(x0, x1, 0.25), 0.25, x1 - x0)
    tensor([[ 1., -2.]])
    ```
    """
    if x_t.shape != velocity.shape:
        raise ValueError(
            f"`x_t` and `velocity` must have the same shape, but got {tuple(x_t.shape)} and {tuple(velocity.shape)}."
        )
    return x_t + (1 - _broadcast_time(t, x_t, "x_t")) * velocity


def t_to_sigma(t: torch.Tensor | float) -> torch.Tensor | float:
    """Converts this package's time ``t`` (0 = noise) to diffusers' flow-matching ``sigma`` (1 = noise)."""
    return 1 - t


def sigma_to_t(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """Converts diffusers' flow-matching ``sigma`` (1 = noise) to this package's time ``t`` (0 = noise)."""
    return 1 - sigma


def velocity_to_flow_match_output(velocity: torch.Tensor) -> torch.Tensor:
    """Converts a velocity ``dx/dt`` (towards data) to a diffusers flow-matching model output, ``noise - data``."""
    return -velocity


def flow_match_output_to_velocity(model_output: torch.Tensor) -> torch.Tensor:
    """Converts a diffusers flow-matching model output (``noise - data``) to a velocity ``dx/dt`` towards data."""
    return -model_output


def check_timestep_density(
    density: str,
    logit_mean: float,
    logit_std: float,
    mode_scale: float,
    noise_end_fraction: float = 0.0,
    argument: str = "density",
) -> tuple[float, float, float, float]:
    """Refuses an unknown density or parameters it cannot use, naming the argument; returns the parameters as floats
    (an int beyond int64 would overflow inside diffusers)."""
    if not isinstance(density, str) or density not in TIMESTEP_DENSITIES:
        raise ValueError(f"`{argument}` must be one of {TIMESTEP_DENSITIES}, but got {density!r}.")
    logit_mean, logit_std = check_real(logit_mean, "logit_mean"), check_real(logit_std, "logit_std")
    mode_scale = check_real(mode_scale, "mode_scale")
    noise_end_fraction = check_real(noise_end_fraction, "noise_end_fraction")
    problem = density_parameter_problem(density, logit_std, mode_scale, noise_end_fraction)
    if problem is not None:
        name, value, valid = problem
        raise ValueError(f"`{name}` must be {valid}, but got {value!r}.")
    return logit_mean, logit_std, mode_scale, noise_end_fraction


def sample_timesteps(
    batch_size: int,
    density: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    noise_end_fraction: float = 0.0,
) -> torch.Tensor:
    """Draws training times ``t`` in ``[0, 1]`` from a density, one per example.

    ``"uniform"`` is the paper's choice. ``"logit_normal"`` and ``"mode"`` are the SD3 densities, drawn with
    `diffusers.training_utils.compute_density_for_timestep_sampling`. That function works on diffusers' sigma clock;
    the draw is converted with :func:`sigma_to_t`, so ``logit_mean > 0`` shifts mass towards noise (small ``t``),
    exactly as it does in diffusers' scripts. ``"mode"`` is symmetric: ``mode_scale > 0`` puts extra weight on the
    middle of the path, ``mode_scale < 0`` on both ends, ``0`` is uniform.

    Args:
        batch_size (`int`): the number of times to draw.
        density (`str`): one of `"uniform"`, `"logit_normal"`, `"mode"`.
        logit_mean (`float`), logit_std (`float`): parameters of the logit-normal density (on the sigma clock).
        mode_scale (`float`): the scale of the `"mode"` density, in `[-1, 2 / (pi - 2)]` (where its map is monotone).
        device, generator: where and with what to draw.
        noise_end_fraction (`float`, in `[0, 1)`): the weight of an atom at ``t = 0`` mixed into the density: each
            time is set to exactly 0 (pure noise) with this probability, drawn from `generator` after the density's
            draw. At ``t = 0`` the velocity is all that one sampling step reads; smooth densities visit it rarely.
            0 draws nothing more, so the density's numbers are unchanged. On images it makes a VRFM net decode `z`
            there but its samples worse (docs/benchmarks.md, "Decoding `z` at the noise end").

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import sample_timesteps
    >>> generator = torch.Generator().manual_seed(0)
    >>> t = sample_timesteps(10_000, "logit_normal", noise_end_fraction=0.1, generator=generator)
    >>> round(float((t == 0).float().mean()), 2), bool(t.min() >= 0 and t.max() <= 1)
    (0.1, True)
    ```
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, but got {batch_size!r}.")
    logit_mean, logit_std, mode_scale, noise_end_fraction = check_timestep_density(
        density, logit_mean, logit_std, mode_scale, noise_end_fraction
    )
    check_generator(generator)
    sigma = compute_density_for_timestep_sampling(
        weighting_scheme=density,
        batch_size=batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device=device,
        generator=generator,
    )
    t = sigma_to_t(sigma).clamp(0.0, 1.0)
    if noise_end_fraction > 0:
        t = t.masked_fill(torch.rand(batch_size, device=device, generator=generator) < noise_end_fraction, 0.0)
    return t


def reparameterize(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reparameterised draw ``z = mean + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)``.

    `eps` is drawn from `generator` (one, or one per row), or given as `noise` (the shape of `mean`): a training loop
    that draws the noise of a whole global batch at once passes this process's rows.
    """
    from diffusers.utils.torch_utils import randn_tensor

    check_tensor(mean, "mean")
    check_tensor(logvar, "logvar")
    check_generator(generator, batch_size=mean.shape[0] if mean.ndim else 1)
    if mean.shape != logvar.shape:
        raise ValueError(
            f"`mean` and `logvar` must have the same shape, but got {tuple(mean.shape)} and {tuple(logvar.shape)}."
        )
    if noise is not None:
        check_tensor(noise, "noise")
        if noise.shape != mean.shape or generator is not None:
            raise ValueError(
                f"`noise` must have the shape of `mean` {tuple(mean.shape)} and come without a `generator`, but got "
                f"shape {tuple(noise.shape)} and generator={generator!r}."
            )
        eps = noise.to(device=mean.device, dtype=mean.dtype)
    else:
        eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps


def gaussian_kl(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    prior_mean: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
) -> torch.Tensor:
    """Analytic ``KL(N(mean, exp(logvar)) || prior)`` per latent dimension, with the prior ``N(0, I)`` by default.

    Returns a tensor of the same shape as ``mean`` (nats per dimension; float32 for half-precision inputs); sum over
    the last axis for the total.
    A learned diagonal-Gaussian prior is given by ``prior_mean`` and ``prior_logvar``.
    """
    named = (("mean", mean), ("logvar", logvar), ("prior_mean", prior_mean), ("prior_logvar", prior_logvar))
    for name, value in named:
        if value is None and name.startswith("prior"):
            continue
        check_tensor(value, name)
        if value.shape != mean.shape:
            raise ValueError(
                f"`{name}` must have the shape of `mean` {tuple(mean.shape)}, but got {tuple(value.shape)}."
            )
    if mean.dtype in (torch.float16, torch.bfloat16):  # half precision rounds a small KL below zero
        mean, logvar = mean.float(), logvar.float()
    if prior_mean is None and prior_logvar is None:
        return 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1.0)
    prior_mean = torch.zeros_like(mean) if prior_mean is None else prior_mean
    prior_logvar = torch.zeros_like(logvar) if prior_logvar is None else prior_logvar
    return 0.5 * (prior_logvar - logvar + (logvar.exp() + (mean - prior_mean).pow(2)) / prior_logvar.exp() - 1.0)


def dropout_mask(
    shape: int | tuple[int, ...],
    dropout_prob: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A boolean mask of `shape`, each entry `True` with probability ``dropout_prob``: which conditions (labels,
    captions) to drop for classifier-free guidance. [`drop_labels`] applies one to labels."""
    check_real(dropout_prob, "dropout_prob", 0.0, 1.0)
    check_generator(generator)
    return torch.rand(shape, generator=generator, device=device) < dropout_prob


def drop_labels(
    class_labels: torch.Tensor, dropout_prob: float, null_class: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replaces each label by ``null_class`` with probability ``dropout_prob`` (trains classifier-free guidance)."""
    check_tensor(class_labels, "class_labels", floating=False)
    if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
        raise TypeError(f"`class_labels` must be an integer tensor, but got dtype {class_labels.dtype}.")
    check_real(dropout_prob, "dropout_prob", 0.0, 1.0)
    if isinstance(null_class, bool) or not isinstance(null_class, numbers.Integral):
        raise TypeError(f"`null_class` must be an integer, but got {type(null_class).__name__} {null_class!r}.")
    limits = torch.iinfo(class_labels.dtype)
    if not limits.min <= null_class <= limits.max:
        raise ValueError(f"`null_class` must fit in the labels' dtype {class_labels.dtype}, but got {null_class}.")
    check_generator(generator)
    if dropout_prob == 0.0:
        return class_labels
    drop = dropout_mask(class_labels.shape, dropout_prob, generator, class_labels.device)
    return torch.where(drop, torch.full_like(class_labels, null_class), class_labels)


@dataclass
class VRFMLossOutput:
    """The VRFM loss and its parts, all reduced with the same documented reduction.

    Args:
        loss (`torch.Tensor`): the scalar to back-propagate, ``mse + beta * kl`` (with the free-bits floor if any).
        mse (`torch.Tensor`): the velocity regression term.
        kl (`torch.Tensor`): the KL term before ``beta`` (and before any free-bits floor).
        kl_per_dim (`torch.Tensor` of shape `(latent_dim,)`): batch-mean KL of each latent dimension, in nats, for
            diagnostics (a dimension with KL near 0 is inactive). Empty when there is no latent.
    """

    loss: torch.Tensor
    mse: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor


def _checked_loss_inputs(
    velocity_pred, velocity_target, posterior_mean, posterior_logvar, prior_mean, prior_logvar, beta, free_bits
) -> tuple[float | torch.Tensor, float]:
    """Checks `vrfm_loss`'s tensors (shapes that agree, the posterior and the prior each given as a pair) and numbers;
    returns `beta` (a float, or the training loop's 0-d tensor, unread) and `free_bits` (a float)."""
    check_tensor(velocity_pred, "velocity_pred")
    check_tensor(velocity_target, "velocity_target")
    if velocity_pred.shape != velocity_target.shape:
        raise ValueError(
            f"`velocity_pred` and `velocity_target` must have the same shape, but got {tuple(velocity_pred.shape)} "
            f"and {tuple(velocity_target.shape)}."
        )
    if velocity_pred.ndim == 0 or velocity_pred.shape[0] == 0:
        raise ValueError(
            f"`velocity_pred` must have shape (B, ...) with B >= 1, but got {tuple(velocity_pred.shape)}."
        )
    if isinstance(beta, torch.Tensor):  # the training loop's adapted beta: its value stays on the device, unread
        check_tensor(beta, "beta")
        if beta.ndim != 0:
            raise ValueError(f"`beta` must be a number or a 0-d tensor, but got shape {tuple(beta.shape)}.")
    else:
        beta = check_real(beta, "beta", minimum=0.0)  # a float: an int beyond int64 would not multiply a tensor
    free_bits = check_real(free_bits, "free_bits", 0.0, torch.finfo(torch.float32).max)  # the floor is float32
    if (posterior_mean is None) != (posterior_logvar is None):
        raise ValueError("`posterior_mean` and `posterior_logvar` must be given together.")
    if posterior_mean is None and (prior_mean is not None or prior_logvar is not None):
        raise ValueError("`prior_mean` and `prior_logvar` need a posterior (`posterior_mean`, `posterior_logvar`).")
    for name, value in (
        ("posterior_mean", posterior_mean),
        ("posterior_logvar", posterior_logvar),
        ("prior_mean", prior_mean),
        ("prior_logvar", prior_logvar),
    ):
        if value is None:
            continue
        check_tensor(value, name)
        if value.ndim != 2 or value.shape[0] != velocity_pred.shape[0] or value.shape != posterior_mean.shape:
            raise ValueError(
                f"`{name}` must have shape ({velocity_pred.shape[0]}, latent_dim) like `posterior_mean` "
                f"{tuple(posterior_mean.shape)}, but got {tuple(value.shape)}."
            )
    return beta, free_bits


def vrfm_loss(
    velocity_pred: torch.Tensor,
    velocity_target: torch.Tensor,
    posterior_mean: torch.Tensor | None = None,
    posterior_logvar: torch.Tensor | None = None,
    beta: float = 1.0,
    reduction: str = "sum",
    free_bits: float = 0.0,
    prior_mean: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
) -> VRFMLossOutput:
    """The VRFM objective ``||v_theta(x_t, t, z) - (x1 - x0)||^2 + beta * KL(q(z | ...) || p(z))``.

    With no posterior (``posterior_mean is None``) the KL is zero and this is exactly plain rectified flow / I-CFM:
    the built-in baseline.

    Args:
        velocity_pred (`torch.Tensor` of shape `(B, ...)`): the model's velocity.
        velocity_target (`torch.Tensor` of shape `(B, ...)`): `x1 - x0`.
        posterior_mean, posterior_logvar (`torch.Tensor` of shape `(B, latent_dim)`, *optional*): the posterior.
        beta (`float` or 0-d `torch.Tensor`): the KL weight, `>= 0` (a tensor's value is not checked: reading it
            would stall the device).
        reduction (`str`): `"sum"` or `"mean"`; see the module docstring.
        free_bits (`float`): a floor, in nats per latent dimension, under the batch-mean KL of each dimension before
            it is weighted by `beta` (Kingma et al., 2016). 0 turns it off.
        prior_mean, prior_logvar (`torch.Tensor` of shape `(B, latent_dim)`, *optional*): a learned conditional prior;
            `N(0, I)` when not given.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import vrfm_loss
    >>> out = vrfm_loss(torch.zeros(4, 2), torch.ones(4, 2), torch.zeros(4, 3), torch.zeros(4, 3), beta=0.1)
    >>> out.loss.item(), out.mse.item(), out.kl.item()
    (2.0, 2.0, 0.0)
    ```
    """
    if not isinstance(reduction, str) or reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {LOSS_REDUCTIONS}, but got {reduction!r}.")
    beta, free_bits = _checked_loss_inputs(
        velocity_pred, velocity_target, posterior_mean, posterior_logvar, prior_mean, prior_logvar, beta, free_bits
    )

    batch_size = velocity_pred.shape[0]
    num_data_dims = velocity_pred[0].numel()
    squared_error = (velocity_pred.float() - velocity_target.float()).pow(2).reshape(batch_size, -1).sum(dim=1)
    mse = squared_error.mean()

    if posterior_mean is None:
        zero = mse.new_zeros(())
        kl, kl_per_dim, kl_for_loss = zero, mse.new_zeros((0,)), zero
    else:
        kl_matrix = gaussian_kl(posterior_mean.float(), posterior_logvar.float(), prior_mean, prior_logvar)
        kl_per_dim = kl_matrix.mean(dim=0)
        kl = kl_per_dim.sum()
        kl_for_loss = kl_per_dim.clamp(min=free_bits).sum() if free_bits > 0 else kl

    loss = mse + beta * kl_for_loss
    if reduction == "mean":
        loss, mse, kl = loss / num_data_dims, mse / num_data_dims, kl / num_data_dims
    return VRFMLossOutput(loss=loss, mse=mse, kl=kl, kl_per_dim=kl_per_dim.detach())


KL_TARGET_BETA_RANGE = (1e-4, 150.0)


def adapt_beta(
    beta: float | torch.Tensor,
    kl: float | torch.Tensor,
    kl_target: float,
    rate: float = 0.01,
    beta_range: tuple[float, float] = KL_TARGET_BETA_RANGE,
) -> float | torch.Tensor:
    """One dual-ascent step on ``log beta`` that steers the KL towards `kl_target` nats.

    ``beta <- beta * exp(rate * (kl - kl_target))``, clipped to `beta_range`: beta rises while the KL is above the
    target and falls while it is below. A KL target fixes how much information ``z`` carries (in nats, summed over
    latent dimensions), which, unlike a fixed ``beta``, means the same on tasks whose velocities differ in scale.

    With tensors for `beta` and `kl` (0-d, on one device) the step is taken there and returns a tensor, without
    reading either value back to the host: the training loop keeps beta on the GPU this way.

    Args:
        beta (`float` or 0-d `torch.Tensor`): the current KL weight (> 0).
        kl (`float` or 0-d `torch.Tensor`): the KL of the current batch, nats summed over latent dimensions (mean over
            examples).
        kl_target (`float`): the target, in the same units (>= 0).
        rate (`float`, defaults to 0.01): the step size on ``log beta`` per nat of error.
        beta_range (`tuple[float, float]`): the bounds of beta.

    Example:

    ```py
    >>> from diffusers_vrfm.objective import adapt_beta
    >>> adapt_beta(1.0, kl=5.0, kl_target=3.0) > 1.0, adapt_beta(1.0, kl=1.0, kl_target=3.0) < 1.0
    (True, True)
    >>> import torch
    >>> adapt_beta(torch.tensor(1.0), kl=torch.tensor(5.0), kl_target=3.0)
    tensor(1.0202)
    ```
    """
    kl_target = check_real(kl_target, "kl_target", minimum=0.0)
    rate = check_real(rate, "rate", minimum=0.0)
    low, high = beta_range
    if not 0 < low <= high:
        raise ValueError(f"`beta_range` must be (low, high) with 0 < low <= high, but got {beta_range!r}.")
    if isinstance(beta, torch.Tensor) or isinstance(kl, torch.Tensor):
        beta, kl = torch.as_tensor(beta), torch.as_tensor(kl)
        for name, value in (("beta", beta), ("kl", kl)):
            if value.ndim != 0 or not value.is_floating_point():
                raise ValueError(
                    f"`{name}` must be a float or a 0-d float tensor, but got {value.dtype} {tuple(value.shape)}."
                )
        log_beta = beta.clamp(low, high).log() + rate * (kl.to(beta.dtype) - kl_target)
        return log_beta.clamp(max=700.0).exp().clamp(low, high)
    beta = check_real(beta, "beta", minimum=0.0)
    kl = check_real(kl, "kl")
    log_beta = math.log(min(max(beta, low), high)) + rate * (kl - kl_target)
    return float(min(max(math.exp(min(log_beta, 700.0)), low), high))


ACTIVE_UNIT_THRESHOLD = 1e-2  # the variance over the data above which a latent unit counts as active


def count_active_units(posterior_means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """The number of active latent units (Burda et al., 2016): dimensions whose posterior mean varies over the data
    with variance above ``threshold``. ``posterior_means`` has shape ``(N, latent_dim)``."""
    if posterior_means.ndim != 2:
        raise ValueError(f"`posterior_means` must have shape (N, latent_dim), but got {tuple(posterior_means.shape)}.")
    if posterior_means.shape[0] < 2:
        return 0
    return int((posterior_means.float().var(dim=0) > threshold).sum().item())


def slerp(z_a: torch.Tensor, z_b: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """Spherical interpolation between latents ``z_a`` and ``z_b`` (``weight`` 0 gives ``z_a``, 1 gives ``z_b``).

    Keeps the norm typical of ``N(0, I)`` draws, unlike linear interpolation; falls back to linear interpolation
    where the two are (nearly) parallel or opposite (where no single great circle joins them). ``weight`` may be a
    tensor of shape ``(K,)``, giving ``K`` latents.
    """
    check_tensor(z_a, "z_a")
    check_tensor(z_b, "z_b")
    if z_a.shape != z_b.shape:
        raise ValueError(
            f"`z_a` and `z_b` must have the same shape, but got {tuple(z_a.shape)} and {tuple(z_b.shape)}."
        )
    if isinstance(weight, torch.Tensor):
        check_tensor(weight, "weight", floating=False)
        if weight.dtype == torch.bool or weight.is_complex() or weight.ndim > 1:
            raise ValueError(
                f"`weight` must be a number or a real tensor of shape (K,), but got dtype {weight.dtype} and shape "
                f"{tuple(weight.shape)}."
            )
        if not torch.isfinite(weight).all():
            raise ValueError(f"`weight` must be finite, but got {weight.tolist()}.")
    else:
        weight = check_real(weight, "weight")  # a float: an int beyond int64 would not convert
    weight = torch.as_tensor(weight, dtype=z_a.dtype, device=z_a.device)
    if weight.ndim == 1:
        if weight.numel() == 0:
            return z_a.new_empty((0, *z_a.shape))
        return torch.stack([slerp(z_a, z_b, w) for w in weight])
    a, b = z_a.flatten().double(), z_b.flatten().double()
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    w = weight.double()
    if torch.sin(omega) < 1e-4:  # omega lies in [0, pi]: near 0 or pi, the division below is ill-conditioned
        out = (1 - w) * a + w * b
    else:
        out = (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / torch.sin(omega)
    return out.to(z_a.dtype).reshape(z_a.shape)


def mix_latents(
    posterior_sample: torch.Tensor,
    prior_sample: torch.Tensor,
    prior_fraction: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replaces the posterior draw of each example by its prior draw with probability ``prior_fraction``.

    A remedy for the prior hole (issue 6): the velocity net then also learns on latents drawn the way inference draws
    them (from ``N(0, I)`` or a learned prior ``p_psi(z | x0)``), so prior draws no longer land only where training
    never put ``z``. The KL term is unaffected; only the ``z`` fed to the velocity net changes.

    Args:
        posterior_sample (`torch.Tensor` of shape `(B, latent_dim)`): reparameterised draws of ``q(z | ...)``.
        prior_sample (`torch.Tensor` of shape `(B, latent_dim)`): draws of the prior for the same examples.
        prior_fraction (`float`): the probability, in `[0, 1]`, that an example takes its prior draw.
        generator (`torch.Generator`, *optional*): draws which examples are replaced.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm.objective import mix_latents
    >>> mix_latents(torch.zeros(3, 2), torch.ones(3, 2), 1.0).sum().item()
    6.0
    ```
    """
    check_tensor(posterior_sample, "posterior_sample")
    check_tensor(prior_sample, "prior_sample")
    if posterior_sample.shape != prior_sample.shape or posterior_sample.ndim != 2:
        raise ValueError(
            "`posterior_sample` and `prior_sample` must both have shape (B, latent_dim), but got "
            f"{tuple(posterior_sample.shape)} and {tuple(prior_sample.shape)}."
        )
    prior_fraction = check_real(prior_fraction, "prior_fraction", 0.0, 1.0)
    check_generator(generator)
    if prior_fraction == 0.0:
        return posterior_sample
    draw = torch.rand(posterior_sample.shape[0], generator=generator, device="cpu").to(posterior_sample.device)
    use_prior = (draw < prior_fraction).unsqueeze(1)
    return torch.where(use_prior, prior_sample.to(posterior_sample.dtype), posterior_sample)


def latent_mmd(
    x: torch.Tensor, y: torch.Tensor, scales: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0, 5.0)
) -> torch.Tensor:
    """The unbiased squared MMD between two sets of latent draws, with a sum of Gaussian kernels; differentiable.

    Measures the prior hole (issue 6): ``x`` are draws of the aggregate posterior ``q(z) = E_data q(z | ...)`` and
    ``y`` draws of the prior (``N(0, I)`` or a learned ``p_psi(z | x0)`` at fresh source points); 0 (up to noise, it
    can be slightly negative) means the two agree. The kernels are ``exp(-||a - b||^2 / (2 s^2 d))`` for each scale
    ``s``, with ``d`` the latent dimension (so that the bandwidth suits unit-variance latents of any dimension). Being
    differentiable, it can also serve as a penalty that pulls the aggregate posterior to the prior (as in InfoVAE).

    Args:
        x (`torch.Tensor` of shape `(N, latent_dim)`), y (`torch.Tensor` of shape `(M, latent_dim)`): the draws,
            `N, M >= 2`.
        scales (`tuple[float]`): the kernel bandwidths, relative to ``sqrt(latent_dim)``.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm.objective import latent_mmd
    >>> g = torch.Generator().manual_seed(0)
    >>> a, b = torch.randn(500, 4, generator=g), torch.randn(500, 4, generator=g)
    >>> latent_mmd(a, b).abs().item() < 0.01, latent_mmd(a + 2.0, b).item() > 0.1
    (True, True)
    ```
    """
    check_tensor(x, "x")
    check_tensor(y, "y")
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"`x` and `y` must have shapes (N, latent_dim) and (M, latent_dim), but got {tuple(x.shape)} and "
            f"{tuple(y.shape)}."
        )
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"`x` and `y` need at least 2 draws each, but got {x.shape[0]} and {y.shape[0]}.")
    if not scales or any(check_real(s, "scales") <= 0 for s in scales):
        raise ValueError(f"`scales` must be a non-empty tuple of positive numbers, but got {scales!r}.")
    x, y = x.float(), y.float()
    dim = x.shape[1]

    def kernel(a, b):
        distances = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-distances / (2.0 * s * s * dim)) for s in scales)

    n, m = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return term_xx + term_yy - 2.0 * k_xy.mean()
