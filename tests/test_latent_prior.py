"""`VRFMAggregatePosteriorPrior` (issue 6): the unconditional prior fitted to the aggregate posterior after training,
and `adapt_beta`, the KL-target controller."""

import math
import os

import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_vrfm import (
    VRFMAggregatePosteriorPrior,
    VRFMMLPModel,
    VRFMPipeline,
    VRFMPosteriorEncoder,
    VRFMScheduler,
    adapt_beta,
    label_condition,
    log_likelihood,
)


def _prior(means, logvars):
    prior = VRFMAggregatePosteriorPrior(latent_dim=means.shape[1], num_atoms=means.shape[0])
    return prior.set_atoms(means, logvars)


def test_draws_pick_atoms_uniformly_and_add_the_atom_noise():
    means = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, -3.0]])
    prior = _prior(means, torch.full((4, 2), -30.0))  # (almost) point atoms
    out = prior(batch_size=4000, generator=torch.Generator().manual_seed(0))
    distances = (out.sample[:, None, :] - means).norm(dim=-1)
    assert distances.min(dim=1).values.max() < 1e-5, "every draw sits on an atom"
    counts = torch.bincount(distances.argmin(dim=1), minlength=4).float() / 4000
    assert counts.min() > 0.2 and counts.max() < 0.3, counts
    assert torch.equal(out.mean, means[distances.argmin(dim=1)]) and out.kl is None
    wide = _prior(torch.zeros(1, 2), torch.zeros(1, 2))(batch_size=20000, generator=torch.Generator().manual_seed(1))
    assert abs(float(wide.sample.var()) - 1.0) < 0.05, "one unit-variance atom is N(0, I)"


def test_draws_are_reproducible_and_per_row_with_generator_lists():
    prior = _prior(torch.randn(16, 3), torch.randn(16, 3) - 1)
    first = prior(batch_size=5, generator=torch.Generator().manual_seed(3)).sample
    assert torch.equal(first, prior(batch_size=5, generator=torch.Generator().manual_seed(3)).sample)
    rows = prior(x0=torch.zeros(5, 7), generator=[torch.Generator().manual_seed(10 + i) for i in range(5)]).sample
    for i in range(5):  # row i depends on its own generator only
        alone = prior(batch_size=1, generator=[torch.Generator().manual_seed(10 + i)]).sample
        assert torch.equal(rows[i], alone[0])


def test_log_prob_is_the_mixture_density():
    means, logvars = torch.randn(6, 3), 0.5 * torch.randn(6, 3)
    prior = _prior(means, logvars)
    z = torch.randn(10, 3)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(6)),
        torch.distributions.Independent(torch.distributions.Normal(means, (0.5 * logvars).exp()), 1),
    ).log_prob(z)
    assert torch.allclose(prior.log_prob(z), reference, atol=1e-5)


def test_from_posterior_keeps_the_posteriors_of_the_first_examples():
    torch.manual_seed(0)
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=3, posterior_inputs=("x1",), hidden_dim=16).eval()
    batches = [(torch.randn(8, 2), torch.randn(8, 2)) for _ in range(3)]
    prior = VRFMAggregatePosteriorPrior.from_posterior(encoder, iter(batches), num_atoms=12)
    x1 = torch.cat([x1 for _, x1 in batches])[:12]
    with torch.no_grad():
        expected = encoder(x1=x1)
    assert (prior.latent_dim, prior.num_atoms) == (3, 12)
    assert torch.allclose(prior.atom_means, expected.mean) and torch.allclose(prior.atom_logvars, expected.logvar)
    with pytest.raises(ValueError, match="fewer than `num_atoms`"):
        VRFMAggregatePosteriorPrior.from_posterior(encoder, iter(batches), num_atoms=100)


def test_an_encoder_reading_t_and_x_t_is_fitted_on_training_style_inputs():
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=2, hidden_dim=8)  # reads x0, x1, x_t, t
    pairs = ((torch.randn(4, 2), torch.randn(4, 2)) for _ in range(2))
    prior = VRFMAggregatePosteriorPrior.from_posterior(encoder, pairs, num_atoms=8, generator=torch.Generator())
    assert torch.isfinite(prior.atom_means).all() and prior.atom_means.std() > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"latent_dim": 0}, "`latent_dim` must be an integer >= 1"),
        ({"num_atoms": 2.5}, "`num_atoms` must be an integer >= 1"),
        ({"condition_dim": -1}, "`condition_dim` must be an integer >= 0"),
        ({"num_neighbors": 0}, "`num_neighbors` must be an integer >= 1"),
    ],
)
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VRFMAggregatePosteriorPrior(**kwargs)


