"""The SD3 wrapper, text conditioning of the conditional UNet, text encoding and VRFMTextToImagePipeline."""

import collections
import json

import pytest
import torch
from device_waits import DeviceWaits
from diffusers import (
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from text_to_image_helpers import (
    SD3_CONFIG,
    tiny_clip,
    tiny_sd3_transformer,
    tiny_stock_sd3_pipeline,
    tiny_t5,
    tiny_text_pipeline,
)

from diffusers_vrfm import (
    VRFMConvPosteriorEncoder,
    VRFMPipeline,
    VRFMScheduler,
    VRFMSD3Transformer2DModel,
    VRFMTextEncoders,
    VRFMTextToImagePipeline,
    VRFMUNet2DConditionModel,
    predicted_end_point,
)

torch.set_num_threads(1)


def _sd3_inputs(batch_size=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 4, 8, 8, generator=generator)
    context = torch.randn(batch_size, 5, SD3_CONFIG["joint_attention_dim"], generator=generator)
    pooled = torch.randn(batch_size, SD3_CONFIG["pooled_projection_dim"], generator=generator)
    return x, context, pooled, torch.rand(batch_size, generator=generator)


# ------------------------------------------------------------------------------------------------------ SD3 wrapper
def test_wrapped_sd3_transformer_is_bit_identical_to_the_stock_one_on_the_package_clock():
    backbone = tiny_sd3_transformer()
    model = VRFMSD3Transformer2DModel.from_backbone(backbone, latent_dim=6).eval()
    x, context, pooled, t = _sd3_inputs()
    with torch.no_grad():
        stock = backbone(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=(1 - t) * 1000).sample
        for z in (torch.randn(3, 6), 100 * torch.randn(3, 6)):
            velocity = model(x, t, z=z, encoder_hidden_states=context, pooled_projections=pooled).sample
            assert torch.equal(velocity, -stock)
    assert stock.abs().mean() > 0.1  # a real output, not zeros


def test_sd3_z_path_changes_the_output_once_trained_and_round_trips_through_save(tmp_path):
    model = VRFMSD3Transformer2DModel(**SD3_CONFIG, latent_dim=3).eval()
    torch.nn.init.normal_(model.z_embedding.linear_2.weight)
    x, context, pooled, t = _sd3_inputs(2)
    z_a, z_b = torch.randn(2, 3), torch.randn(2, 3)
    with torch.no_grad():
        out_a = model(x, t, z=z_a, encoder_hidden_states=context, pooled_projections=pooled).sample
        out_b = model(x, t, z=z_b, encoder_hidden_states=context, pooled_projections=pooled).sample
        assert (out_a - out_b).abs().max() > 1e-4
        model.save_pretrained(tmp_path)
        reloaded = VRFMSD3Transformer2DModel.from_pretrained(tmp_path).eval()
        again = reloaded(x, t, z=z_a, encoder_hidden_states=context, pooled_projections=pooled).sample
        assert torch.equal(again, out_a)
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())


def test_sd3_z_map_enters_with_the_latents_at_every_size_and_round_trips(tmp_path):
    model = VRFMSD3Transformer2DModel(**SD3_CONFIG, latent_dim=3, z_map_channels=2, z_map_stride=2).eval()
    assert model.transformer.config.in_channels == 6 and model.z_map.grid == (2, 4, 4)
    x, context, pooled, t = _sd3_inputs(2)
    text = {"encoder_hidden_states": context, "pooled_projections": pooled}
    z = torch.randn(2, 3)
    with torch.no_grad():
        assert torch.equal(model(x, t, z=z, **text).sample, model(x, t, z=-z, **text).sample)  # starts at zero
        torch.nn.init.normal_(model.z_map.linear.weight)  # the map alone carries z (the adaLN path stays at zero)
        first = model(x, t, z=z, **text).sample
        assert (first - model(x, t, z=-z, **text).sample).abs().max() > 1e-4
        small = torch.randn(2, 4, 4, 6)  # another size: the map is resized to it
        assert model(small, t, z=z).sample.shape == small.shape
        model.save_pretrained(tmp_path)
        reloaded = VRFMSD3Transformer2DModel.from_pretrained(tmp_path).eval()
        assert torch.equal(reloaded(x, t, z=z, **text).sample, first)


