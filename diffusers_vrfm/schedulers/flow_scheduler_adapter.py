"""One adapter that drives `VRFMScheduler` or a diffusers flow scheduler in this package's clock and sign.

diffusers' flow schedulers count time as ``sigma = 1 - t`` (1 = noise) and expect the model output ``noise - data``,
which is ``-v``; this package's models predict ``v = dx/dt`` at ``t`` (0 = noise). `FlowSchedulerAdapter` converts
both in one place, so a pipeline loop reads the same whatever the scheduler:

```py
times = adapter.set_timesteps(num_inference_steps, device=device)
for index, t in enumerate(times):
    sample = adapter.step(velocity_model(sample, t, z).sample, index, sample)
```
"""

from __future__ import annotations

import inspect

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..objective import sigma_to_t, t_to_sigma, velocity_to_flow_match_output
from .scheduling_vrfm import VRFMScheduler, check_time_grid

# The diffusers schedulers that integrate a flow ODE, with the config values they need for it. A config that lacks a
# key (an older diffusers) is taken to have the required value.
FLOW_SCHEDULER_REQUIREMENTS = {
    "FlowMatchEulerDiscreteScheduler": {
        "stochastic_sampling": False,
        "invert_sigmas": False,
        "use_dynamic_shifting": False,
    },
    "FlowMatchHeunDiscreteScheduler": {},
    "DPMSolverMultistepScheduler": {
        "use_flow_sigmas": True,
        "prediction_type": "flow_prediction",
        "use_dynamic_shifting": False,
    },
    "UniPCMultistepScheduler": {
        "use_flow_sigmas": True,
        "prediction_type": "flow_prediction",
        "use_dynamic_shifting": False,
    },
}
ODE_DPM_ALGORITHMS = ("dpmsolver++", "dpmsolver")


def supported_schedulers_text() -> str:
    """The sentence that names the schedulers a VRFM pipeline can sample with."""
    return (
        "VRFMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, or "
        "DPMSolverMultistepScheduler / UniPCMultistepScheduler with `use_flow_sigmas=True, "
        "prediction_type='flow_prediction'` (e.g. `pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config("
        "pipe.scheduler.config)`)"
    )


def check_flow_scheduler(scheduler, argument: str = "scheduler") -> None:
    """Refuses a scheduler that cannot integrate this package's flow ODE, naming the ones that can."""
    if isinstance(scheduler, VRFMScheduler):
        return
    name = type(scheduler).__name__
    if not isinstance(scheduler, SchedulerMixin) or name not in FLOW_SCHEDULER_REQUIREMENTS:
        raise TypeError(
            f"`{argument}` must be a scheduler that integrates a flow ODE, but got {name}. Use "
            f"{supported_schedulers_text()}."
        )
    config = scheduler.config
    wrong = {
        key: config.get(key, required)
        for key, required in FLOW_SCHEDULER_REQUIREMENTS[name].items()
        if config.get(key, required) != required
    }
    if wrong:
        needed = ", ".join(f"{key}={FLOW_SCHEDULER_REQUIREMENTS[name][key]!r}" for key in wrong)
        raise ValueError(
            f"`{argument}` is a {name} configured with {wrong}, which does not integrate a deterministic flow ODE in "
            f"this package's setting; create it with {needed}."
        )
    if name == "DPMSolverMultistepScheduler" and config.get("algorithm_type") not in ODE_DPM_ALGORITHMS:
        raise ValueError(
            f"`{argument}` is a DPMSolverMultistepScheduler with algorithm_type={config.get('algorithm_type')!r}, a "
            f"stochastic solver; use one of {ODE_DPM_ALGORITHMS}."
        )


