"""The prior hole (issue 6): does any VRFM configuration beat rectified flow at every step count on the toy tasks?

VRFM trains ``v(x_t, t, z)`` with ``z ~ q(z | x0, x1, x_t, t)`` but samples with ``z`` from the prior. When the
aggregate posterior ``q(z) = E_data q(z | ...)`` does not match the prior, prior draws at inference land where training
never put ``z`` (the "prior hole"), and many-step sampling degrades. This script trains RF and a grid of VRFM
configurations with the same network, data stream and budget, and reports, for each:

- W2 (exact, POT) against NFE 1, 2, 4, 8, 16, 100 (Euler, ``z`` drawn once per trajectory, as `VRFMPipeline` does),
  beside the sampling floor (target against target);
- as a *diagnostic only* (not the VRFM sampler), W2 at NFE 8 and 100 with ``z`` redrawn at every step;
- posterior diagnostics: KL to the prior used in training, active units, the norm of the mean and the variance of the
  posterior mean ``mu`` over the data, the aggregate-posterior variance, an MMD between aggregate-posterior draws and
  prior draws (with its noise floor), and the share of the variance of ``mu`` that comes from ``t`` for a fixed pair
  (``t-share``: 0 for a path-level posterior, whose ``z`` means the same thing at every ``t``).

Remedies (each a field of `PriorHoleConfig`): ``beta``; posterior inputs; a free-bits floor; a learned conditional
prior ``p_psi(z | x0)`` (trained through ``KL(q || p_psi)``, sampled at the source point at inference, exactly as
`VRFMPipeline`'s `prior` component); ``prior_mix`` (a fraction of training examples take their ``z`` from the prior,
`diffusers_vrfm.objective.mix_latents`); ``kl_target`` (``beta`` adapted by dual ascent so that the KL sits at a
target in nats); ``beta_scale="velocity"`` (``beta`` multiplied by ``E||x1 - x0||^2``, so one value means the same on
tasks of any scale); ``mmd_weight`` (a penalty ``MMD(q(z), p(z))`` on the batch, as in InfoVAE).

Run from the repository root::

    python -m benchmarks.prior_hole              # the study (4000 steps, 1 seed, 2000 samples; see --help)
    python -m benchmarks.prior_hole --quick      # a smoke run in well under 30 s
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmarks/prior_hole.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    euler_trajectory,
    fit_toy_aggregate_prior,
    format_number,
    machine_description,
    markdown_table,
    mean_std,
    pyplot,
    torch_threads,
    wasserstein2,
    write_json,
)
from benchmarks.harness import (  # noqa: E402
    ALL_INPUTS,
    ToyBudget,
    ToyMethod,
    TrainedToy,
    evaluation_draws,
    task_floors,
    train_toy,
)
from diffusers_vrfm import VRFMScheduler, count_active_units, gaussian_kl, interpolate  # noqa: E402
from diffusers_vrfm.data.toy import ToyTask, get_toy_task  # noqa: E402
from diffusers_vrfm.objective import latent_mmd  # noqa: E402

NFES = (1, 2, 4, 8, 16, 100)
REDRAW_NFES = (8, 100)
STUDY_TASKS = ("two_modes_1d", "ring_2d", "8gaussians_moons", "gaussian_8gaussians")
AGGREGATE_PRIOR_ATOMS = 4096
AGGREGATE_PRIOR_SUFFIX = " +AP"


@dataclass(frozen=True)
class PriorHoleConfig:
    """One configuration. ``latent_dim=0`` is plain rectified flow (no posterior, no KL)."""

    label: str
    beta: float = 1.0
    latent_dim: int = 8
    posterior_inputs: tuple[str, ...] = ALL_INPUTS
    learned_prior: bool = False
    prior_mix: float = 0.0
    free_bits: float = 0.0
    kl_target: float | None = None  # nats (summed over latent dims); beta then adapts, starting from `beta`
    beta_scale: str = "none"  # "none" or "velocity" (beta times E||x1 - x0||^2 of the task)
    mmd_weight: float = 0.0
    beta_warmup: float = 0.0  # fraction of the steps over which beta ramps up linearly from 0 (train_vrfm's warm-up)

    def describe(self) -> str:
        if self.latent_dim == 0:
            return "rectified flow (no z)"
        parts = [
            f"beta {self.beta:g}" + (" x E|v|^2" if self.beta_scale == "velocity" else ""),
            f"q({','.join(self.posterior_inputs)})",
        ]
        if self.learned_prior:
            parts.append("learned prior p(z|x0)")
        if self.prior_mix:
            parts.append(f"prior_mix {self.prior_mix:g}")
        if self.free_bits:
            parts.append(f"free bits {self.free_bits:g}")
        if self.kl_target is not None:
            parts.append(f"KL target {self.kl_target:g} nats")
        if self.mmd_weight:
            parts.append(f"MMD weight {self.mmd_weight:g}")
        if self.beta_warmup:
            parts.append(f"beta warm-up over {self.beta_warmup:.0%} of the steps")
        return ", ".join(parts)


def study_configs() -> list[PriorHoleConfig]:
    """The grid of the study (RF first)."""
    x1xt = ("x1", "x_t", "t")
    path = ("x0", "x1")
    return [  # ordered by priority: the study may be cut short by its time budget
        PriorHoleConfig("RF", latent_dim=0),
        PriorHoleConfig("b1", beta=1.0),
        PriorHoleConfig("b1 q(x0,x1) LP", posterior_inputs=path, learned_prior=True),
        PriorHoleConfig("b10", beta=10.0),
        PriorHoleConfig("b1 mix0.3", prior_mix=0.3),
        PriorHoleConfig("bn0.3", beta=0.3, beta_scale="velocity"),
        PriorHoleConfig("b1 q(x0,x1)", posterior_inputs=path),
        PriorHoleConfig("b1 LP", learned_prior=True),
        PriorHoleConfig("b0.1", beta=0.1),
        PriorHoleConfig("b1 q(x0,x1) LP mix0.3", posterior_inputs=path, learned_prior=True, prior_mix=0.3),
        PriorHoleConfig("KL2 q(x0,x1)", posterior_inputs=path, kl_target=2.0),
        PriorHoleConfig("b1 q(x1,xt,t)", posterior_inputs=x1xt),
        PriorHoleConfig("b1 q(x1)", posterior_inputs=("x1",)),
        PriorHoleConfig("b1 mix0.1", prior_mix=0.1),
        PriorHoleConfig("b10 fb0.5", beta=10.0, free_bits=0.5),
        PriorHoleConfig("b1 mmd10", mmd_weight=10.0),
        PriorHoleConfig("b10 q(x0,x1)", beta=10.0, posterior_inputs=path),
        PriorHoleConfig("b0.1 q(x0,x1) LP", beta=0.1, posterior_inputs=path, learned_prior=True),
        PriorHoleConfig("KL2", kl_target=2.0),
        PriorHoleConfig("bn0.1", beta=0.1, beta_scale="velocity"),
        PriorHoleConfig("b10 q(x1)", beta=10.0, posterior_inputs=("x1",)),
        PriorHoleConfig("b0.1 q(x1)", beta=0.1, posterior_inputs=("x1",)),
        PriorHoleConfig("b3 q(x1)", beta=3.0, posterior_inputs=("x1",)),
        PriorHoleConfig("b1 q(x1) mix0.3", posterior_inputs=("x1",), prior_mix=0.3),
        PriorHoleConfig("KL3 q(x1)", posterior_inputs=("x1",), kl_target=3.0),
        PriorHoleConfig("KL1.5 q(x1)", posterior_inputs=("x1",), kl_target=1.5),
        PriorHoleConfig("KL6 q(x1)", posterior_inputs=("x1",), kl_target=6.0),
        PriorHoleConfig("KL3 q(x1,t)", posterior_inputs=("x1", "t"), kl_target=3.0),
        PriorHoleConfig("KL3", kl_target=3.0),
        PriorHoleConfig("b1 warm", beta_warmup=0.5),
        PriorHoleConfig("b1 q(x1) warm", posterior_inputs=("x1",), beta_warmup=0.5),
    ]


RING_CONFIGS = ("RF", "b0.1", "b1", "b0.1 q(x1)", "b1 q(x0,x1)", "bn0.3", "b1 q(x0,x1) LP")


@dataclass(frozen=True)
class Budget:
    steps: int = 4000
    batch_size: int = 256
    lr: float = 1e-3
    hidden_dim: int = 64
    num_layers: int = 3
    num_samples: int = 2000
    kl_dual_lr: float = 0.01


def velocity_scale(task: ToyTask, num_pairs: int = 20_000) -> float:
    """``E||x1 - x0||^2`` of a task's independent coupling (the size of the regression target)."""
    x0, x1 = task.sample_pairs(num_pairs, torch.Generator().manual_seed(12345))
    return float((x1 - x0).pow(2).sum(dim=1).mean())