def test_sd3_wrapper_with_a_z_map_wraps_the_stock_transformer_exactly():
    backbone = tiny_sd3_transformer()
    model = VRFMSD3Transformer2DModel.from_backbone(backbone, latent_dim=3, z_map_channels=2).eval()
    weight = model.transformer.pos_embed.proj.weight
    assert torch.equal(weight[:, :4], backbone.pos_embed.proj.weight) and weight[:, 4:].abs().sum() > 0
    x, context, pooled, t = _sd3_inputs()
    with torch.no_grad():
        stock = backbone(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=(1 - t) * 1000).sample
        velocity = model(x, t, z=torch.randn(3, 3), encoder_hidden_states=context, pooled_projections=pooled).sample
    assert torch.equal(velocity, -stock)


def test_sd3_wrapper_runs_with_its_weights_offloaded():
    """Under accelerate's sequential offload the weights sit on the meta device: the sample goes where the hooks run
    the forward, as in the other wrappers, not to the weights' device."""
    from accelerate import cpu_offload

    model = VRFMSD3Transformer2DModel(**SD3_CONFIG, latent_dim=3).eval()
    torch.nn.init.normal_(model.z_embedding.linear_2.weight)
    x, context, pooled, t = _sd3_inputs(2)
    z = torch.randn(2, 3)
    with torch.no_grad():
        expected = model(x, t, z=z, encoder_hidden_states=context, pooled_projections=pooled).sample
        cpu_offload(model, execution_device=torch.device("cpu"))
        assert model.device.type == "meta"  # the weights really are offloaded
        offloaded = model(x, t, z=z, encoder_hidden_states=context, pooled_projections=pooled).sample
        without_text = model(x, t, z=z).sample
    torch.testing.assert_close(offloaded, expected)
    assert without_text.shape == x.shape and without_text.device.type == "cpu"


def test_sd3_wrapper_runs_without_text_and_at_other_sizes():
    model = VRFMSD3Transformer2DModel(**SD3_CONFIG, latent_dim=0).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 4, 8, 8), 0.3).sample.shape == (2, 4, 8, 8)
        assert model(torch.randn(1, 4, 4, 6), 0.3).sample.shape == (1, 4, 4, 6)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"encoder_hidden_states": torch.randn(2, 5, 7)}, r"`encoder_hidden_states` must have shape \(2, L, 16\)"),
        ({"encoder_hidden_states": torch.randn(3, 5, 16)}, r"`encoder_hidden_states` must have shape \(2, L, 16\)"),
        ({"pooled_projections": torch.randn(2, 5)}, r"`pooled_projections` must have shape \(2, 8\)"),
        ({"z": None}, "needs `z`"),
        ({"sample": torch.randn(2, 4, 7, 8)}, "multiples of `patch_size`"),
        ({"sample": torch.randn(2, 3, 8, 8)}, r"shape \(B, 4, H, W\)"),
        ({"timestep": 1.5}, r"must lie in \[0, 1\]"),
    ],
)
def test_sd3_wrapper_refuses_bad_input_by_name(change, message):
    model = VRFMSD3Transformer2DModel(**SD3_CONFIG, latent_dim=3)
    inputs = {"sample": torch.randn(2, 4, 8, 8), "timestep": 0.5, "z": torch.randn(2, 3)}
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_sd3_inner_transformer_cannot_be_called_directly_and_wrapping_checks_the_type():
    model = VRFMSD3Transformer2DModel(**SD3_CONFIG, latent_dim=3)
    x, context, pooled, t = _sd3_inputs(1)
    with pytest.raises(TypeError, match="call the wrapper"):
        model.transformer(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t)
    with pytest.raises(TypeError, match="SD3Transformer2DModel"):
        VRFMSD3Transformer2DModel.from_backbone(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------- conditional UNet text
def test_conditional_unet_reads_clip_context_and_equals_its_backbone():
    torch.manual_seed(0)
    backbone = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        layers_per_block=1, cross_attention_dim=8, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).eval()  # fmt: skip
    model = VRFMUNet2DConditionModel.from_backbone(backbone, latent_dim=3).eval()
    tokenizer, text_encoder = tiny_clip()
    context = VRFMTextEncoders(tokenizer, text_encoder).encode(["a handwritten seven", "a blurry two"]).prompt_embeds
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    with torch.no_grad():
        velocity = model(x, t, z=torch.randn(2, 3), encoder_hidden_states=context).sample
        assert torch.equal(velocity, backbone(x, t * 1000, context).sample)
        other = model(x, t, z=torch.randn(2, 3), encoder_hidden_states=context.flip(0)).sample
    assert (velocity - other).abs().max() > 1e-5  # the text matters
    assert model.context_dim == 8 and model.pooled_projection_dim is None
    with pytest.raises(ValueError, match=r"`encoder_hidden_states` must have shape \(2, L, 8\)"):
        model(x, t, z=torch.randn(2, 3), encoder_hidden_states=torch.randn(2, 4, 5))