class FlowSchedulerAdapter:
    """Drives a scheduler in this package's clock: the model is evaluated at times ``t`` (0 = noise, 1 = data) and
    returns velocities ``v = dx/dt``.

    For [`VRFMScheduler`] this is the identity. For diffusers' flow schedulers (see `FLOW_SCHEDULER_REQUIREMENTS`) the
    evaluation times are ``1 - scheduler.sigmas[i]`` (the sigma that the scheduler's `step` uses at its `i`-th call,
    exact even where the scheduler's `timesteps` are rounded to integers) and the velocity is handed over as the
    flow-matching output ``-v``.

    Args:
        scheduler: the scheduler to drive; refused by [`check_flow_scheduler`] when it cannot integrate a flow.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import FlowMatchEulerDiscreteScheduler
    >>> from diffusers_vrfm.schedulers.flow_scheduler_adapter import FlowSchedulerAdapter
    >>> adapter = FlowSchedulerAdapter(FlowMatchEulerDiscreteScheduler())
    >>> times = adapter.set_timesteps(timesteps=[0.0, 0.5])
    >>> times
    tensor([0.0000, 0.5000])
    >>> x = torch.zeros(1, 2)
    >>> for index, t in enumerate(times):
    ...     x = adapter.step(torch.ones_like(x), index, x)  # constant velocity 1 from t = 0 to t = 1
    >>> x
    tensor([[1., 1.]])
    ```
    """

    def __init__(self, scheduler):
        check_flow_scheduler(scheduler)
        self.scheduler = scheduler
        self.speaks_velocity = isinstance(scheduler, VRFMScheduler)  # our clock and sign, no conversion
        self.times = None

    @property
    def is_adaptive(self) -> bool:
        """Whether the scheduler picks its own times ([`VRFMScheduler`] with an adaptive solver)."""
        return bool(getattr(self.scheduler, "is_adaptive", False))

    @property
    def num_function_evals(self) -> int:
        """Model evaluations the current schedule needs."""
        return 0 if self.times is None else len(self.times)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        timesteps: list[float] | torch.Tensor | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Sets the scheduler's schedule and returns the times ``t`` at which to evaluate the model, in order.

        Args:
            num_inference_steps (`int`, *optional*): solver steps, on the scheduler's own default grid.
            timesteps (`list[float]` or `torch.Tensor`, *optional*): a custom grid in this package's clock (see
                [`check_time_grid`]); a diffusers scheduler receives it as `sigmas = 1 - t` (without the final
                ``t = 1``), which only schedulers whose `set_timesteps` takes `sigmas` accept.
            device: where the schedule lives.
        """
        if timesteps is not None and num_inference_steps is not None:
            raise ValueError("Pass either `num_inference_steps` or `timesteps`, not both.")
        if self.speaks_velocity:
            self.scheduler.set_timesteps(num_inference_steps, device=device, timesteps=timesteps)
            self.times = self.scheduler.timesteps
            return self.times
        if timesteps is None:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        else:
            grid = check_time_grid(timesteps)
            if "sigmas" not in inspect.signature(self.scheduler.set_timesteps).parameters:
                raise ValueError(
                    f"`timesteps` sets a custom grid, but {type(self.scheduler).__name__} takes no custom sigmas; "
                    "drop `timesteps` or use VRFMScheduler, FlowMatchEulerDiscreteScheduler or "
                    "UniPCMultistepScheduler."
                )
            self.scheduler.set_timesteps(sigmas=t_to_sigma(grid[:-1]).cpu().numpy(), device=device)
        num_evaluations = len(self.scheduler.timesteps)
        self.times = sigma_to_t(self.scheduler.sigmas[:num_evaluations].to(device=device, dtype=torch.float32))
        return self.times

    def step(self, velocity: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """Advances `sample` with the velocity the model predicted at ``self.times[index]``; returns the new sample."""
        if self.speaks_velocity:
            return self.scheduler.step(velocity, self.times[index], sample).prev_sample
        model_output = velocity_to_flow_match_output(velocity)
        return self.scheduler.step(model_output, self.scheduler.timesteps[index], sample, return_dict=False)[0]

    def integrate_adaptive(self, velocity_fn, sample: torch.Tensor):
        """Integrates from noise to data with the scheduler's adaptive solver (see
        [`VRFMScheduler.integrate_adaptive`])."""
        return self.scheduler.integrate_adaptive(velocity_fn, sample)


# Short names for the schedulers a pipeline can sample with, e.g. for a benchmark's `--scheduler` option.
FLOW_SCHEDULER_NAMES = ("euler", "heun", "midpoint", "flow_euler", "flow_heun", "dpm_multistep", "unipc_multistep")
# those that evaluate the model once per step, so that `num_inference_steps` is the NFE
SINGLE_EVAL_SCHEDULERS = ("euler", "flow_euler", "dpm_multistep", "unipc_multistep")


def make_flow_scheduler(name: str, config=None):
    """Creates the scheduler called `name` (see `FLOW_SCHEDULER_NAMES`) from a `VRFMScheduler` config (the default
    one when `config` is `None`): `"euler"`, `"heun"`, `"midpoint"` are `VRFMScheduler` solvers; the others are
    diffusers' flow schedulers, the multistep ones with flow sigmas, `flow_prediction` and `flow_shift` = `shift`.

    Example:

    ```py
    >>> from diffusers_vrfm.schedulers.flow_scheduler_adapter import make_flow_scheduler
    >>> type(make_flow_scheduler("unipc_multistep")).__name__
    'UniPCMultistepScheduler'
    ```
    """
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    if name not in FLOW_SCHEDULER_NAMES:
        raise ValueError(f"`name` must be one of {FLOW_SCHEDULER_NAMES}, but got {name!r}.")
    config = VRFMScheduler().config if config is None else config
    if name in ("euler", "heun", "midpoint"):
        return VRFMScheduler.from_config(config, solver=name)
    multistep = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": config.get("shift", 1.0)}
    scheduler_class, extra = {
        "flow_euler": (FlowMatchEulerDiscreteScheduler, {}),
        "flow_heun": (FlowMatchHeunDiscreteScheduler, {}),
        "dpm_multistep": (DPMSolverMultistepScheduler, multistep),
        "unipc_multistep": (UniPCMultistepScheduler, multistep),
    }[name]
    return scheduler_class.from_config(config, **extra)
