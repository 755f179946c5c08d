"""Validation outputs of `train_vrfm.py`: image grids (PNG) and, for vector data, scatter and trajectory plots.

Every validation uses the same source samples ``x0`` and the same latents ``z`` (drawn once from the run's seed), so
successive grids show how the model changes, not how the noise does. Rows are step counts (NFE), so each grid also
shows few-step behaviour, where VRFM is meant to help most.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from .determinism import make_generator


def fixed_validation_inputs(
    seed: int, num_samples: int, sample_shape: tuple[int, ...], latent_dim: int, toy_task=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The source samples and latents every validation of a run uses (the same on every call)."""
    generator = make_generator(seed, "validation", 0)
    if toy_task is not None:
        x0 = toy_task.sample_source(num_samples, generator)
    else:
        x0 = torch.randn((num_samples, *sample_shape), generator=generator)
    z = torch.randn((num_samples, latent_dim), generator=generator) if latent_dim > 0 else None
    return x0, z


def validation_class_labels(num_classes: int | None, num_samples: int) -> torch.Tensor | None:
    """Labels cycling through the classes (`None` for an unconditional model)."""
    if num_classes is None:
        return None
    return torch.arange(num_samples) % num_classes


@torch.no_grad()
def sample_trajectories(
    pipeline, x0: torch.Tensor, z: torch.Tensor | None, num_inference_steps: int, class_labels=None
):
    """Integrates from `x0` with the pipeline's model and scheduler; returns the states on the time grid,
    a tensor `(num_inference_steps + 1, B, ...)` from ``t = 0`` to ``t = 1``."""
    model = pipeline.velocity_model
    device, dtype = model.device, model.dtype
    x = x0.to(device=device, dtype=dtype)
    z = None if z is None else z.to(device=device, dtype=dtype)
    labels = None if class_labels is None else class_labels.to(device)
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(num_inference_steps, device=device)
    states = [x.float().cpu()]
    for t in scheduler.timesteps:
        velocity = pipeline.velocity(x, t, z, labels)
        output = scheduler.step(velocity, t, x)
        x = output.prev_sample
        if output.is_step_complete:
            states.append(x.float().cpu())
    return torch.stack(states)


