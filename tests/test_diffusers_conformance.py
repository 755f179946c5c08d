"""What diffusers' own test mixins check on its pipelines and schedulers, written here for VRFMPipeline and
VRFMScheduler; the drop-in use of diffusers' flow schedulers; and loading that refuses incomplete weights."""

import inspect
import json
import logging
import os

import pytest
import safetensors.torch
import torch
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.callbacks import PipelineCallback
from test_image_pipeline import make_pipe

from diffusers_vrfm import VRFMMLPModel, VRFMPipeline, VRFMPosteriorEncoder, VRFMScheduler
from diffusers_vrfm.schedulers.flow_scheduler_adapter import FlowSchedulerAdapter

torch.set_num_threads(1)

FLOW_KWARGS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
DIFFUSERS_FLOW_SCHEDULERS = {
    "flow_euler": (FlowMatchEulerDiscreteScheduler, {}),
    "flow_heun": (FlowMatchHeunDiscreteScheduler, {}),
    "dpm_multistep": (DPMSolverMultistepScheduler, FLOW_KWARGS),
    "unipc_multistep": (UniPCMultistepScheduler, FLOW_KWARGS),
}


def vector_pipe(latent_dim=4, num_classes=None, posterior=False):
    torch.manual_seed(0)
    model = VRFMMLPModel(sample_size=2, latent_dim=latent_dim, num_classes=num_classes)
    with torch.no_grad():  # wake the zero-initialised z and class paths so that they change the output
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.3)
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=latent_dim) if posterior else None
    pipe = VRFMPipeline(velocity_model=model.eval(), scheduler=VRFMScheduler(), posterior_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def state_dicts_equal(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


# ------------------------------------------------------------------------------------------------ save and load
@pytest.mark.parametrize("variant", [None, "fp16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_load_round_trip_with_variant_and_dtype(tmp_path, variant, dtype):
    pipe = vector_pipe(posterior=True).to(dtype)
    expected = pipe(batch_size=3, num_inference_steps=2, generator=seeded()).samples
    pipe.save_pretrained(tmp_path, variant=variant)
    weight_name = "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"
    assert os.path.isfile(tmp_path / "velocity_model" / weight_name)
    reloaded = VRFMPipeline.from_pretrained(tmp_path, variant=variant, dtype=dtype)
    assert reloaded.velocity_model.dtype == dtype
    assert state_dicts_equal(pipe.velocity_model, reloaded.velocity_model)
    assert state_dicts_equal(pipe.posterior_encoder, reloaded.posterior_encoder)
    assert torch.equal(expected, reloaded(batch_size=3, num_inference_steps=2, generator=seeded()).samples)


def test_variant_that_no_component_has_is_refused(tmp_path):
    vector_pipe().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="variant='fp16'.*no component"):
        VRFMPipeline.from_pretrained(tmp_path, variant="fp16")


def test_diffusers_loading_arguments_are_accepted(tmp_path):
    pipe = vector_pipe()
    pipe.save_pretrained(tmp_path)
    reloaded = VRFMPipeline.from_pretrained(
        tmp_path,
        torch_dtype=torch.float32,
        use_safetensors=True,
        local_files_only=True,
        device_map="cpu",
        low_cpu_mem_usage=True,
    )
    assert state_dicts_equal(pipe.velocity_model, reloaded.velocity_model)
    assert VRFMPipeline.from_pretrained(tmp_path, low_cpu_mem_usage=False).velocity_model.device.type == "cpu"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"dtype": torch.float16, "torch_dtype": torch.bfloat16}, ValueError, "`dtype`.*`torch_dtype`.*disagree"),
        ({"dtype": "half"}, TypeError, "`dtype` must be a torch.dtype"),
        ({"device_map": "balanced"}, ValueError, "`device_map`.*'balanced' is not supported"),
        ({"device_map": "cpu", "low_cpu_mem_usage": False}, ValueError, "low_cpu_mem_usage=True"),
        ({"use_safetensors": False}, ValueError, "allow_pickle=True"),
        ({"proxies": {}}, TypeError, "unexpected arguments \\['proxies'\\]"),
    ],
)
def test_bad_loading_arguments_are_refused(tmp_path, kwargs, error, match):
    vector_pipe().save_pretrained(tmp_path)
    with pytest.raises(error, match=match):
        VRFMPipeline.from_pretrained(tmp_path, **kwargs)


