"""Log-likelihood of (variational) rectified-flow models by the instantaneous change of variables.

Clock and sign
--------------
``t`` runs from ``0`` (noise, ``x0 ~ p0``) to ``1`` (data). Along a trajectory of ``dx/dt = v(x, t)`` (for VRFM with
``z`` held fixed), the log-density obeys ``d/dt log p_t(x_t) = -div v(x_t, t)``, hence

    log p1(x1) = log p0(x0) - integral_0^1 div v(x_t, t) dt.

(The seed note writes ``+``; that is only right with the integral taken from 1 to 0.)

To evaluate it, the data point ``x1`` is integrated **backwards** from ``t = 1`` to ``t = 0`` together with the running
integral ``J(t) = integral_t^1 div v(x_s, s) ds``, i.e. the augmented ODE

    dx/dt = v(x, t),    dJ/dt = -div v(x, t),    x(1) = x1,  J(1) = 0,

which gives ``x0 = x(0)`` and ``log p1(x1) = log p0(x0) - J(0)``.

Divergence
----------
- ``"exact"``: the trace of the Jacobian by autograd, one backward pass per data dimension. Exact, and cheap in low
  dimension (vectors, toys, tabular data).
- ``"hutchinson"``: ``eps^T (dv/dx) eps`` with one Rademacher probe ``eps`` per trajectory, drawn once and held fixed
  along the whole trajectory (so the estimate of the integral is unbiased and the ODE stays smooth for adaptive
  solvers). One backward pass per evaluation, whatever the dimension: use it for images.

Both assume that the velocity model treats the examples of a batch independently (no batch statistics, e.g.
BatchNorm in training mode): put the model in `eval()` mode.

VRFM: per-``z`` and marginal likelihood
---------------------------------------
Each fixed ``z`` defines its own flow, so ``log p(x | z)`` is exact (up to the solver and, with Hutchinson, the probe).
The marginal ``log p(x) = log E_{z ~ N(0, I)} p(x | z)`` is estimated by ``logmeanexp_k log p(x | z_k)`` with ``K``
independent draws ``z_k ~ N(0, I)``. By Jensen's inequality this is a **stochastic lower bound** on ``log p(x)`` in
expectation, and its expectation is non-decreasing in ``K`` and converges to ``log p(x)`` as ``K -> inf`` (Burda et
al., 2016). With a fitted `prior`, the draws come from it instead; for a class-conditional model with a conditional
prior, from ``p(z | label)``, so that the estimate is of ``log p(x | label)``. With Hutchinson's divergence each
``log p(x | z_k)`` is itself noisy; the exponential in the average then biases the marginal upward by an amount that
shrinks with the probe variance, so prefer ``"exact"`` for marginals in low dimension.

Bits per dimension (images)
---------------------------
8-bit images ``k in {0, ..., 255}`` enter the models of this package as ``x = k / 127.5 - 1`` (diffusers'
``VaeImageProcessor`` with ``do_normalize=True``), so neighbouring pixel values are ``delta = 2 / 255`` apart. Uniform
dequantisation replaces ``x`` by ``x + delta * (u - 1/2)``, ``u ~ U(0, 1)^D``: the bins ``[x - delta/2, x + delta/2)``
tile the line without overlap. The probability of the discrete image is the density integrated over its bin, and
Jensen's inequality gives ``log P(k) >= E_u log p(x + delta (u - 1/2)) + D log delta``, hence the reported

    bits_per_dim = -(log p(x_dequantised) + D * log(delta)) / (D * log 2)
                 = -log p(x_dequantised) / (D * log 2) + log2(127.5)      for delta = 2 / 255,

a stochastic upper bound on the discrete negative log-likelihood in bits per dimension. The offset is
``-log2(delta)``: ``log2(127.5) = 6.994`` for the package's ``[-1, 1]`` scaling, ``8`` for data in ``[0, 1]``
scaled by ``1/256`` (``delta = 1/256``), and ``7`` for the ``(k + u) / 128 - 1`` convention of some papers
(``delta = 2/256``): pass the ``bin_width`` that matches how your data were scaled.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .models.latent_prior import check_condition, label_condition
from .models.z_embedding import given_latent, skip_value_checks

DIVERGENCES = ("exact", "hutchinson")
LIKELIHOOD_SOLVERS = ("euler", "heun", "dopri5")
DEFAULT_IMAGE_BIN_WIDTH = 2.0 / 255.0


@dataclass
class VRFMLikelihoodOutput(BaseOutput):
    """Output of [`log_likelihood`].

    Args:
        log_prob (`torch.Tensor` of shape `(B,)`): the log-density of each example in nats. Given `z`:
            ``log p(x | z)``. Without `z`, for a model with a latent: the marginal estimate
            ``logmeanexp_k log_weights[k]`` (a stochastic lower bound on ``log p(x)`` that tightens with `K`). For a
            model without latent: ``log p(x)``. With dequantisation it is the density of the dequantised `x`.
        bits_per_dim (`torch.Tensor` of shape `(B,)` or `None`): ``-(log_prob + D log(bin_width)) / (D log 2)`` when
            bits per dimension were asked for (by default for image models), else `None`.
        num_function_evals (`int`): the number of batched velocity-model calls that the ODE solve made, each on all
            trajectories of one chunk of `z` draws; with the default `z_chunk_size` (all draws in one batch), that is
            the number of evaluations per trajectory.
        log_prob_per_z (`torch.Tensor` of shape `(K, B)`): ``log p(x | z_k)`` for each draw (`K = 1` when `z` was given
            or the model has no latent).
        log_weights (`torch.Tensor` of shape `(K, B)`): the terms of the marginal estimate: `log_prob_per_z` for draws
            from the prior, ``log p(x | z_k) + log p(z_k) - log q(z_k | x)`` for draws from a `proposal`.
        log_prob_source (`torch.Tensor` of shape `(K, B)`): ``log p0(x0)`` at the reached source points.
        divergence_integral (`torch.Tensor` of shape `(K, B)`): ``integral_0^1 div v(x_t, t) dt`` along each
            trajectory, so that ``log_prob_per_z = log_prob_source - divergence_integral``.
        x0 (`torch.Tensor` of shape `(K, B, *sample_shape)`): the source points the backward integration reached.
        z (`torch.Tensor` of shape `(K, B, latent_dim)` or `None`): the latents used.
    """

    log_prob: torch.Tensor
    bits_per_dim: torch.Tensor | None = None
    num_function_evals: int = 0
    log_prob_per_z: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None
    log_prob_source: torch.Tensor | None = None
    divergence_integral: torch.Tensor | None = None
    x0: torch.Tensor | None = None
    z: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------ small pure pieces
def standard_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """``log N(x; 0, I)`` of each example of a batch ``(B, ...)``, summed over all non-batch dimensions -> ``(B,)``.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm.likelihood import standard_normal_log_prob
    >>> round(standard_normal_log_prob(torch.zeros(1, 2)).item(), 4)  # -log(2 pi)
    -1.8379
    ```
    """
    flat = x.reshape(x.shape[0], -1)
    return -0.5 * (flat.pow(2) + math.log(2 * math.pi)).sum(dim=1)


def logmeanexp(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log(mean(exp(values)))`` along `dim`, computed stably."""
    return torch.logsumexp(values, dim=dim) - math.log(values.shape[dim])


def rademacher_probe(
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A tensor of independent signs ``+-1`` with equal probability (the probe of Hutchinson's estimator)."""
    bits = torch.randint(
        0, 2, tuple(shape), generator=generator, device=generator.device if generator is not None else device
    )
    return (2 * bits - 1).to(device=device, dtype=dtype)


def exact_divergence(output: torch.Tensor, inputs: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """The divergence ``sum_i d output_i / d inputs_i`` of each example, by autograd: one backward pass per dimension.

    `output` must have been computed from `inputs` (which requires grad) with examples treated independently; the
    result has shape `(B,)`. With `create_graph=True` the result can itself be differentiated.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm.likelihood import exact_divergence
    >>> x = torch.randn(4, 3, requires_grad=True)
    >>> exact_divergence(2 * x + x.flip(1), x)  # trace of 2 I + (anti-diagonal ones) = 6 + 1
    tensor([7., 7., 7., 7.])
    ```
    """
    if output.shape != inputs.shape:
        raise ValueError(
            f"`output` must have the shape of `inputs` {tuple(inputs.shape)}, but got {tuple(output.shape)}."
        )
    batch_size = inputs.shape[0]
    if not output.requires_grad:
        return output.new_zeros(batch_size)
    flat_output = output.reshape(batch_size, -1)
    num_dims = flat_output.shape[1]
    divergence = output.new_zeros(batch_size)
    for i in range(num_dims):
        (grad,) = torch.autograd.grad(
            flat_output[:, i].sum(), inputs, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        if grad is not None:
            divergence = divergence + grad.reshape(batch_size, -1)[:, i]
    return divergence


def hutchinson_divergence(
    output: torch.Tensor, inputs: torch.Tensor, probe: torch.Tensor, create_graph: bool = False
) -> torch.Tensor:
    """Hutchinson's estimate ``probe^T (d output / d inputs) probe`` of the divergence of each example -> `(B,)`.

    Unbiased for any probe with zero mean and identity covariance (Rademacher: [`rademacher_probe`]); one backward
    pass whatever the dimension.
    """
    if output.shape != inputs.shape or probe.shape != inputs.shape:
        raise ValueError(
            f"`output` and `probe` must have the shape of `inputs` {tuple(inputs.shape)}, but got "
            f"{tuple(output.shape)} and {tuple(probe.shape)}."
        )
    batch_size = inputs.shape[0]
    if not output.requires_grad:
        return output.new_zeros(batch_size)
    (vjp,) = torch.autograd.grad((output * probe).sum(), inputs, create_graph=create_graph, allow_unused=True)
    if vjp is None:
        return output.new_zeros(batch_size)
    return (vjp * probe).reshape(batch_size, -1).sum(dim=1)


def bits_per_dim_from_log_prob(log_prob: torch.Tensor, num_dims: int, bin_width: float) -> torch.Tensor:
    """Bits per dimension of a discretised density: ``-(log_prob + num_dims * log(bin_width)) / (num_dims * log 2)``.

    `log_prob` is the continuous log-density (nats) of the (dequantised) data in model space, where neighbouring
    discrete values are `bin_width` apart (`2 / 255` for 8-bit images scaled to `[-1, 1]` as `k / 127.5 - 1`).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm.likelihood import bits_per_dim_from_log_prob
    >>> bits_per_dim_from_log_prob(torch.tensor([0.0]), num_dims=3, bin_width=2 / 255)  # log2(127.5)
    tensor([6.9944])
    ```
    """
    return -(log_prob + num_dims * math.log(bin_width)) / (num_dims * math.log(2.0))


def warn_if_impossible_bits_per_dim(bits_per_dim: torch.Tensor, solver: str, num_inference_steps, divergence) -> None:
    """Warns when some bits per dimension are negative: a discrete value with a probability above 1, which no model
    gives in expectation over the dequantisation noise. The usual cause is an inaccurate integral (too few solver
    steps, the Hutchinson probe's variance) or a `bin_width` that does not match the data's scaling."""
    negative = bits_per_dim < 0
    if negative.any():
        steps = "adaptive steps" if solver == "dopri5" else f"num_inference_steps={num_inference_steps}"
        warnings.warn(
            f"{int(negative.sum())} of {bits_per_dim.numel()} bits-per-dimension estimates are negative (min "
            f"{bits_per_dim.min().item():.3g}), which is impossible for discrete data: the integral is inaccurate "
            f"({solver} with {steps}, {divergence} divergence). Raise `num_inference_steps`, use solver='dopri5' or "
            "divergence='exact', and check that `bin_width` matches how the data were scaled.",
            stacklevel=3,
        )


def dequantize(x: torch.Tensor, bin_width: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantisation ``x + bin_width * (u - 1/2)``, ``u ~ U(0, 1)``: each value spreads over its own bin."""
    noise = torch.rand(x.shape, generator=generator, device=generator.device if generator is not None else x.device)
    return x + bin_width * (noise.to(device=x.device, dtype=x.dtype) - 0.5)


# ---------------------------------------------------------------------------------------------- backward integration
FIELD_PARTS = ("velocity", "divergence of the velocity")


def nonfinite_field_flags(velocity: torch.Tensor, divergence: torch.Tensor) -> torch.Tensor:
    """Whether the velocity, and its divergence, hold a NaN or an inf: a `(2,)` bool tensor on their device, in the
    order of `FIELD_PARTS`. Nothing is read back to the host."""
    return torch.stack((~torch.isfinite(velocity).all(), ~torch.isfinite(divergence).all()))


def check_finite_field(flags: torch.Tensor, times: Sequence[float]) -> None:
    """Raises a `ValueError` naming the first evaluation whose velocity or divergence was not finite.

    `flags` `(evals, 2)` stacks [`nonfinite_field_flags`] of the evaluations at `times`, so that a model with
    non-finite weights (or a state that overflowed) fails, naming the cause and the time, instead of giving a NaN
    log-likelihood. One read of `flags`, however many evaluations they cover.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm.likelihood import check_finite_field, nonfinite_field_flags
    >>> finite, divergence = torch.ones(2, 3), torch.ones(2)
    >>> flags = torch.stack([nonfinite_field_flags(finite, divergence), nonfinite_field_flags(finite, divergence / 0)])
    >>> try:
    ...     check_finite_field(flags, [1.0, 0.5])
    ... except ValueError as error:
    ...     print(str(error).split(":")[0])
    The divergence of the velocity is not finite (NaN or inf) at t=0.5 of the backward integration
    ```
    """
    if not flags.any():
        return
    evaluation, part = (int(index) for index in flags.nonzero()[0])
    raise ValueError(
        f"The {FIELD_PARTS[part]} is not finite (NaN or inf) at t={times[evaluation]:.4g} of the backward "
        "integration: the velocity model's weights or the data are not finite, or the state overflowed. The "
        "log-likelihood is undefined."
    )


def _velocity_and_divergence(velocity_fn, x, t, divergence, probe, create_graph):
    with torch.enable_grad():
        x_in = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        velocity = velocity_fn(x_in, t)
        if velocity.shape != x_in.shape:
            raise ValueError(
                f"The velocity model returned shape {tuple(velocity.shape)} for a sample of shape {tuple(x_in.shape)}."
            )
        if divergence == "exact":
            div = exact_divergence(velocity, x_in, create_graph=create_graph)
        else:
            div = hutchinson_divergence(velocity, x_in, probe, create_graph=create_graph)
    if not create_graph:
        velocity, div = velocity.detach(), div.detach()
    return velocity, div


def integrate_log_density(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x1: torch.Tensor,
    num_inference_steps: int = 100,
    solver: str = "heun",
    divergence: str = "exact",
    probe: torch.Tensor | None = None,
    enable_grad: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Integrates ``dx/dt = v(x, t)`` and ``dJ/dt = -div v(x, t)`` backwards from ``t = 1`` (``x = x1``, ``J = 0``) to
    ``t = 0``.

    Args:
        velocity_fn (`Callable`): `velocity_fn(x, t)` with `t` a scalar tensor in `[0, 1]`, returning a tensor shaped
            like `x` (a velocity towards data; `z` and labels are bound in by the caller).
        x1 (`torch.Tensor` of shape `(B, ...)`): data points.
        num_inference_steps (`int`): steps of the fixed-step solvers (uniform grid); ignored by `"dopri5"`.
        solver (`str`): `"euler"` (one evaluation per step), `"heun"` (two) or `"dopri5"` (adaptive, torchdiffeq).
        divergence (`str`): `"exact"` or `"hutchinson"` (then `probe`, shaped like `x1`, is required and is used at
            every evaluation).
        enable_grad (`bool`): keep the graph, so that the results can be differentiated w.r.t. `x1` and parameters.
        rtol, atol (`float`): tolerances of `"dopri5"`.

    Returns:
        `(x0, divergence_integral, num_function_evals)`: the source point, ``J(0) = integral_0^1 div v dt`` of shape
        `(B,)`, and the number of calls of `velocity_fn`. Then ``log p1(x1) = log p0(x0) - divergence_integral``.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm.likelihood import integrate_log_density
    >>> x0, integral, nfe = integrate_log_density(lambda x, t: x, torch.ones(1, 2), 10, "heun")  # x1 = e * x0
    >>> round(integral.item(), 3), nfe  # div v = 2, integrated over [0, 1]
    (2.0, 20)
    ```
    """
    if solver not in LIKELIHOOD_SOLVERS:
        raise ValueError(f"`solver` must be one of {LIKELIHOOD_SOLVERS}, but got {solver!r}.")
    if divergence not in DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {DIVERGENCES}, but got {divergence!r}.")
    if divergence == "hutchinson" and (probe is None or probe.shape != x1.shape):
        raise ValueError(
            f"`probe` must be a tensor of shape {tuple(x1.shape)} for the Hutchinson divergence, but got "
            f"{None if probe is None else tuple(probe.shape)}."
        )
    counter = {"evals": 0}

    def field(x, t):
        """The velocity and its divergence at `(x, t)`, and their `nonfinite_field_flags`. The first evaluation checks
        the model's inputs' values; the later ones skip those checks, which would make the host wait for the device
        at every evaluation: their times come from the same checked grid, their `z` and labels are the same."""
        counter["evals"] += 1
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).clamp(0.0, 1.0)
        with contextlib.nullcontext() if counter["evals"] == 1 else skip_value_checks():
            velocity, div = _velocity_and_divergence(velocity_fn, x, t, divergence, probe, enable_grad)
        return velocity, div, nonfinite_field_flags(velocity, div)

    with torch.set_grad_enabled(enable_grad):
        if solver == "dopri5":
            try:
                from torchdiffeq import odeint
            except ImportError as error:
                raise ImportError(
                    "`solver='dopri5'` needs torchdiffeq: install the `ode` extra with "
                    "`pip install diffusers-vrfm[ode]`, or use solver='euler' or 'heun'."
                ) from error

            def augmented(t, state):  # checked at once: a non-finite field would mislead the step-size control,
                velocity, div, nonfinite = field(state[0], t)  # which reads every step anyway
                check_finite_field(nonfinite[None], [float(t)])
                return velocity, -div

            times = torch.tensor([1.0, 0.0], dtype=x1.dtype, device=x1.device)
            start = (x1, x1.new_zeros(x1.shape[0]))
            x_traj, j_traj = odeint(augmented, start, times, method="dopri5", rtol=rtol, atol=atol)
            return x_traj[-1], j_traj[-1], counter["evals"]

        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise TypeError(f"`num_inference_steps` must be an int, but got {num_inference_steps!r}.")
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, but got {num_inference_steps}.")
        grid = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)
        times, device_times = grid.tolist(), grid.to(device=x1.device, dtype=x1.dtype)  # one copy to the device
        nonfinite, evaluated_at = [], []  # checked once at the end: the loop queues its steps without waiting

        def field_at(x, index):
            velocity, div, flags = field(x, device_times[index])
            nonfinite.append(flags)
            evaluated_at.append(times[index])
            return velocity, div

        x, integral = x1, x1.new_zeros(x1.shape[0])
        for index in range(num_inference_steps):
            h = times[index] - times[index + 1]  # > 0: the step back in time
            velocity, div = field_at(x, index)
            if solver == "euler":
                x, integral = x - h * velocity, integral + h * div
            else:
                velocity_next, div_next = field_at(x - h * velocity, index + 1)
                x = x - 0.5 * h * (velocity + velocity_next)
                integral = integral + 0.5 * h * (div + div_next)
        check_finite_field(torch.stack(nonfinite), evaluated_at)
        return x, integral, counter["evals"]


