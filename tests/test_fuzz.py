"""Property-based fuzz tests (hypothesis) of every public entry point that takes user input.

The property, for the scheduler, the pipeline call, the posterior encoder, the velocity MLP and the objective:
a call either succeeds, with finite outputs of the documented shape, or raises `ValueError`/`TypeError` **from this
package's own validation** (the innermost frame is a file of `diffusers_vrfm`) whose message names the offending
argument in backticks. Anything else fails: an error from deep inside torch (`RuntimeError`, `IndexError`,
`AttributeError`, ...), a `TypeError` raised by torch itself, or a NaN/inf produced from finite inputs.

Data tensors that flow through a model or a pure math function (`sample`, `velocity_pred`, ...) may carry NaN through,
as torch does (the training loop relies on seeing a NaN loss to apply `--nonfinite_policy`); the property then only
requires finite outputs from finite inputs. What a user hands to the pipeline and to the scheduler's time grid is
refused when it is not finite.

Examples are derandomised, so the suite is reproducible. To explore further with fresh random examples, run
`VRFM_FUZZ_MULTIPLIER=20 python -m pytest tests/test_fuzz.py --hypothesis-show-statistics`.
"""

import json
import math
import os
import traceback

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
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
        return call()
    except (ValueError, TypeError) as error:
        message = str(error)
        origin = traceback.extract_tb(error.__traceback__)[-1].filename
        assert os.path.abspath(origin).startswith(PACKAGE_DIR), (
            f"{type(error).__name__} raised from {origin}, not by diffusers_vrfm's validation: {message}"
        )
        assert any(f"`{name}" in message for name in names), (
            f"{type(error).__name__} names none of {list(names)}: {message}"
        )
        return REFUSED


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
FILLS = ["normal", "normal", "normal", "unit", "nan", "inf", "huge", "zero"]


@st.composite
def shapes_near(draw, shape):
    """The shape itself (most often), or one mistake away from it: a size off by one, a dimension added or dropped,
    an empty batch, or any small shape."""
    shape = tuple(shape)
    kind = draw(st.sampled_from(["exact", "exact", "exact", "bump", "add", "drop", "empty", "any"]))
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
    if kind == "any":
        return tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    return shape


@st.composite
def tensors(draw, shape, good_dtype=torch.float32, odd=True, fills=FILLS):
    """A tensor of about `shape`: mostly `good_dtype`, finite and on the CPU; sometimes another float dtype, an
    integer, bool or complex dtype, NaN, inf or huge entries, or the meta device."""
    shape = draw(shapes_near(shape)) if odd else tuple(shape)
    dtypes = [good_dtype] * 4 + (FLOAT_DTYPES + ODD_DTYPES if odd else [])
    dtype = draw(st.sampled_from(dtypes))
    fill = draw(st.sampled_from(fills if odd else ["normal"]))
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
    if odd and draw(st.integers(0, 11)) == 0:
        value = value.to("meta")
    return value


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


def time_lists():
    """Custom time grids: valid ones (sorted, unique, in [0, 1]) and every kind of wrong one."""
    unit = st.floats(0, 1, allow_nan=False)
    valid = st.lists(unit, min_size=1, max_size=5, unique=True).map(sorted)
    wrong = st.lists(
        st.one_of(st.floats(-0.5, 1.5), st.floats(allow_nan=True, allow_infinity=True), st.integers(-1, 2)),
        max_size=5,
    )
    return st.one_of(
        valid,
        valid.map(lambda grid: torch.tensor(grid)),
        valid.map(lambda grid: np.array(grid)),
        wrong,
        st.lists(st.booleans(), max_size=4),
        st.lists(st.lists(unit, max_size=2), min_size=1, max_size=3),
        st.lists(st.text(max_size=2), min_size=1, max_size=3),
        tensors((3,), fills=["unit", "unit", "nan", "normal"]),
        JUNK,
    )


# ------------------------------------------------------------------------------------------------------- scheduler
SCHEDULER_CONFIG = {
    "num_train_timesteps": st.one_of(st.integers(-2, 2000), JUNK),
    "shift": st.one_of(st.floats(0.1, 5), JUNK),
    "solver": st.one_of(st.sampled_from(["euler", "heun", "midpoint", "dopri5", "rk4", "EULER", ""]), JUNK),
    "rtol": st.one_of(st.floats(1e-8, 1e-2), JUNK),
    "atol": st.one_of(st.floats(1e-8, 1e-2), JUNK),
    "timestep_density": st.one_of(st.sampled_from(["uniform", "logit_normal", "mode", "normal"]), JUNK),
    "logit_mean": st.one_of(st.floats(-3, 3), JUNK),
    "logit_std": st.one_of(st.floats(0.1, 3), JUNK),
    "mode_scale": st.one_of(st.floats(-1, 3), JUNK),
}