def test_mistyped_local_path_says_no_such_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such folder"):
        VRFMPipeline.from_pretrained(str(tmp_path / "no-such" / "pipeline"))
    with pytest.raises(FileNotFoundError, match="not a local folder.*local cache"):
        VRFMPipeline.from_pretrained("a-pipeline-that-is-nowhere", local_files_only=True)


def test_loading_logs_each_component(tmp_path):
    vector_pipe(posterior=True).save_pretrained(tmp_path)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    library_logger = logging.getLogger("diffusers_vrfm")  # the package logs through the standard library
    library_logger.addHandler(handler)
    previous = library_logger.level
    library_logger.setLevel(logging.INFO)
    try:
        VRFMPipeline.from_pretrained(tmp_path)
    finally:
        library_logger.setLevel(previous)
        library_logger.removeHandler(handler)
    messages = " ".join(record.getMessage() for record in records)
    assert "Loading VRFMPipeline from" in messages
    assert "Loaded `velocity_model` (VRFMMLPModel)" in messages
    assert "Loaded `posterior_encoder` (VRFMPosteriorEncoder)" in messages


# ------------------------------------------------------------------- loading refuses incomplete weights (issue 17.4)
def tamper_weights(folder, drop_key=True, add_key=False):
    path = folder / "velocity_model" / "diffusion_pytorch_model.safetensors"
    weights = safetensors.torch.load_file(path)
    dropped = sorted(weights)[0]
    if drop_key:
        del weights[dropped]
    if add_key:
        weights["stray.weight"] = torch.zeros(2)
    safetensors.torch.save_file(weights, path)
    return dropped


@pytest.mark.parametrize("drop_key, add_key", [(True, False), (False, True), (True, True)])
def test_incomplete_weights_are_refused_naming_component_and_keys(tmp_path, drop_key, add_key):
    vector_pipe().save_pretrained(tmp_path)
    dropped = tamper_weights(tmp_path, drop_key, add_key)
    with pytest.raises(ValueError, match="`velocity_model`") as error:
        VRFMPipeline.from_pretrained(tmp_path)
    assert (dropped in str(error.value)) == drop_key
    assert ("stray.weight" in str(error.value)) == add_key


def test_missing_keys_are_refused_on_the_remote_code_route(tmp_path):
    vector_pipe().save_pretrained(tmp_path)
    dropped = tamper_weights(tmp_path)
    with pytest.raises(ValueError, match=f"`velocity_model`.*never loaded.*{dropped}"):
        DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)


# -------------------------------------------------------------------------------------------------- device and dtype
def test_to_dtype_and_device_moves_every_component():
    pipe = vector_pipe(posterior=True)
    pipe.to(torch.bfloat16)
    assert pipe.velocity_model.dtype == pipe.posterior_encoder.dtype == torch.bfloat16
    assert pipe(batch_size=2, num_inference_steps=2).samples.dtype == torch.bfloat16
    pipe.to("cpu", torch.float32)
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_cpu_offload_through_accelerate_hooks(offload):
    pipe = vector_pipe(posterior=True)
    expected = pipe(batch_size=3, num_inference_steps=2, generator=seeded()).samples
    if offload == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        # what `enable_sequential_cpu_offload` installs, on the plain "cpu" device: diffusers passes "cpu:0", which
        # torch 2.13 turns into a copy that drops the Parameter class, so accelerate's post-forward hook fails even
        # for diffusers' own DDPMPipeline (an upstream incompatibility, not ours)
        from accelerate import cpu_offload

        for name in ("velocity_model", "posterior_encoder"):
            cpu_offload(getattr(pipe, name), execution_device=torch.device("cpu"))
        assert pipe.velocity_model.device.type == "meta"  # the weights really are offloaded
    out = pipe(batch_size=3, num_inference_steps=2, generator=seeded())
    torch.testing.assert_close(out.samples, expected)


