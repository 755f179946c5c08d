"""Toy quality: VRFM against plain rectified flow and torchcfm's I-CFM and OT-CFM on four transport tasks.

Every method trains the same velocity network (`VRFMMLPModel`, same width and depth; `latent_dim=0` for the baselines,
so only the coupling and the latent differ), with the same batch, optimiser, learning rate and number of steps, on the
same stream of training pairs, over several seeds. Sampling goes through `VRFMPipeline` + `VRFMScheduler` (Euler at
fixed NFE, and dopri5 with its NFE counted), from the same source points for every method.

Metrics (see `benchmarks/common.py`): exact W2 (POT EMD) against a fresh target sample, with the sampling floor
(target against target) beside it; sliced W2; fraction of samples on a target mode (tasks with discrete modes);
straightness along NFE-100 paths; training wall time; for VRFM, the posterior diagnostics of issue 6 (KL, active units,
moments of the posterior mean, MMD between aggregate-posterior and prior draws) and the spread of `v` over `z`.

Run from the repository root::

    python -m benchmarks.toy_quality                 # the full run (20k steps x 3 seeds x 4 tasks x 4 methods)
    python -m benchmarks.toy_quality --steps 5000    # a reduced budget, stated in the table header
    python -m benchmarks.toy_quality --quick         # a smoke run in well under 30 s

The `VRFM` rows use the package's defaults (those of `train_vrfm.py`: a posterior on `x1`, dim z 8, beta adapted to
hold the KL at 3 nats, z drawn from a `VRFMAggregatePosteriorPrior` fitted after training), each overridable with
`--beta`, `--latent-dim`, `--posterior-inputs`. The `VRFM (paper)` rows (left out with `--no-paper`) use the paper's
settings and those of the reference runs in `shared/docs/vrfm-method.md`, with `z ~ N(0, I)`; `beta` multiplies the
KL summed over latent dimensions against the squared error summed over data dimensions (`reduction="sum"`):

| task | beta | dim z | posterior inputs | source |
|---|---|---|---|---|
| two_modes_1d | 1.0 | 4 | x0, x1, x_t, t | the paper's 1D setting |
| ring_2d | 0.1 | 8 | x0, x1, x_t | the paper's 2D setting |
| 8gaussians_moons | 1.0 | 8 | x0, x1, x_t, t | the reference runs (beta 1 gave the few-step gain) |
| gaussian_8gaussians | 1.0 | 8 | x0, x1, x_t, t | the reference runs |

Extra VRFM configurations (for W2-against-NFE curves of every configuration tried) are added with `--variant`, e.g.
`--variant "b0.01:beta=0.01,latent_dim=8,inputs=x1+x_t+t,kl_target=off,prior_atoms=0"`.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmarks/toy_quality.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    count_parameters,
    euler_trajectory,
    format_mean_std,
    machine_description,
    markdown_table,
    mean_std,
    posterior_diagnostics,
    pyplot,
    sliced_wasserstein2,
    straightness,
    torch_threads,
    wasserstein2,
    write_json,
)
from benchmarks.harness import (  # noqa: E402
    ALL_INPUTS,
    ToyBudget,
    ToyMethod,
    TrainedToy,
    build_toy_models,
    evaluation_draws,
    task_floors,
    train_toy,
)
from diffusers_vrfm import VRFMMLPModel, VRFMPipeline, VRFMScheduler, interpolate  # noqa: E402
from diffusers_vrfm.data.toy import TOY_TASKS, ToyTask, get_toy_task  # noqa: E402
from diffusers_vrfm.schedulers.flow_scheduler_adapter import SINGLE_EVAL_SCHEDULERS, make_flow_scheduler  # noqa: E402

DEFAULT_NFES = (1, 2, 4, 8, 16, 100)
BASELINE_KINDS = ("rf", "icfm", "otcfm")
METHOD_KINDS = ("vrfm",) + BASELINE_KINDS
METHOD_LABELS = {"vrfm": "VRFM", "rf": "RF", "icfm": "I-CFM", "otcfm": "OT-CFM"}
PAPER_LABEL = "VRFM (paper)"


@dataclass(frozen=True)
class VRFMSettings:
    """The VRFM-specific knobs of one configuration (`beta` in the package's sum convention)."""

    beta: float
    latent_dim: int
    posterior_inputs: tuple[str, ...] = ALL_INPUTS
    free_bits: float = 0.0
    kl_target: float | None = None  # nats; beta then adapts from `beta` (`diffusers_vrfm.adapt_beta`)
    aggregate_prior_atoms: int = 0  # > 0: sample z from a VRFMAggregatePosteriorPrior fitted after training

    def describe(self) -> str:
        text = f"beta {self.beta:g}, dim z {self.latent_dim}, q({', '.join(self.posterior_inputs)})"
        text += f", free bits {self.free_bits:g}" if self.free_bits else ""
        text += f", KL target {self.kl_target:g} nats" if self.kl_target is not None else ""
        return text + (f", aggregate prior ({self.aggregate_prior_atoms} atoms)" if self.aggregate_prior_atoms else "")


# The package's defaults (those of `train_vrfm.py`, measured in benchmarks/results/prior_hole_20k.md): the "VRFM" rows.
PACKAGE_DEFAULTS = VRFMSettings(
    beta=0.1, latent_dim=8, posterior_inputs=("x1",), kl_target=3.0, aggregate_prior_atoms=4096
)
TASK_DEFAULTS: dict[str, VRFMSettings] = {task: PACKAGE_DEFAULTS for task in TOY_TASKS}
# The paper's settings and those of the reference runs: the "VRFM (paper)" rows.
PAPER_SETTINGS: dict[str, VRFMSettings] = {
    "two_modes_1d": VRFMSettings(beta=1.0, latent_dim=4, posterior_inputs=ALL_INPUTS),
    "ring_2d": VRFMSettings(beta=0.1, latent_dim=8, posterior_inputs=("x0", "x1", "x_t")),
    "8gaussians_moons": VRFMSettings(beta=1.0, latent_dim=8, posterior_inputs=ALL_INPUTS),
    "gaussian_8gaussians": VRFMSettings(beta=1.0, latent_dim=8, posterior_inputs=ALL_INPUTS),
}


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: a label, a kind (`vrfm`, `rf`, `icfm`, `otcfm`) and, for VRFM, its settings."""

    label: str
    kind: str
    settings: VRFMSettings | None = None
    tasks: tuple[str, ...] | None = None  # None: every task


@dataclass(frozen=True)
class TrainConfig:
    """What every method shares."""

    steps: int = 20_000
    batch_size: int = 256
    lr: float = 1e-3
    hidden_dim: int = 64
    num_layers: int = 3
    cfm_sigma: float = 0.0
    log_every: int = 1000


@dataclass(frozen=True)
class EvalConfig:
    num_samples: int = 2000
    nfes: tuple[int, ...] = DEFAULT_NFES
    scheduler: str = "euler"  # the fixed-NFE sampler: VRFMScheduler's Euler, or a diffusers multistep solver
    dopri5: bool = True
    dopri5_tol: float = 1e-5
    straightness_nfe: int = 100
    plot_paths: int = 128


def toy_method(method: MethodSpec, config: TrainConfig) -> ToyMethod:
    """The harness's description of one row: the baselines train the same net with `latent_dim=0`."""
    if method.kind not in METHOD_KINDS:
        raise ValueError(f"`method.kind` must be one of {METHOD_KINDS}, but got {method.kind!r}.")
    if method.kind != "vrfm":
        coupling = "independent" if method.kind == "rf" else method.kind
        return ToyMethod(latent_dim=0, coupling=coupling, cfm_sigma=config.cfm_sigma)
    settings = method.settings
    return ToyMethod(
        latent_dim=settings.latent_dim,
        posterior_inputs=settings.posterior_inputs,
        beta=settings.beta,
        kl_target=settings.kl_target,
        free_bits=settings.free_bits,
        aggregate_prior_atoms=settings.aggregate_prior_atoms,
    )


def toy_budget(config: TrainConfig) -> ToyBudget:
    return ToyBudget(
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        hidden_dim=config.hidden_dim,
        num_layers=config.num_layers,
        log_every=config.log_every,
    )


# -------------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def z_spread(model: VRFMMLPModel, task: ToyTask, seed: int, num_points: int = 256, num_z: int = 16) -> float:
    """How much the velocity depends on `z`: the variance of `v(x_t, t, z)` over prior draws of `z`, summed over
    data dimensions and averaged over random `(x_t, t)` (0 means the net ignores `z`: posterior collapse)."""
    if model.latent_dim == 0:
        return 0.0
    generator = torch.Generator().manual_seed(seed)
    x0, x1 = task.sample_pairs(num_points, generator)
    t = torch.rand(num_points, generator=generator)
    x_t = interpolate(x0, x1, t)
    z = torch.randn(num_z, num_points, model.latent_dim, generator=generator)
    velocities = torch.stack([model(x_t, t, z=z[k]).sample for k in range(num_z)])
    return float(velocities.var(dim=0).sum(dim=-1).mean())


def evaluate_toy(task: ToyTask, trained: TrainedToy, config: EvalConfig, seed: int, keep_plot_data: bool):
    """Samples with `VRFMPipeline` at every NFE and measures W2, sliced W2, fraction on mode and straightness.

    The source points, the target sample and the `z` draws depend on `seed` only, so methods are compared on the
    same draws (common random numbers).
    """
    draws = evaluation_draws(task, config.num_samples, seed)
    x0, target, z_generator = draws.x0, draws.target, draws.z_generator
    has_modes = task.target_modes is not None
    scheduler = make_flow_scheduler(config.scheduler)
    pipe = VRFMPipeline(velocity_model=trained.model, scheduler=scheduler, prior=trained.prior)
    pipe.set_progress_bar_config(disable=True)

    metrics = {"w2": {}, "sw2": {}, "on_mode": {}, "sample_seconds": {}}
    plot = {"samples": {}}
    last_z = None
    for nfe in config.nfes:
        start = time.perf_counter()
        out = pipe(batch_size=config.num_samples, num_inference_steps=nfe, latents=x0, generator=z_generator())
        metrics["sample_seconds"][str(nfe)] = time.perf_counter() - start
        samples, last_z = out.samples, out.z
        metrics["w2"][str(nfe)] = wasserstein2(samples, target)
        metrics["sw2"][str(nfe)] = sliced_wasserstein2(samples, target, seed=seed)
        if has_modes:
            metrics["on_mode"][str(nfe)] = task.fraction_on_mode(samples)
        if keep_plot_data:
            plot["samples"][str(nfe)] = samples[:500].tolist()
    if last_z is None and trained.model.latent_dim > 0:
        last_z = torch.randn(config.num_samples, trained.model.latent_dim, generator=z_generator())
    if config.dopri5:
        scheduler = VRFMScheduler(solver="dopri5", rtol=config.dopri5_tol, atol=config.dopri5_tol)
        dopri = VRFMPipeline(velocity_model=trained.model, scheduler=scheduler, prior=trained.prior)
        dopri.set_progress_bar_config(disable=True)
        out = dopri(batch_size=config.num_samples, latents=x0, generator=z_generator())  # the same z as Euler
        samples, nfe = out.samples, out.num_function_evals
        metrics["w2"]["dopri5"] = wasserstein2(samples, target)
        metrics["sw2"]["dopri5"] = sliced_wasserstein2(samples, target, seed=seed)
        if has_modes:
            metrics["on_mode"]["dopri5"] = task.fraction_on_mode(samples)
        metrics["dopri5_nfe"] = nfe
    trajectory = euler_trajectory(trained.model, x0, config.straightness_nfe, z=last_z)
    metrics["straightness"] = straightness(trajectory)
    metrics["z_spread"] = z_spread(trained.model, task, seed)
    if trained.encoder is not None:
        diag_generator = torch.Generator().manual_seed(30_011 * (seed + 1))
        d0, d1 = task.sample_pairs(config.num_samples, diag_generator)
        metrics["posterior"] = asdict(posterior_diagnostics(trained.encoder, d0, d1, seed=seed))
    if keep_plot_data:
        stride = max(1, config.straightness_nfe // 20)
        states = trajectory.states[::stride]
        if (len(trajectory.states) - 1) % stride:
            states = torch.cat([states, trajectory.states[-1:]])
        plot["paths"] = states[:, : config.plot_paths].tolist()
        plot["target"] = target[:500].tolist()
    return metrics, plot


# --------------------------------------------------------------------------------------------------------- reporting
def nfe_keys(eval_config: EvalConfig) -> list[str]:
    return [str(n) for n in eval_config.nfes] + (["dopri5"] if eval_config.dopri5 else [])


def collect(runs: dict, key_path: tuple) -> list[float]:
    """Values at `key_path` (e.g. `("w2", "1")`) over the seeds of one method."""
    values = []
    for run in runs.values():
        value = run
        for key in key_path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            values.append(float(value))
    return values


def evaluate_targets(results: dict, tasks: list[str]) -> list[dict]:
    """The issue's toy targets per task: VRFM W2 at NFE 1 and 2 <= 0.5x I-CFM's; at NFE 100 <= RF's."""
    rows = []
    for task in tasks:
        methods = results["tasks"][task]["methods"]
        if not {"VRFM", "I-CFM", "RF"} <= set(methods):
            continue
        for nfe, baseline, factor in (("1", "I-CFM", 0.5), ("2", "I-CFM", 0.5), ("100", "RF", 1.0)):
            vrfm, _ = mean_std(collect(methods["VRFM"]["runs"], ("w2", nfe)))
            base, _ = mean_std(collect(methods[baseline]["runs"], ("w2", nfe)))
            if not (math.isfinite(vrfm) and math.isfinite(base)):
                continue
            rows.append(
                {
                    "task": task,
                    "nfe": nfe,
                    "vrfm": vrfm,
                    "baseline": baseline,
                    "baseline_w2": base,
                    "ratio": vrfm / base,
                    "threshold": factor,
                    "met": vrfm <= factor * base,
                }
            )
    return rows


DIAGNOSTIC_COLUMNS = {  # column -> the key path of the posterior diagnostic in a run's metrics
    "KL nats": ("posterior", "kl"),
    "active units": ("posterior", "active_units"),
    "|E mu|": ("posterior", "mu_mean_norm"),
    "Var mu": ("posterior", "mu_var"),
    "E sigma^2": ("posterior", "sigma2"),
    "aggregate var": ("posterior", "aggregate_var"),
    "MMD^2 q vs prior": ("posterior", "mmd"),
    "MMD^2 floor": ("posterior", "mmd_floor"),
    "z-spread": ("z_spread",),
}


def targets_section(results: dict) -> list[str]:
    """The targets table (empty when no target applies to the tasks run)."""
    target_rows = evaluate_targets(results, list(results["tasks"]))
    if not target_rows:
        return []
    table = []
    for row in target_rows:
        rule = f"<= {row['threshold']:g}x {row['baseline']}" if row["threshold"] != 1 else f"<= {row['baseline']}"
        ratio = f"{row['ratio']:.2f}x"
        status = "met" if row["met"] else "NOT met"
        table.append([row["task"], row["nfe"], f"{row['vrfm']:.3f}", f"{row['baseline_w2']:.3f}", ratio, rule, status])
    header = ["task", "NFE", "VRFM W2", "baseline W2", "ratio", "target", "status"]
    return ["## Targets", "", markdown_table(header, table), ""]


def metric_table(methods: dict, keys: list[str], metric: str, column: str) -> str:
    """One column per NFE of `metric` (e.g. "sw2"), one row per method."""
    rows = [[label] + [format_mean_std(collect(m["runs"], (metric, k))) for k in keys] for label, m in methods.items()]
    return markdown_table(["method"] + [f"{column} {k}" for k in keys], rows)


def task_section(task_name: str, task_result: dict, eval_config: EvalConfig) -> list[str]:
    """One task's tables: W2 and the run's figures, sliced W2, the on-mode fraction, the posterior diagnostics."""
    keys, methods = nfe_keys(eval_config), task_result["methods"]
    floor, floor_std = mean_std(task_result["floor"])
    lines = [
        f"## {task_name}",
        "",
        f"Sampling floor (target vs target, {eval_config.num_samples} vs {eval_config.num_samples}): "
        f"W2 = {floor:.3f} ± {floor_std:.3f}.",
        "",
    ]
    headers = ["method", "settings"] + [f"W2 NFE {k}" if k != "dopri5" else "W2 dopri5" for k in keys]
    headers += ["dopri5 NFE", "straightness", "train s", "params (velocity + posterior)"]
    rows = []
    for label, method in methods.items():
        runs = method["runs"]
        row = [label, method["settings"]]
        row += [format_mean_std(collect(runs, ("w2", k))) for k in keys]
        row.append(format_mean_std(collect(runs, ("dopri5_nfe",)), 3) if eval_config.dopri5 else "n/a")
        row.append(format_mean_std(collect(runs, ("straightness",))))
        row.append(f"{mean_std(collect(runs, ('train_seconds',)))[0]:.1f}")
        row.append(f"{method['params_velocity']} + {method['params_posterior']}")
        rows.append(row)
    lines += [markdown_table(headers, rows), ""]
    lines += ["Sliced W2:", "", metric_table(methods, keys, "sw2", "SW2"), ""]
    if task_result["has_modes"]:
        lines += ["Fraction of samples within 3 std of a target mode (1 = all on a mode):", ""]
        lines += [metric_table(methods, keys, "on_mode", "on-mode"), ""]
    diag_rows = [
        [label] + [format_mean_std(collect(method["runs"], path)) for path in DIAGNOSTIC_COLUMNS.values()]
        for label, method in methods.items()
        if collect(method["runs"], ("posterior", "kl"))
    ]
    if diag_rows:
        lines += [
            "Posterior diagnostics (prior hole; a matched aggregate posterior has |E mu| = 0, aggregate var = 1 "
            "and MMD at its floor; z-spread = Var_z v(x_t, t, z), 0 means z is ignored):",
            "",
            markdown_table(["method", *DIAGNOSTIC_COLUMNS], diag_rows),
            "",
        ]
    return lines


def render_report(results: dict) -> str:
    """The markdown report of a toy run."""
    meta, eval_config = results["meta"], EvalConfig(**results["meta"]["eval"])
    train = results["meta"]["train"]
    lines = [
        "# Toy quality: VRFM vs RF vs I-CFM vs OT-CFM",
        "",
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['machine']}",
        f"- Budget: {train['steps']} training steps"
        + (" (REDUCED from the 20k of the reference setup)" if train["steps"] < 20_000 else "")
        + f", batch {train['batch_size']}, Adam lr {train['lr']:g}, width {train['hidden_dim']} x "
        f"{train['num_layers']} hidden layers (VRFMMLPModel, SELU), seeds {meta['seeds']}; torchcfm sigma "
        f"{train['cfm_sigma']:g}.",
        f"- Evaluation: {eval_config.num_samples} generated vs {eval_config.num_samples} fresh target samples, exact "
        f"W2 (POT `emd2`, squared Euclidean cost, square root); `{eval_config.scheduler}` via `VRFMPipeline` at NFE "
        f"{', '.join(map(str, eval_config.nfes))}"
        + (f"; dopri5 (rtol = atol = {eval_config.dopri5_tol:g}) with its NFE" if eval_config.dopri5 else "")
        + f". Straightness = E ||x1_hat - x0 - v(x_t, t, z)||^2 along Euler NFE-{eval_config.straightness_nfe} paths.",
        "- Cells are mean ± std over seeds. RF = the same net with `latent_dim=0` trained with `vrfm_loss` (no z, no "
        "KL); I-CFM / OT-CFM = the same net trained on torchcfm's (t, x_t, u_t). With sigma 0, RF and I-CFM are the "
        "same algorithm: their gap shows the run-to-run noise.",
        f"- Total wall time: {meta.get('total_seconds', float('nan')):.0f} s (summed over resumed invocations).",
        "",
    ]
    lines += targets_section(results)
    for task_name, task_result in results["tasks"].items():
        lines += task_section(task_name, task_result, eval_config)
    lines += [
        "Figures: `toy_w2_vs_nfe.png` (W2 against NFE for every configuration, floor dashed), "
        "`toy_trajectories.png` (RF vs VRFM paths, first seed), `toy_samples.png` (samples at NFE 1, 2, 100).",
        "",
    ]
    return "\n".join(lines)


def plot_w2_curves(results: dict, path: Path, dpi: int = 110) -> None:
    plt = pyplot()
    eval_config = EvalConfig(**results["meta"]["eval"])
    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    nfes = [int(n) for n in eval_config.nfes]
    for ax, task in zip(axes[0], tasks):
        task_result = results["tasks"][task]
        for label, method in task_result["methods"].items():
            means, stds = zip(*[mean_std(collect(method["runs"], ("w2", str(n)))) for n in nfes])
            line = ax.errorbar(nfes, means, yerr=stds, marker="o", ms=3, capsize=2, label=label)
            if eval_config.dopri5:
                w2, _ = mean_std(collect(method["runs"], ("w2", "dopri5")))
                nfe, _ = mean_std(collect(method["runs"], ("dopri5_nfe",)))
                if math.isfinite(w2) and math.isfinite(nfe):
                    ax.scatter([nfe], [w2], marker="*", s=70, color=line[0].get_color())
        floor, _ = mean_std(task_result["floor"])
        ax.axhline(floor, color="gray", ls="--", lw=1, label="floor")
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("NFE (Euler; star = dopri5)")
        ax.set_ylabel("W2")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_trajectories(plot_data: dict, tasks: list[str], path: Path, dpi: int = 100) -> None:
    """RF against VRFM paths (first seed), one row per task."""
    plt = pyplot()
    from matplotlib.collections import LineCollection

    labels = [label for label in ("RF", "VRFM") if any(label in plot_data.get(t, {}) for t in tasks)]
    if not labels:
        return
    fig, axes = plt.subplots(len(tasks), len(labels), figsize=(4 * len(labels), 3.6 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for col, label in enumerate(labels):
            ax = axes[row][col]
            data = plot_data.get(task, {}).get(label)
            if data is None:
                ax.set_axis_off()
                continue
            paths = torch.tensor(data["paths"])  # (K, P, D)
            if paths.shape[-1] == 1:
                times = torch.linspace(0, 1, paths.shape[0])
                segments = torch.stack([times.expand(paths.shape[1], -1), paths[:, :, 0].T], dim=-1)
                ax.add_collection(LineCollection(segments.numpy(), colors="C0", alpha=0.25, linewidths=0.7))
                ax.autoscale()
                ax.set_xlabel("t")
                ax.set_ylabel("x")
            else:
                target = torch.tensor(data["target"])
                ax.scatter(target[:, 0], target[:, 1], s=2, color="lightgray", label="target")
                segments = paths.permute(1, 0, 2).numpy()
                ax.add_collection(LineCollection(segments, colors="C0", alpha=0.25, linewidths=0.7))
                ax.scatter(paths[0, :, 0], paths[0, :, 1], s=4, color="C2", label="x0")
                ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=4, color="C3", label="x1 (NFE 100)")
                ax.set_aspect("equal", adjustable="datalim")
            ax.set_title(f"{task}: {label}")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
            break
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_samples(plot_data: dict, tasks: list[str], path: Path, nfes=("1", "2", "100"), dpi: int = 80) -> None:
    """Samples of every method at a few NFEs (first seed): one row per task and method."""
    plt = pyplot()
    rows = [(task, label) for task in tasks for label in plot_data.get(task, {})]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), len(nfes), figsize=(2.6 * len(nfes), 2.4 * len(rows)), squeeze=False)
    for r, (task, label) in enumerate(rows):
        data = plot_data[task][label]
        target = torch.tensor(data["target"])
        for c, nfe in enumerate(nfes):
            ax = axes[r][c]
            samples = data["samples"].get(nfe)
            if samples is None:
                ax.set_axis_off()
                continue
            samples = torch.tensor(samples)
            if samples.shape[-1] == 1:
                bins = torch.linspace(-2.5, 2.5, 80).tolist()
                ax.hist(target[:, 0].tolist(), bins=bins, color="lightgray", density=True)
                ax.hist(samples[:, 0].tolist(), bins=bins, color="C0", alpha=0.7, density=True)
            else:
                ax.scatter(target[:, 0], target[:, 1], s=1, color="lightgray")
                ax.scatter(samples[:, 0], samples[:, 1], s=1, color="C0")
                ax.set_aspect("equal", adjustable="datalim")
            ax.set_title(f"{task} {label} NFE {nfe}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.01, top=0.97, wspace=0.05, hspace=0.25)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------- CLI
def parse_task_overrides(values: list[str] | None, name: str, convert) -> dict[str, object]:
    """`["ring_2d=0.01", "0.5"]` -> `{"ring_2d": 0.01, "*": 0.5}` (a bare value applies to every task)."""
    overrides = {}
    for item in values or []:
        task, _, value = item.rpartition("=")
        task = task or "*"
        if task != "*" and task not in TOY_TASKS:
            raise ValueError(f"`--{name}` names an unknown task {task!r}; valid tasks are {sorted(TOY_TASKS)}.")
        try:
            overrides[task] = convert(value)
        except ValueError as error:
            raise ValueError(f"`--{name}` got the bad value {item!r}: {error}") from error
    return overrides


def parse_inputs(text: str) -> tuple[str, ...]:
    names = tuple(part for part in text.replace(",", "+").split("+") if part)
    bad = [n for n in names if n not in ALL_INPUTS]
    if bad or not names:
        raise ValueError(f"posterior inputs must be a '+'-separated subset of {ALL_INPUTS}, but got {text!r}")
    return names


def parse_variant(text: str) -> tuple[str, dict, tuple[str, ...] | None]:
    """`"label:beta=0.01,latent_dim=8,inputs=x1+x_t+t,free_bits=0.1,tasks=ring_2d+two_modes_1d"` ->
    `("VRFM[label]", {settings fields}, tasks or None)`. Keys not given are taken from each task's defaults."""
    label, _, body = text.partition(":")
    if not label or not body:
        raise ValueError(f"`--variant` must look like 'label:beta=0.1,latent_dim=8', but got {text!r}.")
    fields, tasks = {}, None
    for item in body.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key == "beta":
            fields["beta"] = float(value)
        elif key in ("latent_dim", "dim"):
            fields["latent_dim"] = int(value)
        elif key == "inputs":
            fields["posterior_inputs"] = parse_inputs(value)
        elif key == "free_bits":
            fields["free_bits"] = float(value)
        elif key == "kl_target":
            fields["kl_target"] = None if value in ("off", "none") else float(value)
        elif key == "prior_atoms":
            fields["aggregate_prior_atoms"] = int(value)
        elif key == "tasks":
            tasks = tuple(value.split("+"))
            for task in tasks:
                get_toy_task(task)
        else:
            raise ValueError(
                f"`--variant` got the unknown key {key!r}; use beta, latent_dim, inputs, free_bits, kl_target, "
                "prior_atoms, tasks."
            )
    return f"VRFM[{label}]", fields, tasks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=list(TOY_TASKS), choices=list(TOY_TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHOD_KINDS), choices=list(METHOD_KINDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20_000, help="training steps for every method (default 20000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, all methods")
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=3)
    parser.add_argument("--cfm-sigma", type=float, default=0.0, help="torchcfm's sigma (0: I-CFM is exactly RF)")
    parser.add_argument("--num-samples", type=int, default=2000, help="generated and target samples for W2")
    parser.add_argument("--nfe", nargs="+", type=int, default=list(DEFAULT_NFES))
    parser.add_argument(
        "--scheduler",
        default="euler",
        choices=SINGLE_EVAL_SCHEDULERS,
        help="the fixed-NFE sampler: VRFMScheduler's Euler (default) or a diffusers multistep solver (try NFE 2-8)",
    )
    parser.add_argument("--no-dopri5", action="store_true")
    parser.add_argument("--dopri5-tol", type=float, default=1e-5, help="rtol = atol of dopri5")
    parser.add_argument("--beta", nargs="+", help="VRFM beta: VALUE for every task or TASK=VALUE (sum convention)")
    parser.add_argument("--latent-dim", nargs="+", help="VRFM dim z: VALUE or TASK=VALUE")
    parser.add_argument("--posterior-inputs", nargs="+", help="VRFM posterior inputs: x0+x1+x_t+t or TASK=x1+x_t+t")
    parser.add_argument("--free-bits", nargs="+", help="VRFM free-bits floor (nats per dim): VALUE or TASK=VALUE")
    parser.add_argument("--variant", action="append", default=[], help="an extra VRFM configuration, see the doc")
    parser.add_argument("--no-paper", action="store_true", help="leave out the VRFM (paper) rows")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--plot-dir", type=Path, default=None, help="where to keep plot data (default: cache/)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps the shared CPU usable)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps and samples, one seed")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the runs already in OUTPUT_DIR/toy_quality.json made with the same settings (and re-render)",
    )
    return parser


