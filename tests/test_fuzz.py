"""Property-based fuzz tests (hypothesis) of every public entry point that takes user input (issue 8, point 4).

The property, for the scheduler, the pipeline call, the posterior encoder, the velocity MLP and the objective:
a call either succeeds, with finite outputs of the documented shape, or raises `ValueError`/`TypeError` **from this
package's own validation** (the innermost frame is a file of `diffusers_vrfm`) whose message names the offending
argument in backticks. Anything else fails: an error from deep inside torch (`RuntimeError`, `IndexError`,
`AttributeError`, `OverflowError`, ...), a `TypeError` raised by torch itself, or a NaN/inf produced from moderate
inputs (finite, magnitude <= 1e6; beyond that a float32 overflow is arithmetic, not validation, and the pipeline
refuses to return it). A refused `step` must also leave the scheduler where it was.

Data tensors that flow through a model or a pure math function (`sample`, `velocity_pred`, ...) may carry NaN through,
as torch does (the training loop relies on seeing a NaN loss to apply `--nonfinite_policy`). What a user hands to the
pipeline (`z`, `latents`) and to the scheduler's time grid is refused when it is not finite. Tensors on the meta
device hold no values and are refused everywhere; tensors on another real device are moved.

The last tests fuzz `model_index.json` entries of a saved pipeline (no module outside diffusers/diffusers_vrfm is
imported, no file of the folder is executed) and pickle weights next to a stray safetensors file.

Examples are derandomised, so the suite is reproducible. To explore further with fresh random examples, run
`VRFM_FUZZ_MULTIPLIER=30 python -m pytest tests/test_fuzz.py --hypothesis-show-statistics`.
"""

import json
import math
import os
import traceback

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import diffusers_vrfm
from diffusers_vrfm import (
    VRFMMLPModel,
    VRFMPipeline,
    VRFMPosteriorEncoder,
    VRFMScheduler,
    drop_labels,
    gaussian_kl,
    interpolate,
    sample_timesteps,
    slerp,
    vrfm_loss,
)

PACKAGE_DIR = os.path.dirname(os.path.abspath(diffusers_vrfm.__file__))
_MULTIPLIER = int(os.environ.get("VRFM_FUZZ_MULTIPLIER", "1"))


def fuzz(max_examples: int) -> settings:
    """Hypothesis settings: `max_examples` examples, no deadline, no example database, reproducible by default."""
    return settings(
        max_examples=max_examples * _MULTIPLIER,
        deadline=None,
        database=None,
        derandomize=_MULTIPLIER == 1,
        suppress_health_check=list(HealthCheck),
    )


REFUSED = object()


def attempt(call, names):
    """Runs `call()`. Returns its result, or `REFUSED` when it raised a clean `ValueError`/`TypeError`: one raised by
    this package (not by torch) whose message names one of `names` in backticks. Any other exception propagates."""
    try:
        result = call()
    except (ValueError, TypeError) as error:
        message = str(error)
        origin = traceback.extract_tb(error.__traceback__)[-1].filename
        assert os.path.abspath(origin).startswith(PACKAGE_DIR), (
            f"{type(error).__name__} raised from {origin}, not by diffusers_vrfm's validation: {message}"
        )
        assert any(f"`{name}" in message for name in names), (
            f"{type(error).__name__} names none of {list(names)}: {message}"
        )
        event(f"refused with {type(error).__name__}")  # shown by --hypothesis-show-statistics
        return REFUSED
    event("accepted")
    return result


def is_finite(value) -> bool:
    if isinstance(value, np.ndarray):
        return bool(np.isfinite(value).all())
    return bool(torch.isfinite(value.float() if value.dtype == torch.bfloat16 else value).all())


def moderate(*values, limit: float = 1e6) -> bool:
    """Whether every value is finite and at most `limit` in magnitude: tensors (real, not on the meta device) and
    numbers; other values count as moderate (the property about them is that they are refused or ignored).

    Outputs must be finite whenever the inputs are moderate. Beyond that, a float32 overflow (an input of 1e30
    squared in a KL, a `beta` of 1e38) is arithmetic, not a validation bug; the pipeline still refuses to return
    it, and training's non-finite-loss guard catches it."""
    for value in values:
        if isinstance(value, torch.Tensor):
            if value.is_meta or value.is_complex():
                return False
            if value.numel() and value.is_floating_point():
                if not is_finite(value) or value.double().abs().max() > limit:
                    return False
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value) or abs(value) > limit:
                return False
    return True


# ------------------------------------------------------------------------------------------------------- strategies
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ODD_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]
FILLS = ["normal", "unit", "nan", "inf", "huge", "zero"]


@st.composite
def shapes_near(draw, shape):
    """One mistake away from `shape`: a size off by one, a dimension added or dropped, an empty batch, or any small
    shape (which may happen to be right)."""
    shape = tuple(shape)
    kind = draw(st.sampled_from(["bump", "add", "drop", "empty", "any"]))
    if kind == "bump" and shape:
        index = draw(st.integers(0, len(shape) - 1))
        return shape[:index] + (max(0, shape[index] + draw(st.sampled_from([-1, 1]))),) + shape[index + 1 :]
    if kind == "add":
        index = draw(st.integers(0, len(shape)))
        return shape[:index] + (draw(st.integers(1, 3)),) + shape[index:]
    if kind == "drop" and shape:
        index = draw(st.integers(0, len(shape) - 1))
        return shape[:index] + shape[index + 1 :]
    if kind == "empty" and shape:
        return (0,) + shape[1:]
    return tuple(draw(st.lists(st.integers(0, 4), max_size=3)))