@pytest.mark.skipif(
    type(torch.nn.Parameter(torch.zeros(1)).to("cpu:0")) is not torch.nn.Parameter,
    reason="this torch copies a Parameter moved to 'cpu:0' into a plain tensor, which breaks accelerate's hooks "
    "under diffusers' enable_sequential_cpu_offload (diffusers' own pipelines fail the same way)",
)
def test_enable_sequential_cpu_offload():
    pipe = vector_pipe()
    expected = pipe(batch_size=2, num_inference_steps=2, generator=seeded()).samples
    pipe.enable_sequential_cpu_offload(device="cpu")
    torch.testing.assert_close(pipe(batch_size=2, num_inference_steps=2, generator=seeded()).samples, expected)


def test_offload_sequence_covers_the_sampling_components():
    assert VRFMPipeline.model_cpu_offload_seq.split("->") == ["prior", "velocity_model", "vae"]


# -------------------------------------------------------------------------------------------------------- from_pipe
def test_from_pipe_carries_every_component_over():
    pipe = make_pipe(vae=True)
    new = VRFMPipeline.from_pipe(pipe)
    assert all(new.components[name] is component for name, component in pipe.components.items())


def test_from_pipe_with_an_explicit_velocity_model_keeps_the_vae():
    pipe = make_pipe(vae=True)
    replacement = make_pipe(vae=True).velocity_model
    new = VRFMPipeline.from_pipe(pipe, velocity_model=replacement)
    assert new.velocity_model is replacement
    assert new.vae is pipe.vae and new.posterior_encoder is pipe.posterior_encoder


# -------------------------------------------------------------------------------------------------------- callbacks
def test_call_signature_and_properties():
    parameters = inspect.signature(VRFMPipeline.__call__).parameters
    for name in ("callback_on_step_end", "callback_on_step_end_tensor_inputs", "num_inference_steps", "generator"):
        assert name in parameters
    pipe = vector_pipe(num_classes=3)
    pipe(class_labels=[0, 1], guidance_scale=2.0, num_inference_steps=3)
    assert pipe.guidance_scale == 2.0 and pipe.num_timesteps == 3 and pipe.interrupt is False


