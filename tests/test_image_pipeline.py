"""VRFMPipeline with image velocity models: output types, determinism, batching, dtype, CFG, the VAE route, load
routes, z interpolation, and the checks of diffusers' own PipelineTesterMixin that apply to these pipelines."""

import inspect

import huggingface_hub
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from diffusers_vrfm import (
    VRFMConvPosteriorEncoder,
    VRFMDiTTransformer2DModel,
    VRFMPipeline,
    VRFMScheduler,
    VRFMUNet2DModel,
)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
UNET_BLOCKS = {
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (8, 16),
    "norm_num_groups": 4,
    "layers_per_block": 1,
    "attention_head_dim": 4,
}
DIT_BLOCKS = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2}


def wake_zero_params(model, seed=0, std=0.3):
    """Gives every all-zero parameter (the zero-initialised z and class paths) random values, in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim > 0 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model.eval()


def velocity_model(kind="unet", num_classes=None, in_channels=3, latent_dim=4):
    torch.manual_seed(0)
    if kind == "unet":
        model = VRFMUNet2DModel(
            sample_size=8,
            in_channels=in_channels,
            out_channels=in_channels,
            latent_dim=latent_dim,
            num_classes=num_classes,
            **UNET_BLOCKS,
        )
    else:
        model = VRFMDiTTransformer2DModel(
            sample_size=8, in_channels=in_channels, latent_dim=latent_dim, num_classes=num_classes, **DIT_BLOCKS
        )
    return wake_zero_params(model)


def tiny_vae(scaling_factor=0.5):
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scaling_factor,
    )
    return vae.eval()


def make_pipe(kind="unet", num_classes=None, vae=False, posterior=True, latent_dim=4):
    model = velocity_model(kind, num_classes, in_channels=2 if vae else 3, latent_dim=latent_dim)
    encoder = None
    if posterior and latent_dim:
        encoder = VRFMConvPosteriorEncoder(
            sample_size=8, in_channels=model.sample_shape[0], latent_dim=latent_dim, block_out_channels=(8,)
        ).eval()
    pipe = VRFMPipeline(
        velocity_model=model, scheduler=VRFMScheduler(), posterior_encoder=encoder, vae=tiny_vae() if vae else None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed):
    return torch.Generator().manual_seed(seed)


def as_array(samples):
    """Any output type as a float numpy array, images as (B, H, W, C) in [0, 255] for PIL."""
    if isinstance(samples, list):
        assert all(isinstance(image, PIL.Image.Image) for image in samples)
        return np.stack([np.asarray(image, dtype=np.float32) for image in samples])
    if isinstance(samples, torch.Tensor):
        return samples.float().cpu().numpy()
    return np.asarray(samples, dtype=np.float32)


def assert_same(a, b, output_type, exact=True):
    a, b = as_array(a), as_array(b)
    assert a.shape == b.shape
    if exact:
        np.testing.assert_array_equal(a, b)
    else:  # batched and single convolutions may round differently; PIL outputs are 8-bit
        np.testing.assert_allclose(a, b, rtol=0, atol=1.0 if output_type == "pil" else 1e-5)


def call(pipe, **kwargs):
    arguments = {"batch_size": 2, "num_inference_steps": 3, "generator": generator(0), "output_type": "pt"}
    arguments.update(kwargs)
    return pipe(**arguments)


# ---------------------------------------------------------------------------------------------- output types
@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("output_type", OUTPUT_TYPES)
def test_output_types_determinism_and_batch_consistency(kind, output_type):
    pipe = make_pipe(kind)
    out = call(pipe, batch_size=3, output_type=output_type)
    again = call(pipe, batch_size=3, output_type=output_type)
    assert_same(out.samples, again.samples, output_type)
    assert torch.equal(out.z, again.z) and out.num_function_evals == 3
    array = as_array(out.samples)
    if output_type == "pil":
        assert len(out.samples) == 3 and out.samples[0].size == (8, 8) and out.images is out.samples
    elif output_type == "np":
        assert isinstance(out.samples, np.ndarray) and array.shape == (3, 8, 8, 3)
    elif output_type == "pt":
        assert isinstance(out.samples, torch.Tensor) and array.shape == (3, 3, 8, 8)
    else:  # model space, not post-processed
        assert array.shape == (3, 3, 8, 8) and (array.min() < 0 or array.max() > 1)
    if output_type in ("np", "pt"):
        assert array.min() >= 0 and array.max() <= 1
    # a different seed gives different samples
    assert not np.array_equal(
        as_array(call(pipe, batch_size=3, output_type=output_type, generator=generator(1)).samples), array
    )

    # batch consistency: a batch with a list of generators equals its items run one at a time
    batched = call(pipe, batch_size=3, output_type=output_type, generator=[generator(s) for s in (5, 6, 7)])
    for index, seed in enumerate((5, 6, 7)):
        single = call(pipe, batch_size=1, output_type=output_type, generator=generator(seed))
        single_samples = single.samples if output_type == "pil" else single.samples[0]
        batched_samples = [batched.samples[index]] if output_type == "pil" else batched.samples[index]
        assert_same(batched_samples, single_samples, output_type, exact=False)
        torch.testing.assert_close(batched.z[index], single.z[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_pt_output_is_the_postprocessed_latent_output(kind):
    pipe = make_pipe(kind)
    latent = call(pipe, output_type="latent").samples
    images = call(pipe, output_type="pt").samples
    torch.testing.assert_close(images, (latent / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_given_z_and_latents_are_used(kind):
    pipe = make_pipe(kind)
    x0 = torch.randn(2, 3, 8, 8, generator=generator(3))
    z = torch.randn(2, 4, generator=generator(4))
    out = call(pipe, latents=x0, z=z, output_type="latent")
    assert torch.equal(out.z, z)
    # with both given, the generator no longer matters
    assert torch.equal(out.samples, call(pipe, latents=x0, z=z, output_type="latent", generator=generator(9)).samples)
    other_z = call(pipe, latents=x0, z=z + 1, output_type="latent").samples
    assert (other_z - out.samples).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_bfloat16_inference_on_cpu(kind):
    pipe = make_pipe(kind)
    reference = call(pipe, output_type="np").samples
    pipe.to(torch.bfloat16)
    assert pipe.velocity_model.dtype == torch.bfloat16
    out = call(pipe, output_type="np")
    assert out.samples.shape == reference.shape and np.isfinite(out.samples).all()
    assert out.z.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits: the images agree with the float32 ones to a few percent
    assert np.abs(out.samples - reference).mean() < 0.05
    assert isinstance(call(pipe, output_type="pil").samples[0], PIL.Image.Image)


# ------------------------------------------------------------------------------------------ class-conditional
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_classifier_free_guidance(kind):
    pipe = make_pipe(kind, num_classes=3)
    labels = torch.tensor([0, 2])
    drawn = call(pipe, class_labels=labels, output_type="latent")
    conditional, z = drawn.samples, drawn.z
    # guidance 1 is the plain conditional model: integrate it by hand (Euler, 3 steps) from the same draws
    x = torch.randn(2, 3, 8, 8, generator=generator(0))  # the pipeline draws x0 first, then z
    for t0, t1 in ((0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1)):
        x = x + (t1 - t0) * pipe.velocity_model(x, torch.full((2,), float(t0)), z=z, class_labels=labels).sample
    torch.testing.assert_close(conditional, x, rtol=1e-5, atol=1e-5)

    # one guided velocity is uncond + scale * (cond - uncond), with the null label num_classes
    sample, t = torch.randn(2, 3, 8, 8, generator=generator(2)), 0.4
    cond = pipe.velocity_model(sample, t, z=z, class_labels=labels).sample
    uncond = pipe.velocity_model(sample, t, z=z, class_labels=torch.full((2,), 3)).sample
    torch.testing.assert_close(pipe.velocity(sample, t, z, labels, guidance_scale=3.0), uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(pipe.velocity(sample, t, z, labels, guidance_scale=1.0), cond)

    guided = call(pipe, class_labels=labels, guidance_scale=4.0, output_type="latent").samples
    assert (guided - conditional).abs().max() > 1e-4
    assert call(pipe, class_labels=labels, guidance_scale=4.0, output_type="pil").samples[0].size == (8, 8)
    # labels change the samples; an unconditional draw uses the null label
    assert (call(pipe, class_labels=[1, 1], output_type="latent").samples - conditional).abs().max() > 1e-4
    with pytest.raises(ValueError, match="class_labels"):
        call(pipe, class_labels=[0, 3])


def test_unconditional_pipeline_refuses_labels():
    with pytest.raises(ValueError, match="unconditional"):
        call(make_pipe("unet"), class_labels=[0, 1])


# ------------------------------------------------------------------------------------------------ VAE route
def test_vae_route_decodes_with_the_scaling_factor():
    pipe = make_pipe("unet", vae=True)
    assert pipe.velocity_model.sample_shape == (2, 8, 8) and pipe.is_image_model
    latents = torch.randn(2, 2, 8, 8, generator=generator(0))
    with torch.no_grad():
        expected = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        wrong = pipe.vae.decode(latents).sample
    decoded = pipe.decode(latents)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=0)
    assert (decoded - wrong).abs().max() > 1e-4  # the factor (0.5) really is applied
    # the pipeline's images are the decoded latents of the same draw, mapped from [-1, 1] to [0, 1]
    latent_out = call(pipe, output_type="latent").samples
    assert latent_out.shape == (2, 2, 8, 8)
    with torch.no_grad():
        images = (pipe.vae.decode(latent_out / 0.5).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(call(pipe, output_type="pt").samples, images)
    pil = call(pipe, output_type="pil").samples
    assert len(pil) == 2 and pil[0].size == (16, 16)
    assert call(pipe, output_type="np").samples.shape == (2, 16, 16, 3)


def test_vae_route_in_bfloat16():
    pipe = make_pipe("unet", vae=True)
    reference = call(pipe, output_type="np").samples
    pipe.to(torch.bfloat16)
    assert pipe.vae.dtype == torch.bfloat16
    out = call(pipe, output_type="np").samples
    assert np.isfinite(out).all() and np.abs(out - reference).mean() < 0.05


# ------------------------------------------------------------------------------------------------ load routes
def load_both_routes(folder, monkeypatch):
    """`VRFMPipeline.from_pretrained` and `DiffusionPipeline.from_pretrained(trust_remote_code=True)`, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    direct = VRFMPipeline.from_pretrained(folder)
    remote = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    for pipe in (direct, remote):
        pipe.set_progress_bar_config(disable=True)
    return direct, remote


