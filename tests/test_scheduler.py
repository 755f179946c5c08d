import math

import pytest
import torch

from diffusers_vrfm import VRFMScheduler


def integrate(scheduler, velocity_fn, x, num_steps=None, timesteps=None):
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps)
    else:
        scheduler.set_timesteps(num_steps)
    evaluations = 0
    for t in scheduler.timesteps:
        x = scheduler.step(velocity_fn(x, t), t, x).prev_sample
        evaluations += 1
    return x, evaluations


def decay(x, t):  # dx/dt = -x + t, x(t) = (x0 - 1) e^{-t} + t - 1 + ... solved below
    return -x + t


def exact_decay(x0, t):
    return (x0 + 1) * math.exp(-t) + t - 1


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2), ("midpoint", 2)])
def test_solvers_converge_at_their_order(solver, order):
    x0 = torch.tensor([[0.5, -2.0]], dtype=torch.float64)
    exact = exact_decay(x0, 1.0)
    errors = []
    for steps in (8, 16, 32):
        x, evaluations = integrate(VRFMScheduler(solver=solver), decay, x0, steps)
        assert evaluations == steps * (1 if solver == "euler" else 2)
        errors.append((x - exact).abs().max().item())
    observed_orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(o - order) < 0.25 for o in observed_orders), observed_orders


def test_euler_is_exact_for_constant_velocity_in_one_step():
    scheduler = VRFMScheduler()
    x, evaluations = integrate(scheduler, lambda x, t: torch.full_like(x, 2.0), torch.zeros(3, 2), 1)
    assert evaluations == 1
    torch.testing.assert_close(x, torch.full((3, 2), 2.0))


def test_adaptive_solver_reports_its_evaluations():
    pytest.importorskip("torchdiffeq")
    scheduler = VRFMScheduler(solver="dopri5", rtol=1e-7, atol=1e-7)
    x0 = torch.tensor([[0.5, -2.0]], dtype=torch.float64)
    calls = []

    def velocity(x, t):
        calls.append(1)
        return decay(x, t)

    out = scheduler.integrate_adaptive(velocity, x0)
    torch.testing.assert_close(out.prev_sample, exact_decay(x0, 1.0), atol=1e-6, rtol=1e-6)
    assert out.num_function_evals == len(calls) > 6
    assert scheduler.is_adaptive
    with pytest.raises(ValueError, match="adaptive"):
        scheduler.set_timesteps(4)


def test_default_grid_endpoints_monotonic_and_length():
    scheduler = VRFMScheduler()
    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) == 10 == scheduler.num_function_evals
    assert scheduler.time_grid[0] == 0 and scheduler.time_grid[-1] == 1
    assert (scheduler.time_grid[1:] > scheduler.time_grid[:-1]).all()
    assert scheduler.timesteps.dtype == torch.float32


def test_shift_is_applied_once_with_the_sd3_formula():
    def shifted(sigma, shift):
        return shift * sigma / (1 + (shift - 1) * sigma)

    plain, ours = VRFMScheduler(), VRFMScheduler(shift=3.0)
    plain.set_timesteps(6)
    ours.set_timesteps(6)
    torch.testing.assert_close(1 - ours.time_grid, shifted(1 - plain.time_grid, 3.0))
    ours.set_timesteps(6)  # calling set_timesteps again does not shift twice
    torch.testing.assert_close(1 - ours.time_grid, shifted(1 - plain.time_grid, 3.0))
    assert ours.time_grid[1] < 1 / 6  # shift > 1 spends steps near noise


def test_custom_timesteps_are_honoured_exactly():
    scheduler = VRFMScheduler(shift=3.0)
    scheduler.set_timesteps(timesteps=[0.0, 0.1, 0.7])
    torch.testing.assert_close(scheduler.time_grid, torch.tensor([0.0, 0.1, 0.7, 1.0]))
    assert scheduler.num_inference_steps == 3
    scheduler.set_timesteps(timesteps=[0.0, 0.5, 1.0])
    torch.testing.assert_close(scheduler.time_grid, torch.tensor([0.0, 0.5, 1.0]))
    heun = VRFMScheduler(solver="heun")
    heun.set_timesteps(timesteps=[0.0, 0.25])
    torch.testing.assert_close(heun.timesteps, torch.tensor([0.0, 0.25, 0.25, 1.0]))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_inference_steps": 0}, ValueError, "`num_inference_steps`"),
        ({"num_inference_steps": 2.5}, TypeError, "`num_inference_steps`"),
        ({}, ValueError, "`num_inference_steps`"),
        ({"timesteps": [0.0, 0.5, 0.4]}, ValueError, "strictly increasing"),
        ({"timesteps": [-0.1, 0.5]}, ValueError, r"\[0, 1\]"),
        ({"timesteps": [0.0, float("nan")]}, ValueError, "finite"),
        ({"timesteps": []}, ValueError, "empty"),
        ({"timesteps": [1.0]}, ValueError, "below 1.0"),
        ({"timesteps": [0.0], "num_inference_steps": 3}, ValueError, "not both"),
    ],
)
def test_set_timesteps_rejects_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        VRFMScheduler().set_timesteps(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"solver": "rk4"}, "`solver`"),
        ({"shift": 0.0}, "`shift`"),
        ({"timestep_density": "beta"}, "`timestep_density`"),
    ],
)
def test_constructor_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VRFMScheduler(**kwargs)