def test_callback_sees_every_step_and_can_change_latents():
    pipe = vector_pipe()
    seen = []

    def record(pipe, step_index, t, callback_kwargs):
        seen.append((step_index, float(t), callback_kwargs["latents"].clone()))
        return callback_kwargs

    plain = pipe(batch_size=2, num_inference_steps=3, generator=seeded(), callback_on_step_end=record)
    assert [index for index, _, _ in seen] == [0, 1, 2]
    assert [t for _, t, _ in seen] == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert torch.equal(seen[-1][2], plain.samples)

    def zero_after_first_step(pipe, step_index, t, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step_index == 0 else callback_kwargs

    changed = pipe(batch_size=2, num_inference_steps=3, generator=seeded(), callback_on_step_end=zero_after_first_step)
    # from zeros at t = 1/3, the remaining two steps with the same z
    expected = pipe(batch_size=2, timesteps=[1 / 3, 2 / 3], latents=torch.zeros(2, 2), z=plain.z).samples
    torch.testing.assert_close(changed.samples, expected)


def test_callback_interrupt_skips_the_remaining_steps():
    pipe = vector_pipe()
    calls = []

    def stop(pipe, step_index, t, callback_kwargs):
        calls.append(step_index)
        pipe._interrupt = True
        return callback_kwargs

    latents = torch.randn(2, 2, generator=seeded())
    out = pipe(batch_size=2, num_inference_steps=4, latents=latents, callback_on_step_end=stop)
    one_step = pipe(batch_size=2, timesteps=[0.0, 0.25], latents=latents, z=out.z)  # the first of the 4 steps
    assert calls == [0]
    pipe.scheduler.set_timesteps(4)
    first_step = pipe.scheduler.step(pipe.velocity(latents, 0.0, out.z), 0.0, latents).prev_sample
    torch.testing.assert_close(out.samples, first_step)
    assert one_step.samples.shape == out.samples.shape


def test_pipeline_callback_objects_and_refusals():
    class ScaleLatents(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return {"latents": callback_kwargs["latents"] * 0}

    pipe = vector_pipe()
    out = pipe(batch_size=2, num_inference_steps=1, callback_on_step_end=ScaleLatents())
    assert torch.equal(out.samples, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="tensor of shape \\(2, 2\\)"):
        pipe(batch_size=2, num_inference_steps=1, callback_on_step_end=lambda *args: {"latents": torch.zeros(3)})
    adaptive = VRFMPipeline(pipe.velocity_model, VRFMScheduler(solver="dopri5"))
    with pytest.raises(ValueError, match="fixed-step solver"):
        adaptive(batch_size=2, callback_on_step_end=lambda pipe, i, t, kwargs: kwargs)


# --------------------------------------------------------------------------------------- batching, determinism, output
def test_batch_size_is_inferred_from_labels_latents_and_z():
    pipe = vector_pipe(num_classes=3)
    assert pipe(class_labels=[0, 1, 2], num_inference_steps=1).samples.shape == (3, 2)
    assert pipe(class_labels=torch.tensor([2, 2]), num_inference_steps=1).samples.shape == (2, 2)
    assert pipe(latents=torch.zeros(5, 2), num_inference_steps=1).samples.shape == (5, 2)
    assert pipe(z=torch.zeros(4, 4), num_inference_steps=1).samples.shape == (4, 2)
    assert pipe(class_labels=1, num_inference_steps=1).samples.shape == (1, 2)
    with pytest.raises(ValueError, match="`class_labels` must be 2"):
        pipe(batch_size=2, class_labels=[0, 1, 2], num_inference_steps=1)


def test_batch_equals_items_with_a_generator_list():
    pipe = vector_pipe(num_classes=3)
    batch = pipe(class_labels=[0, 1, 2], num_inference_steps=2, generator=[seeded(i) for i in range(3)])
    for index in range(3):
        single = pipe(class_labels=[index], num_inference_steps=2, generator=[seeded(index)])
        torch.testing.assert_close(batch.samples[index : index + 1], single.samples)


def test_generator_determinism_output_types_and_return_dict():
    pipe = vector_pipe()
    first = pipe(batch_size=3, num_inference_steps=2, generator=seeded(1))
    second = pipe(batch_size=3, num_inference_steps=2, generator=seeded(1), output_type="np")
    samples, z = pipe(batch_size=3, num_inference_steps=2, generator=seeded(1), return_dict=False)
    assert torch.equal(first.samples, samples) and torch.equal(first.z, z)
    assert second.samples.tolist() == first.samples.numpy().tolist()
    assert not torch.equal(first.samples, pipe(batch_size=3, num_inference_steps=2, generator=seeded(2)).samples)


# --------------------------------------------------------------------------------------------- the scheduler's checks
def test_scheduler_order_and_compatibles():
    assert [VRFMScheduler(solver=s).order for s in ("euler", "heun", "midpoint", "dopri5")] == [1, 2, 2, 1]
    names = {cls.__name__ for cls in VRFMScheduler().compatibles}
    assert names == {
        "FlowMatchEulerDiscreteScheduler",
        "FlowMatchHeunDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
    }


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
def test_scheduler_step_shapes_and_step_index(solver):
    scheduler = VRFMScheduler(solver=solver)
    scheduler.set_timesteps(3)
    assert len(scheduler.timesteps) == 3 * scheduler.order
    sample = torch.randn(2, 3, 4, 4)
    for index, t in enumerate(scheduler.timesteps):
        assert scheduler.step_index == index
        sample = scheduler.step(torch.randn_like(sample), t, sample).prev_sample
        assert sample.shape == (2, 3, 4, 4)


def test_scheduler_from_config_both_ways_and_save_load(tmp_path):
    scheduler = VRFMScheduler(shift=3.0, num_train_timesteps=500)
    flow = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    assert (flow.config.shift, flow.config.num_train_timesteps) == (3.0, 500)
    back = VRFMScheduler.from_config(flow.config)
    assert (back.config.shift, back.config.num_train_timesteps) == (3.0, 500)
    scheduler.save_pretrained(tmp_path)
    with open(tmp_path / "scheduler_config.json") as handle:
        assert json.load(handle)["_class_name"] == "VRFMScheduler"
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}  # noqa: E731
    assert public(VRFMScheduler.from_pretrained(tmp_path).config) == public(scheduler.config)


def test_scheduler_add_noise_broadcasts_like_diffusers():
    scheduler = VRFMScheduler()
    data, noise = torch.ones(4, 3), torch.zeros(4, 3)
    for timesteps in (torch.tensor([0.25]), torch.tensor(0.25), torch.full((4,), 0.25)):
        torch.testing.assert_close(scheduler.add_noise(data, noise, timesteps), torch.full((4, 3), 0.25))
    assert scheduler.add_noise(data, noise, torch.tensor([0.0])).abs().sum() == 0
    torch.testing.assert_close(scheduler.add_noise(data, noise, torch.tensor([1.0])), data)
    with pytest.raises(ValueError, match="`t` must be a scalar or have shape \\(4,\\)"):
        scheduler.add_noise(data, noise, torch.full((2,), 0.25))


# ------------------------------------------------------------------------------------ diffusers' schedulers swapped in
def test_flow_match_euler_matches_our_euler_on_the_same_grid():
    pipe = vector_pipe()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # shift 1.0 carries over
    theirs = pipe(batch_size=8, num_inference_steps=6, generator=seeded())
    grid = (1 - pipe.scheduler.sigmas[:-1]).tolist()  # diffusers' grid in our clock: 0 ... 0.999, then 1
    pipe.scheduler = VRFMScheduler.from_config(pipe.scheduler.config)
    ours = pipe(batch_size=8, timesteps=grid, generator=seeded())
    assert theirs.num_function_evals == ours.num_function_evals == 6
    assert torch.equal(theirs.z, ours.z)
    assert (theirs.samples - ours.samples).abs().max() < 1e-5


@pytest.mark.parametrize("name", sorted(DIFFUSERS_FLOW_SCHEDULERS))
def test_each_diffusers_flow_scheduler_integrates_the_same_flow(name):
    scheduler_class, extra = DIFFUSERS_FLOW_SCHEDULERS[name]
    pipe = vector_pipe()
    latents, z = torch.randn(16, 2, generator=seeded(1)), torch.randn(16, 4, generator=seeded(2))
    reference = pipe(num_inference_steps=200, latents=latents, z=z).samples  # a fine Euler solution
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **extra)
    out = pipe(num_inference_steps=20, latents=latents, z=z).samples
    error = (out - reference).abs().max()
    assert error < 0.02, f"{name}: max deviation {error:.4f} from the fine Euler solution"
    assert (reference - latents).abs().max() > 0.2  # ten times the tolerance: a clock or sign error could not pass