@pytest.mark.parametrize(
    "kind, num_classes, vae", [("unet", None, False), ("unet", 3, False), ("dit", 3, False), ("unet", None, True)]
)
def test_save_and_load_exactly_through_both_routes(tmp_path, monkeypatch, kind, num_classes, vae):
    pipe = make_pipe(kind, num_classes=num_classes, vae=vae)
    labels = None if num_classes is None else [0, 2]
    guidance = 1.0 if num_classes is None else 2.0
    expected = call(pipe, class_labels=labels, guidance_scale=guidance)
    pipe.save_pretrained(tmp_path)
    for loaded in load_both_routes(tmp_path, monkeypatch):
        assert type(loaded) is VRFMPipeline
        assert set(loaded.components) == set(pipe.components)
        for name, component in pipe.components.items():
            other = loaded.components[name]
            assert type(other) is type(component)
            if isinstance(component, torch.nn.Module):
                state, other_state = component.state_dict(), other.state_dict()
                assert state.keys() == other_state.keys()
                assert all(torch.equal(state[key], other_state[key]) for key in state)
        got = call(loaded, class_labels=labels, guidance_scale=guidance)
        assert torch.equal(got.samples, expected.samples) and torch.equal(got.z, expected.z)


# ------------------------------------------------------------------------------------------------ z utilities
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_interpolate_z_walks_the_sample_between_two_latents(kind):
    pipe = make_pipe(kind)
    z_start, z_end = torch.randn(4, generator=generator(0)), torch.randn(4, generator=generator(1))
    path = pipe.interpolate_z(z_start, z_end, num_points=5)
    assert path.shape == (5, 4)
    torch.testing.assert_close(path[0], z_start)
    torch.testing.assert_close(path[-1], z_end)
    # slerp keeps the norm between the endpoints' (up to the arc's dip), unlike the linear mid-point
    low = min(z_start.norm(), z_end.norm()) * 0.7
    assert all(point.norm() > low for point in path)
    x0 = torch.randn(1, 3, 8, 8, generator=generator(2))
    walk = call(pipe, batch_size=5, latents=x0.repeat(5, 1, 1, 1), z=path, output_type="latent").samples
    start = call(pipe, batch_size=1, latents=x0, z=z_start[None], output_type="latent").samples
    torch.testing.assert_close(walk[:1], start, rtol=0, atol=1e-5)
    steps = (walk[1:] - walk[:-1]).flatten(1).norm(dim=1)
    assert (steps > 0).all()
    with pytest.raises(ValueError, match="num_points"):
        pipe.interpolate_z(z_start, z_end, num_points=1)