# ------------------------------------------------------------------------------------------------------ text encoding
def test_text_encoders_follow_the_sd3_layout():
    (tok, clip), (tok_2, clip_2), (tok_3, t5) = tiny_clip(0), tiny_clip(1), tiny_t5()
    encoders = VRFMTextEncoders(tok, clip, tok_2, clip_2, tok_3, t5, max_sequence_length=6)
    out = encoders.encode(["a handwritten seven", "one"])
    assert out.prompt_embeds.shape == (2, 8 + 6, 16) and out.pooled_prompt_embeds.shape == (2, 8)
    clip_part = out.prompt_embeds[:, :8]
    assert torch.equal(clip_part[..., 16:], torch.zeros_like(clip_part[..., 16:]))  # (8 + 8) padded to T5's 16
    with torch.no_grad():
        pooled = clip(tok(["one"], padding="max_length", max_length=8, return_tensors="pt").input_ids).text_embeds
    assert torch.allclose(out.pooled_prompt_embeds[1, :4], pooled[0])
    assert not torch.allclose(out.prompt_embeds[0], out.prompt_embeds[1])


def test_text_encoders_refuse_bad_arguments():
    tokenizer, clip = tiny_clip()
    with pytest.raises(ValueError, match="`tokenizer_2` and `text_encoder_2` must be given together"):
        VRFMTextEncoders(tokenizer, clip, text_encoder_2=clip)
    with pytest.raises(ValueError, match="`context_dim` \\(4\\) must be at least the CLIP width \\(8\\)"):
        VRFMTextEncoders(tokenizer, clip, context_dim=4)
    with pytest.raises(TypeError, match="`prompt` must be a string or a non-empty list of strings"):
        VRFMTextEncoders(tokenizer, clip).encode([1, 2])


# ----------------------------------------------------------------------------------------------------------- pipeline
def test_pipeline_with_prompts_negative_prompts_and_guidance():
    pipe = tiny_text_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a handwritten seven", "a handwritten three"]
    common = {"num_inference_steps": 3, "num_images_per_prompt": 2, "output_type": "pt"}
    seeded = {"generator": torch.Generator().manual_seed(0)}
    out = pipe(prompts, negative_prompt="blurry", guidance_scale=3.0, **seeded, **common)
    assert out.images.shape == (4, 3, 16, 16) and out.z.shape == (4, 4) and out.num_function_evals == 3
    assert 0 <= out.images.min() and out.images.max() <= 1
    assert not torch.equal(out.z[0], out.z[1])  # one z per trajectory
    unguided = pipe(prompts, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **common)
    seeded = {"generator": torch.Generator().manual_seed(0)}
    other_negative = pipe(prompts, negative_prompt=["one", "two"], guidance_scale=3.0, **seeded, **common)
    assert (out.images - unguided.images).abs().max() > 1e-4
    assert (out.images - other_negative.images).abs().max() > 1e-4
    assert pipe.components.keys() >= {"text_encoder", "tokenizer", "velocity_model", "vae", "scheduler"}