@st.composite
def tensors(draw, shape, good_dtype=torch.float32, fills=FILLS, clean=False):
    """A tensor of `shape`, `good_dtype` and values drawn as `fills[0]` says (`"normal"`: N(0, 1), `"unit"`: U[0, 1)),
    on the CPU. Unless `clean`, most draws carry faults: a shape one mistake away, another float dtype or an integer,
    bool or complex one, a NaN, inf or 1e30 entry, all zeros, or the meta device; one fault at a time, or several."""
    fault = "none" if clean else draw(st.sampled_from(["none", "shape", "dtype", "fill", "meta", "several"]))
    several = fault == "several"
    shape = draw(shapes_near(shape)) if fault == "shape" or (several and draw(st.booleans())) else tuple(shape)
    dtype = good_dtype
    if fault == "dtype" or (several and draw(st.booleans())):
        dtype = draw(st.sampled_from(FLOAT_DTYPES + ODD_DTYPES))
    fill = draw(st.sampled_from(fills)) if fault == "fill" or (several and draw(st.booleans())) else fills[0]
    on_meta = fault == "meta" or (several and draw(st.booleans()))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    if fill == "unit":
        value = torch.rand(shape, generator=generator, dtype=torch.float64)
    else:
        value = torch.randn(shape, generator=generator, dtype=torch.float64)
    if fill == "zero":
        value = torch.zeros(shape, dtype=torch.float64)
    if value.numel() and fill in ("nan", "inf", "huge"):
        value.view(-1)[seed % value.numel()] = {"nan": math.nan, "inf": -math.inf, "huge": 1e30}[fill]
    if dtype == torch.bool:
        value = value > 0
    elif not dtype.is_floating_point and not dtype.is_complex:
        value = (value * 3).clamp(-(2**20), 2**20).nan_to_num(0.0).round()
        value = value.abs() if dtype == torch.uint8 else value
    value = value.to(dtype)
    return value.to("meta") if on_meta else value


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.floats(-2, 2), max_size=3),
    st.lists(st.text(max_size=2), min_size=1, max_size=2),
    st.just(np.arange(3.0)),
    st.just({"a": 1}),
    st.just(object()),
    st.builds(torch.Generator),
)
"""Values of the wrong kind for almost any argument. Integers stay small: a huge batch size or step count is a
request for that much memory, which is not validated."""
HUGE_INT = st.just(2**70)
"""An integer that overflows int64 (for labels, times and numbers, not sizes)."""

NUMBERS = st.one_of(
    st.floats(-10, 10),
    st.integers(-3, 10),
    st.floats(allow_nan=True, allow_infinity=True),
    st.just(np.float64(0.5)),
    st.just(np.float32(0.5)),
    HUGE_INT,
)
"""Numbers of every kind: in and out of range, non-finite, numpy scalars, beyond int64."""


def right_or_wrong(right, *wrong):
    """Half the time a `right` value; otherwise a value from one of the `wrong` strategies or `JUNK`, each kind
    equally likely (so that the many kinds of junk do not crowd out the rest). Shrinks towards `right`."""
    kinds = st.sampled_from([*wrong, JUNK]).flatmap(lambda strategy: strategy)
    return st.booleans().flatmap(lambda is_wrong: kinds if is_wrong else right)


def some_arguments(data, strategies, max_size=2):
    """Draws which arguments to change (1 to `max_size` of them) and their new values."""
    names = data.draw(st.lists(st.sampled_from(sorted(strategies)), min_size=1, max_size=max_size, unique=True))
    return {name: data.draw(strategies[name], label=name) for name in names}


def time_lists():
    """Custom time grids: right ones (sorted, unique, in [0, 1], as a list, tensor or array) and every kind of wrong
    one."""
    unit = st.floats(0, 1, allow_nan=False)
    right = st.lists(unit, min_size=1, max_size=5, unique=True).map(sorted)
    return right_or_wrong(
        st.one_of(right, right.map(torch.tensor), right.map(np.array), right.map(lambda grid: [0, *grid[1:]])),
        st.lists(
            st.one_of(st.floats(-0.5, 1.5), st.floats(allow_nan=True, allow_infinity=True), st.integers(-1, 2)),
            max_size=5,
        ),
        st.lists(st.booleans(), max_size=4),
        st.lists(st.lists(unit, max_size=2), min_size=1, max_size=3),
        st.lists(st.text(max_size=2), min_size=1, max_size=3),
        tensors((3,), fills=["unit", "nan", "normal"]),
        st.just([0.0, 1e-30]),
        st.just([2**70]),
    )


# ------------------------------------------------------------------------------------------------------- scheduler
SCHEDULER_CONFIG = {
    "num_train_timesteps": right_or_wrong(st.integers(1, 2000), st.integers(-2, 0), st.just(np.int64(10))),
    "shift": right_or_wrong(st.floats(0.1, 10), st.floats(-1, 0), st.just(1e300), st.just(True)),
    "solver": right_or_wrong(
        st.sampled_from(["euler", "heun", "midpoint", "dopri5"]), st.sampled_from(["rk4", "EULER", ""])
    ),
    "rtol": right_or_wrong(st.floats(1e-8, 1e-2), NUMBERS),
    "atol": right_or_wrong(st.floats(1e-8, 1e-2), NUMBERS),
    "timestep_density": right_or_wrong(
        st.sampled_from(["uniform", "logit_normal", "mode"]), st.sampled_from(["normal", "Uniform"])
    ),
    "logit_mean": right_or_wrong(st.floats(-3, 3), NUMBERS),
    "logit_std": right_or_wrong(st.floats(0.1, 3), NUMBERS),
    "mode_scale": right_or_wrong(st.floats(-1, 3), NUMBERS),
    "noise_end_fraction": right_or_wrong(st.floats(0, 0.99), NUMBERS),
}