def train(task: ToyTask, config: PriorHoleConfig, budget: Budget, seed: int) -> TrainedToy:
    """Trains one configuration through the shared harness; the stream of training pairs depends on `seed` only."""
    method = ToyMethod(
        latent_dim=config.latent_dim,
        posterior_inputs=config.posterior_inputs,
        beta=config.beta * (velocity_scale(task) if config.beta_scale == "velocity" else 1.0),
        kl_target=config.kl_target,
        free_bits=config.free_bits,
        beta_warmup=config.beta_warmup,
        learned_prior=config.learned_prior,
        prior_mix=config.prior_mix,
        mmd_weight=config.mmd_weight,
    )
    toy_budget = ToyBudget(
        steps=budget.steps,
        batch_size=budget.batch_size,
        lr=budget.lr,
        hidden_dim=budget.hidden_dim,
        num_layers=budget.num_layers,
        kl_rate=budget.kl_dual_lr,
        log_every=max(1, budget.steps // 8),
    )
    return train_toy(task, method, toy_budget, seed)


def draw_prior(trained: TrainedToy, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
    """``z`` as inference draws it: from the learned prior at the source point, else from ``N(0, I)``."""
    if trained.model.latent_dim == 0:
        return None
    if trained.prior is not None:
        return trained.prior(x0=x0, generator=generator).sample
    return torch.randn(x0.shape[0], trained.model.latent_dim, generator=generator)


@torch.no_grad()
def euler_redraw(trained: TrainedToy, x0: torch.Tensor, num_steps: int, generator: torch.Generator) -> torch.Tensor:
    """Euler with ``z`` redrawn from the prior at every step (a diagnostic, not the VRFM sampler)."""
    scheduler = VRFMScheduler(solver="euler")
    scheduler.set_timesteps(num_steps)
    x = x0
    for t in scheduler.timesteps:
        z = draw_prior(trained, x0, generator)
        velocity = trained.model(x, t.reshape(()).expand(x.shape[0]), z=z).sample
        x = scheduler.step(velocity, t, x).prev_sample
    return x


def decodability(features: torch.Tensor, target: torch.Tensor) -> float:
    """R^2 of a least-squares fit of `target` on `[1, features, features^2]` (fitted on one half of the rows, scored
    on the other): how much of `target` the posterior mean reveals (1: all of it, 0: nothing)."""
    design = torch.cat([torch.ones(len(features), 1), features, features.pow(2)], dim=1).double()
    half = len(features) // 2
    solution = torch.linalg.lstsq(design[:half], target[:half].double()).solution
    residual = target[half:].double() - design[half:] @ solution
    total = (target[half:].double() - target[half:].double().mean(dim=0)).pow(2).sum()
    return float(1.0 - residual.pow(2).sum() / total.clamp_min(1e-12))


@torch.no_grad()
def diagnostics(trained: TrainedToy, task: ToyTask, seed: int, num: int = 1000, num_times: int = 8) -> dict:
    """Posterior diagnostics (see the module docstring) on `num` fresh pairs."""
    if trained.encoder is None:
        return {}
    generator = torch.Generator().manual_seed(30_011 * (seed + 1))
    x0, x1 = task.sample_pairs(num, generator)
    t = torch.rand(num, generator=generator)
    post = trained.encoder(x0=x0, x1=x1, x_t=interpolate(x0, x1, t), t=t, generator=generator)
    prior_mean = prior_logvar = None
    if trained.prior is not None:
        prior_out = trained.prior(x0=x0, generator=generator)
        prior_mean, prior_logvar = prior_out.mean, prior_out.logvar
    kl = gaussian_kl(post.mean, post.logvar, prior_mean, prior_logvar).sum(dim=1).mean()
    # prior draws at *independent* source points: what inference feeds the net, against the aggregate posterior
    prior_draws = draw_prior(trained, task.sample_source(num, generator), generator)
    reference = draw_prior(trained, task.sample_source(num, generator), generator)
    # how much of the variance of mu over (pair, t) comes from t for a fixed pair
    times = torch.linspace(0.02, 0.98, num_times)
    k = min(num, 256)
    mus = torch.stack(
        [
            trained.encoder(x0=x0[:k], x1=x1[:k], x_t=interpolate(x0[:k], x1[:k], s.expand(k)), t=s.expand(k)).mean
            for s in times
        ]
    )  # (T, k, d)
    within = mus.var(dim=0).sum(dim=-1).mean()
    total = mus.reshape(-1, mus.shape[-1]).var(dim=0).sum()
    mu = post.mean
    return {
        "x0_r2": decodability(mu, x0),
        "x1_r2": decodability(mu, x1),
        "kl": float(kl),
        "active_units": count_active_units(mu),
        "mu_mean_norm": float(mu.mean(dim=0).norm()),
        "mu_var": float(mu.var(dim=0).mean()),
        "aggregate_var": float((mu.var(dim=0) + post.logvar.exp().mean(dim=0)).mean()),
        "mmd": float(latent_mmd(post.sample, prior_draws)),
        "mmd_floor": float(latent_mmd(reference, prior_draws)),
        "t_share": float(within / total.clamp_min(1e-12)),
    }


@torch.no_grad()
def evaluate(
    trained: TrainedToy, task: ToyTask, budget: Budget, seed: int, nfes=NFES, redraw_nfes=REDRAW_NFES
) -> dict:
    """W2 against NFE with one ``z`` per trajectory, the redraw diagnostic, and the posterior diagnostics."""
    draws = evaluation_draws(task, budget.num_samples, seed)
    x0, target = draws.x0, draws.target
    z = draw_prior(trained, x0, draws.z_generator())

    def w2_against_nfe(z_used):
        """W2 at every NFE, and the fraction on a mode at NFE 100 (reusing the NFE-100 samples when measured)."""
        curve, final = {}, None
        for nfe in nfes:
            samples = euler_trajectory(trained.model, x0, nfe, z=z_used).states[-1]
            curve[str(nfe)] = wasserstein2(samples, target)
            final = samples if nfe == 100 else final
        if task.target_modes is None:
            return curve, None
        if final is None:
            final = euler_trajectory(trained.model, x0, 100, z=z_used).states[-1]
        return curve, task.fraction_on_mode(final)

    w2, on_mode = w2_against_nfe(z)
    redraw = {}
    if trained.model.latent_dim:
        for nfe in redraw_nfes:
            samples = euler_redraw(trained, x0, nfe, draws.z_generator())
            redraw[str(nfe)] = wasserstein2(samples, target)
    aggpost = {}
    if trained.encoder is not None and tuple(trained.encoder.config.posterior_inputs) == ("x1",):
        # diagnostic: z from the aggregate posterior (q(z | x1') at fresh independent targets x1'), not the prior:
        # an oracle prior that tells a prior hole (the gap closes) from other errors (it stays)
        agg_generator = torch.Generator().manual_seed(50_021 * (seed + 1))
        x1_fresh = task.sample_target(budget.num_samples, agg_generator)
        z_agg = trained.encoder(x1=x1_fresh, generator=agg_generator).sample
        for nfe in nfes:
            aggpost[str(nfe)] = wasserstein2(euler_trajectory(trained.model, x0, nfe, z=z_agg).states[-1], target)
    aggprior, on_mode_aggprior = {}, None
    if trained.encoder is not None and trained.prior is None:
        # the package's remedy: z from VRFMAggregatePosteriorPrior fitted on training pairs after training
        fitted = fit_toy_aggregate_prior(
            trained.encoder, task, AGGREGATE_PRIOR_ATOMS, torch.Generator().manual_seed(60_013 * (seed + 1))
        )
        z_fitted = fitted(x0=x0, generator=draws.z_generator()).sample
        aggprior, on_mode_aggprior = w2_against_nfe(z_fitted)
    return {
        "w2": w2,
        "w2_redraw": redraw,
        "w2_aggpost": aggpost,
        "w2_aggprior": aggprior,
        "on_mode_nfe100": on_mode,
        "on_mode_aggprior_nfe100": on_mode_aggprior,
        "posterior": diagnostics(trained, task, seed),
    }


# --------------------------------------------------------------------------------------------------------- reporting
def summarise(results: dict, task: str, label: str, key: str, sub: str, seeds=None) -> float:
    """The mean over seeds (only `seeds`, when given) of `run[key][sub]`."""
    runs = results["tasks"][task]["configs"][label]["runs"]
    runs = {s: r for s, r in runs.items() if seeds is None or s in seeds}
    values = [(run.get(key) or {}).get(sub) for run in runs.values()]
    return mean_std([v for v in values if v is not None])[0]


def goal_check(results: dict, task: str, label: str, nfes) -> tuple[bool, bool, float]:
    """(no worse than RF at every NFE, <= 0.5x RF at NFE 1 and 2, worst ratio to RF over NFEs), against RF on the
    same seeds."""
    seeds = set(results["tasks"][task]["configs"][label]["runs"])
    ratios = []
    for nfe in nfes:
        ours = summarise(results, task, label, "w2", str(nfe))
        rf = summarise(results, task, "RF", "w2", str(nfe), seeds=seeds)
        ratios.append(ours / rf)
    every = all(r <= 1.0 for r in ratios)
    few = all(r <= 0.5 for n, r in zip(nfes, ratios) if n in (1, 2))
    return every, few, max(ratios)


DIAGNOSTIC_COLUMNS = {  # column -> the key of the posterior diagnostic, mean over seeds
    "KL": "kl",
    "AU": "active_units",
    "|E mu|": "mu_mean_norm",
    "Var mu": "mu_var",
    "agg var": "aggregate_var",
    "MMD": "mmd",
    "MMD floor": "mmd_floor",
    "t-share": "t_share",
    "R2 x0": "x0_r2",  # the R^2 columns are absent from runs made before this diagnostic existed
    "R2 x1": "x1_r2",
}


def w2_table(results: dict, task: str) -> str:
    """W2 against NFE for every configuration of `task`, with its worst ratio to RF and whether it meets the goal."""
    entry, nfes = results["tasks"][task], results["meta"]["nfes"]
    headers = ["config", "settings", "seeds", *[f"NFE {n}" for n in nfes], "worst/RF", "goal"]
    if entry["has_modes"]:
        headers.append("on mode @100")
    rows = []
    for label, cfg in entry["configs"].items():
        w2 = [summarise(results, task, label, "w2", str(n)) for n in nfes]
        every, few, worst = goal_check(results, task, label, nfes) if "RF" in entry["configs"] else (0, 0, math.nan)
        goal = "yes" if every and few else ("few-step only" if few else ("all-NFE only" if every else "no"))
        seeds = ",".join(sorted(cfg["runs"]))
        row = [label, cfg["settings"], seeds, *w2, worst, "—" if label == "RF" else goal]
        if entry["has_modes"]:
            row.append(_on_mode(cfg))
        rows.append(row)
    return markdown_table(headers, rows)


def diagnostics_table(results: dict, task: str) -> str:
    """The posterior diagnostics of every VRFM configuration of `task`, with the redrawn-z and oracle-z W2."""
    entry, meta = results["tasks"][task], results["meta"]
    ends, redraw_nfes = (meta["nfes"][0], meta["nfes"][-1]), meta["redraw_nfes"]
    headers = ["config", *DIAGNOSTIC_COLUMNS, *[f"redraw NFE {n}" for n in redraw_nfes]]
    headers += [f"agg-post z NFE {n}" for n in ends] + ["final beta", "train s"]
    rows = []
    for label, cfg in entry["configs"].items():
        if label == "RF":
            continue
        runs = list(cfg["runs"].values())
        post = [r["posterior"] for r in runs]
        row = [label] + [mean_std([p[key] for p in post if key in p])[0] for key in DIAGNOSTIC_COLUMNS.values()]
        row += [summarise(results, task, label, "w2_redraw", str(n)) for n in redraw_nfes]
        row += [summarise(results, task, label, "w2_aggpost", str(n)) for n in ends]
        row += [mean_std([r["beta_final"] for r in runs])[0], mean_std([r["train_seconds"] for r in runs])[0]]
        rows.append(row)
    return markdown_table(headers, rows)


def render(results: dict) -> str:
    meta = results["meta"]
    budget = meta["budget"]
    lines = [
        "# The prior hole (issue 6): VRFM configurations against rectified flow",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in meta.get("parts", [meta["command"]])) + "  ",
        f"Machine: {meta['machine']}  ",
        f"Budget: {budget['steps']} steps, batch {budget['batch_size']}, Adam {budget['lr']:g}, width-"
        f"{budget['hidden_dim']} {budget['num_layers']}-layer MLPs (velocity and posterior), dim z 8 unless stated, "
        f"seeds {meta['seeds']}, W2 on {budget['num_samples']} vs {budget['num_samples']} samples, Euler with one z "
        f"per trajectory. Total {meta.get('total_seconds', 0):.0f} s."
        + (" **QUICK smoke run: not a result.**" if meta["quick"] else ""),
        "",
        "Each W2 cell is the mean over the seeds in its row (RF's row averages all seeds; `worst/RF` and `goal` "
        "compare each configuration with RF on the same seeds). "
        "`goal` = no worse than RF at every NFE *and* <= 0.5x RF at NFE 1-2 (single-seed numbers: differences of a "
        "few per cent are noise). `worst/RF` = the largest ratio to RF's W2 over NFEs. `redraw` = W2 with z redrawn "
        "at every Euler step (a diagnostic, not the VRFM sampler). Diagnostics: `KL` to the training prior (nats), "
        "`AU` active units, `|E mu|` norm of the mean posterior mean, `Var mu` its variance over data (mean over "
        "dims), "
        "`agg var` aggregate-posterior variance (1 for a matched N(0, I)), `MMD` aggregate posterior vs prior draws "
        "(`floor` = prior vs prior), `t-share` the share of Var mu due to t for a fixed pair, `R2 x0`/`R2 x1` how "
        "much of x0/x1 a quadratic fit on mu recovers (held-out R^2; nan where not measured), `agg-post z` W2 with z "
        "drawn from the aggregate posterior q(z | x1') at fresh targets instead of the prior (an oracle prior; q(x1) "
        "only).",
        "",
    ]
    for task, entry in results["tasks"].items():
        floor = mean_std(entry["floor"])[0]
        lines += [f"## {task} (sampling floor W2 {format_number(floor)})", ""]
        lines += ["W2 against NFE:", "", w2_table(results, task), ""]
        lines += ["Diagnostics:", "", diagnostics_table(results, task), ""]
    lines += results.get("findings", [])
    return "\n".join(lines) + "\n"


def _on_mode(cfg: dict) -> float:
    values = [r["on_mode_nfe100"] for r in cfg["runs"].values() if r.get("on_mode_nfe100") is not None]
    return mean_std(values)[0]


def plot_curves(results: dict, path: Path) -> None:
    """W2 against NFE, one panel per task, every configuration (RF in black)."""
    plt = pyplot()
    tasks = list(results["tasks"])
    nfes = results["meta"]["nfes"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        entry = results["tasks"][task]
        for i, label in enumerate(entry["configs"]):
            w2 = [summarise(results, task, label, "w2", str(n)) for n in nfes]
            style = {"color": "black", "linewidth": 2.5} if label == "RF" else {"color": plt.cm.tab20(i % 20)}
            ax.plot(nfes, w2, marker="o", markersize=3, label=label, **style)
        ax.axhline(mean_std(entry["floor"])[0], color="gray", linestyle=":", label="sampling floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE (Euler)")
        ax.set_ylabel("W2")
        ax.set_title(task)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(STUDY_TASKS))
    parser.add_argument("--configs", nargs="+", default=None, help="labels from the grid (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="prior_hole", help="basename of the .md/.json/.png outputs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of a sequential run (--jobs 1)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="processes that train (task, configuration, seed) jobs in parallel"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run in well under 30 s (not a result)")
    parser.add_argument(
        "--merge", nargs="+", type=Path, default=None, help="render the tasks of these result JSONs (no training)"
    )
    parser.add_argument("--findings", type=Path, default=None, help="a markdown file appended to the report")
    return parser


def merge_results(paths: list[Path]) -> dict:
    """Several result JSONs (e.g. one process per task) as one result: tasks are joined and the configurations of a
    task found in several files are joined too (the floor is the first file's); meta from the first."""
    merged = None
    for path in paths:
        part = json.loads(Path(path).read_text())
        if merged is None:
            merged = part
            merged["meta"]["parts"] = [part["meta"]["command"]]
            continue
        for task, entry in part["tasks"].items():
            if task in merged["tasks"]:  # the same task from another process: add its configurations and seeds
                configs = merged["tasks"][task]["configs"]
                for label, config in entry["configs"].items():
                    if label in configs and configs[label]["settings"] == config["settings"]:
                        configs[label]["runs"].update(config["runs"])
                    else:
                        configs[label] = config
                if len(entry["floor"]) > 0 and set(part["meta"]["seeds"]) - set(merged["meta"]["seeds"]):
                    merged["tasks"][task]["floor"] = merged["tasks"][task]["floor"] + entry["floor"]
            else:
                merged["tasks"][task] = entry
        merged["meta"]["parts"].append(part["meta"]["command"])
        merged["meta"]["seeds"] = sorted(set(merged["meta"]["seeds"]) | set(part["meta"]["seeds"]))
        merged["meta"]["total_seconds"] = merged["meta"].get("total_seconds", 0) + part["meta"].get("total_seconds", 0)
    return merged


def write_outputs(results: dict, output_dir: Path, name: str, findings: Path | None = None) -> None:
    if findings is not None:
        results["findings"] = ["", Path(findings).read_text()]
    for entry in results["tasks"].values():  # configurations no job finished (a study cut short) are left out
        entry["configs"] = {label: config for label, config in entry["configs"].items() if config["runs"]}
    write_json(output_dir / f"{name}.json", results)
    (output_dir / f"{name}.md").write_text(render(results))
    plot_curves(results, output_dir / f"{name}_w2_vs_nfe.png")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.merge:
        results = merge_results(args.merge)
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        write_outputs(results, Path(args.output_dir), args.name, args.findings)
        return results
    with torch_threads(args.threads):
        return run(args, argv)


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Trains and scores every (task, configuration, seed) job of the study `args` describes, writing the partial
    results after each job, then the report."""
    if args.jobs < 1:
        raise ValueError(f"`--jobs` must be an integer >= 1, but got {args.jobs}.")
    grid = {c.label: c for c in study_configs()}
    labels = args.configs or list(grid)
    unknown = [label for label in labels if label not in grid]
    if unknown:
        raise ValueError(f"`--configs` got unknown labels {unknown}; valid labels are {list(grid)}.")
    nfes, redraw_nfes = NFES, REDRAW_NFES
    if args.quick:
        args.steps, args.num_samples, args.seeds = min(args.steps, 30), min(args.num_samples, 128), args.seeds[:1]
        args.tasks = args.tasks[:1]
        labels = args.configs or ["RF", "b1", "b1 q(x0,x1) LP mix0.3"]
        nfes, redraw_nfes = (1, 2, 8), (8,)
    budget = Budget(steps=args.steps, num_samples=args.num_samples)
    results = {
        "meta": {
            "command": ("python -m benchmarks.prior_hole " + " ".join(shlex.quote(a) for a in argv)).strip(),
            "machine": machine_description(),
            "budget": asdict(budget),
            "seeds": list(args.seeds),
            "nfes": list(nfes),
            "redraw_nfes": list(redraw_nfes),
            "quick": bool(args.quick),
        },
        "tasks": {},
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # every (task, configuration, seed) is one job; jobs run in priority order (configurations in grid order, then
    # seeds, then tasks), so that a study cut short by its time budget keeps the most important cells
    jobs = []
    for task_name in args.tasks:
        task = get_toy_task(task_name)
        floors = task_floors(task, budget.num_samples, args.seeds)
        results["tasks"][task_name] = {"floor": floors, "has_modes": task.target_modes is not None, "configs": {}}
    for label in labels:
        for seed in args.seeds:
            for task_name in args.tasks:
                if task_name == "ring_2d" and not args.configs and not args.quick and label not in RING_CONFIGS:
                    continue
                jobs.append((task_name, label, seed))
    for task_name, label, _ in jobs:  # table rows in grid order, whatever order jobs finish in
        results["tasks"][task_name]["configs"].setdefault(label, {"settings": grid[label].describe(), "runs": {}})

    def record(task_name: str, label: str, seed: int, metrics: dict) -> None:
        entry = results["tasks"][task_name]
        entry["configs"][label]["runs"][str(seed)] = metrics
        if metrics["w2_aggprior"]:  # the same trained model, sampled with the fitted aggregate-posterior prior
            fitted_entry = entry["configs"].setdefault(
                label + AGGREGATE_PRIOR_SUFFIX,
                {
                    "settings": f"{grid[label].describe()}, z from VRFMAggregatePosteriorPrior "
                    f"({AGGREGATE_PRIOR_ATOMS} atoms)",
                    "runs": {},
                },
            )
            fitted_entry["runs"][str(seed)] = {
                **metrics,
                "w2": metrics["w2_aggprior"],
                "on_mode_nfe100": metrics["on_mode_aggprior_nfe100"],
            }
        w2 = " ".join(f"{v:.3f}" for v in metrics["w2"].values())
        print(f"[{time.perf_counter() - start:6.0f}s] {task_name} {label:>24} s{seed}: W2 {w2}", flush=True)
        results["meta"]["total_seconds"] = time.perf_counter() - start
        write_json(output_dir / f"{args.name}.json", results)

    job_arguments = [(task_name, grid[label], budget, seed, nfes, redraw_nfes) for task_name, label, seed in jobs]
    if args.jobs == 1:
        for (task_name, label, seed), arguments in zip(jobs, job_arguments):
            record(task_name, label, seed, run_job(*arguments))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            args.jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            futures = {pool.submit(run_job, *arguments): job for job, arguments in zip(jobs, job_arguments)}
            for future in as_completed(futures):
                record(*futures[future], future.result())
    results["meta"]["total_seconds"] = time.perf_counter() - start
    write_outputs(results, output_dir, args.name, args.findings)
    return results


def run_job(task_name: str, config: PriorHoleConfig, budget: Budget, seed: int, nfes, redraw_nfes) -> dict:
    """Trains and evaluates one configuration on one task with one seed (one process of a parallel study)."""
    task = get_toy_task(task_name)
    trained = train(task, config, budget, seed)
    metrics = evaluate(trained, task, budget, seed, nfes, redraw_nfes)
    metrics.update(beta_final=trained.beta_final, train_seconds=trained.train_seconds, log=trained.log)
    return metrics


if __name__ == "__main__":
    main()
