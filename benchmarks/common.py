"""The shared benchmark harness: distances, straightness, posterior diagnostics, timing, tables and plots.

Everything here is a small function of tensors or arrays, so that each benchmark script is wiring only and so that
later work (for example on the prior hole of issue 6) can reuse the same rulers.

Conventions are the package's: ``t`` in ``[0, 1]``, ``t = 0`` noise, ``t = 1`` data, velocities ``dx/dt``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from diffusers_vrfm import VRFMAggregatePosteriorPrior, VRFMScheduler, count_active_units, interpolate
from diffusers_vrfm.objective import latent_mmd

BENCHMARK_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARK_DIR / "results"
CLASSIFIER_DIR = BENCHMARK_DIR / "classifiers"  # committed: the image benchmarks' scoring CNNs, one ruler for all


# ------------------------------------------------------------------------------------------------------------ setup
@contextmanager
def torch_threads(count: int | None = None):
    """Runs the block with `count` torch threads (the count unchanged when `None`), then restores the previous count:
    a benchmark run in-process, as the tests run them, leaves its caller's setting as it found it."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def set_seed(seed: int) -> None:
    """Seeds Python, NumPy and torch's global generators (torchcfm and POT draw from the global ones)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def machine_description() -> str:
    """A one-line description of the machine a benchmark ran on (CPU model, cores, threads, torch, GPU, kernel: a
    sandbox shows in it, gVisor as Linux 4.4.0, and it bounds how much each CUDA call costs the host)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} CPU cores visible, torch {torch.__version__} with {torch.get_num_threads()} "
        f"thread(s), {gpu}, Python {platform.python_version()}, kernel {platform.system()} {platform.release()}"
    )


def to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float64 NumPy copy of a tensor or array, flattened to `(N, D)`; refuses NaN and inf.

    Every distance below reads its samples through this function, so none of them scores diverged samples (POT's
    `emd2` would return 0 on a NaN cost).
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {len(x)} samples contain NaN or inf: the metric is undefined (the model or the "
            "sampler diverged)."
        )
    return x


# --------------------------------------------------------------------------------------------------------- distances
def wasserstein2(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, num_iter_max: int = 10_000_000) -> float:
    """The exact 2-Wasserstein distance between two empirical measures with uniform weights.

    POT's exact EMD (`ot.emd2`) on the squared-Euclidean cost, then the square root.

    Args:
        x (`torch.Tensor` or `np.ndarray` of shape `(N, ...)`), y (of shape `(M, ...)`): the two samples.
        num_iter_max (`int`): the network-simplex iteration cap (POT's default is too small for 2000 x 2000).

    Example:

    ```py
    >>> import torch
    >>> from benchmarks.common import wasserstein2
    >>> round(wasserstein2(torch.zeros(5, 2), torch.ones(5, 2)), 4)
    1.4142
    ```
    """
    import ot

    a, b = to_numpy(x), to_numpy(y)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"`x` and `y` must have the same dimension, but got {a.shape[1]} and {b.shape[1]}.")
    cost = ot.dist(a, b, metric="sqeuclidean")
    value = ot.emd2(ot.unif(len(a)), ot.unif(len(b)), cost, numItermax=num_iter_max)
    return float(math.sqrt(max(float(value), 0.0)))


def sliced_wasserstein2(
    x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, num_projections: int = 256, seed: int = 0
) -> float:
    """The sliced 2-Wasserstein distance (`ot.sliced_wasserstein_distance`, p = 2), a cheap second ruler."""
    import ot

    a, b = to_numpy(x), to_numpy(y)
    return float(ot.sliced_wasserstein_distance(a, b, n_projections=num_projections, p=2, seed=seed))


def sampling_floor(sample_fn: Callable[[int, torch.Generator], torch.Tensor], num_samples: int, seed: int) -> float:
    """W2 between two independent target samples of the same size: the best any model can score at that size."""
    generator = torch.Generator().manual_seed(seed)
    return wasserstein2(sample_fn(num_samples, generator), sample_fn(num_samples, generator))