def test_precomputed_embeddings_give_the_same_images_as_prompts():
    pipe = tiny_text_pipeline()
    pipe.set_progress_bar_config(disable=True)
    encoders = VRFMTextEncoders.from_pipeline(pipe)
    text, negative = encoders.encode(["a handwritten seven"]), encoders.encode([""])
    common = {"num_inference_steps": 2, "guidance_scale": 2.0, "output_type": "latent"}
    from_prompt = pipe("a handwritten seven", generator=torch.Generator().manual_seed(1), **common)
    from_embeds = pipe(
        prompt_embeds=text.prompt_embeds, pooled_prompt_embeds=text.pooled_prompt_embeds,
        negative_prompt_embeds=negative.prompt_embeds, negative_pooled_prompt_embeds=negative.pooled_prompt_embeds,
        generator=torch.Generator().manual_seed(1), **common,
    )  # fmt: skip
    assert torch.equal(from_prompt.images, from_embeds.images)


def test_batch_equals_its_items_with_a_list_of_generators():
    pipe = tiny_text_pipeline(with_vae=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a handwritten seven", "a blurry one"]
    batch = pipe(prompts, num_inference_steps=2, generator=[torch.Generator().manual_seed(i) for i in (7, 8)],
                 output_type="pt", guidance_scale=2.0)  # fmt: skip
    for index, (prompt, seed) in enumerate(zip(prompts, (7, 8))):
        single = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="pt",
                      guidance_scale=2.0)  # fmt: skip
        assert torch.allclose(batch.images[index], single.images[0], atol=1e-5)


def test_reencode_z_at_swaps_z_once_for_the_posterior_mean_of_the_guided_end_point():
    torch.manual_seed(6)
    encoder = VRFMConvPosteriorEncoder(sample_size=8, in_channels=4, latent_dim=4, block_out_channels=(8, 16))
    pipe = tiny_text_pipeline(posterior_encoder=encoder)
    torch.nn.init.normal_(pipe.velocity_model.z_embedding.linear_2.weight)  # trained: z changes the velocity
    seen, guided_velocity = [], pipe.guided_velocity

    def spy(sample, t, z, *args):
        velocity = guided_velocity(sample, t, z, *args)
        seen.append((sample.clone(), t, z.clone(), velocity.clone()))
        return velocity

    pipe.guided_velocity = spy
    plain = _latent_call(pipe, num_inference_steps=4)
    seen.clear()
    out = _latent_call(pipe, num_inference_steps=4, reencode_z_at=0.3)
    assert [float(t) for _, t, _, _ in seen] == pytest.approx([0, 0.25, 0.5, 0.75])
    assert torch.equal(out.z, plain.z) and out.num_function_evals == 4
    assert all(torch.equal(z, out.z) for _, _, z, _ in seen[:3])
    x_t, t, _, velocity = seen[2]
    x0, t_batch = _source_noise(x_t.shape), torch.full((2,), float(t))
    expected = encoder(x0=x0, x1=predicted_end_point(x_t, t_batch, velocity), x_t=x_t, t=t_batch).mean
    torch.testing.assert_close(seen[3][2], expected)
    assert not torch.allclose(out.images, plain.images)
    late = _latent_call(pipe, num_inference_steps=4, reencode_z_at=0.75)  # after the last evaluation: no change
    assert torch.equal(late.images, plain.images)
    with pytest.raises(ValueError, match="`reencode_z_at=0.5` .*no `posterior_encoder`"):
        _latent_call(tiny_text_pipeline(), num_inference_steps=2, reencode_z_at=0.5)


