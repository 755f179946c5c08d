"""Image velocity models (UNet, conditional UNet, DiT wrappers) and the convolutional posterior encoder."""

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

from diffusers_vrfm import (
    LatentMap,
    VRFMConvPosteriorEncoder,
    VRFMDiTTransformer2DModel,
    VRFMUNet2DConditionModel,
    VRFMUNet2DModel,
    interpolate,
    target_velocity,
    vrfm_loss,
)

UNET_BLOCKS = {
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (8, 16),
    "norm_num_groups": 4,
    "layers_per_block": 1,
    "attention_head_dim": 4,
}
COND_UNET_BLOCKS = {
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "block_out_channels": (8, 16),
    "norm_num_groups": 4,
    "layers_per_block": 1,
}
COND_UNET_XATTN_BLOCKS = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (8, 16),
    "norm_num_groups": 4,
    "layers_per_block": 1,
    "cross_attention_dim": 8,
    "attention_head_dim": 4,
}
DIT_BLOCKS = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2}


def tiny_unet(**kwargs):
    config = {"sample_size": 8, "in_channels": 3, "out_channels": 3, "latent_dim": 4, **UNET_BLOCKS}
    config.update(kwargs)
    return VRFMUNet2DModel(**config)


def tiny_cond_unet(**kwargs):
    config = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "latent_dim": 4, **COND_UNET_BLOCKS}
    config.update(kwargs)
    return VRFMUNet2DConditionModel(**config)


def tiny_dit(**kwargs):
    config = {"sample_size": 8, "in_channels": 3, "latent_dim": 4, **DIT_BLOCKS}
    config.update(kwargs)
    return VRFMDiTTransformer2DModel(**config)


def tiny_posterior(**kwargs):
    config = {"sample_size": 8, "in_channels": 3, "latent_dim": 4, "block_out_channels": (8, 16), "hidden_dim": 32}
    config.update(kwargs)
    return VRFMConvPosteriorEncoder(**config)