@fuzz(60)
@given(data=st.data())
def test_scheduler_constructor(data):
    """Any config value: refused naming it, or a scheduler whose grid and training times are finite and in [0, 1]."""
    names = data.draw(st.lists(st.sampled_from(sorted(SCHEDULER_CONFIG)), min_size=1, max_size=2, unique=True))
    config = {name: data.draw(SCHEDULER_CONFIG[name], label=name) for name in names}
    scheduler = attempt(lambda: VRFMScheduler(**config), names)
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
    shift=st.sampled_from([1.0, 3.0]),
    num_inference_steps=st.one_of(st.none(), st.integers(-2, 12), st.just(np.int64(3)), JUNK),
    timesteps=st.one_of(st.none(), time_lists()),
)
def test_scheduler_set_timesteps(solver, shift, num_inference_steps, timesteps):
    """Any step count or custom grid: refused naming it, or a finite, increasing grid from t0 >= 0 to 1."""
    scheduler = VRFMScheduler(solver=solver, shift=shift)
    result = attempt(
        lambda: scheduler.set_timesteps(num_inference_steps, timesteps=timesteps),
        ["num_inference_steps", "timesteps"],
    )
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
    """A trajectory in which some calls get a wrong `model_output`, `timestep` or `sample`, and which runs past its
    end: each call succeeds with a finite state of the right shape or is refused without advancing the scheduler."""
    scheduler = VRFMScheduler(solver=solver)
    scheduler.set_timesteps(num_inference_steps)
    shape = (batch, 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    num_calls = len(scheduler.timesteps) + data.draw(st.integers(0, 2), label="extra calls")
    for call in range(num_calls):
        index = scheduler.step_index
        expected = scheduler.timesteps[index] if index < len(scheduler.timesteps) else torch.tensor(1.0)
        model_output, timestep, sample = -x, expected, x
        wrong = data.draw(st.sampled_from([None, None, "model_output", "timestep", "sample"]), label=f"wrong {call}")
        if wrong == "model_output":
            model_output = data.draw(st.one_of(tensors(shape), JUNK), label="model_output")
        elif wrong == "timestep":
            timestep = data.draw(
                st.one_of(
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.just(float(expected)),
                    st.just(expected.expand(batch)),
                    tensors((batch,), fills=["unit", "nan"]),
                    JUNK,
                ),
                label="timestep",
            )
        elif wrong == "sample":
            sample = data.draw(st.one_of(tensors(shape), JUNK), label="sample")
        names = [name for name in (wrong, "step") if name]
        out = attempt(lambda m=model_output, t=timestep, s=sample: scheduler.step(m, t, s), names)
        if out is REFUSED:
            assert scheduler.step_index == index, "a refused call must not advance the scheduler"
            continue
        assert index < len(scheduler.timesteps), "a call past the end of the schedule must be refused"
        assert out.prev_sample.shape == shape
        if moderate(model_output, sample):
            assert is_finite(out.prev_sample)
        x = out.prev_sample.float() if out.prev_sample.is_floating_point() else x


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
    """A strategy for one argument of `VRFMPipeline.__call__`: right values and every kind of wrong one."""
    latent_dim, num_classes = pipe.velocity_model.latent_dim, pipe.velocity_model.num_classes or 2
    generators = st.lists(st.builds(torch.Generator), min_size=0, max_size=batch_size + 1)
    return {
        "batch_size": st.one_of(st.integers(-1, 4), st.just(np.int64(2)), JUNK),
        "num_inference_steps": st.one_of(st.integers(-1, 5), st.just(np.int64(2)), JUNK),
        "generator": st.one_of(
            st.none(),
            st.builds(torch.Generator),
            generators,
            generators.map(lambda gs: [*gs[:-1], 0] if gs else [None]),
            st.just(np.random.default_rng(0)),
            JUNK,
        ),
        "z": st.one_of(st.none(), tensors((batch_size, max(latent_dim, 1))), tensors((max(latent_dim, 1),)), JUNK),
        "latents": st.one_of(st.none(), tensors((batch_size, 2)), JUNK),
        "class_labels": st.one_of(
            st.none(),
            st.integers(-1, num_classes + 1),
            st.lists(st.integers(-1, num_classes), min_size=batch_size - 1, max_size=batch_size + 1),
            st.lists(st.floats(0, 2), min_size=batch_size, max_size=batch_size),
            st.lists(st.lists(st.integers(0, 1), max_size=2), min_size=1, max_size=batch_size),
            tensors((batch_size,), good_dtype=torch.int64),
            st.just(2**70),
            JUNK,
        ),
        "guidance_scale": st.one_of(st.floats(-5, 10), NUMBERS, JUNK),
        "timesteps": st.one_of(st.none(), time_lists()),
        "output_type": st.one_of(st.sampled_from([None, "pt", "np", "latent", "pil", "PT", "jpg"]), JUNK),
    }[name]


def check_pipeline_output(pipe, out, arguments, batch_size):
    samples = out.samples
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
        check_pipeline_output(pipe, out, arguments, arguments["batch_size"])


@fuzz(50)
@given(which=st.integers(0, len(PIPELINES) - 1), batch_size=st.integers(1, 3), data=st.data())
def test_pipeline_call_many_wrong_arguments(which, batch_size, data):
    """Several arguments at once: refused naming one of them, or finite samples."""
    pipe = PIPELINES[which]
    names = data.draw(st.lists(st.sampled_from(CALL_ARGUMENTS), min_size=2, max_size=5, unique=True))
    arguments = {"batch_size": batch_size, "num_inference_steps": 2}
    arguments.update({name: data.draw(call_argument(name, pipe, batch_size), label=name) for name in names})
    out = attempt(lambda: pipe(**arguments), names)
    if out is not REFUSED:
        check_pipeline_output(pipe, out, arguments, arguments["batch_size"])


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
    "sample_size": st.one_of(st.integers(-1, 4), JUNK),
    "latent_dim": st.one_of(st.integers(-1, 4), JUNK),
    "hidden_dim": st.one_of(st.integers(-1, 9), JUNK),
    "num_layers": st.one_of(st.integers(-1, 3), JUNK),
    "activation": st.one_of(st.sampled_from(["selu", "silu", "relu", "gelu", "elu", "tanh", "SiLU"]), JUNK),
    "time_embed_dim": st.one_of(st.integers(-1, 9), JUNK),
    "num_classes": st.one_of(st.none(), st.integers(-1, 4), JUNK),
}