# ------------------------------------------------------------- checks from diffusers' PipelineTesterMixin
PIPELINE_CASES = [("unconditional", None), ("class_conditional", 3)]


@pytest.mark.parametrize("case, num_classes", PIPELINE_CASES)
def test_call_signature(case, num_classes):
    parameters = inspect.signature(VRFMPipeline.__call__).parameters
    for name in ("num_inference_steps", "generator", "latents", "output_type", "return_dict", "batch_size"):
        assert name in parameters, name
    if num_classes is not None:
        assert "class_labels" in parameters and "guidance_scale" in parameters


@pytest.mark.parametrize("case, num_classes", PIPELINE_CASES)
def test_components_keys_and_rebuild(case, num_classes):
    pipe = make_pipe("unet", num_classes=num_classes)
    # `reencode_z_at` is a setting, not a component (as diffusers sorts them)
    init_parameters = set(inspect.signature(VRFMPipeline.__init__).parameters) - {"self", "reencode_z_at"}
    assert set(pipe.components) == init_parameters == {
        "velocity_model",
        "scheduler",
        "posterior_encoder",
        "vae",
        "prior",
    }
    rebuilt = VRFMPipeline(**pipe.components)
    rebuilt.set_progress_bar_config(disable=True)
    labels = None if num_classes is None else [1, 0]
    assert torch.equal(call(rebuilt, class_labels=labels).samples, call(pipe, class_labels=labels).samples)