def test_bad_atoms_and_calls_are_refused_with_the_argument_named():
    prior = VRFMAggregatePosteriorPrior(latent_dim=2, num_atoms=3)
    with pytest.raises(ValueError, match=r"`means` must have shape \(3, 2\)"):
        prior.set_atoms(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="`logvars` must be finite"):
        prior.set_atoms(torch.zeros(3, 2), torch.full((3, 2), math.nan))
    with pytest.raises(ValueError, match="`batch_size`"):
        prior()
    with pytest.raises(ValueError, match="`generator` is a list of 2"):
        prior(batch_size=3, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match=r"`z` must have shape \(B, 2\)"):
        prior.log_prob(torch.zeros(4, 3))


def _pipeline_with_prior(latent_dim=3):
    torch.manual_seed(0)
    model = VRFMMLPModel(sample_size=2, latent_dim=latent_dim, hidden_dim=16)
    torch.nn.init.normal_(model.z_embedding.linear_2.weight)  # zero-initialised: make the velocity depend on z
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=latent_dim, posterior_inputs=("x1",), hidden_dim=16)
    prior = _prior(4.0 + torch.randn(32, latent_dim), torch.full((32, latent_dim), -4.0))
    return VRFMPipeline(velocity_model=model, scheduler=VRFMScheduler(), posterior_encoder=encoder, prior=prior)