def resolve_methods(args, task: str) -> list[MethodSpec]:
    """The methods to run on `task`: the default VRFM (with CLI overrides), the baselines, and any variants."""
    defaults = TASK_DEFAULTS[task]
    overrides = {
        "beta": parse_task_overrides(args.beta, "beta", float),
        "latent_dim": parse_task_overrides(args.latent_dim, "latent-dim", int),
        "posterior_inputs": parse_task_overrides(args.posterior_inputs, "posterior-inputs", parse_inputs),
        "free_bits": parse_task_overrides(args.free_bits, "free-bits", float),
    }
    settings = defaults
    for key, values in overrides.items():
        if task in values:
            settings = replace(settings, **{key: values[task]})
        elif "*" in values:
            settings = replace(settings, **{key: values["*"]})
    methods = []
    for kind in args.methods:
        methods.append(MethodSpec(METHOD_LABELS[kind], kind, settings if kind == "vrfm" else None))
        if kind == "vrfm" and not args.no_paper:
            methods.append(MethodSpec(PAPER_LABEL, "vrfm", PAPER_SETTINGS[task]))
    for text in args.variant:
        label, fields, tasks = parse_variant(text)
        if tasks is None or task in tasks:
            methods.append(MethodSpec(label, "vrfm", replace(defaults, **fields), tasks))
    return methods


