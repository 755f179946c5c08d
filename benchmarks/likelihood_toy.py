"""Test-set negative log-likelihood of VRFM against plain rectified flow (RF) on the 2D toy tasks.

For each task of `diffusers_vrfm.data.toy` (`ring_2d`, `8gaussians_moons`, `gaussian_8gaussians`) it trains

- RF: a `VRFMMLPModel` with `latent_dim=0`, the plain rectified-flow / I-CFM loss;
- VRFM: the same velocity MLP (same width, depth and number of steps) with `latent_dim=8`, a
  `VRFMPosteriorEncoder` on (x0, x1, x_t, t), and `vrfm_loss` with the task's `beta`,

then measures the NLL (nats, mean over held-out target samples) with `diffusers_vrfm.log_likelihood`: exact
divergence, backward Heun with a fixed number of steps, and the task's own source density as ``log p0`` (two of the
three tasks do not start from N(0, I)). For VRFM the marginal ``-logmeanexp_k log p(x | z_k)`` is reported for
several K, computed on nested subsets of one set of draws (an upper bound on the NLL in expectation that tightens with
K). RF is also evaluated with dopri5 as a check of the fixed-step solver. Where the target density is known in closed
form, the NLL of the test samples under the true density (an estimate of the target's entropy: the best any model can
do in expectation) is given as a reference.

Usage:

    python benchmarks/likelihood_toy.py            # full run (~5-10 min on 2 cores), writes results/likelihood_toy.md
    python benchmarks/likelihood_toy.py --quick    # smoke run (< 30 s), writes results/likelihood_toy_quick.md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmarks/likelihood_toy.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import count_parameters, fit_toy_aggregate_prior  # noqa: E402
from benchmarks.harness import ALL_INPUTS, ToyBudget, ToyMethod, train_toy  # noqa: E402
from diffusers_vrfm import log_likelihood  # noqa: E402
from diffusers_vrfm.data import get_toy_task  # noqa: E402

TASKS = ("ring_2d", "8gaussians_moons", "gaussian_8gaussians")
# KL weights from the reference runs in docs/vrfm-method.md (the best-W2 settings of each task family).
BETAS = {"ring_2d": 0.1, "8gaussians_moons": 1.0, "gaussian_8gaussians": 1.0}
LATENT_DIM = 8
DEFAULTS_KL_TARGET = 3.0  # train_vrfm.py's default


@dataclass
class BenchmarkConfig:
    train_steps: int
    batch_size: int
    hidden_dim: int
    lr: float
    num_test: int
    z_counts: tuple[int, ...]
    heun_steps: int
    dopri_check: bool
    seed: int = 0


FULL = BenchmarkConfig(
    train_steps=5000,
    batch_size=256,
    hidden_dim=64,
    lr=1e-3,
    num_test=1000,
    z_counts=(1, 4, 16, 64),
    heun_steps=100,
    dopri_check=True,
)
QUICK = BenchmarkConfig(
    train_steps=150,
    batch_size=256,
    hidden_dim=64,
    lr=1e-3,
    num_test=128,
    z_counts=(1, 4),
    heun_steps=10,
    dopri_check=False,
)


# ------------------------------------------------------------------------------------------------------- densities
def ring_centres(num_modes: int, radius: float) -> torch.Tensor:
    """Centres at angles ``2 pi k / num_modes`` on a circle, as `diffusers_vrfm.data.toy` places its modes."""
    angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    return (radius * torch.stack([angles.cos(), angles.sin()], dim=1)).float()


def mixture_log_prob(centres: torch.Tensor, std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``log p`` of an equal-weight mixture of isotropic Gaussians with the given centres `(M, D)` and `std`."""

    def log_prob(x: torch.Tensor) -> torch.Tensor:
        c = centres.to(device=x.device, dtype=x.dtype)
        squared = (x.reshape(x.shape[0], 1, -1) - c.unsqueeze(0)).pow(2).sum(dim=-1)
        dim = c.shape[1]
        log_components = -0.5 * squared / std**2 - dim * math.log(std) - 0.5 * dim * math.log(2 * math.pi)
        return torch.logsumexp(log_components, dim=1) - math.log(c.shape[0])

    return log_prob


def standard_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * (x.pow(2) + math.log(2 * math.pi)).sum(dim=1)