@pytest.mark.parametrize("name", sorted(DIFFUSERS_FLOW_SCHEDULERS))
def test_z_stays_fixed_along_each_trajectory_whatever_the_scheduler(name):
    scheduler_class, extra = DIFFUSERS_FLOW_SCHEDULERS[name]
    pipe = vector_pipe()
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **extra)
    seen = []
    original_forward = pipe.velocity_model.forward

    def recording_forward(sample, timestep, z=None, **kwargs):
        seen.append((float(torch.as_tensor(timestep).flatten()[0]), z.clone()))
        return original_forward(sample, timestep, z=z, **kwargs)

    pipe.velocity_model.forward = recording_forward
    out = pipe(batch_size=3, num_inference_steps=4, generator=seeded())
    assert len(seen) == out.num_function_evals == pipe.num_timesteps
    assert all(torch.equal(z, out.z) for _, z in seen)
    times = [t for t, _ in seen]
    assert times == sorted(times) and 0 <= times[0] < 0.01 and times[-1] < 1  # noise to data, in our clock


@pytest.mark.parametrize(
    "scheduler, match",
    [
        (DDPMScheduler(), "DDPMScheduler.*FlowMatchEulerDiscreteScheduler"),
        (EulerDiscreteScheduler(), "EulerDiscreteScheduler"),
        (DPMSolverMultistepScheduler(), "use_flow_sigmas=True"),
        (UniPCMultistepScheduler(use_flow_sigmas=True), "prediction_type='flow_prediction'"),
        (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **FLOW_KWARGS), "stochastic"),
        (FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), "stochastic_sampling=False"),
    ],
)
def test_schedulers_that_cannot_integrate_a_flow_are_refused_on_assignment(scheduler, match):
    pipe = vector_pipe()
    with pytest.raises((TypeError, ValueError), match=match):
        pipe.scheduler = scheduler
    assert isinstance(pipe.scheduler, VRFMScheduler)