# -------------------------------------------------------------------------------------------------------- validation
def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, but got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, but got {value}.")


def _check_positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, but got {value!r}.")


def check_samples(velocity_model, x) -> int:
    """Refuses data that [`log_likelihood`] cannot score with `velocity_model`, naming `x`: not a finite
    floating-point tensor of shape `(B, *sample_shape)`. Returns `B`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, but got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"`x` must be a floating-point tensor, but got dtype {x.dtype}.")
    sample_shape = tuple(velocity_model.sample_shape)
    if x.ndim != len(sample_shape) + 1 or tuple(x.shape[1:]) != sample_shape or x.shape[0] < 1:
        raise ValueError(
            f"`x` must have shape (B, {', '.join(map(str, sample_shape))}) with B >= 1 for this model, but got "
            f"{tuple(x.shape)}."
        )
    if not torch.isfinite(x).all():
        raise ValueError("`x` must be finite, but it contains NaN or inf.")
    return x.shape[0]


def _check_inputs(velocity_model, x, z, num_z_samples, divergence, solver, num_inference_steps, generator):
    for attribute in ("latent_dim", "sample_shape"):
        if not hasattr(velocity_model, attribute):
            raise TypeError(
                f"`velocity_model` must be a VRFM velocity model exposing `{attribute}` (for example VRFMMLPModel), "
                f"but got {type(velocity_model).__name__}."
            )
    check_samples(velocity_model, x)
    _check_int("num_z_samples", num_z_samples, 1)
    if divergence not in DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {DIVERGENCES}, but got {divergence!r}.")
    if solver not in LIKELIHOOD_SOLVERS:
        raise ValueError(f"`solver` must be one of {LIKELIHOOD_SOLVERS}, but got {solver!r}.")
    if solver != "dopri5":
        _check_int("num_inference_steps", num_inference_steps, 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, but got {type(generator).__name__}.")

    latent_dim = int(velocity_model.latent_dim)
    batch_size = x.shape[0]
    if z is None:
        return None
    if latent_dim == 0:
        raise ValueError("`z` was given, but the velocity model has `latent_dim=0` (plain rectified flow).")
    return given_latent(z, batch_size, latent_dim, x.device, x.dtype)


def _prepare_labels(class_labels, batch_size, device):
    if class_labels is None:
        return None
    labels = torch.as_tensor(class_labels, device=device)
    if labels.ndim == 0:
        return labels
    if labels.ndim != 1 or labels.shape[0] != batch_size or labels.is_floating_point():
        raise ValueError(
            f"`class_labels` must be an integer or {batch_size} integers, but got dtype {labels.dtype} and shape "
            f"{tuple(labels.shape)}."
        )
    return labels


# ------------------------------------------------------------------------------------------------------ the front door
def log_likelihood(
    velocity_model: torch.nn.Module,
    x: torch.Tensor,
    z: torch.Tensor | None = None,
    num_z_samples: int = 16,
    divergence: str = "exact",
    num_inference_steps: int = 100,
    solver: str = "heun",
    generator: torch.Generator | None = None,
    class_labels: torch.Tensor | list[int] | int | None = None,
    source_log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None,
    enable_grad: bool = False,
    compute_bits_per_dim: bool | None = None,
    bin_width: float = DEFAULT_IMAGE_BIN_WIDTH,
    dequantize_input: bool | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    z_chunk_size: int | None = None,
    prior: torch.nn.Module | None = None,
    proposal: torch.nn.Module | None = None,
    prior_condition: torch.Tensor | None = None,
    model_kwargs: dict[str, torch.Tensor] | None = None,
) -> VRFMLikelihoodOutput:
    """The log-likelihood of data under a (variational) rectified-flow model, by backward integration of the ODE
    together with the divergence: ``log p1(x) = log p0(x0) - integral_0^1 div v(x_t, t, z) dt``.

    See the module docstring for the sign, the marginal over ``z`` and the bits-per-dimension convention.

    Args:
        velocity_model (`torch.nn.Module`): a VRFM velocity model, called as
            `velocity_model(sample, t_batch, z=z, class_labels=labels).sample`, exposing `latent_dim` and
            `sample_shape`. It must treat examples independently (use `eval()` mode).
        x (`torch.Tensor` of shape `(B, *sample_shape)`): data in model space (for images: `[-1, 1]`).
        z (`torch.Tensor` of shape `(B, latent_dim)` or `(latent_dim,)`, *optional*): a latent per example; then
            `log_prob` is ``log p(x | z)``. Must be `None` for models with `latent_dim=0`.
        num_z_samples (`int`, defaults to 16): `K`, the number of prior draws ``z_k ~ p(z)`` of the marginal
            estimate ``logmeanexp_k log p(x | z_k)`` when `z` is not given (a stochastic lower bound on
            ``log p(x)`` that tightens with `K`); irrelevant when `z` is given or `latent_dim=0`.
        divergence (`str`, defaults to `"exact"`): `"exact"` (autograd, one backward pass per dimension: low
            dimension) or `"hutchinson"` (one Rademacher probe per trajectory, fixed along it: images).
        num_inference_steps (`int`, defaults to 100): steps of `"euler"` / `"heun"` on a uniform grid.
        solver (`str`, defaults to `"heun"`): `"euler"`, `"heun"` or `"dopri5"` (adaptive; needs the `ode` extra,
            `pip install diffusers-vrfm[ode]`).
        generator (`torch.Generator`, *optional*): drives the dequantisation noise, then the draws of `z`, then the
            Hutchinson probes, in that order.
        class_labels (`int`, `list[int]` or `torch.Tensor` of shape `(B,)`, *optional*): labels of a
            class-conditional model, passed to the model as they are (the null label gives the unconditional
            density).
        source_log_prob (`Callable`, *optional*): ``log p0`` of a batch of source points, returning shape `(N,)`;
            the standard normal by default.
        enable_grad (`bool`, defaults to `False`): keep the autograd graph so that `log_prob` can be differentiated
            w.r.t. `x` (give `x` with `requires_grad=True`) and the model's parameters. Costs memory.
        compute_bits_per_dim (`bool`, *optional*): return `bits_per_dim`; defaults to `True` for image models
            (3-D `sample_shape`) and `False` otherwise.
        bin_width (`float`, defaults to `2 / 255`): the spacing of neighbouring discrete values in model space
            (`2 / 255` for 8-bit images scaled as `k / 127.5 - 1`; `1 / 256` for `[0, 1]` data scaled by `1/256`).
        dequantize_input (`bool`, *optional*): add uniform noise ``bin_width * (u - 1/2)`` to `x` first; defaults to
            `compute_bits_per_dim`. Leave it off when `x` is already dequantised.
        rtol, atol (`float`, default to `1e-5`): tolerances of `"dopri5"`.
        prior ([`VRFMAggregatePosteriorPrior`] or [`VRFMFlowPrior`], *optional*): the prior ``p(z)`` of the marginal
            (``N(0, I)`` by default); [`VRFMPipeline.log_likelihood`] passes its own. A conditional one gives
            ``p(z | c)`` for each example's `prior_condition`.
        proposal (posterior encoder, *optional*): draw the `K` latents from ``q(z | x)`` instead of the prior and
            weight them, ``logmeanexp_k [log p(x | z_k) + log p(z_k) - log q(z_k | x)]`` (importance sampling; still a
            lower bound on ``log p(x)`` in expectation, and far tighter for a given `K` when ``z`` is informative).
            It must read only the data point (`posterior_inputs=("x1",)`, the default of `train_vrfm.py`); ``log
            p(z)`` comes from `prior` (which then needs `log_prob`) or ``N(0, I)``.
        z_chunk_size (`int`, *optional*): how many of the `K` draws to integrate together in one batch (of
            `z_chunk_size * B` trajectories); all `K` by default. Lower it to save memory.
        prior_condition (`torch.Tensor` of shape `(B, condition_dim)`, *optional*): each example's key for a
            conditional `prior`. By default, [`label_condition`] of `class_labels` when they are all real labels,
            and the prior's marginal when they are all the null label (or not given).
        model_kwargs (`dict[str, torch.Tensor]`, *optional*): more inputs of the velocity model, one row per
            example (first dimension `B`): a text-conditioned model's `encoder_hidden_states` and
            `pooled_projections`, for example ([`VRFMTextToImagePipeline.log_likelihood`] passes them). Each draw of
            `z` reuses its example's rows.

    Returns:
        [`VRFMLikelihoodOutput`]: `log_prob` (`(B,)`), `bits_per_dim`, `num_function_evals` and the per-draw parts.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import VRFMMLPModel, log_likelihood
    >>> model = VRFMMLPModel(sample_size=2, latent_dim=4).eval()  # untrained: v is not yet a useful field
    >>> out = log_likelihood(model, torch.randn(5, 2), num_z_samples=8, num_inference_steps=10,
    ...                      generator=torch.Generator().manual_seed(0))
    >>> out.log_prob.shape, out.log_prob_per_z.shape, out.num_function_evals
    (torch.Size([5]), torch.Size([8, 5]), 20)
    ```
    """
    z = _check_inputs(velocity_model, x, z, num_z_samples, divergence, solver, num_inference_steps, generator)
    _check_options(enable_grad, solver, rtol, atol, z_chunk_size, source_log_prob)
    _check_prior_and_proposal(velocity_model.latent_dim, z, prior, proposal)
    source_log_prob = standard_normal_log_prob if source_log_prob is None else source_log_prob
    sample_shape = tuple(velocity_model.sample_shape)
    compute_bits_per_dim, dequantize_input = _discrete_data_options(
        sample_shape, compute_bits_per_dim, dequantize_input, bin_width
    )

    batch_size, num_dims = x.shape[0], math.prod(sample_shape)
    latent_dim = int(velocity_model.latent_dim)
    labels = _prepare_labels(class_labels, batch_size, x.device)
    prior_condition = _prior_condition(prior, prior_condition, labels, velocity_model, batch_size)
    model_inputs = _model_inputs(model_kwargs, labels, batch_size)

    with torch.set_grad_enabled(enable_grad):
        if dequantize_input:
            x = dequantize(x, bin_width, generator)

        zs, log_correction = _draw_latents(
            x, latent_dim, z, num_z_samples, prior, proposal, generator, prior_condition
        )
        draw_chunks = [None] if zs is None else zs.split(z_chunk_size or zs.shape[0])

        ode = {"num_inference_steps": num_inference_steps, "solver": solver, "divergence": divergence}
        ode.update(enable_grad=enable_grad, rtol=rtol, atol=atol)
        parts = [
            _integrate_draws(velocity_model, x, draws, model_inputs, ode, source_log_prob, generator)
            for draws in draw_chunks
        ]
        log_p0, integral, x0 = (torch.cat([part[i] for part in parts]) for i in range(3))
        log_prob_per_z = log_p0 - integral
        log_weights = log_prob_per_z if proposal is None else log_prob_per_z + log_correction
        log_prob = logmeanexp(log_weights, dim=0)
        bpd = bits_per_dim_from_log_prob(log_prob, num_dims, bin_width) if compute_bits_per_dim else None
        if bpd is not None:
            warn_if_impossible_bits_per_dim(bpd, solver, num_inference_steps, divergence)

    return VRFMLikelihoodOutput(
        log_prob=log_prob,
        bits_per_dim=bpd,
        num_function_evals=sum(part[3] for part in parts),
        log_prob_per_z=log_prob_per_z,
        log_weights=log_weights,
        log_prob_source=log_p0,
        divergence_integral=integral,
        x0=x0,
        z=zs,
    )


def _integrate_draws(velocity_model, x, zs, model_inputs: dict, ode: dict, source_log_prob, generator):
    """Integrates every example of `x` under each of the draws `zs` `(count, B, latent_dim)` (or once, for `None`),
    batched as one set of trajectories with the solver options `ode`, each reading its example's `model_inputs`:
    returns ``log p0(x0)`` and the divergence integral, each `(count, B)`, ``x0`` `(count, B, *sample_shape)` and the
    number of function evaluations."""
    count, batch_size, sample_shape = 1 if zs is None else zs.shape[0], x.shape[0], x.shape[1:]
    rows = count * batch_size
    x1 = x.unsqueeze(0).expand(count, *x.shape).reshape(rows, *sample_shape)
    z_rows = None if zs is None else zs.reshape(rows, zs.shape[-1])
    input_rows = {  # one row per example, repeated for each draw (a label given once stays a scalar)
        name: value.repeat(count, *[1] * (value.ndim - 1)) if value.ndim > 0 else value
        for name, value in model_inputs.items()
    }
    probe = rademacher_probe(x1.shape, generator, x.device, x.dtype) if ode["divergence"] == "hutchinson" else None
    velocity_fn = _conditioned_velocity(velocity_model, z_rows, input_rows)
    x0, integral, evals = integrate_log_density(velocity_fn, x1, probe=probe, **ode)
    log_p0 = _source_log_density(source_log_prob, x0)
    per_draw = (count, batch_size)
    return log_p0.reshape(per_draw), integral.reshape(per_draw), x0.reshape(*per_draw, *sample_shape), evals


def _check_prior_and_proposal(latent_dim: int, z, prior, proposal) -> None:
    """Checks the `prior` and the importance-sampling `proposal` of [`log_likelihood`] against the model's z."""
    if proposal is not None:
        inputs = tuple(getattr(getattr(proposal, "config", None), "posterior_inputs", None) or ())
        if inputs != ("x1",) or getattr(proposal, "latent_dim", None) != latent_dim:
            raise ValueError(
                f"`proposal` must be a posterior encoder that reads only the data point (posterior_inputs ('x1',)) "
                f"with latent_dim {latent_dim}, but got {type(proposal).__name__} reading {inputs} "
                f"with latent_dim {getattr(proposal, 'latent_dim', None)}."
            )
        if z is not None:
            raise ValueError("Pass either `z` (log p(x | z)) or `proposal` (the marginal over z), not both.")
        if prior is not None and not hasattr(prior, "log_prob"):
            raise ValueError(f"With a `proposal`, `prior` must have `log_prob`, but {type(prior).__name__} has not.")
    if prior is not None and getattr(prior, "latent_dim", None) != latent_dim:
        raise ValueError(
            f"`prior` must be a prior over z with latent_dim {latent_dim} (for "
            f"example a VRFMAggregatePosteriorPrior), but got {type(prior).__name__} with latent_dim "
            f"{getattr(prior, 'latent_dim', None)}."
        )


def _prior_condition(prior, prior_condition, labels, velocity_model, batch_size: int) -> torch.Tensor | None:
    """The key of each example for a conditional `prior` (`(B, condition_dim)`), or `None` for the marginal."""
    condition_dim = getattr(prior, "condition_dim", 0)
    if prior_condition is not None:
        if condition_dim == 0:
            raise ValueError("`prior_condition` was given, but `prior` is not a conditional prior.")
        check_condition(prior_condition, condition_dim, batch_size, "prior_condition")
        return prior_condition
    num_classes = getattr(velocity_model, "num_classes", None)
    if condition_dim == 0 or labels is None or num_classes is None:
        return None
    labels = labels.expand(batch_size)
    is_null = labels == num_classes
    if is_null.all():
        return None
    if is_null.any():
        raise ValueError(
            f"`class_labels` mix real labels with the null label {num_classes}; with a conditional prior, call "
            "log_likelihood separately for the labelled and the unlabelled examples (or pass `prior_condition`)."
        )
    return label_condition(labels, num_classes)


def _draw_latents(x, latent_dim: int, z, num_z_samples: int, prior, proposal, generator, prior_condition=None):
    """The latents of [`log_likelihood`], `(K, B, latent_dim)` (`None` for plain rectified flow), and with a
    `proposal` the importance-weight correction ``log p(z) - log q(z | x)`` of shape `(K, B)` (else `None`).
    `prior_condition` `(B, condition_dim)`: each example's key for a conditional `prior`."""
    batch_size = x.shape[0]
    condition = {} if prior_condition is None else {"condition": prior_condition.repeat(num_z_samples, 1)}
    if latent_dim == 0:
        return None, None
    if z is not None:
        return z.unsqueeze(0), None
    if proposal is not None:
        posterior = proposal(x1=x.to(proposal.dtype))
        mean, logvar = posterior.mean.to(x.dtype), posterior.logvar.to(x.dtype)
        eps = randn_tensor((num_z_samples, *mean.shape), generator=generator, device=x.device, dtype=x.dtype)
        zs = mean + torch.exp(0.5 * logvar) * eps
        log_q = -0.5 * (eps.pow(2) + logvar + math.log(2 * math.pi)).sum(dim=-1)  # (K, B)
        flat = zs.reshape(-1, latent_dim)
        log_p_z = prior.log_prob(flat, **condition) if prior is not None else standard_normal_log_prob(flat)
        return zs, log_p_z.to(x.dtype).reshape(num_z_samples, batch_size) - log_q
    if prior is not None:
        draws = prior(batch_size=num_z_samples * batch_size, generator=generator, **condition).sample
        return draws.to(device=x.device, dtype=x.dtype).reshape(num_z_samples, batch_size, latent_dim), None
    shape = (num_z_samples, batch_size, latent_dim)
    return randn_tensor(shape, generator=generator, device=x.device, dtype=x.dtype), None


def _source_log_density(source_log_prob, x0: torch.Tensor) -> torch.Tensor:
    """``log p0(x0)``, checked: one value per source point, none NaN or +inf."""
    rows = x0.shape[0]
    log_p0 = source_log_prob(x0)
    if not isinstance(log_p0, torch.Tensor) or tuple(log_p0.shape) != (rows,):
        raise ValueError(
            f"`source_log_prob` must return a tensor of shape ({rows},) for a batch of {rows} source points, "
            f"but got {tuple(log_p0.shape) if isinstance(log_p0, torch.Tensor) else type(log_p0).__name__}."
        )
    invalid = torch.isnan(log_p0) | torch.isposinf(log_p0)
    if invalid.any():
        raise ValueError(
            f"`source_log_prob` returned NaN or +inf for {int(invalid.sum())} of {rows} source points: it "
            "must give a log-density (finite, or -inf outside its support)."
        )
    return log_p0


def _check_options(enable_grad, solver: str, rtol, atol, z_chunk_size, source_log_prob) -> None:
    """Checks the numerical options of [`log_likelihood`]."""
    if not isinstance(enable_grad, bool):
        raise TypeError(f"`enable_grad` must be a bool, but got {type(enable_grad).__name__}.")
    if solver == "dopri5":
        _check_positive_float("rtol", rtol)
        _check_positive_float("atol", atol)
    if z_chunk_size is not None:
        _check_int("z_chunk_size", z_chunk_size, 1)
    if source_log_prob is not None and not callable(source_log_prob):
        raise TypeError(f"`source_log_prob` must be callable, but got {type(source_log_prob).__name__}.")


def _conditioned_velocity(velocity_model, z_rows, input_rows: dict):
    """``v(x, t)`` of the model with its rows' `z` and other inputs fixed, `t` a scalar broadcast over the batch."""

    def velocity_fn(sample, t):
        t_batch = t.reshape(()).expand(sample.shape[0])
        return velocity_model(sample, t_batch, z=z_rows, **input_rows).sample

    return velocity_fn


def _model_inputs(model_kwargs, labels, batch_size: int) -> dict[str, torch.Tensor]:
    """The velocity model's inputs besides the sample, `t` and `z`: `model_kwargs` (checked: a tensor of `B` rows
    each) and the class labels."""
    inputs = {} if labels is None else {"class_labels": labels}
    if model_kwargs is None:
        return inputs
    if not isinstance(model_kwargs, dict):
        raise TypeError(f"`model_kwargs` must be a dict of tensors, but got {type(model_kwargs).__name__}.")
    for name, value in model_kwargs.items():
        if name in ("sample", "timestep", "z", "class_labels"):
            raise ValueError(
                f"`model_kwargs` must not hold {name!r}: pass the data as `x`, `z` and `class_labels` as arguments."
            )
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != batch_size:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"`model_kwargs[{name!r}]` must be a tensor with one row per example ({batch_size}), but got {shape}."
            )
    return {**inputs, **model_kwargs}


def _discrete_data_options(sample_shape, compute_bits_per_dim, dequantize_input, bin_width) -> tuple[bool, bool]:
    """Whether to report bits per dimension and to dequantize the input: both on for images by default."""
    if compute_bits_per_dim is None:
        compute_bits_per_dim = len(sample_shape) == 3
    if dequantize_input is None:
        dequantize_input = compute_bits_per_dim
    if compute_bits_per_dim or dequantize_input:
        _check_positive_float("bin_width", bin_width)
    return compute_bits_per_dim, dequantize_input