@fuzz(40)
@given(data=st.data())
def test_velocity_model_constructor(data):
    """Any config value: refused naming it, or a model whose velocity is finite at every time, including t = 0."""
    names = data.draw(st.lists(st.sampled_from(sorted(MLP_CONFIG)), min_size=1, max_size=3, unique=True))
    config = {"sample_size": 2, "latent_dim": 2, "hidden_dim": 8, "num_layers": 1}
    config.update({name: data.draw(MLP_CONFIG[name], label=name) for name in names})
    model = attempt(lambda: VRFMMLPModel(**config), names)
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


@fuzz(60)
@given(which=st.integers(0, len(MLPS) - 1), batch=st.integers(1, 3), data=st.data())
def test_velocity_model_forward(which, batch, data):
    """`VRFMMLPModel.forward` with any `sample`, `timestep`, `z` and `class_labels`: a finite velocity shaped like
    `sample` (from finite inputs), or refused naming the argument."""
    model = MLPS[which]
    latent_dim = model.latent_dim
    arguments = {
        "sample": torch.randn(batch, 2),
        "timestep": torch.rand(batch),
        "z": torch.randn(batch, latent_dim) if latent_dim else None,
        "class_labels": None,
    }
    names = data.draw(st.lists(st.sampled_from(sorted(arguments)), min_size=1, max_size=2, unique=True))
    strategies = {
        "sample": st.one_of(tensors((batch, 2)), JUNK),
        "timestep": st.one_of(NUMBERS, tensors((batch,), fills=["unit", "unit", "normal", "nan"]), JUNK),
        "z": st.one_of(st.none(), tensors((batch, max(latent_dim, 1))), JUNK),
        "class_labels": st.one_of(
            st.none(), st.integers(-1, 4), tensors((batch,), good_dtype=torch.int64), st.just(["a"] * batch), JUNK
        ),
    }
    arguments.update({name: data.draw(strategies[name], label=name) for name in names})
    out = attempt(lambda: model(**arguments), names)
    if out is REFUSED:
        return
    sample = arguments["sample"]
    assert out.sample.shape == sample.shape
    if moderate(*arguments.values()):
        assert is_finite(out.sample)


# ----------------------------------------------------------------------------------------------- posterior encoder
POSTERIOR_INPUT_CHOICES = st.one_of(
    st.lists(st.sampled_from(["x0", "x1", "x_t", "t"]), min_size=1, max_size=4),
    st.sampled_from(["x0", "x1", "t", "x_t", "x", ""]),
    st.lists(st.sampled_from(["x0", "t", "X1", "xt", 1, None]), max_size=3),
    st.just(("x1", ["x0"])),
    JUNK,
)