def mmd_rbf(
    x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, scales: Sequence[float] = (0.5, 1.0, 2.0)
) -> float:
    """The unbiased squared maximum mean discrepancy with a sum of Gaussian kernels: [`latent_mmd`] with bandwidths
    set by the data instead of the dimension.

    The bandwidths are `scales` times the median pairwise distance of the pooled sample. 0 (up to noise, it can be
    slightly negative) means the two samples are indistinguishable to the kernel.
    """
    a = torch.as_tensor(to_numpy(x)).float()
    b = torch.as_tensor(to_numpy(y)).float()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"`x` and `y` must have the same dimension, but got {a.shape[1]} and {b.shape[1]}.")
    pooled = torch.cat([a, b])
    squared_distances = torch.cdist(pooled, pooled).pow(2)
    median = squared_distances[~torch.eye(len(pooled), dtype=torch.bool)].median().clamp_min(1e-12)
    relative_to_dimension = math.sqrt(float(median) / a.shape[1])  # latent_mmd's bandwidths are s * sqrt(dim)
    return float(latent_mmd(a, b, scales=tuple(s * relative_to_dimension for s in scales)))


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (the formula of FID).

    ``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``; the last trace is the sum of the square roots
    of the eigenvalues of ``S_a S_b`` (real and non-negative for covariance matrices up to round-off), which avoids
    `scipy.linalg.sqrtm` and its warnings.
    """
    a, b = to_numpy(features_a), to_numpy(features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"The feature sets must have the same width, but got {a.shape[1]} and {b.shape[1]}.")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b)
    trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0.0, None)).sum()
    value = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


def fit_toy_aggregate_prior(
    encoder: torch.nn.Module, task, num_atoms: int, generator: torch.Generator, batch_size: int = 1024
) -> VRFMAggregatePosteriorPrior:
    """[`VRFMAggregatePosteriorPrior.from_posterior`] on fresh training pairs of a toy task, as `train_vrfm.py` fits
    it after training (`generator` draws the pairs and the times)."""
    pairs = (task.sample_pairs(batch_size, generator) for _ in range(math.ceil(num_atoms / batch_size)))
    return VRFMAggregatePosteriorPrior.from_posterior(encoder, pairs, num_atoms=num_atoms, generator=generator)


# ----------------------------------------------------------------------------------------------- paths, straightness
@dataclass
class Trajectory:
    """A sampled path: `states` `(K + 1, B, ...)` at `times` `(K + 1,)`, and the `velocities` `(K, B, ...)` used."""

    times: torch.Tensor
    states: torch.Tensor
    velocities: torch.Tensor


@torch.no_grad()
def euler_trajectory(
    model: torch.nn.Module, x0: torch.Tensor, num_steps: int, z: torch.Tensor | None = None
) -> Trajectory:
    """Integrates ``dx/dt = v(x, t, z)`` from ``t = 0`` with [`VRFMScheduler`] (Euler) and keeps every state.

    It takes exactly the steps `VRFMPipeline` takes with the same `x0` (`latents`) and `z`; the benchmark tests check
    that the end points agree.
    """
    scheduler = VRFMScheduler(solver="euler")
    scheduler.set_timesteps(num_steps, device=x0.device)
    x = x0
    states, velocities = [x0], []
    for t in scheduler.timesteps:
        t_batch = t.reshape(()).expand(x.shape[0])
        velocity = model(x, t_batch, z=z).sample
        x = scheduler.step(velocity, t, x).prev_sample
        states.append(x)
        velocities.append(velocity)
    return Trajectory(
        times=scheduler.time_grid.clone(), states=torch.stack(states), velocities=torch.stack(velocities)
    )


@torch.no_grad()
def adaptive_sample(
    model: torch.nn.Module,
    x0: torch.Tensor,
    z: torch.Tensor | None = None,
    solver: str = "dopri5",
    tol: float = 1e-5,
) -> tuple[torch.Tensor, int]:
    """Integrates ``dx/dt = v(x, t, z)`` from 0 to 1 with `VRFMScheduler(solver=solver).integrate_adaptive`.

    Returns the samples and the number of velocity evaluations. For a model without the pipeline (for example inside
    a training loop). The time handed to the model is clamped to ``[0, 1]``: torchdiffeq's adaptive solvers can place
    stage times past the end of the interval, which the package's models refuse.
    """
    scheduler = VRFMScheduler(solver=solver, rtol=tol, atol=tol)

    def velocity(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_batch = t.clamp(0.0, 1.0).reshape(()).expand(sample.shape[0])
        return model(sample, t_batch, z=z).sample

    out = scheduler.integrate_adaptive(velocity, x0)
    return out.prev_sample, out.num_function_evals


def straightness(trajectory: Trajectory) -> float:
    """``E_t E_x || (x1_hat - x0) - v(x_t, t, z) ||^2`` along sampled paths (0 for perfectly straight flows).

    ``x1_hat`` is the end of each path and ``x0`` its start; the squared norm is summed over data dimensions and
    averaged over the evaluation times of the trajectory and over samples.
    """
    displacement = trajectory.states[-1] - trajectory.states[0]
    deviation = (displacement.unsqueeze(0) - trajectory.velocities).pow(2)
    return float(deviation.flatten(2).sum(dim=2).mean())


# ------------------------------------------------------------------------------------------ posterior diagnostics
@dataclass
class PosteriorDiagnostics:
    """How far the aggregate posterior ``q(z) = E_data q(z | ...)`` is from the prior ``N(0, I)``.

    Args:
        kl (`float`): mean ``KL(q(z | ...) || N(0, I))`` per example, nats (summed over latent dimensions).
        kl_per_dim (`list[float]`): the mean KL of each latent dimension.
        active_units (`int`): dimensions whose posterior mean varies over the data (`count_active_units`).
        mu_mean_norm (`float`): the norm of the mean of ``mu`` over the data (0 for a matched prior).
        mu_var (`float`): the variance of ``mu`` over the data, averaged over dimensions.
        sigma2 (`float`): the mean posterior variance ``exp(logvar)``, averaged over dimensions.
        aggregate_var (`float`): ``mu_var + sigma2``, the variance of the aggregate posterior (1 for a matched prior).
        mmd (`float`): unbiased squared MMD between aggregate-posterior draws and prior draws.
        mmd_floor (`float`): the same estimator between two prior samples of the same sizes (its noise level).
    """

    kl: float
    kl_per_dim: list[float]
    active_units: int
    mu_mean_norm: float
    mu_var: float
    sigma2: float
    aggregate_var: float
    mmd: float
    mmd_floor: float


@torch.no_grad()
def posterior_diagnostics(
    encoder: torch.nn.Module,
    x0: torch.Tensor,
    x1: torch.Tensor,
    t: torch.Tensor | None = None,
    num_mmd_samples: int = 1000,
    seed: int = 0,
) -> PosteriorDiagnostics:
    """Measures the prior hole: moments of the posterior mean over the data and an MMD to prior draws.

    Args:
        encoder: a posterior encoder (`forward(x0=, x1=, x_t=, t=, generator=)`).
        x0, x1 (`torch.Tensor` of shape `(N, ...)`): source and target samples (an independent coupling).
        t (`torch.Tensor` of shape `(N,)`, *optional*): times; uniform draws when not given.
        num_mmd_samples (`int`): how many posterior and prior draws enter the MMD.
        seed (`int`): seeds the times, the reparameterised draws and the prior draws.
    """
    generator = torch.Generator().manual_seed(seed)
    if t is None:
        t = torch.rand(x0.shape[0], generator=generator)
    x_t = interpolate(x0, x1, t)
    out = encoder(x0=x0, x1=x1, x_t=x_t, t=t, generator=generator)
    mean, logvar, draws = out.mean.float(), out.logvar.float(), out.sample.float()
    kl_per_dim = (0.5 * (mean.pow(2) + logvar.exp() - logvar - 1.0)).mean(dim=0)
    mu_var = mean.var(dim=0) if len(mean) > 1 else torch.zeros_like(mean[0])
    sigma2 = logvar.exp().mean(dim=0)
    n = min(num_mmd_samples, len(draws))
    prior_a = torch.randn(n, draws.shape[1], generator=generator)
    prior_b = torch.randn(n, draws.shape[1], generator=generator)
    return PosteriorDiagnostics(
        kl=float(kl_per_dim.sum()),
        kl_per_dim=[float(v) for v in kl_per_dim],
        active_units=count_active_units(mean),
        mu_mean_norm=float(mean.mean(dim=0).norm()),
        mu_var=float(mu_var.mean()),
        sigma2=float(sigma2.mean()),
        aggregate_var=float((mu_var + sigma2).mean()),
        mmd=mmd_rbf(draws[:n], prior_a),
        mmd_floor=mmd_rbf(prior_b, prior_a),
    )


# ------------------------------------------------------------------------------------------------------------ timing
def resolve_device(name: str) -> torch.device:
    """`--device` as a torch device, refusing a name torch does not know and CUDA on a machine without it."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(
            f"`--device` must be a torch device such as cpu, cuda or cuda:1, but got {name!r}."
        ) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`--device` is {name!r}, but torch sees no CUDA device here; pass `--device cpu`.")
    return device


