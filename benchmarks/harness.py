"""The shared train-and-evaluate harness of the toy benchmarks (`toy_quality`, `prior_hole`, `likelihood_toy`).

A toy benchmark compares ways of training the same velocity MLP. What it varies is a [`ToyMethod`]; what every method
shares is a [`ToyBudget`]; [`train_toy`] is the one training loop, and [`evaluation_draws`] the common random numbers
every method is scored on. The benchmark files keep only their grids of methods, their metrics and their reports.

Random streams: initial weights are drawn after `set_seed(seed)`; the training pairs, times and posterior draws come
from one generator seeded with `seed` only, so every method of a seed sees the same pairs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from benchmarks.common import fit_toy_aggregate_prior, sampling_floor, set_seed
from diffusers_vrfm import (
    VRFMMLPModel,
    VRFMPosteriorEncoder,
    adapt_beta,
    interpolate,
    sample_timesteps,
    target_velocity,
    vrfm_loss,
)
from diffusers_vrfm.data.toy import ToyTask
from diffusers_vrfm.objective import latent_mmd, mix_latents
from diffusers_vrfm.training.step import beta_at_step

ALL_INPUTS = ("x0", "x1", "x_t", "t")
COUPLINGS = ("independent", "icfm", "otcfm")


@dataclass(frozen=True)
class ToyMethod:
    """How one method trains (`latent_dim=0`: no posterior, plain rectified flow or a torchcfm baseline).

    Args:
        latent_dim (`int`): the dimension of `z`; 0 trains without a latent.
        posterior_inputs (`tuple[str]`): what the posterior reads.
        beta (`float`): the KL weight (sum convention), or the starting value that `kl_target` adapts.
        kl_target (`float`, *optional*): nats; beta adapts by dual ascent (`diffusers_vrfm.adapt_beta`).
        free_bits (`float`): the floor under each latent dimension's KL.
        beta_warmup (`float`): the fraction of the steps over which beta ramps up from 0 (`beta_at_step`).
        learned_prior (`bool`): train a prior `p(z | x0)` through the KL; the pipeline then samples `z` from it.
        prior_mix (`float`): the share of examples whose `z` comes from the prior (`mix_latents`).
        mmd_weight (`float`): the weight of an MMD penalty between posterior and prior draws of `z`.
        coupling (`str`): `"independent"` (RF and VRFM), or torchcfm's `"icfm"` / `"otcfm"` draws of (t, x_t, u_t).
        cfm_sigma (`float`): torchcfm's sigma.
        aggregate_prior_atoms (`int`): > 0 fits a `VRFMAggregatePosteriorPrior` after training, to sample `z` from.
    """

    latent_dim: int = 0
    posterior_inputs: tuple[str, ...] = ALL_INPUTS
    beta: float = 1.0
    kl_target: float | None = None
    free_bits: float = 0.0
    beta_warmup: float = 0.0
    learned_prior: bool = False
    prior_mix: float = 0.0
    mmd_weight: float = 0.0
    coupling: str = "independent"
    cfm_sigma: float = 0.0
    aggregate_prior_atoms: int = 0


@dataclass(frozen=True)
class ToyBudget:
    """What every method of a benchmark shares: steps, batch, Adam's learning rate, the MLPs' size and the KL dual
    step size."""

    steps: int = 20_000
    batch_size: int = 256
    lr: float = 1e-3
    hidden_dim: int = 64
    num_layers: int = 3
    kl_rate: float = 0.01
    log_every: int = 1000


@dataclass
class TrainedToy:
    """A trained method: the velocity net, the posterior and the pipeline's `prior` component (the learned prior or
    the fitted aggregate prior; `None` for `N(0, I)`), the final beta, the training wall time and the log."""

    model: VRFMMLPModel
    encoder: VRFMPosteriorEncoder | None
    prior: torch.nn.Module | None
    beta_final: float
    train_seconds: float
    log: list[dict] = field(default_factory=list)


def build_toy_models(task: ToyTask, method: ToyMethod, budget: ToyBudget):
    """The velocity MLP, the posterior (with a latent) and the learned prior (when asked) of one method."""
    model = VRFMMLPModel(
        sample_size=task.dim, latent_dim=method.latent_dim, hidden_dim=budget.hidden_dim, num_layers=budget.num_layers
    )
    if method.latent_dim == 0:
        return model, None, None

    def encoder(inputs):
        return VRFMPosteriorEncoder(
            sample_size=task.dim, latent_dim=method.latent_dim, posterior_inputs=inputs, hidden_dim=budget.hidden_dim
        )

    return model, encoder(method.posterior_inputs), encoder(("x0",)) if method.learned_prior else None


def _flow_matcher(method: ToyMethod):
    if method.coupling not in COUPLINGS:
        raise ValueError(f"`coupling` must be one of {COUPLINGS}, but got {method.coupling!r}.")
    if method.coupling == "independent":
        return None
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )

    cls = ConditionalFlowMatcher if method.coupling == "icfm" else ExactOptimalTransportConditionalFlowMatcher
    return cls(sigma=method.cfm_sigma)


def _latent_loss(models, method: ToyMethod, x0, x1, t, beta: float, generator: torch.Generator):
    """The VRFM loss of one batch with the prior-hole remedies of `method`; returns (loss to minimise, parts)."""
    model, encoder, prior_model = models
    x_t = interpolate(x0, x1, t)
    posterior = encoder(x0=x0, x1=x1, x_t=x_t, t=t, generator=generator)
    z, prior_draw, prior_mean, prior_logvar = posterior.sample, None, None, None
    if prior_model is not None:
        prior_out = prior_model(x0=x0, generator=generator)
        prior_mean, prior_logvar, prior_draw = prior_out.mean, prior_out.logvar, prior_out.sample
    elif method.prior_mix or method.mmd_weight:
        prior_draw = torch.randn(z.shape, generator=generator)
    if method.prior_mix:
        z = mix_latents(z, prior_draw, method.prior_mix, generator=generator)
    out = vrfm_loss(
        model(x_t, t, z=z).sample,
        target_velocity(x0, x1),
        posterior.mean,
        posterior.logvar,
        beta=beta,
        free_bits=method.free_bits,
        prior_mean=prior_mean,
        prior_logvar=prior_logvar,
    )
    loss = out.loss
    if method.mmd_weight:
        loss = loss + method.mmd_weight * latent_mmd(posterior.sample, prior_draw.detach())
    return loss, out


def train_toy(task: ToyTask, method: ToyMethod, budget: ToyBudget, seed: int) -> TrainedToy:
    """Trains one method on one task with one seed (Adam, fresh pairs every step) and fits its aggregate prior.

    Example:

    ```py
    >>> from benchmarks.harness import ToyBudget, ToyMethod, train_toy
    >>> from diffusers_vrfm.data.toy import get_toy_task
    >>> trained = train_toy(get_toy_task("ring_2d"), ToyMethod(latent_dim=2, kl_target=3.0), ToyBudget(steps=3), 0)
    >>> trained.model.latent_dim, len(trained.log), trained.beta_final > 0
    (2, 1, True)

    ```
    """
    set_seed(seed)
    models = build_toy_models(task, method, budget)
    model, encoder, _ = models
    optimizer = torch.optim.Adam([p for m in models if m is not None for p in m.parameters()], lr=budget.lr)
    generator = torch.Generator().manual_seed(1_000_003 * (seed + 1))
    flow_matcher = _flow_matcher(method)
    beta, warmup_steps = method.beta, round(method.beta_warmup * budget.steps)
    log, window = [], {"loss": 0.0, "mse": 0.0, "kl": 0.0, "n": 0}
    start = time.perf_counter()
    for step in range(1, budget.steps + 1):
        x0, x1 = task.sample_pairs(budget.batch_size, generator)
        if flow_matcher is not None:  # torchcfm re-pairs (OT) and draws (t, x_t, u_t) itself
            t, x_t, u_t = flow_matcher.sample_location_and_conditional_flow(x0, x1)
            out = vrfm_loss(model(x_t, t).sample, u_t)
            loss = out.loss
        else:
            t = sample_timesteps(budget.batch_size, "uniform", generator=generator)
            if encoder is None:
                out = vrfm_loss(model(interpolate(x0, x1, t), t).sample, target_velocity(x0, x1))
                loss = out.loss
            else:
                step_beta = beta_at_step(beta, step - 1, warmup_steps)
                loss, out = _latent_loss(models, method, x0, x1, t, step_beta, generator)
                if method.kl_target is not None:
                    beta = adapt_beta(beta, out.kl.item(), method.kl_target, rate=budget.kl_rate)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in (("loss", loss), ("mse", out.mse), ("kl", out.kl)):
            window[key] += value.item()
        window["n"] += 1
        if step % budget.log_every == 0 or step == budget.steps:
            n = window.pop("n")
            log.append({"step": step, **{k: v / n for k, v in window.items()}, "beta": beta})
            window = {"loss": 0.0, "mse": 0.0, "kl": 0.0, "n": 0}
    train_seconds = time.perf_counter() - start
    for module in models:
        if module is not None:
            module.eval()
    prior = models[2]
    if encoder is not None and prior is None and method.aggregate_prior_atoms:
        # fitted on fresh training pairs after training, as train_vrfm.py does
        prior = fit_toy_aggregate_prior(encoder, task, method.aggregate_prior_atoms, generator)
    return TrainedToy(model, encoder, prior, beta, train_seconds, log)


@dataclass
class EvaluationDraws:
    """The common random numbers of one seed's evaluation: source points, a fresh target sample, and the seed of the
    generator that draws `z` (the same for every method and NFE)."""

    x0: torch.Tensor
    target: torch.Tensor
    z_seed: int

    def z_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.z_seed)


def evaluation_draws(task: ToyTask, num_samples: int, seed: int) -> EvaluationDraws:
    """Source points and target samples for seed `seed` (the same for every method)."""
    generator = torch.Generator().manual_seed(10_007 * (seed + 1))
    x0 = task.sample_source(num_samples, generator)
    return EvaluationDraws(x0, task.sample_target(num_samples, generator), 20_011 * (seed + 1))


def task_floors(task: ToyTask, num_samples: int, seeds) -> list[float]:
    """The sampling floor (W2 of target against target, `num_samples` each) for every seed."""
    return [sampling_floor(task.sample_target, num_samples, seed=40_009 + s) for s in seeds]