@fuzz(60)
@given(
    posterior_inputs=POSTERIOR_INPUT_CHOICES,
    latent_dim=st.one_of(st.integers(-1, 4), JUNK),
    time_embed_dim=st.one_of(st.integers(-1, 9), JUNK),
)
def test_posterior_encoder_constructor(posterior_inputs, latent_dim, time_embed_dim):
    """Any `posterior_inputs`, `latent_dim` and `time_embed_dim`: refused naming the argument, or an encoder that maps
    finite inputs to finite Gaussians."""
    encoder = attempt(
        lambda: VRFMPosteriorEncoder(
            sample_size=2,
            latent_dim=latent_dim,
            posterior_inputs=posterior_inputs,
            hidden_dim=8,
            time_embed_dim=time_embed_dim,
        ),
        ["posterior_inputs", "latent_dim", "time_embed_dim"],
    )
    if encoder is REFUSED:
        return
    assert set(encoder.posterior_inputs) <= {"x0", "x1", "x_t", "t"} and encoder.posterior_inputs != ("t",)
    x = torch.randn(3, 2)
    out = encoder(x0=x, x1=x, x_t=x, t=torch.rand(3))
    assert out.mean.shape == out.logvar.shape == out.sample.shape == (3, latent_dim) and out.kl.shape == (3,)
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
    shape `(B, latent_dim)`, or refused naming the argument. Inputs the encoder does not read are ignored."""
    encoder = ENCODERS[which]
    x0, x1, t = torch.randn(batch, 2), torch.randn(batch, 2), torch.rand(batch)
    arguments = {"x0": x0, "x1": x1, "x_t": interpolate(x0, x1, t), "t": t, "generator": None}
    names = data.draw(st.lists(st.sampled_from(sorted(arguments)), min_size=1, max_size=2, unique=True))
    strategies = {
        "x0": st.one_of(st.none(), tensors((batch, 2)), JUNK),
        "x1": st.one_of(st.none(), tensors((batch, 2)), JUNK),
        "x_t": st.one_of(st.none(), tensors((batch, 2)), JUNK),
        "t": st.one_of(st.none(), NUMBERS, tensors((batch,), fills=["unit", "unit", "normal", "nan"]), JUNK),
        "generator": st.one_of(
            st.builds(torch.Generator),
            st.lists(st.builds(torch.Generator), max_size=batch + 1),
            st.just([None] * batch),
            JUNK,
        ),
    }
    arguments.update({name: data.draw(strategies[name], label=name) for name in names})
    out = attempt(lambda: encoder(**arguments), names)
    if out is REFUSED:
        return
    read = [arguments[name] for name in encoder.posterior_inputs]
    batch_size = next(v.shape[0] for v in read if isinstance(v, torch.Tensor) and v.ndim == 2)
    assert out.mean.shape == out.logvar.shape == out.sample.shape == (batch_size, encoder.latent_dim)
    assert out.kl.shape == (batch_size,)
    assert all(is_finite(v) for v in (out.mean, out.logvar, out.sample, out.kl))


# ------------------------------------------------------------------------------------------------------- objective
@fuzz(50)
@given(batch=st.integers(1, 3), data=st.data())
def test_vrfm_loss(batch, data):
    """`vrfm_loss` with any predictions, posterior, prior and hyper-parameters: finite scalars from finite inputs
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
    latent = st.one_of(st.none(), tensors((batch, 3)), JUNK)
    strategies = {
        "velocity_pred": st.one_of(tensors((batch, 2)), JUNK),
        "velocity_target": st.one_of(tensors((batch, 2)), JUNK),
        "posterior_mean": latent,
        "posterior_logvar": latent,
        "beta": st.one_of(st.floats(0, 10), NUMBERS, JUNK),
        "reduction": st.one_of(st.sampled_from(["sum", "mean", "none", "Sum"]), JUNK),
        "free_bits": st.one_of(st.floats(0, 2), NUMBERS, JUNK),
        "prior_mean": latent,
        "prior_logvar": latent,
    }
    names = data.draw(st.lists(st.sampled_from(sorted(arguments)), min_size=1, max_size=3, unique=True))
    arguments.update({name: data.draw(strategies[name], label=name) for name in names})
    out = attempt(lambda: vrfm_loss(**arguments), names)
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
    strategies = {
        "x0": st.one_of(tensors((batch, 2)), JUNK),
        "x1": st.one_of(tensors((batch, 2)), JUNK),
        "t": st.one_of(NUMBERS, tensors((batch,), fills=["unit", "unit", "nan"]), JUNK),
    }
    names = data.draw(st.lists(st.sampled_from(sorted(arguments)), min_size=1, max_size=2, unique=True))
    arguments.update({name: data.draw(strategies[name], label=name) for name in names})
    out = attempt(lambda: interpolate(**arguments), names)
    if out is REFUSED:
        return
    assert out.shape == arguments["x0"].shape and out.is_floating_point()
    if moderate(*arguments.values()):
        assert is_finite(out)