def _to_uint8_images(samples: torch.Tensor) -> list[PIL.Image.Image]:
    """`(B, C, H, W)` in `[-1, 1]` to PIL images."""
    array = ((samples.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    images = []
    for item in array:
        item = item[0] if item.shape[0] == 1 else item.transpose(1, 2, 0)
        images.append(PIL.Image.fromarray(np.ascontiguousarray(item)))
    return images


def labelled_grid(rows: list[list[PIL.Image.Image]], row_labels: list[str], min_cell: int = 48) -> PIL.Image.Image:
    """Lays rows of equally sized images out in a grid, each row headed by a label; small images are enlarged
    (nearest neighbour) to at least `min_cell` pixels."""
    cell_w, cell_h = rows[0][0].size
    scale = max(1, math.ceil(min_cell / max(cell_w, cell_h)))
    cell_w, cell_h = cell_w * scale, cell_h * scale
    label_width = 56
    columns = max(len(row) for row in rows)
    grid = PIL.Image.new("RGB", (label_width + columns * (cell_w + 2), len(rows) * (cell_h + 2)), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        top = r * (cell_h + 2)
        draw.text((4, top + cell_h // 2 - 5), label, fill="black")
        for c, image in enumerate(row):
            image = image.convert("RGB").resize((cell_w, cell_h), PIL.Image.NEAREST)
            grid.paste(image, (label_width + c * (cell_w + 2), top))
    return grid


@torch.no_grad()
def image_validation_grid(
    pipeline, x0: torch.Tensor, z: torch.Tensor | None, steps_list: list[int], class_labels=None
) -> PIL.Image.Image:
    """One row per entry of `steps_list` (NFE), one column per fixed `(x0, z)` pair; returns the grid image."""
    rows = []
    for steps in steps_list:
        states = sample_trajectories(pipeline, x0, z, steps, class_labels)
        model = pipeline.velocity_model
        images = pipeline.decode(states[-1].to(device=model.device, dtype=model.dtype))
        rows.append(_to_uint8_images(images))
    return labelled_grid(rows, [f"{s} step{'s' if s > 1 else ''}" for s in steps_list])


@torch.no_grad()
def vector_validation_figure(pipeline, toy_task, x0: torch.Tensor, z: torch.Tensor | None, steps_list, path: str):
    """Scatter plots of samples against target samples, one panel per step count, and a trajectory panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = toy_task.sample_target(len(x0), make_generator(0, "validation", 1))
    panels = len(steps_list) + 1
    figure, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.2), squeeze=False)
    axes = axes[0]
    for axis, steps in zip(axes, steps_list):
        samples = sample_trajectories(pipeline, x0, z, steps)[-1]
        if toy_task.dim == 1:
            bins = np.linspace(-2.5, 2.5, 61)
            axis.hist(target[:, 0].numpy(), bins=bins, alpha=0.5, density=True, label="data")
            axis.hist(samples[:, 0].numpy(), bins=bins, alpha=0.5, density=True, label="samples")
        else:
            axis.scatter(target[:, 0], target[:, 1], s=2, alpha=0.3, label="data")
            axis.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5, label="samples")
            axis.set_aspect("equal")
        axis.set_title(f"{steps} step{'s' if steps > 1 else ''}")
    axes[0].legend(loc="upper right", fontsize=7)
    trajectory_axis = axes[-1]
    steps = max(steps_list)
    count = min(64, len(x0))
    states = sample_trajectories(pipeline, x0[:count], None if z is None else z[:count], steps).numpy()
    if toy_task.dim == 1:
        times = np.linspace(0, 1, states.shape[0])
        for i in range(count):
            trajectory_axis.plot(times, states[:, i, 0], lw=0.6, alpha=0.7)
        trajectory_axis.set_xlabel("t")
    else:
        for i in range(count):
            trajectory_axis.plot(states[:, i, 0], states[:, i, 1], lw=0.6, alpha=0.7)
        trajectory_axis.scatter(states[0, :, 0], states[0, :, 1], s=4, c="black", label="x0")
        trajectory_axis.scatter(states[-1, :, 0], states[-1, :, 1], s=4, c="red", label="x1")
        trajectory_axis.set_aspect("equal")
    trajectory_axis.set_title(f"trajectories ({steps} steps)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def check_finite_samples(samples: torch.Tensor, what: str) -> None:
    """Refuses samples with a NaN or an inf: no distance or score is defined on them (POT's `emd2` returns 0 on a NaN
    cost, which would read as a perfect score)."""
    bad = (~torch.isfinite(samples.reshape(len(samples), -1))).any(dim=1)
    if bad.any():
        raise ValueError(
            f"{what}: {int(bad.sum())} of {len(samples)} samples contain NaN or inf, so the metric is undefined (the "
            "model or the sampler diverged)."
        )


@torch.no_grad()
def toy_metrics(pipeline, toy_task, steps_list, num_samples: int = 1000, seed: int = 0) -> dict[str, float]:
    """W2 (POT, when installed) and, for tasks with discrete modes, the fraction of samples on a mode, per NFE.

    Raises a `ValueError` when the samples at some NFE are not all finite (never a score of 0).
    """
    generator = make_generator(seed, "validation", 2)
    x0 = toy_task.sample_source(num_samples, generator)
    target = toy_task.sample_target(num_samples, generator)
    reference = toy_task.sample_target(num_samples, generator)
    latent_dim = pipeline.velocity_model.latent_dim
    z = torch.randn(num_samples, latent_dim, generator=generator) if latent_dim > 0 else None
    if pipeline.prior is not None:  # z as the pipeline draws it
        model = pipeline.velocity_model
        z = pipeline.prepare_z(num_samples, generator, model.device, model.dtype, source=x0).cpu()
    try:
        import ot
    except ImportError:  # POT is optional (the `bench` extra)
        ot = None
    metrics = {}

    def w2(a, b):
        cost = ot.dist(a.double().numpy(), b.double().numpy())
        weights = np.full(len(a), 1.0 / len(a))
        return float(math.sqrt(max(ot.emd2(weights, weights, cost, numItermax=1_000_000), 0.0)))

    if ot is not None:
        metrics["w2_floor"] = w2(target, reference)
    for steps in steps_list:
        samples = sample_trajectories(pipeline, x0, z, steps)[-1]
        check_finite_samples(samples, f"toy metrics at {steps} step(s)")
        if ot is not None:
            metrics[f"w2_nfe{steps}"] = w2(samples, target)
        if toy_task.target_modes is not None:
            metrics[f"on_mode_nfe{steps}"] = toy_task.fraction_on_mode(samples)
    return metrics
