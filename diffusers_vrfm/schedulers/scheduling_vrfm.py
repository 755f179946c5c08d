"""VRFMScheduler: the time grid and ODE solvers for (variational) rectified flow, in diffusers' scheduler style."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..objective import (
    check_real,
    check_tensor,
    check_timestep_density,
    interpolate,
    sample_timesteps,
    sigma_to_t,
    t_to_sigma,
    target_velocity,
)

FIXED_STEP_SOLVERS = ("euler", "heun", "midpoint")
ADAPTIVE_SOLVERS = ("dopri5", "bosh3", "adaptive_heun", "dopri8")


def check_time_grid(timesteps: list[float] | torch.Tensor) -> torch.Tensor:
    """Checks a custom sampling grid in this package's clock and returns it as float64, ending at ``t = 1``.

    The grid must be real, finite, within `[0, 1]` (0 = noise, 1 = data) and strictly increasing (in float32 too);
    `1.0` is appended when it does not already end there. Errors name the argument `timesteps`.
    """
    if isinstance(timesteps, torch.Tensor):
        check_tensor(timesteps, "timesteps", floating=False)
    try:
        grid = torch.as_tensor(timesteps)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise TypeError(
            f"`timesteps` must be a list of floats or a tensor, but got {timesteps!r} ({error})."
        ) from None
    if grid.dtype == torch.bool or grid.is_complex():
        raise TypeError(f"`timesteps` must hold real numbers, but got dtype {grid.dtype}.")
    grid = grid.to(dtype=torch.float64).flatten()
    if grid.numel() == 0:
        raise ValueError("`timesteps` must not be empty.")
    if not torch.isfinite(grid).all():
        raise ValueError(f"`timesteps` must be finite, but got {grid.tolist()}.")
    if grid.min() < 0 or grid.max() > 1:
        raise ValueError(f"`timesteps` must lie in [0, 1] (0 = noise, 1 = data), but got {grid.tolist()}.")
    if grid.numel() > 1 and not (grid[1:] > grid[:-1]).all():
        raise ValueError(f"`timesteps` must be strictly increasing, but got {grid.tolist()}.")
    if grid[-1] < 1:
        grid = torch.cat([grid, grid.new_ones(1)])
    if grid.numel() < 2:
        raise ValueError("`timesteps` must contain at least one time below 1.0.")
    if not (grid.float()[1:] > grid.float()[:-1]).all():
        raise ValueError(f"`timesteps` must stay strictly increasing in float32, but got {grid.tolist()}.")
    return grid


@dataclass
class VRFMSchedulerOutput(BaseOutput):
    """Output of [`VRFMScheduler.step`].

    Args:
        prev_sample (`torch.Tensor`): the sample to feed to the next model evaluation (for the first stage of a
            two-stage solver this is the intermediate point, not yet the next grid point).
        is_step_complete (`bool`): whether `prev_sample` lies on the next point of the time grid.
    """

    prev_sample: torch.Tensor
    is_step_complete: bool = True


@dataclass
class VRFMAdaptiveOutput(BaseOutput):
    """Output of [`VRFMScheduler.integrate_adaptive`].

    Args:
        prev_sample (`torch.Tensor`): the state at `t_end`.
        num_function_evals (`int`): how many times the velocity was evaluated, counted by calls.
    """

    prev_sample: torch.Tensor
    num_function_evals: int


def is_entry_of_schedule(timestep, entry: torch.Tensor) -> bool:
    """Whether `timestep` is `entry` itself, an element of a scheduler's `timesteps`, or a broadcast of it (as a
    sampling loop that iterates over `timesteps` passes it): then it holds the scheduled time by construction, and
    `step` need not read either value, which would make the host wait for the device at every step."""
    return (
        isinstance(timestep, torch.Tensor)
        and timestep.numel() > 0
        and timestep.dtype == entry.dtype
        and timestep.device == entry.device
        and timestep.data_ptr() == entry.data_ptr()
        and all(stride == 0 for stride, size in zip(timestep.stride(), timestep.shape) if size > 1)
    )


class VRFMScheduler(SchedulerMixin, ConfigMixin):
    """Sampling grid, ODE solvers and training helpers for VRFM and plain rectified flow.

    Clock: ``t`` runs from ``0`` (noise) to ``1`` (data); ``x_t = (1 - t) x0 + t x1``; the model predicts the velocity
    ``dx/dt = x1 - x0``. `timesteps` holds the times **in this clock** (floats in `[0, 1]`) at which the model is
    evaluated, in the order it is evaluated, so `len(scheduler.timesteps)` is the number of function evaluations.
    diffusers' flow-matching schedulers use ``sigma = 1 - t`` and models that predict ``-v``: convert with
    [`~VRFMScheduler.t_to_sigma`], [`~VRFMScheduler.sigma_to_t`] and [`~VRFMScheduler.to_flow_match_timesteps`].

    Solvers:
        - `"euler"`: one evaluation per step.
        - `"heun"`: explicit trapezoid, two evaluations per step (at ``t_n`` and ``t_{n+1}``).
        - `"midpoint"`: two evaluations per step (at ``t_n`` and ``t_n + h / 2``).
        - `"dopri5"` (and the other adaptive methods of torchdiffeq, the `ode` extra): adaptive steps through
          [`~VRFMScheduler.integrate_adaptive`], which reports the number of evaluations it used.

    Args:
        num_train_timesteps (`int`, defaults to 1000): the scale of the integer-like timesteps that diffusers'
            backbones embed; only used by [`~VRFMScheduler.to_flow_match_timesteps`] and the model wrappers.
        shift (`float`, defaults to 1.0): the SD3 time shift, applied once, on the sigma clock, to the default grid
            (``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``). `shift > 1` spends more steps near noise.
        solver (`str`, defaults to `"euler"`): one of `"euler"`, `"heun"`, `"midpoint"`, `"dopri5"`, `"bosh3"`,
            `"adaptive_heun"`, `"dopri8"`.
        rtol (`float`), atol (`float`): tolerances of the adaptive solvers.
        timestep_density (`str`, defaults to `"uniform"`): the training-time density of [`sample_timesteps`].
        logit_mean, logit_std, mode_scale (`float`): parameters of that density.
        noise_end_fraction (`float`, defaults to 0.0): the weight of an atom at ``t = 0`` mixed into that density.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import VRFMScheduler
    >>> scheduler = VRFMScheduler(solver="heun")
    >>> scheduler.set_timesteps(2)
    >>> scheduler.timesteps
    tensor([0.0000, 0.5000, 0.5000, 1.0000])
    >>> x = torch.zeros(1, 2)
    >>> for t in scheduler.timesteps:
    ...     x = scheduler.step(torch.ones_like(x), t, x).prev_sample
    >>> x
    tensor([[1., 1.]])
    ```
    """

    config_name = "scheduler_config.json"
    # the diffusers schedulers that `from_config(scheduler.config)` can swap in (VRFMPipeline drives them through
    # `FlowSchedulerAdapter`; the multistep two need `use_flow_sigmas=True, prediction_type="flow_prediction"`)
    _compatibles = [
        "FlowMatchEulerDiscreteScheduler",
        "FlowMatchHeunDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
    ]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        solver: str = "euler",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        timestep_density: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        noise_end_fraction: float = 0.0,
    ):
        if not isinstance(solver, str) or solver not in FIXED_STEP_SOLVERS + ADAPTIVE_SOLVERS:
            raise ValueError(f"`solver` must be one of {FIXED_STEP_SOLVERS + ADAPTIVE_SOLVERS}, but got {solver!r}.")
        if isinstance(shift, bool) or not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise ValueError(f"`shift` must be a finite number > 0, but got {shift!r}.")
        if isinstance(num_train_timesteps, bool) or not (
            isinstance(num_train_timesteps, int) and num_train_timesteps > 0
        ):
            raise ValueError(f"`num_train_timesteps` must be a positive integer, but got {num_train_timesteps!r}.")
        for name, value in (("rtol", rtol), ("atol", atol)):
            if check_real(value, name) <= 0:
                raise ValueError(f"`{name}` must be > 0, but got {value!r}.")
        check_timestep_density(
            timestep_density, logit_mean, logit_std, mode_scale, noise_end_fraction, argument="timestep_density"
        )
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.time_grid = None
        self.timesteps = None
        self._step_index = None
        self._stage_sample = None
        self._stage_velocity = None

    # ----------------------------------------------------------------------------------------------- clock converters
    @staticmethod
    def t_to_sigma(t):
        """This package's `t` (0 = noise) to diffusers' flow-matching `sigma` (1 = noise)."""
        return t_to_sigma(t)

    @staticmethod
    def sigma_to_t(sigma):
        """diffusers' flow-matching `sigma` (1 = noise) to this package's `t` (0 = noise)."""
        return sigma_to_t(sigma)

    def to_flow_match_timesteps(self, t):
        """`t` to the timesteps `FlowMatchEulerDiscreteScheduler` gives its model: `sigma * num_train_timesteps`."""
        return t_to_sigma(t) * self.config.num_train_timesteps

    def from_flow_match_timesteps(self, timesteps):
        """`FlowMatchEulerDiscreteScheduler` timesteps (`sigma * num_train_timesteps`) to this package's `t`."""
        return sigma_to_t(timesteps / self.config.num_train_timesteps)

    # ------------------------------------------------------------------------------------------------------ properties
    @property
    def is_adaptive(self) -> bool:
        """Whether the configured solver is adaptive (use [`~VRFMScheduler.integrate_adaptive`], not `step`)."""
        return self.config.solver in ADAPTIVE_SOLVERS

    @property
    def order(self) -> int:
        """Model evaluations per solver step, as diffusers' `order` counts them (2 for Heun and midpoint, 1 for Euler
        and for the adaptive solvers, which run outside `step`)."""
        return 1 if self.is_adaptive else self.evals_per_step

    @property
    def evals_per_step(self) -> int:
        """Model evaluations per grid interval of the fixed-step solver."""
        return 1 if self.config.solver == "euler" else 2

    @property
    def step_index(self):
        """The number of `step` calls since the last `set_timesteps`."""
        return self._step_index

    @property
    def num_function_evals(self) -> int:
        """Model evaluations the current schedule needs: `len(self.timesteps)`."""
        return 0 if self.timesteps is None else len(self.timesteps)

    # --------------------------------------------------------------------------------------------------- the time grid
    def _shift_time(self, t: torch.Tensor) -> torch.Tensor:
        shift = self.config.shift
        if shift == 1.0:
            return t
        sigma = t_to_sigma(t)
        # clamped: for shift < 1, rounding takes the first time a hair below 0
        return sigma_to_t(shift * sigma / (1 + (shift - 1) * sigma)).clamp(0.0, 1.0)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | torch.Tensor | None = None,
    ):
        """Builds the time grid for sampling, from ``t = 0`` (noise) to ``t = 1`` (data).

        Args:
            num_inference_steps (`int`, *optional*): the number of grid intervals (solver steps); the model is
                evaluated `num_inference_steps * evals_per_step` times. With the default grid, the grid is uniform in
                `t` and then shifted by `config.shift`.
            device (`str` or `torch.device`, *optional*): where to put `timesteps`.
            timesteps (`list[float]` or `torch.Tensor`, *optional*): a custom grid in this package's clock, strictly
                increasing, within `[0, 1]`; it is used exactly as given (no shift is applied), with `1.0` appended
                when it does not already end there. Excludes `num_inference_steps`.
        """
        if self.is_adaptive:
            raise ValueError(
                f"`set_timesteps` builds a fixed grid, but the solver is the adaptive {self.config.solver!r}; "
                "use `integrate_adaptive`, or a scheduler with solver='euler', 'heun' or 'midpoint'."
            )
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("Pass either `num_inference_steps` or `timesteps`, not both.")
            grid = check_time_grid(timesteps)
        else:
            if num_inference_steps is None:
                raise ValueError("Pass `num_inference_steps` or `timesteps`.")
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
                raise TypeError(
                    f"`num_inference_steps` must be an int, but got {type(num_inference_steps).__name__} "
                    f"{num_inference_steps!r}."
                )
            if num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be >= 1, but got {num_inference_steps}.")
            grid = self._shift_time(torch.linspace(0.0, 1.0, num_inference_steps + 1, dtype=torch.float64))
            if not (grid.float()[1:] > grid.float()[:-1]).all():
                raise ValueError(
                    f"`shift`={self.config.shift} squeezes the grid of `num_inference_steps`={num_inference_steps} "
                    "into repeated float32 times; use a shift closer to 1 or fewer steps."
                )

        self.num_inference_steps = grid.numel() - 1
        self.time_grid = grid.to(dtype=torch.float32, device=device)
        start, end = self.time_grid[:-1], self.time_grid[1:]
        if self.config.solver == "euler":
            evals = start
        elif self.config.solver == "heun":
            evals = torch.stack([start, end], dim=1).flatten()
        else:  # midpoint
            evals = torch.stack([start, (start + end) / 2], dim=1).flatten()
        self.timesteps = evals
        self._step_index = 0
        self._stage_sample = None
        self._stage_velocity = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: flow models take the sample as it is. Present for diffusers compatibility."""
        return sample

    # ------------------------------------------------------------------------------------------------------- stepping
    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> VRFMSchedulerOutput | tuple:
        """Advances the ODE by one model evaluation.

        Args:
            model_output (`torch.Tensor`): the velocity ``dx/dt`` predicted at (`sample`, `timestep`).
            timestep (`float` or `torch.Tensor`): the time the model was evaluated at; must equal
                `self.timesteps[self.step_index]` (a scalar, or a per-example tensor whose entries all equal it).
                This catches samplers that hold `t` fixed or skip steps.
            sample (`torch.Tensor`): the current state.
            generator: unused (the solvers are deterministic); accepted for diffusers compatibility.
            return_dict (`bool`): return a [`VRFMSchedulerOutput`] rather than a tuple.
        """
        self._check_step_inputs(model_output, timestep, sample)
        solver = self.config.solver
        interval = self._step_index // self.evals_per_step
        t_start, t_end = self.time_grid[interval], self.time_grid[interval + 1]
        h = (t_end - t_start).to(sample.dtype)
        velocity = model_output.to(sample.dtype)
        is_first_stage = solver != "euler" and self._step_index % 2 == 0

        if solver == "euler":
            prev_sample = sample + h * velocity
        elif is_first_stage:
            self._stage_sample, self._stage_velocity = sample, velocity
            prev_sample = sample + (h if solver == "heun" else h / 2) * velocity
        elif solver == "heun":
            prev_sample = self._stage_sample + h / 2 * (self._stage_velocity + velocity)
        else:  # midpoint
            prev_sample = self._stage_sample + h * velocity
        if not is_first_stage:
            self._stage_sample, self._stage_velocity = None, None
        self._step_index += 1

        if not return_dict:
            return (prev_sample,)
        return VRFMSchedulerOutput(prev_sample=prev_sample, is_step_complete=not is_first_stage)

    def _check_step_inputs(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> None:
        """`step`'s checks: a schedule set and not used up, a velocity like `sample`, and the scheduled time."""
        if self.timesteps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        check_tensor(model_output, "model_output")
        check_tensor(sample, "sample")
        if isinstance(timestep, torch.Tensor):
            check_tensor(timestep, "timestep", floating=False)
            if timestep.dtype == torch.bool or timestep.is_complex():
                raise TypeError(f"`timestep` must be a real-valued tensor, but got dtype {timestep.dtype}.")
        elif isinstance(timestep, bool) or not isinstance(timestep, numbers.Real):
            raise TypeError(f"`timestep` must be a float or a tensor, but got {type(timestep).__name__}.")
        else:
            timestep = float(timestep)  # an int beyond int64 would not convert
        if self._step_index >= len(self.timesteps):
            raise ValueError(
                f"`step` was called {self._step_index + 1} times, but the schedule has only {len(self.timesteps)} "
                "evaluations; call `set_timesteps` again to start a new trajectory."
            )
        if model_output.shape != sample.shape:
            raise ValueError(
                f"`model_output` must have the shape of `sample` {tuple(sample.shape)}, but got "
                f"{tuple(model_output.shape)}."
            )
        if model_output.device != sample.device:
            raise ValueError(
                f"`model_output` must be on the device of `sample` ({sample.device}), but is on {model_output.device}."
            )
        expected = self.timesteps[self._step_index]
        if is_entry_of_schedule(timestep, expected):
            return  # the schedule's own time (or a broadcast of it): nothing to compare, and no wait for the device
        timestep = torch.as_tensor(timestep, dtype=torch.float32, device=expected.device)
        if timestep.numel() == 0 or not torch.allclose(timestep, expected.expand_as(timestep), atol=1e-6, rtol=0):
            raise ValueError(
                f"`timestep` must be {expected.item():.6f} (self.timesteps[{self._step_index}]), but got "
                f"{timestep.flatten()[:4].tolist()}; the model must be evaluated at the scheduled times in order."
            )

    def integrate_adaptive(
        self,
        velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        sample: torch.Tensor,
        t_start: float = 0.0,
        t_end: float = 1.0,
        return_dict: bool = True,
    ) -> VRFMAdaptiveOutput | tuple:
        """Integrates ``dx/dt = velocity_fn(x, t)`` from `t_start` to `t_end` with an adaptive torchdiffeq solver.

        `velocity_fn` receives the state and a scalar time tensor. Requires the `ode` extra
        (`pip install diffusers-vrfm[ode]`). Returns the final state and the number of velocity evaluations.
        """
        solver = self.config.solver if self.is_adaptive else "dopri5"
        try:
            from torchdiffeq import odeint
        except ImportError as error:
            raise ImportError(
                "Adaptive solvers need torchdiffeq: install the `ode` extra with `pip install diffusers-vrfm[ode]`."
            ) from error
        for name, value in (("t_start", t_start), ("t_end", t_end)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1):
                raise ValueError(f"`{name}` must be a number in [0, 1], but got {value!r}.")
        counter = {"evals": 0}

        def failure(reason: str) -> ValueError:
            return ValueError(
                f"The adaptive solver {solver!r} could not integrate from `t_start`={t_start} to `t_end`={t_end} "
                f"({reason}): the velocity is too large or not finite along the path from this `sample`. In "
                "VRFMPipeline this comes from extreme `latents`, `z` or `guidance_scale`, or non-finite model weights."
            )

        def ode_func(t, x):
            counter["evals"] += 1
            if not torch.isfinite(t):  # a non-finite velocity turns the step size, and so the next time, into NaN
                raise failure(f"the step size turned non-finite after {counter['evals'] - 1} velocity evaluation(s)")
            # dopri5's stage times can overshoot t_end by a rounding error; keep them in [0, 1]
            return velocity_fn(x, t.clamp(min(t_start, t_end), max(t_start, t_end)))

        times = torch.tensor([t_start, t_end], dtype=sample.dtype, device=sample.device)
        # step_t makes the solver land on t_end instead of stepping past it and interpolating back: past t_end the
        # clamp above would integrate a different ODE
        options = {"step_t": times[1:]}
        try:
            solution = odeint(
                ode_func, sample, times, method=solver, rtol=self.config.rtol, atol=self.config.atol, options=options
            )
        except AssertionError as error:  # torchdiffeq asserts when the step size underflows
            if "underflow" not in str(error):
                raise
            raise failure(str(error)) from None
        prev_sample = solution[-1]
        if not return_dict:
            return (prev_sample, counter["evals"])
        return VRFMAdaptiveOutput(prev_sample=prev_sample, num_function_evals=counter["evals"])

    # ------------------------------------------------------------------------------------------------ training helpers
    def sample_training_timesteps(
        self, batch_size: int, device: str | torch.device = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draws training times in `[0, 1]` from the configured `timestep_density` (see [`sample_timesteps`])."""
        return sample_timesteps(
            batch_size,
            density=self.config.timestep_density,
            logit_mean=self.config.logit_mean,
            logit_std=self.config.logit_std,
            mode_scale=self.config.mode_scale,
            device=device,
            generator=generator,
            noise_end_fraction=self.config.noise_end_fraction,
        )

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The training path point ``x_t = (1 - t) * noise + t * original_samples`` (`timesteps` are `t` values).

        `timesteps` is a scalar, one time per example `(B,)`, or a single time `(1,)` that applies to every example
        (diffusers' schedulers broadcast it the same way).
        """
        if isinstance(timesteps, torch.Tensor) and timesteps.ndim == 1 and timesteps.numel() == 1:
            timesteps = timesteps.reshape(())
        return interpolate(noise, original_samples, timesteps)

    def get_velocity(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps=None) -> torch.Tensor:
        """The training target ``original_samples - noise`` (`timesteps` is accepted for diffusers' signature)."""
        return target_velocity(noise, original_samples)

    def __len__(self):
        return self.config.num_train_timesteps
