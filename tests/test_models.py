import pytest
import torch

from diffusers_vrfm import VRFMMLPModel, VRFMPosteriorEncoder


def test_mlp_output_depends_on_z_once_trained_and_not_at_init():
    model = VRFMMLPModel(sample_size=2, latent_dim=3)
    x, t = torch.randn(5, 2), torch.rand(5)
    # the zero-initialised last layer of the z path: at init z has no effect
    torch.testing.assert_close(model(x, t, z=torch.zeros(5, 3)).sample, model(x, t, z=torch.randn(5, 3)).sample)
    torch.nn.init.normal_(model.z_embedding.linear_2.weight)
    assert not torch.allclose(model(x, t, z=torch.zeros(5, 3)).sample, model(x, t, z=torch.randn(5, 3)).sample)


def test_mlp_without_latent_is_plain_rf_and_refuses_z():
    model = VRFMMLPModel(sample_size=2, latent_dim=0)
    assert model.z_embedding is None
    assert model(torch.randn(4, 2), 0.5).sample.shape == (4, 2)
    with pytest.raises(ValueError, match="latent_dim=0"):
        model(torch.randn(4, 2), 0.5, z=torch.randn(4, 2))


def test_mlp_class_conditioning():
    model = VRFMMLPModel(sample_size=2, latent_dim=2, num_classes=3)
    torch.nn.init.normal_(model.class_embedding.weight)
    x, t, z = torch.randn(4, 2), torch.rand(4), torch.randn(4, 2)
    a = model(x, t, z=z, class_labels=torch.tensor([0, 0, 0, 0])).sample
    b = model(x, t, z=z, class_labels=torch.tensor([1, 1, 1, 1])).sample
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model(x, t, z=z).sample, model(x, t, z=z, class_labels=torch.full((4,), 3)).sample)
    with pytest.raises(ValueError, match="`class_labels`"):
        model(x, t, z=z, class_labels=torch.tensor([0, 1, 2, 4]))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m(torch.randn(4, 3), 0.5, z=torch.randn(4, 2)), ValueError, "`sample`"),
        (lambda m: m(torch.randn(4, 2), 0.5, z=torch.randn(4, 5)), ValueError, r"`z` must have shape \(4, 2\)"),
        (lambda m: m(torch.randn(4, 2), 0.5), ValueError, "needs `z`"),
        (lambda m: m(torch.randn(4, 2), 1.5, z=torch.randn(4, 2)), ValueError, r"`timestep` must lie in \[0, 1\]"),
        (lambda m: m(torch.randn(4, 2), float("nan"), z=torch.randn(4, 2)), ValueError, "`timestep` must be finite"),
        (lambda m: m(torch.randn(4, 2), torch.rand(3), z=torch.randn(4, 2)), ValueError, "`timestep`"),
        (lambda m: m(torch.randn(4, 2), 0.5, z=torch.ones(4, 2, dtype=torch.long)), TypeError, "`z`"),
        (lambda m: m(torch.ones(4, 2, dtype=torch.long), 0.5, z=torch.randn(4, 2)), TypeError, "`sample`"),
    ],
)
def test_mlp_refuses_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(VRFMMLPModel(sample_size=2, latent_dim=2))


@pytest.mark.parametrize(
    "kwargs, match", [({"latent_dim": -1}, "`latent_dim`"), ({"activation": "tanhh"}, "`activation`")]
)
def test_mlp_refuses_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VRFMMLPModel(**kwargs)


def test_posterior_outputs_and_kl():
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=3)
    x0, x1, t = torch.randn(6, 2), torch.randn(6, 2), torch.rand(6)
    out = encoder(x0=x0, x1=x1, x_t=x0 + t[:, None] * (x1 - x0), t=t, generator=torch.Generator().manual_seed(0))
    assert out.mean.shape == out.logvar.shape == out.sample.shape == (6, 3) and out.kl.shape == (6,)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(out.mean, (0.5 * out.logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=1)
    torch.testing.assert_close(out.kl, expected)
    mean, logvar, sample, kl = encoder(x0=x0, x1=x1, x_t=x0, t=t, return_dict=False)
    assert sample.shape == (6, 3)


@pytest.mark.parametrize("inputs", [("x1", "t"), ("x_t", "t"), ("x0", "x1"), ("x1",)])
def test_posterior_reads_only_its_inputs(inputs):
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=2, posterior_inputs=inputs)
    assert tuple(encoder.config.posterior_inputs) == inputs
    given = {"x0": torch.randn(3, 2), "x1": torch.randn(3, 2), "x_t": torch.randn(3, 2), "t": torch.rand(3)}
    base = encoder(**given, generator=torch.Generator().manual_seed(0)).mean
    for name in ("x0", "x1", "x_t", "t"):
        changed = dict(given)
        changed[name] = torch.rand(3) if name == "t" else torch.randn(3, 2)
        moved = not torch.allclose(encoder(**changed).mean, base)
        assert moved == (name in inputs), name
    missing = next(name for name in inputs if name != "t")
    with pytest.raises(ValueError, match=f"`{missing}` is required"):
        encoder(**{k: v for k, v in given.items() if k != missing})


@pytest.mark.parametrize("inputs", [(), ("x2",), ("t",), ("x1", "x1")])
def test_posterior_refuses_bad_inputs_config(inputs):
    with pytest.raises(ValueError, match="`posterior_inputs`"):
        VRFMPosteriorEncoder(posterior_inputs=inputs)


def test_posterior_refuses_non_finite_input():
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=2)
    bad = torch.tensor([[float("nan"), 0.0]])
    with pytest.raises(ValueError, match="`x1` must be finite"):
        encoder(x0=torch.zeros(1, 2), x1=bad, x_t=torch.zeros(1, 2), t=torch.zeros(1))


@pytest.mark.parametrize(
    "model_class, kwargs",
    [(VRFMMLPModel, {"latent_dim": 3, "num_classes": 2}), (VRFMPosteriorEncoder, {"posterior_inputs": ["x1", "t"]})],
)
def test_models_save_and_load_exactly(tmp_path, model_class, kwargs):
    model = model_class(sample_size=2, **kwargs)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    reloaded = model_class.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