EMBEDS = {"prompt_embeds": torch.zeros(2, 8, 16), "pooled_prompt_embeds": torch.zeros(2, 4)}
BAD_CALLS = [
    ({"prompt": "a", "prompt_embeds": torch.zeros(1, 8, 16)}, "but got both"),
    ({}, "exactly one of `prompt` and `prompt_embeds`, but got neither"),
    ({"prompt": ["a", "one"], "negative_prompt": ["a", "b", "c"]}, "`negative_prompt` has 3 prompts, but there are 2"),
    ({"prompt": "a", "negative_prompt": "b", "negative_prompt_embeds": torch.zeros(1, 8, 16)}, "at most one of"),
    (
        {**EMBEDS, "negative_prompt_embeds": torch.zeros(3, 8, 16), "negative_pooled_prompt_embeds": torch.ones(3, 4)},
        "`negative_prompt_embeds` has batch size 3, but there are 2 prompts",
    ),
    ({**EMBEDS, "pooled_prompt_embeds": torch.zeros(3, 4)}, r"`pooled_prompt_embeds` must have shape \(2, 4\)"),
    ({"prompt_embeds": torch.zeros(2, 8, 16)}, "needs `pooled_prompt_embeds` too"),
    ({**EMBEDS, "prompt_embeds": torch.zeros(2, 8, 9)}, r"shape \(B, L, 16\)"),
    ({"prompt": 3}, "`prompt` must be a string or a non-empty list of strings, but got 3"),
    ({"prompt": "a", "height": 15}, "`height` must be a positive multiple of the VAE's scale factor"),
    ({"prompt": ["a", "b"], "generator": [torch.Generator()]}, "`generator` is a list of 1, but the batch size is 2"),
    ({"prompt": "a", "num_images_per_prompt": 0}, "`num_images_per_prompt` must be >= 1"),
    ({"prompt": "a", "latents": torch.zeros(2, 4, 8, 8)}, r"`latents` must have shape \(1, 4, 8, 8\)"),
    ({"prompt": "a", "output_type": "jpg"}, "`output_type` must be one of"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CALLS)
def test_pipeline_refuses_bad_input_by_name(kwargs, message):
    pipe = tiny_text_pipeline()
    with pytest.raises((ValueError, TypeError), match=message):
        pipe(num_inference_steps=1, **kwargs)


def test_pipeline_refuses_mismatched_components():
    tokenizer, clip = tiny_clip(projection_dim=5)
    velocity_model = VRFMSD3Transformer2DModel(**{**SD3_CONFIG, "pooled_projection_dim": 4}, latent_dim=2)
    from diffusers_vrfm import VRFMScheduler

    with pytest.raises(ValueError, match=r"pooled width \(5\) must equal `velocity_model.pooled_projection_dim`"):
        VRFMTextToImagePipeline(velocity_model, VRFMScheduler(), text_encoder=clip, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="text-conditioned VRFM model"):
        from diffusers_vrfm import VRFMMLPModel

        VRFMTextToImagePipeline(VRFMMLPModel(sample_size=2), VRFMScheduler(), text_encoder=clip, tokenizer=tokenizer)


# ------------------------------------------------------------------------------ the shared loop: schedulers, callbacks
def _latent_call(pipe, **kwargs):
    """A seeded guided call on two prompts that returns model-space latents."""
    pipe.set_progress_bar_config(disable=True)
    call = {"negative_prompt": "blurry", "guidance_scale": 3.0, "output_type": "latent"}
    return pipe(["a handwritten seven", "a blurry one"], generator=torch.Generator().manual_seed(0), **call, **kwargs)


def _source_noise(shape):
    """The source noise `_latent_call` draws first from its seeded generator."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def test_flow_match_euler_swapped_in_matches_vrfm_euler_on_the_same_grid():
    pipe = tiny_text_pipeline(with_vae=False)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    theirs = _latent_call(pipe, num_inference_steps=5)
    grid = (1 - pipe.scheduler.sigmas[:-1]).tolist()  # diffusers' grid on this package's clock
    pipe.scheduler = VRFMScheduler.from_config(pipe.scheduler.config)
    ours = _latent_call(pipe, timesteps=grid)
    assert theirs.num_function_evals == ours.num_function_evals == pipe.num_timesteps == 5
    assert torch.equal(theirs.z, ours.z)
    assert (theirs.images - ours.images).abs().max() < 1e-5
    assert (ours.images - _source_noise(ours.images.shape)).abs().mean() > 0.1  # it moved


FLOW_KWARGS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
DIFFUSERS_FLOW_SCHEDULERS = [
    (FlowMatchHeunDiscreteScheduler, {}, 2 * 6 - 1),  # two evaluations per step, one on the last
    (DPMSolverMultistepScheduler, FLOW_KWARGS, 6),
    (UniPCMultistepScheduler, FLOW_KWARGS, 6),
]


@pytest.mark.parametrize("scheduler_class, extra, num_evals", DIFFUSERS_FLOW_SCHEDULERS)
def test_each_diffusers_flow_scheduler_samples_text_to_image(scheduler_class, extra, num_evals):
    pipe = tiny_text_pipeline(with_vae=False)
    reference = _latent_call(pipe, num_inference_steps=6)  # VRFMScheduler's Euler
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **extra)
    calls = []
    pipe.velocity_model.register_forward_hook(lambda module, args, output: calls.append(1))
    out = _latent_call(pipe, num_inference_steps=6)
    assert out.num_function_evals == pipe.num_timesteps == len(calls) == num_evals
    assert torch.equal(out.z, reference.z) and torch.isfinite(out.images).all()
    # another solver of the same flow, in the same clock and sign: near Euler's end point, far from the start
    distance_travelled = (reference.images - _source_noise(out.images.shape)).abs().mean()
    assert (out.images - reference.images).abs().mean() < 0.2 * distance_travelled


def test_callback_changes_the_latents_and_sees_the_schedule():
    pipe = tiny_text_pipeline(with_vae=False)
    plain = _latent_call(pipe, num_inference_steps=3)
    seen = []

    def shift_last_step(pipe, step_index, t, callback_kwargs):
        seen.append((step_index, round(float(t), 4), pipe.guidance_scale))
        latents = callback_kwargs["latents"]
        return {"latents": latents + 1.0 if step_index == 2 else latents}

    shifted = _latent_call(pipe, num_inference_steps=3, callback_on_step_end=shift_last_step)
    assert seen == [(0, 0.0, 3.0), (1, 0.3333, 3.0), (2, 0.6667, 3.0)]
    assert torch.allclose(shifted.images, plain.images + 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="`callback_on_step_end_tensor_inputs` must be among \\['latents'\\]"):
        _latent_call(pipe, num_inference_steps=3, callback_on_step_end=shift_last_step,
                     callback_on_step_end_tensor_inputs=["prompt_embeds"])  # fmt: skip


def test_interrupt_skips_the_remaining_steps():
    pipe = tiny_text_pipeline(with_vae=False)
    after_first_step = []

    def stop(pipe, step_index, t, callback_kwargs):
        after_first_step.append(callback_kwargs["latents"].clone())
        pipe._interrupt = True
        return callback_kwargs

    calls = []
    pipe.velocity_model.register_forward_hook(lambda module, args, output: calls.append(1))
    out = _latent_call(pipe, num_inference_steps=4, callback_on_step_end=stop)
    assert len(calls) == len(after_first_step) == 1 and pipe.interrupt
    assert torch.equal(out.images, after_first_step[0])
    _latent_call(pipe, num_inference_steps=2)  # the next call starts afresh
    assert not pipe.interrupt and len(calls) == 3


def test_steps_default_to_28_and_a_custom_grid_refuses_an_explicit_step_count():
    pipe = tiny_text_pipeline(with_vae=False)
    assert _latent_call(pipe).num_function_evals == pipe.num_timesteps == 28
    assert _latent_call(pipe, timesteps=[0.0, 0.5]).num_function_evals == 2
    with pytest.raises(ValueError, match="Pass either `num_inference_steps` \\(28\\) or `timesteps`, not both"):
        _latent_call(pipe, num_inference_steps=28, timesteps=[0.0, 0.5])
    with pytest.raises(TypeError, match="`num_inference_steps` must be an int, but got 2.5"):
        _latent_call(pipe, num_inference_steps=2.5)


def test_a_pipeline_with_a_diffusers_scheduler_saves_loads_and_carries_over_with_from_pipe(tmp_path):
    pipe = tiny_text_pipeline(with_vae=False)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, **FLOW_KWARGS)
    expected = _latent_call(pipe, num_inference_steps=3).images
    pipe.save_pretrained(tmp_path)
    reloaded = VRFMTextToImagePipeline.from_pretrained(tmp_path)
    assert type(reloaded.scheduler).__name__ == "UniPCMultistepScheduler"
    assert torch.equal(_latent_call(reloaded, num_inference_steps=3).images, expected)
    carried = VRFMTextToImagePipeline.from_pipe(pipe)
    assert carried.velocity_model is pipe.velocity_model and carried.text_encoder is pipe.text_encoder
    assert torch.equal(_latent_call(carried, num_inference_steps=3).images, expected)


# ---------------------------------------------------------------------------------------------------- save and load
def test_save_and_load_both_ways(tmp_path):
    pipe = tiny_text_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "VRFMTextToImagePipeline"]
    assert index["velocity_model"] == ["vrfmsd3transformer2dmodel", "VRFMSD3Transformer2DModel"]
    assert index["text_encoder"][0] == "transformers" and index["text_encoder_3"] == [None, None]
    assert not list(tmp_path.rglob("*.bin"))

    def sample(p):
        p.set_progress_bar_config(disable=True)
        return p(["a handwritten seven"], negative_prompt="blurry", guidance_scale=2.0, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(3), output_type="pt").images  # fmt: skip

    expected = sample(pipe)
    reloaded = VRFMTextToImagePipeline.from_pretrained(tmp_path)
    assert reloaded.text_encoder_2 is None and reloaded.posterior_encoder is None
    assert torch.equal(sample(reloaded), expected)
    remote = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(remote).__name__ == "VRFMTextToImagePipeline"
    assert torch.equal(sample(remote), expected)
    with pytest.raises(ValueError, match="`_class_name` must be one of \\('VRFMPipeline',\\)"):
        VRFMPipeline.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------------ SD3 conversion
def test_converted_stock_sd3_pipeline_samples_what_the_stock_pipeline_samples(tmp_path):
    stock = tiny_stock_sd3_pipeline()
    stock.set_progress_bar_config(disable=True)
    stock.save_pretrained(tmp_path)
    pipe = VRFMTextToImagePipeline.from_stable_diffusion_3(str(tmp_path), latent_dim=5)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.shift == 3.0 and pipe.velocity_model.latent_dim == 5
    assert pipe.config._base_model == str(tmp_path)

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    call = {"negative_prompt": "blurry", "guidance_scale": 4.0, "max_sequence_length": 6, "output_type": "latent"}
    prompts = ["a handwritten seven", "a blurry one"]
    expected = stock(prompts, latents=latents, num_inference_steps=4, **call).images
    stock.scheduler.set_timesteps(4)
    grid = (1 - stock.scheduler.sigmas[:-1]).tolist()  # the stock grid, on this package's clock
    converted = pipe(prompts, latents=latents, timesteps=grid, generator=torch.Generator().manual_seed(1), **call)
    assert torch.allclose(converted.images, expected, atol=1e-5)
    assert (converted.images - latents).abs().mean() > 0.1  # it moved
    with pytest.raises(TypeError, match="StableDiffusion3Pipeline"):
        VRFMTextToImagePipeline.from_stable_diffusion_3(pipe)


def test_pipeline_with_a_text_conditioned_unet():
    tokenizer, text_encoder = tiny_clip()
    unet = VRFMUNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, latent_dim=2, block_out_channels=(8, 16), norm_num_groups=4,
        layers_per_block=1, cross_attention_dim=8, attention_head_dim=4,
    )  # fmt: skip
    from diffusers_vrfm import VRFMScheduler

    pipe = VRFMTextToImagePipeline(unet, VRFMScheduler(), text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    context = VRFMTextEncoders.from_pipeline(pipe).encode(["a handwritten seven"]).prompt_embeds
    out = pipe(prompt_embeds=context, negative_prompt="blurry", guidance_scale=2.0, num_inference_steps=2,
               output_type="np")  # fmt: skip
    assert out.images.shape == (1, 8, 8, 3)
    with pytest.raises(ValueError, match=r"`prompt_embeds` must have shape \(B, L, 8\)"):
        pipe(prompt_embeds=torch.zeros(1, 8, 16), num_inference_steps=1)


# ------------------------------------------------------------------------------------------------------- likelihood
def _likelihood_inputs(pipe, batch_size=2):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *pipe.velocity_model.sample_shape, generator=generator)
    z = torch.randn(batch_size, pipe.velocity_model.latent_dim, generator=generator)
    return x, z


def _ode(seed=0):  # a few Hutchinson steps on continuous data
    return {"num_inference_steps": 2, "divergence": "hutchinson", "generator": torch.Generator().manual_seed(seed)}


def test_log_likelihood_reads_each_examples_prompt():
    from diffusers_vrfm import log_likelihood

    pipe = tiny_text_pipeline(with_vae=False)
    x, z = _likelihood_inputs(pipe)
    prompts = ["a handwritten seven", "a handwritten three"]
    out = pipe.log_likelihood(x, prompt=prompts, z=z, **_ode())
    assert out.log_prob.shape == (2,) and torch.isfinite(out.log_prob).all()
    assert out.bits_per_dim.shape == (2,), "pixel space (no VAE): bits per dimension of dequantised images"
    text = VRFMTextEncoders.from_pipeline(pipe).encode(prompts)
    core = log_likelihood(pipe.velocity_model, x, z=z, model_kwargs=pipe.text_inputs(text), **_ode())
    assert torch.equal(out.log_prob, core.log_prob), "the core integrator with the prompts' text inputs"
    exact = {"num_inference_steps": 2, "divergence": "exact", "dequantize_input": False}  # no randomness: each example
    # is integrated on its own, with its own prompt
    both = pipe.log_likelihood(x, prompt=prompts, z=z, **exact)
    assert torch.allclose(pipe.log_likelihood(x[1:], prompt=prompts[1], z=z[1:], **exact).log_prob, both.log_prob[1:])
    other = pipe.log_likelihood(x, prompt=["a handwritten one", "a handwritten zero"], z=z, **_ode())
    assert (other.log_prob - out.log_prob).abs().min() > 1e-6, "another prompt, another density"
    one_prompt = pipe.log_likelihood(x, prompt="a handwritten seven", z=z, **_ode())
    twice = pipe.log_likelihood(x, prompt=[prompts[0]] * 2, z=z, **_ode())
    assert torch.allclose(one_prompt.log_prob, twice.log_prob), "one prompt serves every example"
    embeds = pipe.log_likelihood(
        x, prompt_embeds=text.prompt_embeds, pooled_prompt_embeds=text.pooled_prompt_embeds, z=z, **_ode()
    )
    assert torch.equal(embeds.log_prob, out.log_prob)


def test_log_likelihood_with_a_vae_and_a_conditional_prior(monkeypatch):
    from diffusers_vrfm import VRFMFlowPrior

    pipe = tiny_text_pipeline(prior=VRFMFlowPrior(latent_dim=4, num_layers=2, hidden_dim=8, condition_dim=4))
    x, _ = _likelihood_inputs(pipe)  # VAE latents
    asked = []
    original = VRFMFlowPrior.forward

    def recording_forward(prior, *args, **kwargs):
        asked.append(kwargs.get("condition"))
        return original(prior, *args, **kwargs)

    monkeypatch.setattr(VRFMFlowPrior, "forward", recording_forward)
    out = pipe.log_likelihood(x, prompt=["a handwritten seven", "a handwritten three"], num_z_samples=3, **_ode())
    assert out.log_prob.shape == (2,) and out.z.shape == (3, 2, 4) and out.bits_per_dim is None
    pooled = VRFMTextEncoders.from_pipeline(pipe).encode(["a handwritten seven", "a handwritten three"])
    (condition,) = asked
    assert torch.equal(condition, pooled.pooled_prompt_embeds.repeat(3, 1)), "z ~ p(z | prompt), for every draw"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"prompt": ["one", "two", "three"]}, ValueError, r"one per example \(2\), but got 3 prompts"),
        ({}, ValueError, "Pass exactly one of `prompt` and `prompt_embeds`"),
        ({"prompt": "one", "x": torch.zeros(2, 3, 4, 4)}, ValueError, r"`x` must have shape \(B, 3, 8, 8\)"),
    ],
)
def test_log_likelihood_refuses_bad_text_input_by_name(kwargs, error, message):
    pipe = tiny_text_pipeline(with_vae=False)
    x, z = _likelihood_inputs(pipe)
    kwargs = {"x": x, **kwargs}  # a case may replace `x`
    with pytest.raises(error, match=message):
        pipe.log_likelihood(z=z, **kwargs, **_ode())


def test_a_text_to_image_sampling_step_makes_the_host_wait_for_nothing():
    pipe = tiny_text_pipeline()
    pipe.set_progress_bar_config(disable=True)
    per_call = {}
    for steps in (2, 6):
        waits = []
        with DeviceWaits(waits, {"on": True}):
            pipe(prompt=["a cat", "a dog"], num_inference_steps=steps, guidance_scale=2.0, output_type="pt")
        per_call[steps] = collections.Counter(waits)
    assert per_call[2] == per_call[6], per_call  # the prompt's encoding and the call's checks, nothing per step