def test_the_pipeline_draws_z_from_the_prior_and_saves_and_loads_it(tmp_path):
    pipe = _pipeline_with_prior()
    out = pipe(batch_size=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.z.mean() > 3.0, "z comes from the atoms near 4, not from N(0, I)"
    pipe.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path / "prior")) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "vrfmaggregateposteriorprior.py",
    ]
    for loaded in (
        VRFMPipeline.from_pretrained(tmp_path),
        DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True),
    ):
        assert type(loaded.prior).__name__ == "VRFMAggregatePosteriorPrior"
        assert torch.equal(loaded.prior.atom_means, pipe.prior.atom_means)
        again = loaded(batch_size=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        assert torch.equal(again.z, out.z) and torch.equal(again.samples, out.samples)


def test_the_pipeline_refuses_a_prior_that_is_neither_kind():
    pipe = _pipeline_with_prior()
    reads_x1 = VRFMPosteriorEncoder(sample_size=2, latent_dim=3, posterior_inputs=("x1",))
    with pytest.raises(ValueError, match="`prior` must be a VRFMAggregatePosteriorPrior, a VRFMFlowPrior or"):
        VRFMPipeline(velocity_model=pipe.velocity_model, scheduler=VRFMScheduler(), prior=reads_x1)
    with pytest.raises(ValueError, match=r"`prior.latent_dim` \(2\) must equal"):
        VRFMPipeline(
            velocity_model=pipe.velocity_model,
            scheduler=VRFMScheduler(),
            prior=VRFMAggregatePosteriorPrior(latent_dim=2, num_atoms=4),
        )


def test_log_likelihood_marginalises_over_the_prior():
    pipe = _pipeline_with_prior()
    point = torch.tensor([4.0, -4.0, 4.0])
    pipe.register_modules(prior=_prior(point[None].expand(5, 3), torch.full((5, 3), -30.0)))
    x = torch.randn(3, 2)
    kwargs = {"num_inference_steps": 8, "solver": "euler"}
    marginal = pipe.log_likelihood(x, num_z_samples=4, generator=torch.Generator().manual_seed(0), **kwargs)
    conditional = log_likelihood(pipe.velocity_model, x, z=point, **kwargs)
    assert torch.allclose(marginal.log_prob, conditional.log_prob, atol=1e-4)
    standard = log_likelihood(pipe.velocity_model, x, num_z_samples=4, generator=torch.Generator(), **kwargs)
    assert not torch.allclose(standard.log_prob, conditional.log_prob, atol=1e-2)
    with pytest.raises(ValueError, match="`prior` must be a prior over z with latent_dim 3"):
        log_likelihood(pipe.velocity_model, x, prior=VRFMAggregatePosteriorPrior(latent_dim=2, num_atoms=2))


# ----------------------------------------------------------------------------------------------------- adapt_beta
def test_adapt_beta_moves_towards_the_target_and_stays_in_range():
    assert adapt_beta(1.0, kl=5.0, kl_target=3.0) == pytest.approx(math.exp(0.02))
    assert adapt_beta(1.0, kl=1.0, kl_target=3.0) == pytest.approx(math.exp(-0.02))
    assert adapt_beta(0.7, kl=3.0, kl_target=3.0) == pytest.approx(0.7)
    assert adapt_beta(140.0, kl=1e6, kl_target=0.0) == 150.0
    assert adapt_beta(1e-4, kl=0.0, kl_target=1e6) == 1e-4
    assert adapt_beta(0.0, kl=1.0, kl_target=0.0) > 0, "a zero beta starts from the lower bound"


def test_adapt_beta_settles_the_kl_of_a_simple_model_at_the_target():
    # a posterior whose KL falls as beta rises, KL(beta) = 2 / beta: the fixed point is beta = 2 / target
    beta = 0.05
    for _ in range(3000):
        beta = adapt_beta(beta, kl=2.0 / beta, kl_target=4.0, rate=0.05)
    assert 2.0 / beta == pytest.approx(4.0, rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": -1.0}, "`beta` must lie in"),
        ({"kl": math.nan}, "`kl` must be finite"),
        ({"kl_target": -0.5}, "`kl_target` must lie in"),
        ({"rate": "fast"}, "`rate` must be a real number"),
        ({"beta_range": (1.0, 0.5)}, "`beta_range` must be"),
    ],
)
def test_adapt_beta_refuses_bad_input(kwargs, message):
    arguments = {"beta": 1.0, "kl": 1.0, "kl_target": 1.0, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        adapt_beta(**arguments)


# ------------------------------------------------------------------------------- importance-weighted likelihood
def _proposal(latent_dim=3, seed=0):
    torch.manual_seed(seed)
    return VRFMPosteriorEncoder(sample_size=2, latent_dim=latent_dim, posterior_inputs=("x1",), hidden_dim=16).eval()


def test_importance_weights_are_the_likelihood_plus_the_prior_over_the_proposal():
    pipe = _pipeline_with_prior()
    proposal = _proposal()
    x = torch.randn(4, 2)
    kwargs = {"num_inference_steps": 6, "solver": "euler", "num_z_samples": 5}
    out = log_likelihood(
        pipe.velocity_model, x, proposal=proposal, prior=pipe.prior, generator=torch.Generator(), **kwargs
    )
    with torch.no_grad():
        posterior = proposal(x1=x)
    std = (0.5 * posterior.logvar).exp()
    log_q = torch.distributions.Normal(posterior.mean, std).log_prob(out.z).sum(dim=-1)
    log_p = pipe.prior.log_prob(out.z.reshape(-1, 3)).reshape(5, 4)
    assert torch.allclose(out.log_weights - out.log_prob_per_z, log_p - log_q, atol=1e-4)
    assert torch.allclose(out.log_prob, torch.logsumexp(out.log_weights, dim=0) - math.log(5))
    plain = log_likelihood(pipe.velocity_model, x, generator=torch.Generator(), **kwargs)
    assert torch.equal(plain.log_weights, plain.log_prob_per_z), "prior draws need no weights"


def test_importance_weighting_recovers_the_density_when_z_does_not_matter():
    model = VRFMMLPModel(sample_size=2, latent_dim=3, hidden_dim=16).eval()  # zero-initialised z path: v ignores z
    x = torch.randn(3, 2)
    kwargs = {"num_inference_steps": 6, "solver": "euler"}
    exact = log_likelihood(model, x, z=torch.zeros(3), **kwargs).log_prob
    weighted = log_likelihood(
        model, x, proposal=_proposal(), num_z_samples=4000, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert torch.allclose(weighted.log_prob, exact, atol=0.05), "E_q[p(z) / q(z | x)] = 1"


def test_a_proposal_must_read_only_the_data_point():
    model = VRFMMLPModel(sample_size=2, latent_dim=3)
    reads_more = VRFMPosteriorEncoder(sample_size=2, latent_dim=3)
    with pytest.raises(ValueError, match="`proposal` must be a posterior encoder that reads only the data point"):
        log_likelihood(model, torch.randn(2, 2), proposal=reads_more, num_inference_steps=2, solver="euler")
    with pytest.raises(ValueError, match="Pass either `z`"):
        log_likelihood(model, torch.randn(2, 2), z=torch.zeros(3), proposal=_proposal(), num_inference_steps=2)


# ------------------------------------------------------------------------------ loading refuses bad atoms (issue 17)
def _saved_prior(tmp_path, edit):
    """A saved prior whose weights file was then edited by `edit(tensors)` (in place, as a bad writer or a bit flip
    would leave it)."""
    from safetensors.torch import load_file, save_file

    folder = str(tmp_path / "prior")
    _prior(torch.randn(5, 3), torch.full((5, 3), -1.0)).save_pretrained(folder)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("atom_means", float("nan"), r"`atom_means` of 1 atom\(s\) contain NaN or inf"),
        ("atom_means", float("inf"), r"`atom_means` of 1 atom\(s\) contain NaN or inf"),
        ("atom_logvars", float("nan"), r"`atom_logvars` of 1 atom\(s\) are not finite or lie outside"),
        ("atom_logvars", 1e4, r"`atom_logvars` .* outside the log-variance range \[-30.0, 20.0\] \(e.g. 10000.0\)"),
    ],
)
def test_loading_refuses_non_finite_or_unclamped_atoms(tmp_path, name, value, message):
    folder = _saved_prior(tmp_path, lambda tensors: tensors[name][2].__setitem__(1, value))
    with pytest.raises(ValueError, match=message):
        VRFMAggregatePosteriorPrior.from_pretrained(folder)