def wake_zero_params(model, seed=0, std=0.3):
    """Gives every all-zero parameter (the zero-initialised z and class paths) random values, in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim > 0 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model.eval()


def public_config(model):
    """The config as saved to JSON, without the bookkeeping keys (`_name_or_path`, `_diffusers_version`, ...)."""
    return {key: value for key, value in json.loads(model.to_json_string()).items() if not key.startswith("_")}


def inputs(model, batch_size=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *model.sample_shape, generator=generator)
    t = torch.rand(batch_size, generator=generator)
    z = torch.randn(batch_size, model.latent_dim, generator=generator) if model.latent_dim else None
    return x, t, z


FACTORIES = {"unet": tiny_unet, "cond_unet": tiny_cond_unet, "dit": tiny_dit}


# ------------------------------------------------------------------------------------------------------ all wrappers
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_output_shape_properties_and_z_dependence(name):
    model = FACTORIES[name]()
    assert model.latent_dim == 4 and model.num_classes is None
    x, t, z = inputs(model)
    assert model.sample_shape == tuple(x.shape[1:])
    at_init = model(x, t, z=z).sample
    assert at_init.shape == x.shape
    # zero-initialised z path: z has no effect at first
    assert torch.equal(at_init, model(x, t, z=torch.randn_like(z)).sample)
    wake_zero_params(model)
    first = model(x, t, z=z).sample
    second = model(x, t, z=z + 1.0).sample
    assert (first - second).abs().max() > 1e-4
    # per-example: changing z of example 0 leaves the others unchanged
    z_changed = z.clone()
    z_changed[0] += 1.0
    changed = model(x, t, z=z_changed).sample
    assert not torch.allclose(changed[0], first[0])
    torch.testing.assert_close(changed[1:], first[1:], rtol=0, atol=1e-6)
    # dict and tuple outputs agree
    assert torch.equal(model(x, t, z=z, return_dict=False)[0], first)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_class_conditioning_and_null_label(name):
    model = wake_zero_params(FACTORIES[name](num_classes=3))
    assert model.num_classes == 3
    x, t, z = inputs(model)
    outputs = [model(x, t, z=z, class_labels=torch.full((3,), label)).sample for label in range(4)]
    for label in range(1, 4):
        assert (outputs[0] - outputs[label]).abs().max() > 1e-4
    # no labels means the null label (index num_classes)
    assert torch.equal(model(x, t, z=z).sample, outputs[3])
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t, z=z, class_labels=torch.full((3,), 4))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_latent_dim_zero_is_plain_rectified_flow(name):
    model = FACTORIES[name](latent_dim=0)
    assert model.latent_dim == 0
    if name == "cond_unet":
        assert model.unet.class_embedding is None
    else:
        assert model.z_embedding is None
    if name == "unet":
        assert model.unet.class_embedding is None and model.unet.config.class_embed_type is None
    assert not any("z_embedding" in key for key in model.state_dict())
    x, t, _ = inputs(model)
    assert model(x, t).sample.shape == x.shape
    with pytest.raises(ValueError, match="latent_dim=0"):
        model(x, t, z=torch.randn(3, 4))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_inputs_are_validated(name):
    model = FACTORIES[name]()
    x, t, z = inputs(model)
    with pytest.raises(ValueError, match="needs `z`"):
        model(x, t)
    with pytest.raises(ValueError, match="`z` must have shape"):
        model(x, t, z=torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(x, t * 1000, z=z)
    with pytest.raises(ValueError, match="`sample` must have shape"):
        model(x[:, :1], t, z=z)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, z=z, class_labels=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_inner_backbone_sees_t_times_timestep_scale(name):
    model = FACTORIES[name](latent_dim=0, timestep_scale=250.0).eval()
    inner = {"unet": "unet", "cond_unet": "unet", "dit": "transformer"}[name]
    seen = {}

    def record(module, args, kwargs):
        seen["t"] = args[1] if len(args) > 1 else kwargs["timestep"]

    hook = getattr(model, inner).register_forward_pre_hook(record, with_kwargs=True)
    x, t, _ = inputs(model)
    model(x, t)
    hook.remove()
    torch.testing.assert_close(seen["t"], t * 250.0)


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("num_classes", [None, 2])
def test_save_and_load_exactly(tmp_path, name, num_classes):
    model = wake_zero_params(FACTORIES[name](num_classes=num_classes))
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert public_config(loaded) == public_config(model)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[key], loaded_state[key]) for key in state)
    x, t, z = inputs(model)
    labels = None if num_classes is None else torch.tensor([0, 1, 2])
    assert torch.equal(model(x, t, z=z, class_labels=labels).sample, loaded(x, t, z=z, class_labels=labels).sample)
    # the config alone rebuilds the same architecture
    rebuilt = type(model).from_config(model.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in state.items()}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_gradient_checkpointing_gives_the_same_gradients(name):
    model = wake_zero_params(FACTORIES[name]())
    x, t, z = inputs(model)
    model(x, t, z=z).sample.square().mean().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model.train()
    model(x, t, z=z).sample.square().mean().backward()
    for key, grad in reference.items():
        torch.testing.assert_close(dict(model.named_parameters())[key].grad, grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------- UNet
def test_unet_wraps_a_pretrained_backbone_exactly(tmp_path):
    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=3, out_channels=3, **UNET_BLOCKS).save_pretrained(tmp_path)
    backbone = UNet2DModel.from_pretrained(tmp_path)
    for latent_dim, num_classes in [(4, None), (4, 5), (0, None)]:
        model = VRFMUNet2DModel.from_backbone(backbone, latent_dim=latent_dim, num_classes=num_classes)
        backbone_state = backbone.state_dict()
        assert all(torch.equal(model.unet.state_dict()[key], value) for key, value in backbone_state.items())
        x, t, z = inputs(model)
        labels = None if num_classes is None else torch.tensor([0, 4, 5])
        with torch.no_grad():
            expected = backbone(x, t * 1000).sample
            assert torch.equal(model(x, t, z=z, class_labels=labels).sample, expected)
            if latent_dim:
                assert torch.equal(model(x, t, z=3 * torch.randn_like(z), class_labels=labels).sample, expected)


def test_unet_refuses_bad_backbones_and_configs():
    with pytest.raises(ValueError, match="own class path"):
        VRFMUNet2DModel.from_backbone(UNet2DModel(sample_size=8, num_class_embeds=3, **UNET_BLOCKS))
    with pytest.raises(TypeError, match="UNet2DModel"):
        VRFMUNet2DModel.from_backbone(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="out_channels"):
        tiny_unet(out_channels=6)
    with pytest.raises(ValueError, match="time_embedding_type"):
        tiny_unet(time_embedding_type="fourier")
    with pytest.raises(ValueError, match="num_classes"):
        tiny_unet(num_classes=0)
    with pytest.raises(ValueError, match="timestep_scale"):
        tiny_unet(timestep_scale=0)


def test_unet_rectangular_sample_size():
    model = tiny_unet(sample_size=(8, 16))
    assert model.sample_shape == (3, 8, 16)
    x, t, z = inputs(model, batch_size=2)
    assert model(x, t, z=z).sample.shape == (2, 3, 8, 16)


def test_latent_map_is_a_zero_started_grid_resized_to_the_image():
    latent_map = LatentMap(latent_dim=3, channels=2, size=(8, 12), stride=4)
    z = torch.randn(5, 3)
    assert latent_map.grid == (2, 2, 3)
    assert torch.equal(latent_map(z), torch.zeros(5, 2, 8, 12))
    wake_zero_params(latent_map)
    grid = latent_map.linear(z).view(5, 2, 2, 3)
    out = latent_map(z)
    assert out.shape == (5, 2, 8, 12)
    # nearest resize: each grid cell fills a 4 x 4 block
    assert torch.equal(out, grid.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3))
    # stride 1 is the grid itself; a stride that does not divide the size rounds the grid up
    assert LatentMap(3, 2, (8, 12), 1).grid == (2, 8, 12)
    assert LatentMap(3, 2, (9, 12), 4)(z).shape == (5, 2, 9, 12)


# name -> (the wrapper's inner backbone, that backbone's input layer, which reads the map's channels)
Z_MAP_INNER = {
    "unet": (lambda model: model.unet, lambda backbone: backbone.conv_in),
    "cond_unet": (lambda model: model.unet, lambda backbone: backbone.conv_in),
    "dit": (lambda model: model.transformer, lambda backbone: backbone.pos_embed.proj),
}


@pytest.mark.parametrize("name", sorted(Z_MAP_INNER))
def test_z_map_feeds_z_as_extra_input_channels(tmp_path, name):
    model = FACTORIES[name](z_map_channels=2, z_map_stride=2)
    inner, _ = Z_MAP_INNER[name]
    channels = model.sample_shape[0]
    assert inner(model).config.in_channels == channels + 2 and model.sample_shape == (channels, 8, 8)
    x, t, z = inputs(model)
    assert torch.equal(model(x, t, z=z).sample, model(x, t, z=torch.randn_like(z)).sample)  # both paths start at 0
    wake_zero_params(model.z_map)  # the map alone (the adaLN or time-embedding path stays at zero) carries z
    first = model(x, t, z=z).sample
    assert (first - model(x, t, z=z + 1.0).sample).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    seen = {}
    hook = inner(model).register_forward_pre_hook(lambda module, args: seen.update(sample=args[0]))
    model(x, t, z=z)
    hook.remove()
    assert torch.equal(seen["sample"], torch.cat([x, model.z_map(z)], dim=1))
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert public_config(loaded)["z_map_channels"] == 2 and public_config(loaded)["z_map_stride"] == 2
    assert torch.equal(loaded(x, t, z=z).sample, first)


Z_MAP_BACKBONES = {  # name -> (the stock backbone, how the wrapped model is compared with it)
    "unet": (
        lambda: UNet2DModel(sample_size=8, in_channels=3, out_channels=3, **UNET_BLOCKS),
        lambda backbone, x, t: backbone(x, t * 1000).sample,
    ),
    "cond_unet": (
        lambda: UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, **COND_UNET_BLOCKS),
        lambda backbone, x, t: backbone(x, t * 1000, torch.zeros(x.shape[0], 0, 1280)).sample,
    ),
    "dit": (  # unconditional: the wrapper keeps the backbone's null-label row
        lambda: DiTTransformer2DModel(sample_size=8, in_channels=3, num_embeds_ada_norm=10, **DIT_BLOCKS),
        lambda backbone, x, t: backbone(x, t * 1000, torch.full((x.shape[0],), 10)).sample,
    ),
}


@pytest.mark.parametrize("name", sorted(Z_MAP_BACKBONES))
def test_a_wrapper_with_a_z_map_wraps_a_pretrained_backbone_exactly(name):
    torch.manual_seed(0)
    make_backbone, stock_velocity = Z_MAP_BACKBONES[name]
    backbone = make_backbone().eval()
    model = FACTORIES[name](latent_dim=4).from_backbone(backbone, latent_dim=4, z_map_channels=2, z_map_stride=4)
    model.eval()
    inner, input_layer = Z_MAP_INNER[name]
    weight, stock_weight = input_layer(inner(model)).weight, input_layer(backbone).weight
    channels = stock_weight.shape[1]
    assert weight.shape[1] == channels + 2 and torch.equal(weight[:, :channels], stock_weight)
    assert weight[:, channels:].abs().sum() > 0  # the map's channels can learn from the first step
    # every other weight is the backbone's (the DiT keeps only the null-label row of its label tables)
    wrapped = inner(model).state_dict()
    others = [key for key, value in backbone.state_dict().items() if value.data_ptr() != stock_weight.data_ptr()]
    kept = [key for key in others if key in wrapped and wrapped[key].shape == backbone.state_dict()[key].shape]
    assert all("class_embedder" in key for key in set(others) - set(kept))
    assert all(torch.equal(wrapped[key], backbone.state_dict()[key]) for key in kept)
    x, t, z = inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, z=z).sample, stock_velocity(backbone, x, t))


@pytest.mark.parametrize("name", sorted(Z_MAP_INNER))
def test_z_map_refuses_bad_settings(name):
    factory = FACTORIES[name]
    with pytest.raises(ValueError, match=r"`z_map_channels` must be an integer >= 0, but got -1"):
        factory(z_map_channels=-1)
    with pytest.raises(ValueError, match=r"`z_map_stride` must be an integer >= 1, but got 0"):
        factory(z_map_channels=2, z_map_stride=0)
    with pytest.raises(ValueError, match=r"`z_map_channels` \(2\) needs a `z`, but `latent_dim` is 0"):
        factory(latent_dim=0, z_map_channels=2)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_train_vrfm_gives_a_from_scratch_vrfm_model_a_z_map_by_default(backbone):
    from diffusers_vrfm.training.factory import build_models

    def built(shape, latent_dim=4, **config):
        model_config = {**(UNET_BLOCKS if backbone == "unet" else DIT_BLOCKS), **config}
        return build_models(backbone, shape, latent_dim, ("x1",), model_config=model_config).velocity_model

    assert built((1, 8, 8)).z_map.grid == (4, 8, 8)  # 4 channels, stride 1 up to 32x32
    assert built((3, 80, 80)).z_map.grid == (4, 27, 27)  # the stride grows with the image: at most 32 a side
    assert built((1, 8, 8), z_map_stride=4).z_map.grid == (4, 2, 2)  # a key of --model_config wins
    assert built((1, 8, 8), z_map_channels=0).z_map is None
    assert built((1, 8, 8), latent_dim=0).z_map is None  # rectified flow has no z


# ------------------------------------------------------------------------------------------- conditional UNet
def test_conditional_unet_without_cross_attention_uses_the_projection_path():
    model = tiny_cond_unet(num_classes=3)
    assert not model.has_cross_attention
    assert model.unet.config.class_embed_type == "projection"
    assert model.unet.config.projection_class_embeddings_input_dim == 4 + 3 + 1
    assert not model.unet.class_embedding.linear_2.weight.any()


def test_conditional_unet_with_cross_attention_reads_the_context():
    model = wake_zero_params(tiny_cond_unet(**COND_UNET_XATTN_BLOCKS))
    assert model.has_cross_attention
    x, t, z = inputs(model)
    default = model(x, t, z=z).sample
    # the default is one all-zero context token
    assert torch.equal(default, model(x, t, z=z, encoder_hidden_states=torch.zeros(3, 1, 8)).sample)
    context = torch.randn(3, 5, 8)
    assert (model(x, t, z=z, encoder_hidden_states=context).sample - default).abs().max() > 1e-5


@pytest.mark.parametrize("blocks", [COND_UNET_BLOCKS, COND_UNET_XATTN_BLOCKS], ids=["no_xattn", "xattn"])
def test_conditional_unet_wraps_a_pretrained_backbone_exactly(tmp_path, blocks):
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, **blocks).save_pretrained(tmp_path)
    backbone = UNet2DConditionModel.from_pretrained(tmp_path)
    model = VRFMUNet2DConditionModel.from_backbone(backbone, latent_dim=4, num_classes=2)
    x, t, z = inputs(model)
    width = backbone.config.cross_attention_dim
    context = torch.randn(3, 2, width) if model.has_cross_attention else torch.zeros(3, 0, width)
    with torch.no_grad():
        expected = backbone(x, t * 1000, encoder_hidden_states=context).sample
        got = model(x, t, z=z, class_labels=torch.tensor([0, 1, 2]), encoder_hidden_states=context).sample
    assert torch.equal(got, expected)


def test_conditional_unet_carries_extra_backbone_settings(tmp_path):
    backbone = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, resnet_skip_time_act=True, **COND_UNET_BLOCKS
    )
    model = VRFMUNet2DConditionModel.from_backbone(backbone, latent_dim=2)
    assert model.config.extra_unet_config == {"resnet_skip_time_act": True}
    model.save_pretrained(tmp_path)
    assert VRFMUNet2DConditionModel.from_pretrained(tmp_path).unet.config.resnet_skip_time_act is True
    with pytest.raises(ValueError, match="extra_unet_config"):
        tiny_cond_unet(extra_unet_config={"class_embed_type": "timestep"})


# ----------------------------------------------------------------------------------------------------------- DiT
def test_dit_has_no_label_dropout_in_train_mode():
    model = wake_zero_params(tiny_dit(num_classes=3))
    x, t, z = inputs(model, batch_size=64)
    labels = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))
    model.train()
    train_outputs = [model(x, t, z=z, class_labels=labels).sample for _ in range(3)]
    model.eval()
    eval_output = model(x, t, z=z, class_labels=labels).sample
    for output in train_outputs:
        assert torch.equal(output, eval_output)
    # the stock DiT does drop labels in train mode (p=0.1): 64 draws x 3 calls would all survive with p=1.6e-9
    stock = DiTTransformer2DModel(sample_size=8, in_channels=3, num_embeds_ada_norm=3, **DIT_BLOCKS).train()
    stock_eval = stock.eval()(x, t * 1000, labels).sample
    stock.train()
    assert any(not torch.equal(stock(x, t * 1000, labels).sample, stock_eval) for _ in range(3))


@pytest.mark.parametrize("num_classes", [10, None])
def test_dit_wraps_a_pretrained_backbone_exactly(tmp_path, num_classes):
    torch.manual_seed(0)
    DiTTransformer2DModel(sample_size=8, in_channels=3, num_embeds_ada_norm=10, **DIT_BLOCKS).save_pretrained(tmp_path)
    backbone = DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    model = VRFMDiTTransformer2DModel.from_backbone(backbone, latent_dim=4, num_classes=num_classes)
    x, t, z = inputs(model)
    labels = torch.tensor([0, 9, 10]) if num_classes else torch.full((3,), 10)
    with torch.no_grad():
        expected = backbone(x, t * 1000, labels).sample
        given = labels if num_classes else None
        assert torch.equal(model(x, t, z=z, class_labels=given).sample, expected)
        assert torch.equal(model(x, t, z=-z, class_labels=given).sample, expected)


def test_dit_refuses_bad_backbones_and_configs():
    backbone = DiTTransformer2DModel(sample_size=8, in_channels=3, num_embeds_ada_norm=10, **DIT_BLOCKS)
    with pytest.raises(ValueError, match="num_embeds_ada_norm"):
        VRFMDiTTransformer2DModel.from_backbone(backbone, num_classes=5)
    learned_sigma = DiTTransformer2DModel(sample_size=8, in_channels=3, out_channels=6, **DIT_BLOCKS)
    with pytest.raises(ValueError, match="out_channels"):
        VRFMDiTTransformer2DModel.from_backbone(learned_sigma)
    with pytest.raises(ValueError, match="patch_size"):
        tiny_dit(sample_size=7)
    with pytest.raises(TypeError, match="call the wrapper"):
        model = tiny_dit()
        x, t, _ = inputs(model)
        model.transformer(x, t * 1000, torch.zeros(3, dtype=torch.long))


# ------------------------------------------------------------------------------------------ posterior encoder
def test_conv_posterior_defaults_outputs_and_kl():
    encoder = VRFMConvPosteriorEncoder(sample_size=8, in_channels=3, latent_dim=4, block_out_channels=(8, 16))
    assert encoder.posterior_inputs == ("x1", "t")
    assert encoder.sample_shape == (3, 8, 8) and encoder.latent_dim == 4
    x1, t = torch.randn(5, 3, 8, 8), torch.rand(5)
    out = encoder(x1=x1, t=t, generator=torch.Generator().manual_seed(0))
    assert out.mean.shape == out.logvar.shape == out.sample.shape == (5, 4)
    expected_kl = 0.5 * (out.mean.pow(2) + out.logvar.exp() - out.logvar - 1).sum(-1)
    torch.testing.assert_close(out.kl, expected_kl)
    # reads t: a different time gives a different posterior
    assert (encoder(x1=x1, t=1 - t).mean - out.mean).abs().max() > 1e-6
    with pytest.raises(ValueError, match="`x1` is required"):
        encoder(x0=x1, t=t)
    with pytest.raises(ValueError, match="`t` is required"):
        encoder(x1=x1)


@pytest.mark.parametrize("posterior_inputs", [("x0", "x1", "x_t", "t"), ("x1",), ("x0", "x1"), ("x_t", "t")])
def test_conv_posterior_reads_only_its_inputs(posterior_inputs):
    encoder = VRFMConvPosteriorEncoder(
        sample_size=8, in_channels=2, latent_dim=3, posterior_inputs=posterior_inputs, block_out_channels=(8,)
    )
    assert encoder.posterior_inputs == tuple(posterior_inputs)
    generator = torch.Generator().manual_seed(0)
    given = {name: torch.randn(4, 2, 8, 8, generator=generator) for name in ("x0", "x1", "x_t")}
    given["t"] = torch.rand(4, generator=generator)
    base = encoder(**given).mean
    for name in ("x0", "x1", "x_t", "t"):
        changed = dict(given)
        changed[name] = 1 - given[name] if name == "t" else given[name] + 0.5
        moved = (encoder(**changed).mean - base).abs().max() > 1e-6
        assert moved == (name in posterior_inputs), name


@pytest.mark.parametrize("sample_size", [16, (13, 15)])
def test_conv_posterior_pooled_grid_tells_where_a_stroke_is(sample_size):
    """One bright 2x2 blob on a blank image, moved by two pixels away from the border: the global average pool
    (`pooled_size=1`) gives the same posterior (the convs are translation-equivariant at this stride), a grid does
    not, whether it keeps every position of the last feature map or averages it to 4x4."""
    config = dict(sample_size=sample_size, in_channels=1, latent_dim=4, posterior_inputs=("x1",))
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    images = -torch.ones(2, 1, height, width)
    images[0, :, 4:6, 4:6] = 1.0
    images[1, :, 6:8, 6:8] = 1.0
    torch.manual_seed(0)
    mean_pooled = VRFMConvPosteriorEncoder(**config, block_out_channels=(8, 8))
    torch.testing.assert_close(*mean_pooled(x1=images).mean)
    last_side = (min(height, width) + 1) // 2  # after one stride-2 conv
    for grid in (last_side, 4):
        pooled = VRFMConvPosteriorEncoder(**config, block_out_channels=(8, 8), pooled_size=grid)
        assert (pooled(x1=images).mean[0] - pooled(x1=images).mean[1]).abs().max() > 1e-3
        assert pooled.head[0].in_features == 8 * grid**2


def test_conv_posterior_refuses_bad_config():
    with pytest.raises(ValueError, match="posterior_inputs"):
        VRFMConvPosteriorEncoder(posterior_inputs=("t",))
    with pytest.raises(ValueError, match="norm_num_groups"):
        VRFMConvPosteriorEncoder(block_out_channels=(12,), norm_num_groups=8)
    with pytest.raises(ValueError, match="sample_size"):
        VRFMConvPosteriorEncoder(sample_size=0)
    with pytest.raises(ValueError, match="`pooled_size` must be an integer >= 1, but got 0"):
        VRFMConvPosteriorEncoder(pooled_size=0)
    with pytest.raises(ValueError, match=r"`pooled_size` must be at most 8, .*\(8, 8\) for sample_size 32.* got 9"):
        VRFMConvPosteriorEncoder(pooled_size=9)


def test_conv_posterior_save_and_load_exactly(tmp_path):
    encoder = VRFMConvPosteriorEncoder(
        sample_size=8, in_channels=3, latent_dim=4, posterior_inputs=("x_t", "x1", "t"), block_out_channels=(8, 16)
    )
    encoder.save_pretrained(tmp_path)
    loaded = VRFMConvPosteriorEncoder.from_pretrained(tmp_path)
    assert loaded.posterior_inputs == ("x1", "x_t", "t")
    x1, x_t, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.rand(2)
    assert torch.equal(encoder(x1=x1, x_t=x_t, t=t).mean, loaded(x1=x1, x_t=x_t, t=t).mean)
    assert torch.equal(encoder(x1=x1, x_t=x_t, t=t).logvar, loaded(x1=x1, x_t=x_t, t=t).logvar)


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_posterior_is_small_next_to_the_velocity_nets():
    """Reports the parameter counts of the default configs (run with -s to see them)."""
    posterior = count(VRFMConvPosteriorEncoder())
    unet = count(VRFMUNet2DModel())
    dit = count(VRFMDiTTransformer2DModel())
    print(f"\nparameters (defaults): conv posterior {posterior:,}; UNet {unet:,}; DiT {dit:,}")
    tiny_encoder = count(tiny_posterior())
    tiny = {"UNet": count(tiny_unet()), "DiT": count(tiny_dit())}
    print(f"parameters (tiny test configs): conv posterior {tiny_encoder:,}; {tiny}")
    assert posterior < unet / 10 and posterior < dit / 10
    assert all(tiny_encoder < value for value in tiny.values())


# -------------------------------------------------------------------------------------------------- training
def train_steps(model, encoder, steps=60, beta=1e-3, seed=0, num_classes=None):
    """A fixed small batch, Adam, the VRFM loss; returns the per-step losses."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    batch = 16
    x1 = torch.randn(4, *model.sample_shape, generator=generator).repeat(4, 1, 1, 1).clamp(-1, 1)
    x0 = torch.randn(batch, *model.sample_shape, generator=generator)
    t = torch.rand(batch, generator=generator)
    labels = torch.arange(batch) % num_classes if num_classes else None
    x_t = interpolate(x0, x1, t)
    target = target_velocity(x0, x1)
    optimizer = torch.optim.Adam([*model.parameters(), *encoder.parameters()], lr=2e-3)
    losses = []
    model.train()
    encoder.train()
    for step in range(steps):
        posterior = encoder(x0=x0, x1=x1, x_t=x_t, t=t, generator=torch.Generator().manual_seed(step))
        prediction = model(x_t, t, z=posterior.sample, class_labels=labels).sample
        loss = vrfm_loss(prediction, target, posterior.mean, posterior.logvar, beta=beta, reduction="mean")
        optimizer.zero_grad()
        loss.loss.backward()
        optimizer.step()
        losses.append(loss.loss.item())
    return losses


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_tiny_model_trains_with_the_posterior(name):
    num_classes = 2 if name == "dit" else None
    model = FACTORIES[name](num_classes=num_classes)
    encoder = tiny_posterior()
    assert not model.z_embedding.linear_2.weight.any()
    losses = train_steps(model, encoder, steps=60, num_classes=num_classes)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"\n{name}: loss (mean of 5 steps) {first:.3f} -> {last:.3f} over 60 steps")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.75 * first
    # the zero-initialised z path has left zero: the velocity net now reads z
    assert model.z_embedding.linear_2.weight.abs().max() > 0


@pytest.mark.parametrize("build", [tiny_unet, tiny_cond_unet, tiny_dit], ids=["unet", "cond_unet", "dit"])
def test_inputs_of_another_dtype_run_in_the_model_dtype(build):
    model = build().eval()
    channels = model.sample_shape[0]
    x, t, z = torch.randn(2, channels, 8, 8), torch.rand(2), torch.randn(2, 4)
    with torch.no_grad():
        expected = model(x, t, z=z).sample
        from_double = model(x.double(), t.double(), z=z.double()).sample
    assert from_double.dtype == torch.float32
    torch.testing.assert_close(from_double, expected)


def test_conv_posterior_refuses_a_degenerate_time_embedding():
    with pytest.raises(ValueError, match="`time_embed_dim`"):
        tiny_posterior(time_embed_dim=3)