@pytest.mark.parametrize("case, num_classes", PIPELINE_CASES)
def test_dict_and_tuple_outputs_match(case, num_classes):
    pipe = make_pipe("unet", num_classes=num_classes)
    labels = None if num_classes is None else [2, 0]
    for output_type in ("pt", "np"):
        as_dict = call(pipe, class_labels=labels, output_type=output_type)
        as_tuple = call(pipe, class_labels=labels, output_type=output_type, return_dict=False)
        assert isinstance(as_tuple, tuple)
        np.testing.assert_array_equal(as_array(as_dict.samples), as_array(as_tuple[0]))
        assert torch.equal(as_dict.z, as_tuple[1])


@pytest.mark.parametrize("case, num_classes", PIPELINE_CASES)
def test_optional_components_stay_none_after_reload(tmp_path, monkeypatch, case, num_classes):
    pipe = make_pipe("unet", num_classes=num_classes, posterior=False)
    assert pipe.posterior_encoder is None and pipe.vae is None
    labels = None if num_classes is None else [0, 1]
    expected = call(pipe, class_labels=labels).samples
    pipe.save_pretrained(tmp_path)
    for loaded in load_both_routes(tmp_path, monkeypatch):
        assert loaded.posterior_encoder is None and loaded.vae is None
        assert torch.equal(call(loaded, class_labels=labels).samples, expected)


@pytest.mark.parametrize("case, num_classes", PIPELINE_CASES)
def test_to_device_and_progress_bar(capsys, case, num_classes):
    pipe = make_pipe("unet", num_classes=num_classes)
    pipe.to("cpu")
    assert all(
        module.device.type == "cpu" for module in pipe.components.values() if isinstance(module, torch.nn.Module)
    )
    pipe.set_progress_bar_config(disable=False)
    labels = None if num_classes is None else [0, 1]
    out = call(pipe, class_labels=labels, num_inference_steps=4)
    assert torch.isfinite(out.samples).all()
    assert "4/4" in capsys.readouterr().err


def test_plain_rectified_flow_image_pipeline_has_no_z(tmp_path):
    pipe = make_pipe("unet", latent_dim=0)
    out = call(pipe)
    assert out.z is None and out.samples.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="latent_dim=0"):
        call(pipe, z=torch.randn(2, 4))