@fuzz(60)
@given(data=st.data())
def test_scheduler_constructor(data):
    """Any config value: refused naming it, or a scheduler whose grid and training times are finite and in [0, 1]."""
    config = some_arguments(data, SCHEDULER_CONFIG)
    scheduler = attempt(lambda: VRFMScheduler(**config), config)
    if scheduler is REFUSED:
        return
    times = scheduler.sample_training_timesteps(16, generator=torch.Generator().manual_seed(0))
    assert times.shape == (16,) and is_finite(times) and times.min() >= 0 and times.max() <= 1
    if not scheduler.is_adaptive and attempt(lambda: scheduler.set_timesteps(3), ["shift"]) is not REFUSED:
        grid = scheduler.time_grid
        assert is_finite(grid) and grid[0] >= 0 and grid[-1] == 1 and (grid[1:] > grid[:-1]).all()


@fuzz(60)
@given(
    solver=st.sampled_from(["euler", "heun", "midpoint"]),
    shift=st.sampled_from([1.0, 3.0, 0.2]),
    which=st.sampled_from(["num_inference_steps", "timesteps", "timesteps", "both"]),
    num_inference_steps=right_or_wrong(st.integers(1, 12), st.integers(-2, 0), st.just(np.int64(3))),
    timesteps=time_lists(),
)
def test_scheduler_set_timesteps(solver, shift, which, num_inference_steps, timesteps):
    """Any step count or custom grid: refused naming it, or a finite, strictly increasing grid from t0 >= 0 to 1 and
    evaluation times in [0, 1], in order."""
    scheduler = VRFMScheduler(solver=solver, shift=shift)
    arguments = {
        "num_inference_steps": None if which == "timesteps" else num_inference_steps,
        "timesteps": None if which == "num_inference_steps" else timesteps,
    }
    result = attempt(lambda: scheduler.set_timesteps(**arguments), arguments)
    if result is REFUSED:
        return
    grid, evals = scheduler.time_grid, scheduler.timesteps
    assert is_finite(grid) and is_finite(evals)
    assert grid[0] >= 0 and grid[-1] == 1 and (grid[1:] > grid[:-1]).all()
    assert len(evals) == scheduler.num_inference_steps * scheduler.evals_per_step == scheduler.num_function_evals
    assert (evals >= 0).all() and (evals <= 1).all() and (evals[1:] >= evals[:-1]).all()