def test_custom_timesteps_reach_diffusers_schedulers_as_sigmas():
    adapter = FlowSchedulerAdapter(FlowMatchEulerDiscreteScheduler())
    torch.testing.assert_close(adapter.set_timesteps(timesteps=[0.0, 0.25, 0.5]), torch.tensor([0.0, 0.25, 0.5]))
    torch.testing.assert_close(adapter.scheduler.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.0]))
    with pytest.raises(ValueError, match="takes no custom sigmas"):
        FlowSchedulerAdapter(DPMSolverMultistepScheduler(**FLOW_KWARGS)).set_timesteps(timesteps=[0.0, 0.5])


def test_a_saved_pipeline_keeps_its_diffusers_scheduler(tmp_path):
    pipe = vector_pipe()
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, **FLOW_KWARGS)
    expected = pipe(batch_size=2, num_inference_steps=3, generator=seeded()).samples
    pipe.save_pretrained(tmp_path)
    remote = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    for reloaded in (VRFMPipeline.from_pretrained(tmp_path), remote):
        assert isinstance(reloaded.scheduler, UniPCMultistepScheduler)
        torch.testing.assert_close(reloaded(batch_size=2, num_inference_steps=3, generator=seeded()).samples, expected)


# ----------------------------------------------------------------------------------------- smaller attacks (17.7)
def test_dopri5_with_nan_weights_reports_the_integration_failure():
    pipe = vector_pipe()
    with torch.no_grad():
        for parameter in pipe.velocity_model.parameters():
            parameter.fill_(float("nan"))
    pipe.scheduler = VRFMScheduler(solver="dopri5")
    with pytest.raises(ValueError, match="adaptive solver 'dopri5' could not integrate.*non-finite model weights"):
        pipe(batch_size=2)


def test_huge_integer_guidance_scale_is_a_clear_value_error():
    with pytest.raises(ValueError, match="`guidance_scale` must be finite.*beyond the float range"):
        vector_pipe(num_classes=3)(class_labels=[0, 1], guidance_scale=10**400, num_inference_steps=1)


def test_timesteps_and_num_inference_steps_together_are_refused():
    pipe = vector_pipe()
    with pytest.raises(ValueError, match="either `num_inference_steps` \\(4\\) or `timesteps`, not both"):
        pipe(batch_size=2, num_inference_steps=4, timesteps=[0.0, 0.5])
    assert pipe(batch_size=2, timesteps=[0.0, 0.5]).num_function_evals == 2


# ------------------------------------------------------------------------------------------------------ model card
@pytest.mark.parametrize("data_kind", ["vector", "image"])
def test_model_card_snippets_run_as_copied(tmp_path, data_kind):
    """Every Python block of the card's Usage section runs, with the card rendered for a local folder in place of the
    Hub id (both loaders treat the two alike); the install line names the real install."""
    from diffusers_vrfm.training.model_card import render_model_card

    pipe = vector_pipe(latent_dim=2) if data_kind == "vector" else make_pipe(num_classes=10)
    folder = tmp_path / "pipeline"
    pipe.save_pretrained(folder)
    card = render_model_card(
        repo_id=str(folder),
        args={"latent_dim": 2, "beta": 1.0, "loss_reduction": "mean", "max_train_steps": 10},
        argv=[],
        data_kind=data_kind,
        dataset_description="test data",
        hub_dataset_id=None,
        velocity_class=type(pipe.velocity_model).__name__,
        velocity_parameters=1,
        posterior_description="none",
        base_model=None,
        num_processes=1,
        global_batch_size=1,
        metrics={},
        metric_window=1,
        sample_image=None,
        num_classes=10 if data_kind == "image" else None,
    )
    usage = card.text.split("## Usage", 1)[1].split("\n## ", 1)[0]
    assert "pip install -e ." in usage and "`pip install diffusers-vrfm` does not work" in usage
    blocks = [block.split("\n", 1)[1] for block in usage.split("```")[1::2] if block.startswith("python")]
    assert len(blocks) == 2
    for block in blocks:
        namespace = {}
        exec(compile(block, "model card", "exec"), namespace)  # noqa: S102 - our own rendered template
        assert isinstance(namespace["pipe"], VRFMPipeline)