def test_step_refuses_wrong_time_and_extra_calls():
    scheduler = VRFMScheduler()
    scheduler.set_timesteps(2)
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="`timestep` must be 0.000000"):
        scheduler.step(x, 0.5, x)  # a sampler that holds t at a constant or wrong value
    x = scheduler.step(x, torch.zeros(2), x).prev_sample  # a per-example tensor of equal values is accepted
    assert scheduler.step_index == 1
    x = scheduler.step(x, scheduler.timesteps[1], x).prev_sample
    with pytest.raises(ValueError, match="only 2 evaluations"):
        scheduler.step(x, 1.0, x)
    with pytest.raises(ValueError, match="`model_output`"):
        scheduler.set_timesteps(2)
        scheduler.step(torch.zeros(3, 2), 0.0, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        VRFMScheduler().step(x, 0.0, x)


def test_the_schedules_own_time_is_taken_unread_and_any_other_is_compared():
    from diffusers_vrfm.schedulers.scheduling_vrfm import is_entry_of_schedule

    scheduler = VRFMScheduler()
    scheduler.set_timesteps(4)
    entry = scheduler.timesteps[0]
    assert is_entry_of_schedule(entry, entry) and is_entry_of_schedule(entry.expand(3), entry)
    assert not is_entry_of_schedule(scheduler.timesteps[0:3], entry), "a slice holds later times after the first"
    assert not is_entry_of_schedule(entry.clone(), entry) and not is_entry_of_schedule(0.0, entry)
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="`timestep` must be 0.000000"):
        scheduler.step(x, scheduler.timesteps[0:3], x)  # starts at the entry in memory, yet is compared
    x = scheduler.step(x, entry.expand(3), x).prev_sample
    assert scheduler.step_index == 1


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
def test_dict_and_tuple_outputs_match(solver):
    a, b = VRFMScheduler(solver=solver), VRFMScheduler(solver=solver)
    a.set_timesteps(3)
    b.set_timesteps(3)
    x_a = x_b = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    for t in a.timesteps:
        x_a = a.step(decay(x_a, t), t, x_a).prev_sample
        x_b = b.step(decay(x_b, t), t, x_b, return_dict=False)[0]
    assert torch.equal(x_a, x_b)


def test_config_round_trip_gives_identical_steps(tmp_path):
    scheduler = VRFMScheduler(shift=2.0, solver="midpoint", timestep_density="logit_normal", logit_mean=0.3)
    scheduler.save_pretrained(tmp_path)
    reloaded = VRFMScheduler.from_pretrained(tmp_path)
    assert {k: v for k, v in reloaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in scheduler.config.items() if not k.startswith("_")
    }
    x0 = torch.randn(2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        integrate(scheduler, decay, x0, 4)[0], integrate(reloaded, decay, x0, 4)[0], rtol=0, atol=0
    )
    assert VRFMScheduler.from_config(scheduler.config).config.solver == "midpoint"


def test_training_helpers():
    scheduler = VRFMScheduler()
    data, noise = torch.randn(4, 2), torch.randn(4, 2)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t = scheduler.add_noise(data, noise, t)
    torch.testing.assert_close(x_t[0], noise[0])
    torch.testing.assert_close(x_t[3], data[3])
    torch.testing.assert_close(scheduler.get_velocity(data, noise), data - noise)
    t = scheduler.sample_training_timesteps(16, generator=torch.Generator().manual_seed(0))
    assert t.shape == (16,) and (t >= 0).all() and (t <= 1).all()


def test_flow_match_timestep_converters():
    scheduler = VRFMScheduler()
    t = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(scheduler.to_flow_match_timesteps(t), torch.tensor([1000.0, 750.0, 0.0]))
    torch.testing.assert_close(scheduler.from_flow_match_timesteps(scheduler.to_flow_match_timesteps(t)), t)