EIGHT_STD = 0.1**0.25
SOURCE_LOG_PROB = {
    "ring_2d": mixture_log_prob(ring_centres(6, 1 / 3), 0.03),
    "8gaussians_moons": mixture_log_prob(ring_centres(8, 5.0), EIGHT_STD),
    "gaussian_8gaussians": standard_normal_log_prob,
}
TARGET_LOG_PROB = {
    "ring_2d": mixture_log_prob(ring_centres(6, 1.0), 0.03),
    "8gaussians_moons": None,  # two moons: no closed-form density
    "gaussian_8gaussians": mixture_log_prob(ring_centres(8, 5.0), EIGHT_STD),
}


# --------------------------------------------------------------------------------------------------------- training
def train_model(
    task_name: str,
    latent_dim: int,
    beta: float,
    config: BenchmarkConfig,
    seed: int = 0,
    posterior_inputs: tuple[str, ...] = ALL_INPUTS,
    kl_target: float | None = None,
):
    """Trains a velocity MLP through the shared harness (VRFM when `latent_dim > 0`, plain RF otherwise); returns
    (model, encoder, seconds). With `kl_target` (nats), beta adapts from `beta` to hold the KL there."""
    method = ToyMethod(latent_dim=latent_dim, posterior_inputs=posterior_inputs, beta=beta, kl_target=kl_target)
    budget = ToyBudget(
        steps=config.train_steps, batch_size=config.batch_size, lr=config.lr, hidden_dim=config.hidden_dim
    )
    trained = train_toy(get_toy_task(task_name), method, budget, seed)
    return trained.model, trained.encoder, trained.train_seconds


# ------------------------------------------------------------------------------------------------------- evaluation
def mean_and_error(nll: torch.Tensor) -> tuple[float, float]:
    nll = nll.double()
    return nll.mean().item(), (nll.std() / math.sqrt(nll.numel())).item()


def evaluate_task(task_name: str, config: BenchmarkConfig, log=print) -> list[dict]:
    """Trains RF and VRFM on one task and returns the table rows."""
    task = get_toy_task(task_name)
    test = task.sample_target(config.num_test, torch.Generator().manual_seed(10_000 + config.seed))
    source = SOURCE_LOG_PROB[task_name]
    rows = []
    reference = TARGET_LOG_PROB[task_name]
    if reference is not None:
        mean, err = mean_and_error(-reference(test))
        rows.append(dict(task=task_name, method="true target density", params="-", nll=mean, err=err, nfe="-"))

    common = dict(divergence="exact", solver="heun", num_inference_steps=config.heun_steps, source_log_prob=source)
    rf, _, rf_seconds = train_model(task_name, 0, 0.0, config, seed=config.seed)
    out = log_likelihood(rf, test, **common)
    mean, err = mean_and_error(-out.log_prob)
    params = f"{count_parameters(rf)}"
    rows.append(dict(task=task_name, method="RF", params=params, nll=mean, err=err, nfe=out.num_function_evals))
    log(f"{task_name}: RF trained in {rf_seconds:.0f} s, NLL {mean:.3f} +- {err:.3f}")
    if config.dopri_check:
        out = log_likelihood(rf, test, divergence="exact", solver="dopri5", source_log_prob=source)
        mean_d, err_d = mean_and_error(-out.log_prob)
        rows.append(
            dict(task=task_name, method="RF (dopri5 check)", params=params, nll=mean_d, err=err_d,
                 nfe=out.num_function_evals)
        )  # fmt: skip

    k_max = max(config.z_counts)

    def marginal_rows(model, encoder, label: str, **kwargs) -> None:
        """One row per K: the marginal ``-logmeanexp_k log_weights`` on nested subsets of one set of `k_max` draws."""
        out = log_likelihood(
            model, test, num_z_samples=k_max, generator=torch.Generator().manual_seed(20_000 + config.seed),
            **common, **kwargs,
        )  # fmt: skip
        params = f"{count_parameters(model)} (+{count_parameters(encoder)} enc.)"
        for k in config.z_counts:
            mean, err = mean_and_error(-(torch.logsumexp(out.log_weights[:k], dim=0) - math.log(k)))
            rows.append(
                dict(task=task_name, method=f"{label}, K={k}", params=params, nll=mean, err=err,
                     nfe=out.num_function_evals)
            )  # fmt: skip
        log(f"{task_name}: {label}: NLL(K={k_max}) {rows[-1]['nll']:.3f}")

    beta = BETAS[task_name]
    vrfm, encoder, vrfm_seconds = train_model(task_name, LATENT_DIM, beta, config, seed=config.seed)
    log(f"{task_name}: VRFM trained in {vrfm_seconds:.0f} s")
    marginal_rows(vrfm, encoder, f"VRFM beta={beta:g}, dim z={LATENT_DIM}")

    # the package's defaults: posterior on x1, KL held at 3 nats, z from the aggregate prior fitted after training
    vrfm, encoder, vrfm_seconds = train_model(
        task_name, LATENT_DIM, 0.1, config, seed=config.seed, posterior_inputs=("x1",), kl_target=DEFAULTS_KL_TARGET
    )
    log(f"{task_name}: VRFM (defaults) trained in {vrfm_seconds:.0f} s")
    prior = fit_toy_aggregate_prior(encoder, task, 4096, torch.Generator().manual_seed(30_000 + config.seed))
    label = f"VRFM defaults (q(x1), KL {DEFAULTS_KL_TARGET:g} nats, aggregate prior)"
    marginal_rows(vrfm, encoder, label, prior=prior)
    # the same model, with the K latents drawn from the posterior q(z | x1) and importance-weighted
    label = "VRFM defaults, importance-weighted (posterior proposal)"
    marginal_rows(vrfm, encoder, label, prior=prior, proposal=encoder)
    return rows