@fuzz(50)
@given(
    solver=st.sampled_from(["euler", "heun", "midpoint"]),
    num_inference_steps=st.integers(1, 4),
    batch=st.integers(1, 3),
    data=st.data(),
)
def test_scheduler_step_sequence(solver, num_inference_steps, batch, data):
    """A trajectory in which some calls get a wrong `model_output`, `timestep` or `sample`, and which may run past its
    end: each call succeeds with a finite state of the right shape or is refused without advancing the scheduler."""
    scheduler = VRFMScheduler(solver=solver)
    scheduler.set_timesteps(num_inference_steps)
    shape = (batch, 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    num_calls = len(scheduler.timesteps) + data.draw(st.integers(0, 2), label="extra calls")
    for call in range(num_calls):
        index = scheduler.step_index
        expected = scheduler.timesteps[index] if index < len(scheduler.timesteps) else torch.tensor(1.0)
        arguments = {"model_output": -x, "timestep": expected, "sample": x}
        wrong = data.draw(st.sampled_from([None, None, "model_output", "timestep", "sample"]), label=f"call {call}")
        if wrong in ("model_output", "sample"):
            arguments[wrong] = data.draw(right_or_wrong(tensors(shape, clean=True), tensors(shape)), label=wrong)
        elif wrong == "timestep":
            arguments[wrong] = data.draw(
                right_or_wrong(
                    st.sampled_from([float(expected), expected.expand(batch), expected.double()]),
                    st.floats(allow_nan=True, allow_infinity=True),
                    NUMBERS,
                    tensors((batch,), fills=["unit", "nan"]),
                ),
                label=wrong,
            )
        names = [name for name in (wrong, "step") if name]
        out = attempt(lambda arguments=arguments: scheduler.step(**arguments), names)
        if out is REFUSED:
            assert scheduler.step_index == index, "a refused call must not advance the scheduler"
            continue
        assert index < len(scheduler.timesteps), "a call past the end of the schedule must be refused"
        assert out.prev_sample.shape == shape
        if moderate(*arguments.values()):
            assert is_finite(out.prev_sample)
        x = out.prev_sample.float()


# -------------------------------------------------------------------------------------------------------- pipeline
def _make_pipeline(latent_dim, num_classes, solver, seed):
    torch.manual_seed(seed)
    model = VRFMMLPModel(sample_size=2, latent_dim=latent_dim, hidden_dim=8, num_layers=1, num_classes=num_classes)
    for parameter in model.parameters():  # no zero-initialised layer: make z and the labels matter
        torch.nn.init.normal_(parameter, std=0.3)
    pipe = VRFMPipeline(velocity_model=model, scheduler=VRFMScheduler(solver=solver))
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIPELINES = [
    _make_pipeline(latent_dim=3, num_classes=None, solver="euler", seed=0),
    _make_pipeline(latent_dim=0, num_classes=3, solver="heun", seed=1),
    _make_pipeline(latent_dim=2, num_classes=2, solver="midpoint", seed=2),
    _make_pipeline(latent_dim=2, num_classes=None, solver="heun", seed=5).to(torch.bfloat16),
]
CALL_ARGUMENTS = (
    "batch_size",
    "num_inference_steps",
    "generator",
    "z",
    "latents",
    "class_labels",
    "guidance_scale",
    "timesteps",
    "output_type",
)


def call_argument(name, pipe, batch_size):
    """A strategy for one argument of `VRFMPipeline.__call__`: right values half the time, else a wrong one."""
    latent_dim, num_classes = pipe.velocity_model.latent_dim, pipe.velocity_model.num_classes
    z_dim, label_count = max(latent_dim, 1), num_classes or 2
    generators = st.lists(st.builds(torch.Generator), min_size=batch_size, max_size=batch_size)
    return {
        "batch_size": right_or_wrong(st.integers(1, 4), st.integers(-1, 0), st.just(np.int64(2))),
        "num_inference_steps": right_or_wrong(st.integers(1, 5), st.integers(-1, 0), st.just(np.int64(2))),
        "generator": right_or_wrong(
            st.one_of(st.none(), st.builds(torch.Generator), generators),
            st.lists(st.builds(torch.Generator), max_size=batch_size + 2),
            generators.map(lambda gs: [*gs[:-1], 0]),
            st.just(np.random.default_rng(0)),
        ),
        "z": right_or_wrong(
            st.one_of(st.none(), tensors((batch_size, z_dim), clean=True), tensors((z_dim,), clean=True)),
            tensors((batch_size, z_dim)),
            tensors((z_dim,)),
        ),
        "latents": right_or_wrong(
            st.one_of(st.none(), tensors((batch_size, 2), clean=True)), tensors((batch_size, 2))
        ),
        "class_labels": right_or_wrong(
            st.one_of(
                st.none(),
                st.integers(0, label_count - 1),
                st.lists(st.integers(0, label_count - 1), min_size=batch_size, max_size=batch_size),
                st.lists(st.integers(0, label_count - 1), min_size=batch_size, max_size=batch_size).map(torch.tensor),
            ),
            st.integers(-1, label_count + 1),
            st.lists(st.integers(-1, label_count), min_size=max(batch_size - 1, 0), max_size=batch_size + 1),
            st.lists(st.floats(0, 2), min_size=batch_size, max_size=batch_size),
            st.lists(st.lists(st.integers(0, 1), max_size=2), min_size=1, max_size=batch_size),
            tensors((batch_size,), good_dtype=torch.int64),
            HUGE_INT,
        ),
        "guidance_scale": right_or_wrong(st.floats(-5, 10), NUMBERS, st.just(1e30)),
        "timesteps": st.one_of(st.none(), time_lists()),
        "output_type": right_or_wrong(
            st.sampled_from([None, "pt", "np", "latent"]), st.sampled_from(["pil", "PT", "jpg", ""])
        ),
    }[name]


def check_pipeline_output(pipe, out, arguments):
    samples, batch_size = out.samples, arguments["batch_size"]
    latent_dim = pipe.velocity_model.latent_dim
    assert isinstance(samples, np.ndarray if arguments.get("output_type") == "np" else torch.Tensor)
    assert tuple(samples.shape) == (batch_size, 2)
    assert is_finite(samples), "the pipeline returned NaN or inf"
    if latent_dim:
        assert out.z.shape == (batch_size, latent_dim) and is_finite(out.z)
    else:
        assert out.z is None
    assert out.num_function_evals == pipe.scheduler.num_function_evals >= 1


@fuzz(60)
@given(which=st.integers(0, len(PIPELINES) - 1), batch_size=st.integers(1, 4), data=st.data())
def test_pipeline_call_one_wrong_argument(which, batch_size, data):
    """Each call argument in turn gets any value, the others being right: the call samples finite values of shape
    `(batch_size, 2)` or is refused with a message naming that argument."""
    pipe = PIPELINES[which]
    name = data.draw(st.sampled_from(CALL_ARGUMENTS), label="argument")
    arguments = {"batch_size": batch_size, "num_inference_steps": 2}
    arguments[name] = data.draw(call_argument(name, pipe, batch_size), label=name)
    out = attempt(lambda: pipe(**arguments), [name])
    if out is not REFUSED:
        check_pipeline_output(pipe, out, arguments)


@fuzz(50)
@given(which=st.integers(0, len(PIPELINES) - 1), batch_size=st.integers(1, 3), data=st.data())
def test_pipeline_call_many_wrong_arguments(which, batch_size, data):
    """Several arguments at once: refused naming one of them, or finite samples."""
    pipe = PIPELINES[which]
    strategies = {name: call_argument(name, pipe, batch_size) for name in CALL_ARGUMENTS}
    arguments = {"batch_size": batch_size, "num_inference_steps": 2, **some_arguments(data, strategies, max_size=5)}
    out = attempt(lambda: pipe(**arguments), arguments)
    if out is not REFUSED:
        check_pipeline_output(pipe, out, arguments)


@fuzz(15)
@given(
    batch_size=st.integers(1, 3),
    z=st.one_of(st.none(), tensors((3, 2))),
    timesteps=st.one_of(st.none(), st.just([0.0, 0.5])),
    num_inference_steps=st.one_of(st.just(2), JUNK),
)
def test_adaptive_pipeline_call(batch_size, z, timesteps, num_inference_steps):
    """With an adaptive solver, `num_inference_steps` is ignored, and a custom grid is refused rather than ignored."""
    pytest.importorskip("torchdiffeq")
    pipe = _make_pipeline(latent_dim=2, num_classes=None, solver="dopri5", seed=3)
    pipe.scheduler = VRFMScheduler(solver="dopri5", rtol=1e-3, atol=1e-3)
    arguments = {"batch_size": batch_size, "z": z, "timesteps": timesteps, "num_inference_steps": num_inference_steps}
    out = attempt(lambda: pipe(**arguments), ["z", "timesteps"])
    if out is not REFUSED:
        assert timesteps is None, "a custom grid must not be silently ignored by an adaptive solver"
        assert out.samples.shape == (batch_size, 2) and is_finite(out.samples) and out.num_function_evals > 1


@pytest.mark.parametrize("argument", ["z", "latents"])
def test_meta_tensors_are_refused_by_the_pipeline(argument):
    """A tensor on the meta device has no values to sample from: it is refused with a message naming it (tensors on
    any other device are moved to the pipeline's device)."""
    pipe = PIPELINES[0]
    value = torch.empty((2, 3) if argument == "z" else (2, 2), device="meta")
    with pytest.raises(ValueError, match=rf"`{argument}`.*meta"):
        pipe(batch_size=2, num_inference_steps=2, **{argument: value})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_tensors_on_another_device_are_moved():
    """`z` and `latents` on another real device are moved to the pipeline's, and the models run inputs on their own
    device, so the result equals the all-CPU one."""
    pipe, encoder = PIPELINES[0], ENCODERS[0]
    z, latents = torch.randn(2, 3), torch.randn(2, 2)
    expected = pipe(batch_size=2, num_inference_steps=2, z=z, latents=latents).samples
    moved = pipe(batch_size=2, num_inference_steps=2, z=z.cuda(), latents=latents.cuda()).samples
    torch.testing.assert_close(moved.cpu(), expected)
    velocity = pipe.velocity_model(latents.cuda(), torch.rand(2).cuda(), z=z.cuda()).sample
    assert velocity.device.type == "cpu" and is_finite(velocity)
    x = torch.randn(2, 2)
    out = encoder(x0=x.cuda(), x1=x, x_t=x.cuda(), t=0.5)
    assert out.mean.device.type == "cpu" and is_finite(out.mean)


def test_pipeline_refuses_to_return_non_finite_samples():
    """A velocity model whose weights are not finite makes NaN samples: the pipeline says so instead of returning
    them."""
    pipe = _make_pipeline(latent_dim=3, num_classes=None, solver="euler", seed=4)
    with torch.no_grad():
        pipe.velocity_model.net[-1].bias.fill_(math.inf)
    with pytest.raises(ValueError, match="non-finite"):
        pipe(batch_size=2, num_inference_steps=2)


# ------------------------------------------------------------------------------------------------ velocity model
MLP_CONFIG = {
    "sample_size": right_or_wrong(st.integers(1, 4), st.integers(-1, 0)),
    "latent_dim": right_or_wrong(st.integers(0, 4), st.just(-1)),
    "hidden_dim": right_or_wrong(st.integers(1, 9), st.integers(-1, 0)),
    "num_layers": right_or_wrong(st.integers(1, 3), st.integers(-1, 0)),
    "activation": right_or_wrong(
        st.sampled_from(["selu", "silu", "relu", "gelu", "elu"]), st.sampled_from(["tanh", "SiLU", ""])
    ),
    "time_embed_dim": right_or_wrong(st.integers(4, 9), st.integers(-1, 3)),
    "num_classes": right_or_wrong(st.one_of(st.none(), st.integers(1, 4)), st.integers(-1, 0)),
}


@fuzz(40)
@given(data=st.data())
def test_velocity_model_constructor(data):
    """Any config value: refused naming it, or a model whose velocity is finite at every time, including t = 0."""
    config = {"sample_size": 2, "latent_dim": 2, "hidden_dim": 8, "num_layers": 1}
    changed = some_arguments(data, MLP_CONFIG, max_size=3)
    model = attempt(lambda: VRFMMLPModel(**{**config, **changed}), changed)
    if model is REFUSED:
        return
    x = torch.randn(3, model.config.sample_size)
    z = torch.randn(3, model.latent_dim) if model.latent_dim else None
    velocity = model(x, torch.tensor([0.0, 0.5, 1.0]), z=z).sample
    assert velocity.shape == x.shape and is_finite(velocity)


MLPS = [
    VRFMMLPModel(sample_size=2, latent_dim=3, hidden_dim=8, num_layers=1),
    VRFMMLPModel(sample_size=2, latent_dim=0, hidden_dim=8, num_layers=1, num_classes=3),
]


def time_values(batch):
    """Times: right ones (floats in [0, 1], tensors of shape `(batch,)`, numpy scalars) and wrong ones."""
    return right_or_wrong(
        st.one_of(st.floats(0, 1), st.just(np.float32(0.5)), tensors((batch,), fills=["unit"], clean=True)),
        NUMBERS,
        tensors((batch,), fills=["unit", "normal", "nan"]),
        tensors((), fills=["unit", "nan"]),
    )


@fuzz(60)
@given(which=st.integers(0, len(MLPS) - 1), batch=st.integers(1, 3), data=st.data())
def test_velocity_model_forward(which, batch, data):
    """`VRFMMLPModel.forward` with any `sample`, `timestep`, `z` and `class_labels`: a finite velocity shaped like
    `sample` (from moderate inputs), or refused naming the argument."""
    model = MLPS[which]
    latent_dim, num_classes = model.latent_dim, model.num_classes or 2
    z_shape = (batch, max(latent_dim, 1))
    arguments = {
        "sample": torch.randn(batch, 2),
        "timestep": torch.rand(batch),
        "z": torch.randn(batch, latent_dim) if latent_dim else None,
        "class_labels": None,
    }
    changed = some_arguments(
        data,
        {
            "sample": right_or_wrong(tensors((batch, 2), clean=True), tensors((batch, 2))),
            "timestep": time_values(batch),
            "z": right_or_wrong(st.one_of(st.none(), tensors(z_shape, clean=True)), tensors(z_shape)),
            "class_labels": right_or_wrong(
                st.one_of(st.none(), st.integers(0, num_classes), tensors((batch,), torch.int64, clean=True).map(abs)),
                st.integers(-1, num_classes + 1),
                tensors((batch,), good_dtype=torch.int64),
                st.just(["a"] * batch),
                HUGE_INT,
            ),
        },
    )
    arguments.update(changed)
    out = attempt(lambda: model(**arguments), changed)
    if out is REFUSED:
        return
    sample = arguments["sample"]
    assert out.sample.shape == sample.shape
    if moderate(*arguments.values()):
        assert is_finite(out.sample)


# ----------------------------------------------------------------------------------------------- posterior encoder
POSTERIOR_CONFIG = {
    "posterior_inputs": right_or_wrong(
        st.lists(st.sampled_from(["x0", "x1", "x_t", "t"]), min_size=1, max_size=4, unique=True).filter(
            lambda names: names != ["t"]
        ),
        st.lists(st.sampled_from(["x0", "x1", "x_t", "t"]), max_size=4),
        st.sampled_from(["x0", "x1", "t", "x_t", "x", ""]),
        st.lists(st.sampled_from(["x0", "t", "X1", "xt", 1, None]), max_size=3),
        st.just(("x1", ["x0"])),
    ),
    "latent_dim": right_or_wrong(st.integers(1, 4), st.integers(-1, 0)),
    "hidden_dim": right_or_wrong(st.integers(1, 9), st.integers(-1, 0)),
    "num_layers": right_or_wrong(st.integers(1, 3), st.integers(-1, 0)),
    "time_embed_dim": right_or_wrong(st.integers(4, 9), st.integers(-1, 3)),
}


@fuzz(60)
@given(data=st.data())
def test_posterior_encoder_constructor(data):
    """Any `posterior_inputs`, sizes or `time_embed_dim`: refused naming the argument, or an encoder that maps finite
    inputs to finite Gaussians."""
    changed = some_arguments(data, POSTERIOR_CONFIG)
    encoder = attempt(lambda: VRFMPosteriorEncoder(**{"sample_size": 2, "hidden_dim": 8, **changed}), changed)
    if encoder is REFUSED:
        return
    assert set(encoder.posterior_inputs) <= {"x0", "x1", "x_t", "t"} and encoder.posterior_inputs != ("t",)
    x = torch.randn(3, 2)
    out = encoder(x0=x, x1=x, x_t=x, t=torch.rand(3))
    assert out.mean.shape == out.logvar.shape == out.sample.shape == (3, encoder.latent_dim) and out.kl.shape == (3,)
    assert all(is_finite(v) for v in (out.mean, out.logvar, out.sample, out.kl))


ENCODERS = [
    VRFMPosteriorEncoder(sample_size=2, latent_dim=3, hidden_dim=8),
    VRFMPosteriorEncoder(sample_size=2, latent_dim=2, hidden_dim=8, posterior_inputs=("x1",)),
    VRFMPosteriorEncoder(sample_size=2, latent_dim=2, hidden_dim=8, posterior_inputs=("x0", "t")),
]


@fuzz(60)
@given(which=st.integers(0, len(ENCODERS) - 1), batch=st.integers(1, 3), data=st.data())
def test_posterior_encoder_forward(which, batch, data):
    """`forward` with wrong shapes, dtypes, devices, missing or NaN inputs and any generator: a finite posterior of
    shape `(B, latent_dim)` (from moderate inputs), or refused naming the argument. Inputs the encoder does not read
    are ignored."""
    encoder = ENCODERS[which]
    x0, x1, t = torch.randn(batch, 2), torch.randn(batch, 2), torch.rand(batch)
    arguments = {"x0": x0, "x1": x1, "x_t": interpolate(x0, x1, t), "t": t, "generator": None}
    data_input = right_or_wrong(tensors((batch, 2), clean=True), st.none(), tensors((batch, 2)))
    changed = some_arguments(
        data,
        {
            "x0": data_input,
            "x1": data_input,
            "x_t": data_input,
            "t": right_or_wrong(time_values(batch), st.none()),
            "generator": right_or_wrong(
                st.one_of(
                    st.none(),
                    st.builds(torch.Generator),
                    st.lists(st.builds(torch.Generator), min_size=batch, max_size=batch),
                ),
                st.lists(st.builds(torch.Generator), max_size=batch + 2),
                st.just([None] * batch),
            ),
        },
    )
    arguments.update(changed)
    out = attempt(lambda: encoder(**arguments), changed)
    if out is REFUSED:
        return
    read = [arguments[name] for name in encoder.posterior_inputs]
    batch_size = next(v.shape[0] for v in read if isinstance(v, torch.Tensor) and v.ndim == 2)
    assert out.mean.shape == out.logvar.shape == out.sample.shape == (batch_size, encoder.latent_dim)
    assert out.kl.shape == (batch_size,)
    if moderate(*read):
        assert all(is_finite(v) for v in (out.mean, out.logvar, out.sample, out.kl))


# ------------------------------------------------------------------------------------------------------- objective
@fuzz(50)
@given(batch=st.integers(1, 3), data=st.data())
def test_vrfm_loss(batch, data):
    """`vrfm_loss` with any predictions, posterior, prior and hyper-parameters: finite scalars from moderate inputs
    (with `logvar` in the range the encoders clamp to), or refused naming the argument."""
    arguments = {
        "velocity_pred": torch.randn(batch, 2),
        "velocity_target": torch.randn(batch, 2),
        "posterior_mean": torch.randn(batch, 3),
        "posterior_logvar": torch.randn(batch, 3),
        "beta": 0.5,
        "reduction": "sum",
        "free_bits": 0.0,
        "prior_mean": None,
        "prior_logvar": None,
    }
    latent = right_or_wrong(tensors((batch, 3), clean=True), st.none(), tensors((batch, 3)))
    changed = some_arguments(
        data,
        {
            "velocity_pred": right_or_wrong(tensors((batch, 2), clean=True), tensors((batch, 2))),
            "velocity_target": right_or_wrong(tensors((batch, 2), clean=True), tensors((batch, 2))),
            "posterior_mean": latent,
            "posterior_logvar": latent,
            "beta": right_or_wrong(st.floats(0, 10), NUMBERS, st.just(1e38)),
            "reduction": right_or_wrong(st.sampled_from(["sum", "mean"]), st.sampled_from(["none", "Sum"])),
            "free_bits": right_or_wrong(st.floats(0, 2), NUMBERS),
            "prior_mean": latent,
            "prior_logvar": latent,
        },
        max_size=3,
    )
    arguments.update(changed)
    out = attempt(lambda: vrfm_loss(**arguments), changed)
    if out is REFUSED:
        return
    assert out.loss.shape == out.mse.shape == out.kl.shape == ()
    has_posterior = arguments["posterior_mean"] is not None
    assert out.kl_per_dim.shape == ((arguments["posterior_mean"].shape[1],) if has_posterior else (0,))
    # log-variances are bounded by the encoders' clamp range (exp(100) overflows float32)
    if moderate(*arguments.values()) and moderate(arguments["posterior_logvar"], arguments["prior_logvar"], limit=20):
        assert all(is_finite(v) for v in (out.loss, out.mse, out.kl, out.kl_per_dim))


@fuzz(50)
@given(batch=st.integers(1, 3), data=st.data())
def test_interpolate(batch, data):
    """`interpolate(x0, x1, t)`: finite points shaped like `x0` from moderate inputs, or refused naming it."""
    arguments = {"x0": torch.randn(batch, 2), "x1": torch.randn(batch, 2), "t": torch.rand(batch)}
    changed = some_arguments(
        data,
        {
            "x0": right_or_wrong(tensors((batch, 2), clean=True), tensors((batch, 2))),
            "x1": right_or_wrong(tensors((batch, 2), clean=True), tensors((batch, 2))),
            "t": time_values(batch),
        },
    )
    arguments.update(changed)
    out = attempt(lambda: interpolate(**arguments), changed)
    if out is REFUSED:
        return
    assert out.shape == arguments["x0"].shape and out.is_floating_point()
    if moderate(*arguments.values()):
        assert is_finite(out)


SAMPLE_TIMESTEPS_ARGUMENTS = {
    "batch_size": right_or_wrong(st.integers(1, 5), st.integers(-1, 0), st.just(np.int64(3))),
    "density": right_or_wrong(st.sampled_from(["uniform", "logit_normal", "mode"]), st.just("cosine")),
    "logit_mean": right_or_wrong(st.floats(-3, 3), NUMBERS),
    "logit_std": right_or_wrong(st.floats(0.1, 3), NUMBERS),
    "mode_scale": right_or_wrong(st.floats(-1, 3), NUMBERS),
    "generator": right_or_wrong(st.one_of(st.none(), st.builds(torch.Generator)), st.just([torch.Generator()])),
    "noise_end_fraction": right_or_wrong(st.floats(0, 0.99), NUMBERS),
}


@fuzz(40)
@given(data=st.data())
def test_sample_timesteps(data):
    """Training times: `batch_size` finite values in [0, 1], or refused naming the argument."""
    arguments = {"batch_size": 4, "density": "logit_normal", **some_arguments(data, SAMPLE_TIMESTEPS_ARGUMENTS, 3)}
    out = attempt(lambda: sample_timesteps(**arguments), arguments)
    if out is REFUSED:
        return
    assert out.shape == (arguments["batch_size"],) and is_finite(out) and out.min() >= 0 and out.max() <= 1


@fuzz(40)
@given(batch=st.integers(1, 3), data=st.data())
def test_gaussian_kl(batch, data):
    """`gaussian_kl`: finite, non-negative KL of the shape of `mean` from finite inputs (log-variances within the
    encoders' clamp range), or refused naming the argument."""
    arguments = {"mean": torch.randn(batch, 3), "logvar": torch.randn(batch, 3)}
    arguments.update(prior_mean=None, prior_logvar=None)
    latent = right_or_wrong(tensors((batch, 3), clean=True), tensors((batch, 3)))
    optional = right_or_wrong(st.one_of(st.none(), tensors((batch, 3), clean=True)), tensors((batch, 3)))
    changed = some_arguments(
        data, {"mean": latent, "logvar": latent, "prior_mean": optional, "prior_logvar": optional}
    )
    arguments.update(changed)
    out = attempt(lambda: gaussian_kl(**arguments), changed)
    if out is REFUSED:
        return
    assert out.shape == arguments["mean"].shape
    if moderate(*arguments.values(), limit=20):
        assert is_finite(out) and (out.float() >= -1e-3).all()


@fuzz(40)
@given(batch=st.integers(1, 4), data=st.data())
def test_drop_labels(batch, data):
    """`drop_labels`: labels of the same shape, each kept or replaced by `null_class`, or refused naming the
    argument."""
    arguments = {"class_labels": torch.arange(batch), "dropout_prob": 0.5, "null_class": 7, "generator": None}
    changed = some_arguments(
        data,
        {
            "class_labels": right_or_wrong(
                tensors((batch,), good_dtype=torch.int64, clean=True), tensors((batch,), good_dtype=torch.int64)
            ),
            "dropout_prob": right_or_wrong(st.floats(0, 1), NUMBERS),
            "null_class": right_or_wrong(st.integers(0, 9), st.just(1.5), HUGE_INT),
            "generator": right_or_wrong(st.one_of(st.none(), st.builds(torch.Generator)), st.just([None])),
        },
    )
    arguments.update(changed)
    out = attempt(lambda: drop_labels(**arguments), changed)
    if out is REFUSED:
        return
    labels = arguments["class_labels"]
    assert out.shape == labels.shape and out.dtype == labels.dtype
    assert ((out == labels) | (out == arguments["null_class"])).all()


@fuzz(40)
@given(dim=st.integers(1, 4), data=st.data())
def test_slerp(dim, data):
    """`slerp(z_a, z_b, weight)`: finite latents (one per weight) from moderate inputs, or refused naming the
    argument."""
    arguments = {"z_a": torch.randn(dim), "z_b": torch.randn(dim), "weight": 0.5}
    changed = some_arguments(
        data,
        {
            "z_a": right_or_wrong(tensors((dim,), clean=True), tensors((dim,))),
            "z_b": right_or_wrong(tensors((dim,), clean=True), tensors((dim,))),
            "weight": right_or_wrong(
                st.one_of(st.floats(-1, 2), tensors((3,), fills=["unit"], clean=True), st.just(torch.zeros(0))),
                NUMBERS,
                tensors((3,), fills=["unit", "nan"]),
                tensors((), fills=["unit", "nan"]),
            ),
        },
    )
    arguments.update(changed)
    out = attempt(lambda: slerp(**arguments), changed)
    if out is REFUSED:
        return
    z_a, weight = arguments["z_a"], arguments["weight"]
    one_per_weight = isinstance(weight, torch.Tensor) and weight.ndim == 1
    assert out.shape == ((len(weight), *z_a.shape) if one_per_weight else z_a.shape)
    if moderate(*arguments.values()):
        assert is_finite(out)


# ------------------------------------------------------------------------------------- untrusted pipeline folders
@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    PIPELINES[0].save_pretrained(folder)
    return folder


ENTRY_PARTS = st.sampled_from(
    [
        "diffusers_vrfm",
        "vrfmmlpmodel",
        "diffusers",
        "VRFMMLPModel",
        "VRFMScheduler",
        "AutoencoderKL",
        "os",
        "system",
        "subprocess",
        "builtins",
        "eval",
        "diffusers_vrfm.models.mlp",
        "../velocity_model/vrfmmlpmodel",
        "transformers",
        "torch",
        "",
    ]
)


@fuzz(30)
@given(
    component=st.sampled_from(["velocity_model", "scheduler", "vae", "extra", "../escape", "_private", "Bad-Name"]),
    entry=st.one_of(
        st.tuples(ENTRY_PARTS, ENTRY_PARTS).map(list),
        st.lists(ENTRY_PARTS, max_size=3),
        st.just([None, None]),
        st.just([None, "VRFMMLPModel"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(-1, 1), st.text(max_size=4), st.just({"a": 1})),
    ),
)
def test_tampered_model_index_never_imports_or_runs_untrusted_code(saved_pipeline, tmp_path_factory, component, entry):
    """Any `model_index.json` entry: either a pipeline loads, from the allowlisted classes only, or a clear error
    names the component; no module outside diffusers/diffusers_vrfm is imported and no file of the folder runs."""
    import importlib
    import shutil

    folder = tmp_path_factory.mktemp("tampered")
    shutil.copytree(saved_pipeline, folder, dirs_exist_ok=True)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index[component] = entry
    index_path.write_text(json.dumps(index))
    sentinel = folder / "executed"
    for python_file in folder.rglob("*.py"):  # had any file of the folder been executed, this would show
        python_file.write_text(f"open({str(sentinel)!r}, 'w').close()\n")

    imported = []
    real_import_module = importlib.import_module

    def recording_import_module(name, *args, **kwargs):
        imported.append(name)
        return real_import_module(name, *args, **kwargs)

    importlib.import_module = recording_import_module
    try:
        try:
            pipe = VRFMPipeline.from_pretrained(folder)
        except (ValueError, TypeError, FileNotFoundError) as error:
            assert "model_index.json" in str(error) or f"`{component}" in str(error) or component in str(error), error
            pipe = None
    finally:
        importlib.import_module = real_import_module
    assert not sentinel.exists(), "a file of the pipeline folder was executed"
    assert all(name in ("diffusers_vrfm", "diffusers") for name in imported), imported
    if pipe is not None:
        assert isinstance(pipe.velocity_model, VRFMMLPModel) and isinstance(pipe.scheduler, VRFMScheduler)


@pytest.mark.parametrize("names", [["weights.safetensors"], ["diffusion_pytorch_model.safetensors.bin"], []])
def test_pickle_weights_are_not_loaded_beside_an_unrelated_safetensors_file(saved_pipeline, tmp_path, names):
    """A folder whose safetensors file is not the weights (or missing) next to pickle weights: without
    `allow_pickle=True`, the pickle file is never unpickled."""
    import shutil

    shutil.copytree(saved_pipeline, tmp_path, dirs_exist_ok=True)
    weights_folder = tmp_path / "velocity_model"
    (weights_folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(PIPELINES[0].velocity_model.state_dict(), weights_folder / "diffusion_pytorch_model.bin")
    for name in names:
        (weights_folder / name).write_bytes(b"not weights")
    real_load = torch.load
    loaded = []

    def recording_load(*args, **kwargs):
        loaded.append(args[0] if args else kwargs.get("f"))
        return real_load(*args, **kwargs)

    torch.load = recording_load
    try:
        with pytest.raises((ValueError, OSError, EnvironmentError)):
            VRFMPipeline.from_pretrained(tmp_path)
    finally:
        torch.load = real_load
    assert loaded == [], f"pickle weights were loaded without allow_pickle=True: {loaded}"