@pytest.mark.parametrize("missing", ["atom_logvars", "atom_means"])
def test_loading_refuses_a_weights_file_missing_atoms(tmp_path, missing):
    folder = _saved_prior(tmp_path, lambda tensors: tensors.pop(missing))
    with pytest.raises(ValueError, match=rf"lack \['{missing}'\]: the file is incomplete"):
        VRFMAggregatePosteriorPrior.from_pretrained(folder)


def test_loading_a_sound_prior_still_works_and_returns_loading_info(tmp_path):
    folder = _saved_prior(tmp_path, lambda tensors: None)
    prior, info = VRFMAggregatePosteriorPrior.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and prior.atom_logvars.eq(-1.0).all()


def test_a_saved_pipeline_with_nan_prior_atoms_is_refused_on_load(tmp_path):
    from safetensors.torch import load_file, save_file

    prior = _prior(torch.randn(5, 4), torch.zeros(5, 4))
    model = VRFMMLPModel(sample_size=2, latent_dim=4)
    pipe = VRFMPipeline(velocity_model=model, scheduler=VRFMScheduler(), prior=prior)
    pipe.save_pretrained(str(tmp_path))
    path = os.path.join(str(tmp_path), "prior", "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    tensors["atom_means"][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="contain NaN or inf"):
        VRFMPipeline.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------- a prior conditional on labels or prompts
def _conditional_prior(num_neighbors=32):
    """Point atoms at `3 * label` (labels 0, 1, 2; four atoms each), keyed by the one-hot label."""
    labels = torch.arange(12) % 3
    means = (3.0 * labels)[:, None].repeat(1, 2) + 0.01 * torch.arange(12)[:, None]
    prior = VRFMAggregatePosteriorPrior(latent_dim=2, num_atoms=12, condition_dim=3, num_neighbors=num_neighbors)
    return prior.set_atoms(means, torch.full((12, 2), -30.0), label_condition(labels, 3)), means, labels


@pytest.mark.parametrize("num_neighbors", [1, 32])
def test_a_conditional_draw_picks_among_every_atom_of_its_condition(num_neighbors):
    prior, means, labels = _conditional_prior(num_neighbors)
    wanted = torch.tensor([2, 0, 1, 2] * 100)
    out = prior(condition=label_condition(wanted, 3), generator=torch.Generator().manual_seed(0))
    drawn = (out.sample[:, None, :] - means).norm(dim=-1).argmin(dim=1)
    assert torch.equal(labels[drawn], wanted), "each row draws an atom of its own label"
    assert len(drawn[wanted == 2].unique()) == 4, "every atom of the label is a candidate, whatever k"
    marginal = prior(batch_size=400, generator=torch.Generator().manual_seed(1)).sample
    assert len(labels[(marginal[:, None, :] - means).norm(dim=-1).argmin(dim=1)].unique()) == 3


def test_a_conditional_draw_without_an_exact_match_uses_the_nearest_atoms():
    keys = torch.linspace(0, 1, 10)[:, None]  # e.g. text embeddings: no prompt equals a training caption
    prior = VRFMAggregatePosteriorPrior(latent_dim=1, num_atoms=10, condition_dim=1, num_neighbors=3)
    prior.set_atoms(keys.clone(), torch.full((10, 1), -30.0), keys)
    out = prior(condition=torch.full((300, 1), 0.02), generator=torch.Generator().manual_seed(0))
    assert set(out.mean.flatten().tolist()) == set(keys[:3].flatten().tolist())


def test_conditional_draws_are_per_row_with_generator_lists():
    prior, _, _ = _conditional_prior()
    condition = label_condition(torch.tensor([0, 1, 2]), 3)
    rows = prior(condition=condition, generator=[torch.Generator().manual_seed(5 + i) for i in range(3)]).sample
    for i in range(3):
        alone = prior(condition=condition[i : i + 1], generator=[torch.Generator().manual_seed(5 + i)]).sample
        assert torch.equal(rows[i], alone[0])


def test_from_posterior_keeps_the_conditions_of_the_batches(tmp_path):
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=3, posterior_inputs=("x1",), hidden_dim=8).eval()
    batches = [(torch.randn(8, 2), torch.randn(8, 2), torch.randn(8, 5)) for _ in range(2)]
    prior = VRFMAggregatePosteriorPrior.from_posterior(encoder, iter(batches), num_atoms=12, num_neighbors=4)
    assert (prior.condition_dim, prior.config.num_neighbors) == (5, 4)
    assert torch.equal(prior.atom_conditions, torch.cat([c for _, _, c in batches])[:12])
    prior.save_pretrained(tmp_path / "prior")
    loaded = VRFMAggregatePosteriorPrior.from_pretrained(tmp_path / "prior")
    assert loaded.condition_dim == 5 and torch.equal(loaded.atom_conditions, prior.atom_conditions)
    mixed = [batches[0], batches[1][:2]]
    with pytest.raises(ValueError, match="conditions with every batch or with none"):
        VRFMAggregatePosteriorPrior.from_posterior(encoder, iter(mixed), num_atoms=16)