def synchronize(device: str | torch.device) -> None:
    """Waits for the work queued on `device` (CUDA); nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_timings(
    functions: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    inner: int = 1,
    device: str | torch.device = "cpu",
) -> dict[str, list[float]]:
    """Times several callables side by side, interleaved so that machine noise hits all of them alike.

    Each round runs every function once (in an order rotated from round to round) and records seconds per call,
    averaged over `inner` back-to-back calls. On a CUDA `device` each timing starts and ends with the device idle, so
    that it counts the work a call queued, not only its launches. Returns `{name: [seconds per call of each round]}`.
    """
    if repeats < 1 or inner < 1 or warmup < 0:
        raise ValueError(f"`repeats` and `inner` must be >= 1 and `warmup` >= 0, got {repeats}, {inner}, {warmup}.")
    names = list(functions)
    for _ in range(warmup):
        for name in names:
            functions[name]()
    timings: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(inner):
                functions[name]()
            synchronize(device)
            timings[name].append((time.perf_counter() - start) / inner)
    return timings


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The median over rounds of the per-round ratio (rounds are paired by `interleaved_timings`)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("Both timing lists must be non-empty and of the same length.")
    return statistics.median(a / b for a, b in zip(numerator, denominator))


# ------------------------------------------------------------------------------------------------ numbers and tables
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation, ignoring NaNs; NaN when nothing is left."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return float("nan"), float("nan")
    return float(np.mean(finite)), float(np.std(finite))


def format_number(value: float, digits: int = 3) -> str:
    """Formats a float compactly (`digits` significant figures), `nan` for missing values."""
    if value is None or not math.isfinite(value):
        return "nan"
    if value != 0 and (abs(value) >= 10**digits or abs(value) < 10 ** -(digits - 1)):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".") or "0"


def format_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """`mean ± std` over seeds: the mean to `digits` significant figures (trailing zeros kept), the std to as many
    decimals as the mean; just the mean for one value."""
    mean, std = mean_std(values)
    if len(values) <= 1 or not math.isfinite(std) or not math.isfinite(mean):
        return format_number(mean, digits)
    if mean != 0 and (abs(mean) >= 10**digits or abs(mean) < 10 ** -(digits - 1)):
        return f"{mean:.{digits - 1}e} ± {std:.1e}"
    text = f"{mean:#.{digits}g}".rstrip(".")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f"{text} ± {std:.{decimals}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table. Every row must have as many cells as there are headers."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"Every row needs {len(headers)} cells, but one has {len(row)}: {list(row)!r}.")

    def cell(value: object) -> str:
        text = format_number(value) if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_markdown_tables(text: str) -> list[list[list[str]]]:
    """Reads every markdown table in `text` back as lists of rows of cells (header row first, separator dropped)."""
    tables, current = [], []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|") and stripped.endswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", stripped[1:-1])]
            if not all(c and set(c) <= set("-: ") for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def write_json(path: Path, payload: object) -> None:
    """Writes `payload` as indented JSON (dataclasses converted), creating folders as needed.

    The text goes to a temporary file that is then renamed, so a run killed mid-write leaves the previous file whole.
    """

    def default(value):
        if hasattr(value, "__dataclass_fields__"):
            return asdict(value)
        if isinstance(value, (np.floating, np.integer)):
            return value.item()
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"Cannot serialise {type(value).__name__}")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(payload, indent=1, default=default, allow_nan=True))
    os.replace(temporary, path)


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def count_parameters(module: torch.nn.Module | None) -> int:
    """The number of parameters of a module (0 for `None`)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())