def configs_from_args(args) -> tuple[TrainConfig, EvalConfig]:
    """The training and evaluation settings of parsed `args` (`--quick` shrinks them in place first)."""
    if args.quick:
        args.steps = min(args.steps, 40)
        args.num_samples = min(args.num_samples, 200)
        args.seeds = args.seeds[:1]
        args.dopri5_tol = max(args.dopri5_tol, 1e-3)
    train_config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        hidden_dim=args.hidden_dim,
        num_layers=args.num_layers,
        cfm_sigma=args.cfm_sigma,
        log_every=max(1, min(1000, args.steps // 10)),
    )
    eval_config = EvalConfig(
        num_samples=args.num_samples,
        nfes=tuple(args.nfe),
        scheduler=args.scheduler,
        dopri5=not args.no_dopri5,
        dopri5_tol=args.dopri5_tol,
        straightness_nfe=100 if not args.quick else 20,
    )
    return train_config, eval_config


@dataclass
class PreviousRuns:
    """What `--resume` reuses of an earlier `toy_quality.json` made with the same settings."""

    by_settings: dict = field(default_factory=dict)  # (task, kind, settings) -> (label, runs), whatever the label
    seconds: float = 0.0
    plot_data: dict = field(default_factory=dict)

    @classmethod
    def load(cls, json_path: Path, plot_path: Path, meta: dict) -> PreviousRuns:
        if not json_path.exists():
            return cls()
        old = json.loads(json_path.read_text())
        keys = ("train", "eval", "quick")
        if any(json.loads(json.dumps(meta[key])) != old["meta"].get(key) for key in keys):
            print(f"not resuming: {json_path} was made with other training or evaluation settings", flush=True)
            return cls()
        print(f"resuming from {json_path}", flush=True)
        by_settings = {
            (task_name, method["kind"], method["settings"]): (label, method["runs"])
            for task_name, entry in old["tasks"].items()
            for label, method in entry.get("methods", {}).items()
        }
        plot_data = json.loads(plot_path.read_text()) if plot_path.exists() else {}
        return cls(by_settings, float(old["meta"].get("total_seconds", 0.0)), plot_data)


def method_entry(task: ToyTask, method: MethodSpec, train_config: TrainConfig) -> dict:
    """The JSON entry of one method on one task, before its runs."""
    model, encoder, _ = build_toy_models(task, toy_method(method, train_config), toy_budget(train_config))
    return {
        "kind": method.kind,
        "settings": method.settings.describe() if method.settings else "z off",
        "params_velocity": count_parameters(model),
        "params_posterior": count_parameters(encoder),
        "runs": {},
    }


def run(args) -> dict:
    """Runs the benchmark described by parsed `args` and writes the table, the JSON and the figures."""
    torch.set_num_threads(args.threads)
    train_config, eval_config = configs_from_args(args)
    output_dir = Path(args.output_dir)
    plot_dir = Path(args.plot_dir) if args.plot_dir else output_dir / "cache"
    output_dir.mkdir(parents=True, exist_ok=True)
    # `--resume` only continues (or re-renders) the run the rest of the command describes: leave it out.
    command = "python -m benchmarks.toy_quality " + " ".join(shlex.quote(a) for a in args.argv if a != "--resume")
    meta = {
        "command": command.strip(),
        "machine": machine_description(),
        "seeds": list(args.seeds),
        "train": asdict(train_config),
        "eval": asdict(eval_config),
        "quick": bool(args.quick),
    }
    results = {"meta": meta, "tasks": {}}
    json_path, plot_path = output_dir / "toy_quality.json", plot_dir / "toy_quality_plot_data.json"
    previous = PreviousRuns.load(json_path, plot_path, meta) if args.resume else PreviousRuns()
    plot_data = previous.plot_data
    start = time.perf_counter()

    def save_progress():  # partial results survive an interruption (see --resume)
        meta["total_seconds"] = previous.seconds + time.perf_counter() - start
        write_json(json_path, results)

    for task_name in args.tasks:
        task = get_toy_task(task_name)
        methods = resolve_methods(args, task_name)
        floors = task_floors(task, eval_config.num_samples, args.seeds)
        task_result = {"floor": floors, "has_modes": task.target_modes is not None, "methods": {}}
        results["tasks"][task_name] = task_result
        task_plots = plot_data.setdefault(task_name, {})
        for method in methods:
            entry = task_result["methods"][method.label] = method_entry(task, method, train_config)
            old_label, _ = previous.by_settings.get((task_name, method.kind, entry["settings"]), (None, {}))
            if old_label not in (None, method.label) and old_label in task_plots:  # keep a relabelled run's plots
                task_plots[method.label] = task_plots[old_label]
        for seed in args.seeds:
            for method in methods:
                entry = task_result["methods"][method.label]
                _, old_runs = previous.by_settings.get((task_name, method.kind, entry["settings"]), (None, {}))
                if str(seed) in old_runs:  # the same settings, under any label
                    entry["runs"][str(seed)] = old_runs[str(seed)]
                    continue
                trained = train_toy(task, toy_method(method, train_config), toy_budget(train_config), seed)
                first_seed = seed == args.seeds[0]
                metrics, plot = evaluate_toy(task, trained, eval_config, seed, keep_plot_data=first_seed)
                metrics["train_seconds"] = trained.train_seconds
                metrics["train_log"] = trained.log
                entry["runs"][str(seed)] = metrics
                if first_seed:
                    task_plots[method.label] = plot
                    write_json(plot_path, plot_data)
                w2 = " ".join(f"{k}:{v:.3f}" for k, v in metrics["w2"].items())
                print(
                    f"[{time.perf_counter() - start:7.1f}s] {task_name} seed {seed} {method.label:>10}: "
                    f"train {trained.train_seconds:.1f}s W2 {w2}",
                    flush=True,
                )
                save_progress()
    save_progress()
    write_json(plot_path, plot_data)
    write_outputs(results, plot_data, list(args.tasks), output_dir, quick=args.quick)
    return results


def write_outputs(results: dict, plot_data: dict, tasks: list[str], output_dir: Path, quick: bool) -> None:
    """The report and the three figures (at a low resolution for `--quick`, which only checks they are written)."""
    (output_dir / "toy_quality.md").write_text(render_report(results))
    dpi = {"dpi": 40} if quick else {}
    plot_w2_curves(results, output_dir / "toy_w2_vs_nfe.png", **dpi)
    plot_trajectories(plot_data, tasks, output_dir / "toy_trajectories.png", **dpi)
    plot_samples(plot_data, tasks, output_dir / "toy_samples.png", **dpi)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    with torch_threads():  # `run` sets `--threads`
        results = run(args)
    print((Path(args.output_dir) / "toy_quality.md").read_text())
    return results


if __name__ == "__main__":
    main()