def format_table(rows: list[dict], config: BenchmarkConfig, seconds: float, quick: bool) -> str:
    lines = [
        f"# Test-set NLL on the 2D toy tasks{' (--quick smoke run, not a result)' if quick else ''}",
        "",
        f"Produced by `python benchmarks/likelihood_toy.py{' --quick' if quick else ''}` in {seconds:.0f} s.",
        "",
        f"- Training: {config.train_steps} Adam steps (lr {config.lr:g}), batch {config.batch_size}, uniform t, "
        f"width-{config.hidden_dim} 3-layer SELU `VRFMMLPModel` for both methods, seed {config.seed}; VRFM adds a "
        f"`VRFMPosteriorEncoder` on (x0, x1, x_t, t), dim z {LATENT_DIM}, `vrfm_loss` (sum reduction).",
        f"- NLL: nats, mean +- standard error over {config.num_test} held-out target samples; exact divergence, "
        f"backward Heun with {config.heun_steps} steps (NFE {2 * config.heun_steps}) unless marked dopri5 "
        "(rtol = atol = 1e-5); log p0 is each task's own source density.",
        "- VRFM: the marginal estimate -logmeanexp_k log p(x | z_k), z_k ~ N(0, I), for each K on nested subsets of "
        f"one set of {max(config.z_counts)} draws: an upper bound on the NLL in expectation that tightens with K.",
        "- VRFM defaults: the package's defaults (a posterior on x1 alone, beta adapted to hold the KL at "
        f"{DEFAULTS_KL_TARGET:g} nats), with z_k drawn from the VRFMAggregatePosteriorPrior (4096 atoms) fitted after "
        "training, the prior its pipeline samples with; `importance-weighted`: the same model, with z_k drawn from "
        "the posterior q(z | x1) and the estimate -logmeanexp_k [log p(x | z_k) + log p(z_k) - log q(z_k | x)] "
        "(`log_likelihood(..., proposal=...)`).",
        "- `true target density`: NLL of the same test samples under the exact target density (an estimate of the "
        "target's entropy, the best achievable in expectation); none for the moons.",
        "- Lower is better.",
        "",
        "| task | method | parameters | test NLL (nats) | NFE |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['task']} | {row['method']} | {row['params']} | {row['nll']:.3f} +- {row['err']:.3f} | "
            f"{row['nfe']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in under 30 s")
    parser.add_argument("--output", default=None, help="where to write the markdown table")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the benchmark machine has 2 cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = QUICK if args.quick else FULL
    config = BenchmarkConfig(**{**config.__dict__, "seed": args.seed})
    here = os.path.dirname(os.path.abspath(__file__))
    output = args.output or os.path.join(
        here, "results", "likelihood_toy_quick.md" if args.quick else "likelihood_toy.md"
    )

    start = time.perf_counter()
    rows = []
    for task_name in args.tasks:
        rows += evaluate_task(task_name, config, log=lambda message: print(message, file=sys.stderr))
    table = format_table(rows, config, time.perf_counter() - start, args.quick)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as handle:
        handle.write(table)
    print(table)
    return table


if __name__ == "__main__":
    main()