@fuzz(40)
@given(
    batch_size=st.one_of(st.integers(-1, 5), JUNK),
    density=st.one_of(st.sampled_from(["uniform", "logit_normal", "mode", "cosine"]), JUNK),
    logit_mean=st.one_of(st.floats(-3, 3), NUMBERS, JUNK),
    logit_std=st.one_of(st.floats(0.1, 3), NUMBERS, JUNK),
    mode_scale=st.one_of(st.floats(-1, 3), NUMBERS, JUNK),
    generator=st.one_of(st.none(), st.builds(torch.Generator), JUNK),
)
def test_sample_timesteps(batch_size, density, logit_mean, logit_std, mode_scale, generator):
    """Training times: `batch_size` finite values in [0, 1], or refused naming the argument."""
    names = ["batch_size", "density", "logit_mean", "logit_std", "mode_scale", "generator"]
    out = attempt(
        lambda: sample_timesteps(
            batch_size,
            density=density,
            logit_mean=logit_mean,
            logit_std=logit_std,
            mode_scale=mode_scale,
            generator=generator,
        ),
        names,
    )
    if out is REFUSED:
        return
    assert out.shape == (batch_size,) and is_finite(out) and out.min() >= 0 and out.max() <= 1


@fuzz(40)
@given(batch=st.integers(1, 3), data=st.data())
def test_gaussian_kl(batch, data):
    """`gaussian_kl`: finite, non-negative KL of the shape of `mean` from finite inputs (log-variances within the
    encoders' clamp range), or refused naming the argument."""
    arguments = {"mean": torch.randn(batch, 3), "logvar": torch.randn(batch, 3)}
    arguments.update(prior_mean=None, prior_logvar=None)
    latent = st.one_of(tensors((batch, 3)), JUNK)
    strategies = {name: latent if name in ("mean", "logvar") else st.one_of(st.none(), latent) for name in arguments}
    names = data.draw(st.lists(st.sampled_from(sorted(arguments)), min_size=1, max_size=2, unique=True))
    arguments.update({name: data.draw(strategies[name], label=name) for name in names})
    out = attempt(lambda: gaussian_kl(**arguments), names)
    if out is REFUSED:
        return
    assert out.shape == arguments["mean"].shape
    given_tensors = [v for v in arguments.values() if isinstance(v, torch.Tensor)]
    if moderate(*given_tensors, limit=20):
        assert is_finite(out) and (out.float() >= -1e-3).all()


@fuzz(40)
@given(batch=st.integers(1, 4), data=st.data())
def test_drop_labels(batch, data):
    """`drop_labels`: labels of the same shape, each kept or replaced by `null_class`, or refused naming the
    argument."""
    arguments = {
        "class_labels": torch.arange(batch),
        "dropout_prob": 0.5,
        "null_class": 7,
        "generator": None,
    }
    strategies = {
        "class_labels": st.one_of(tensors((batch,), good_dtype=torch.int64), JUNK),
        "dropout_prob": st.one_of(st.floats(0, 1), NUMBERS, JUNK),
        "null_class": st.one_of(st.integers(0, 9), st.just(1.5), HUGE_INT, JUNK),
        "generator": st.one_of(st.none(), st.builds(torch.Generator), JUNK),
    }
    names = data.draw(st.lists(st.sampled_from(sorted(arguments)), min_size=1, max_size=2, unique=True))
    arguments.update({name: data.draw(strategies[name], label=name) for name in names})
    out = attempt(lambda: drop_labels(**arguments), names)
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
    strategies = {
        "z_a": st.one_of(tensors((dim,)), JUNK),
        "z_b": st.one_of(tensors((dim,)), JUNK),
        "weight": st.one_of(NUMBERS, tensors((3,), fills=["unit", "unit", "nan"]), tensors(()), JUNK),
    }
    names = data.draw(st.lists(st.sampled_from(sorted(arguments)), min_size=1, max_size=2, unique=True))
    arguments.update({name: data.draw(strategies[name], label=name) for name in names})
    out = attempt(lambda: slerp(**arguments), names)
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
