"""Toy transport tasks: a source distribution (t = 0) and a target distribution (t = 1), both sampled in torch.

| name | dim | source (t = 0) | target (t = 1) |
|---|---|---|---|
| `two_modes_1d` | 1 | N(0, 1) | modes at -1 and +1, std 0.1 (the paper's 1D task) |
| `ring_2d` | 2 | 6 Gaussians at radius 1/3, std 0.03 | 6 Gaussians at radius 1, std 0.03 (the paper's 2D task) |
| `8gaussians_moons` | 2 | 8 Gaussians at radius 5, std 0.1 ** 0.25 | two moons (noise 0.2, times 3, minus 1) |
| `gaussian_8gaussians` | 2 | N(0, I) | 8 Gaussians at radius 5, std 0.1 ** 0.25 |

The radius-5 tasks follow the benchmark conventions of torchcfm (its 8 Gaussians use covariance sqrt(0.1) * I).
Each sampler takes a `torch.Generator`, so draws are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def _ring_centres(num_modes: int, radius: float, offset: float = 0.0) -> torch.Tensor:
    angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes) + offset
    return (radius * torch.stack([angles.cos(), angles.sin()], dim=1)).float()


def gaussian_mixture(centres: torch.Tensor, std: float, num_samples: int, generator=None) -> torch.Tensor:
    """Draws from an equal-weight mixture of isotropic Gaussians with the given centres `(K, D)`."""
    index = torch.randint(len(centres), (num_samples,), generator=generator)
    noise = torch.randn(num_samples, centres.shape[1], generator=generator)
    return centres[index] + std * noise


def standard_normal(dim: int, num_samples: int, generator=None) -> torch.Tensor:
    return torch.randn(num_samples, dim, generator=generator)


def two_moons(num_samples: int, noise: float = 0.2, generator=None) -> torch.Tensor:
    """Two interleaving half circles (the shape of scikit-learn's `make_moons`), scaled by 3 and shifted by -1."""
    upper = torch.rand(num_samples, generator=generator) < 0.5
    angle = torch.rand(num_samples, generator=generator) * math.pi
    x = torch.where(upper, angle.cos(), 1 - angle.cos())
    y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
    points = torch.stack([x, y], dim=1) + noise * torch.randn(num_samples, 2, generator=generator)
    return points * 3 - 1


@dataclass(frozen=True)
class ToyTask:
    """A toy transport problem.

    Args:
        name (`str`): the task's name.
        dim (`int`): the data dimension.
        sample_source, sample_target: `f(num_samples, generator) -> (num_samples, dim)` tensors.
        target_modes (`torch.Tensor`, *optional*): the target's mode centres, for the fraction-on-mode metric.
        target_mode_std (`float`, *optional*): the standard deviation of each target mode.
    """

    name: str
    dim: int
    sample_source: Callable[[int, torch.Generator | None], torch.Tensor]
    sample_target: Callable[[int, torch.Generator | None], torch.Tensor]
    target_modes: torch.Tensor | None = field(default=None, compare=False)
    target_mode_std: float | None = None

    def sample_pairs(self, num_samples: int, generator: torch.Generator | None = None):
        """An independent coupling: `(x0, x1)`, each `(num_samples, dim)`."""
        return self.sample_source(num_samples, generator), self.sample_target(num_samples, generator)

    def fraction_on_mode(self, samples: torch.Tensor, num_std: float = 3.0) -> float:
        """The fraction of samples within `num_std` standard deviations of a target mode centre (sharpness)."""
        if self.target_modes is None:
            raise ValueError(f"The task {self.name!r} has no discrete target modes.")
        if not torch.isfinite(samples).all():
            raise ValueError("`samples` contain NaN or inf: the fraction on a mode is undefined (sampling diverged).")
        distance = torch.cdist(samples.float(), self.target_modes).min(dim=1).values
        return (distance <= num_std * self.target_mode_std).float().mean().item()


_EIGHT_STD = 0.1**0.25
_TWO_MODES = torch.tensor([[-1.0], [1.0]])
_RING_SOURCE = _ring_centres(6, 1 / 3)
_RING_TARGET = _ring_centres(6, 1.0)
_EIGHT = _ring_centres(8, 5.0)

TOY_TASKS: dict[str, ToyTask] = {
    "two_modes_1d": ToyTask(
        name="two_modes_1d",
        dim=1,
        sample_source=lambda n, g=None: standard_normal(1, n, g),
        sample_target=lambda n, g=None: gaussian_mixture(_TWO_MODES, 0.1, n, g),
        target_modes=_TWO_MODES,
        target_mode_std=0.1,
    ),
    "ring_2d": ToyTask(
        name="ring_2d",
        dim=2,
        sample_source=lambda n, g=None: gaussian_mixture(_RING_SOURCE, 0.03, n, g),
        sample_target=lambda n, g=None: gaussian_mixture(_RING_TARGET, 0.03, n, g),
        target_modes=_RING_TARGET,
        target_mode_std=0.03,
    ),
    "8gaussians_moons": ToyTask(
        name="8gaussians_moons",
        dim=2,
        sample_source=lambda n, g=None: gaussian_mixture(_EIGHT, _EIGHT_STD, n, g),
        sample_target=lambda n, g=None: two_moons(n, generator=g),
    ),
    "gaussian_8gaussians": ToyTask(
        name="gaussian_8gaussians",
        dim=2,
        sample_source=lambda n, g=None: standard_normal(2, n, g),
        sample_target=lambda n, g=None: gaussian_mixture(_EIGHT, _EIGHT_STD, n, g),
        target_modes=_EIGHT,
        target_mode_std=_EIGHT_STD,
    ),
}


def get_toy_task(name: str) -> ToyTask:
    """Looks up a toy task by name, with an error that lists the valid names."""
    if name not in TOY_TASKS:
        raise ValueError(f"Unknown toy task {name!r}; valid names are {sorted(TOY_TASKS)}.")
    return TOY_TASKS[name]