def test_loading_refuses_a_conditional_prior_missing_its_conditions(tmp_path):
    from safetensors.torch import load_file, save_file

    prior, _, _ = _conditional_prior()
    folder = str(tmp_path / "prior")
    prior.save_pretrained(folder)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    tensors.pop("atom_conditions")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lack \['atom_conditions'\]"):
        VRFMAggregatePosteriorPrior.from_pretrained(folder)


def test_bad_conditions_are_refused_with_the_argument_named():
    prior, means, labels = _conditional_prior()
    with pytest.raises(ValueError, match=r"`condition` must have shape \(2, 3\), but got \(2, 4\)"):
        prior(batch_size=2, condition=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="`condition` must be finite"):
        prior(condition=torch.full((1, 3), float("nan")))
    with pytest.raises(ValueError, match="`conditions` must be given exactly when the prior is conditional"):
        prior.set_atoms(means, torch.zeros(12, 2))
    with pytest.raises(ValueError, match=r"`condition` was given, but this prior is unconditional"):
        _prior(torch.zeros(2, 2), torch.zeros(2, 2))(condition=torch.zeros(1, 3))


def test_the_pipeline_draws_z_among_the_atoms_of_its_class_labels():
    prior, means, labels = _conditional_prior()
    model = VRFMMLPModel(sample_size=2, latent_dim=2, num_classes=3)
    pipe = VRFMPipeline(velocity_model=model, scheduler=VRFMScheduler(), prior=prior)
    wanted = torch.tensor([1, 2, 0, 1, 1, 2])
    out = pipe(class_labels=wanted, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(labels[(out.z[:, None, :] - means).norm(dim=-1).argmin(dim=1)], wanted)
    unlabelled = pipe(batch_size=60, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).z
    assert len(labels[(unlabelled[:, None, :] - means).norm(dim=-1).argmin(dim=1)].unique()) == 3  # the marginal


def test_conditional_log_prob_is_the_mixture_of_the_atoms_of_the_condition():
    labels = torch.arange(12) % 3
    means, logvars = torch.randn(12, 2), torch.rand(12, 2) - 0.5
    prior = VRFMAggregatePosteriorPrior(latent_dim=2, num_atoms=12, condition_dim=3).set_atoms(
        means, logvars, label_condition(labels, 3)
    )
    z, wanted = torch.randn(5, 2), torch.tensor([0, 2, 1, 1, 0])
    log_density = -0.5 * ((z[:, None] - means) ** 2 / logvars.exp() + logvars + math.log(2 * math.pi)).sum(-1)
    same_label = labels[None, :] == wanted[:, None]
    expected = torch.logsumexp(log_density.masked_fill(~same_label, -math.inf), dim=1) - math.log(4)
    assert torch.allclose(prior.log_prob(z, condition=label_condition(wanted, 3)), expected, atol=1e-5)
    assert torch.allclose(prior.log_prob(z), torch.logsumexp(log_density, dim=1) - math.log(12), atol=1e-5)
    with pytest.raises(ValueError, match=r"`condition` must have shape \(5, 3\)"):
        prior.log_prob(z, condition=label_condition(wanted[:2], 3))
    with pytest.raises(ValueError, match="this prior is unconditional"):
        _prior(means, logvars).log_prob(z, condition=label_condition(wanted, 3))


def test_log_likelihood_with_a_conditional_prior_draws_z_given_each_label():
    labels = torch.arange(12) % 3
    points = (3.0 * labels)[:, None].repeat(1, 2)  # every atom of a label at the same point
    prior = VRFMAggregatePosteriorPrior(latent_dim=2, num_atoms=12, condition_dim=3)
    prior.set_atoms(points, torch.full((12, 2), -30.0), label_condition(labels, 3))
    model = VRFMMLPModel(sample_size=2, latent_dim=2, num_classes=3).eval()
    pipe = VRFMPipeline(velocity_model=model, scheduler=VRFMScheduler(), prior=prior)
    x, wanted = torch.randn(4, 2), torch.tensor([2, 0, 1, 2])
    kwargs = {"num_inference_steps": 4, "solver": "euler", "class_labels": wanted}
    given_label = pipe.log_likelihood(x, num_z_samples=3, generator=torch.Generator().manual_seed(0), **kwargs)
    at_the_point = log_likelihood(model, x, z=3.0 * wanted[:, None].repeat(1, 2).float(), **kwargs)
    assert torch.allclose(given_label.log_prob, at_the_point.log_prob, atol=1e-4)
    assert torch.equal(given_label.z.round(), 3.0 * wanted[None, :, None].expand(3, 4, 2).float())
    null = pipe.log_likelihood(x, num_z_samples=60, class_labels=3, generator=torch.Generator().manual_seed(0))
    assert len(null.z[..., 0].round().unique()) == 3, "the null label draws from every label's atoms"
    with pytest.raises(ValueError, match="`class_labels` mix real labels with the null label 3"):
        pipe.log_likelihood(x, class_labels=torch.tensor([0, 3, 1, 2]))
    with pytest.raises(ValueError, match=r"`prior_condition` must have shape \(4, 3\), but got \(2, 3\)"):
        pipe.log_likelihood(x, prior_condition=label_condition(wanted[:2], 3))
    with pytest.raises(ValueError, match="`prior_condition` was given, but `prior` is not a conditional prior"):
        log_likelihood(model, x, prior=_prior(points, torch.zeros(12, 2)), prior_condition=torch.zeros(4, 3))


def test_importance_weights_of_a_labelled_example_use_the_prior_given_its_label():
    labels = torch.arange(12) % 3
    prior = VRFMAggregatePosteriorPrior(latent_dim=3, num_atoms=12, condition_dim=3)
    prior.set_atoms(torch.randn(12, 3), torch.zeros(12, 3), label_condition(labels, 3))
    model = VRFMMLPModel(sample_size=2, latent_dim=3, num_classes=3).eval()
    x, wanted = torch.randn(4, 2), torch.tensor([1, 0, 2, 1])
    out = log_likelihood(
        model, x, proposal=_proposal(), prior=prior, class_labels=wanted, num_z_samples=5, num_inference_steps=2,
        solver="euler", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    with torch.no_grad():
        posterior = _proposal()(x1=x)
    log_q = torch.distributions.Normal(posterior.mean, (0.5 * posterior.logvar).exp()).log_prob(out.z).sum(dim=-1)
    log_p = prior.log_prob(out.z.reshape(-1, 3), condition=label_condition(wanted.repeat(5), 3)).reshape(5, 4)
    assert torch.allclose(out.log_weights - out.log_prob_per_z, log_p - log_q, atol=1e-4)
    assert not torch.allclose(log_p, prior.log_prob(out.z.reshape(-1, 3)).reshape(5, 4), atol=1e-2)
