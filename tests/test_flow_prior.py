"""`VRFMFlowPrior` (issue 13): a RealNVP over z fitted to the aggregate posterior after training."""

import os

import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_vrfm import (
    VRFMAggregatePosteriorPrior,
    VRFMFlowPrior,
    VRFMMLPModel,
    VRFMPipeline,
    VRFMPosteriorEncoder,
    VRFMScheduler,
    collect_posterior_atoms,
    label_condition,
    log_likelihood,
)
from diffusers_vrfm.models.flow_prior import coupling_masks


def _random_flow(latent_dim=3, seed=0, **config) -> VRFMFlowPrior:
    """A flow whose layers are not the identity (the last layers start at zero)."""
    torch.manual_seed(seed)
    flow = VRFMFlowPrior(latent_dim=latent_dim, num_layers=4, hidden_dim=16, **config)
    with torch.no_grad():
        for net in flow.conditioners:
            torch.nn.init.normal_(net[-1].weight, std=0.5)
        flow.data_mean.copy_(torch.randn(latent_dim))
        flow.data_log_std.copy_(0.3 * torch.randn(latent_dim))
    return flow.eval()


def _two_modes(rows=400):
    means = torch.tensor([[-3.0, 0.0], [3.0, 1.0]]).repeat(rows // 2, 1)
    return means, torch.full_like(means, -2.0)


def test_coupling_masks_alternate_halves_and_are_fixed():
    masks = coupling_masks(latent_dim=5, num_layers=5)
    assert masks.shape == (5, 5) and torch.equal(masks, coupling_masks(5, 5))
    assert (masks.sum(dim=1)[::2] == 3).all(), "layer 2k keeps ceil(d / 2) dimensions"
    assert torch.equal(masks[1], 1 - masks[0]) and torch.equal(masks[3], 1 - masks[2])
    assert not torch.equal(masks[0], masks[2]), "each pair of layers splits the dimensions its own way"
    assert coupling_masks(1, 2).tolist() == [[1.0], [0.0]]


def test_from_base_inverts_to_base_and_the_log_determinant_is_the_jacobian_one():
    flow = _random_flow(latent_dim=3)
    z = 2 * torch.randn(6, 3)
    u, log_det = flow.to_base(z)
    assert torch.allclose(flow.from_base(u), z, atol=1e-5)
    for row in range(3):
        jacobian = torch.autograd.functional.jacobian(lambda x: flow.to_base(x[None])[0][0], z[row])
        assert log_det[row].item() == pytest.approx(torch.linalg.slogdet(jacobian).logabsdet.item(), abs=1e-4)


def test_log_prob_is_a_normalised_density():
    flow = _random_flow(latent_dim=2)
    grid = torch.linspace(-12, 12, 481)
    points = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), dim=-1).reshape(-1, 2)
    with torch.no_grad():
        mass = flow.log_prob(points).exp().sum() * (grid[1] - grid[0]) ** 2
    assert mass.item() == pytest.approx(1.0, abs=5e-3)


def test_fit_learns_a_two_mode_aggregate_posterior():
    means, logvars = _two_modes()
    flow = VRFMFlowPrior(latent_dim=2, num_layers=6, hidden_dim=32)
    generator = torch.Generator().manual_seed(0)
    losses = flow.fit(means, logvars, num_train_steps=300, batch_size=256, learning_rate=3e-3, generator=generator)
    assert len(losses) == 300 and sum(losses[-20:]) / 20 < losses[0] - 1.0
    mixture = VRFMAggregatePosteriorPrior(latent_dim=2, num_atoms=len(means)).set_atoms(means, logvars)
    reference = mixture(batch_size=4000, generator=torch.Generator().manual_seed(1)).sample
    with torch.no_grad():  # cross-entropy to the true mixture, within 0.25 nats of its entropy (0.1 measured)
        assert -flow.log_prob(reference).mean() < -mixture.log_prob(reference).mean() + 0.25
        draws = flow(batch_size=4000, generator=torch.Generator().manual_seed(2)).sample
    near = ((draws[:, 0].abs() - 3).abs() < 1.0).float().mean()
    assert near > 0.9, f"draws land near the two modes ({near:.2f}), not between them"
    assert (draws[:, 0] < 0).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_draws_are_reproducible_and_per_row_with_generator_lists():
    flow = _random_flow()
    first = flow(batch_size=4, generator=torch.Generator().manual_seed(0))
    again = flow(batch_size=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first.sample, again.sample) and first.mean is None and first.kl is None
    rows = flow(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).sample
    alone = flow(batch_size=1, generator=torch.Generator().manual_seed(6)).sample
    assert torch.allclose(rows[1:], alone)
    assert flow(x0=torch.zeros(3, 7), return_dict=False)[2].shape == (3, 3), "x0 gives only the row count"


def test_from_posterior_uses_the_same_atoms_as_the_mixture_prior():
    torch.manual_seed(0)
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=3, posterior_inputs=("x1",), hidden_dim=16).eval()
    batches = [(torch.randn(8, 2), 3 * torch.randn(8, 2)) for _ in range(3)]
    means, logvars = collect_posterior_atoms(encoder, iter(batches), num_atoms=20)
    mixture = VRFMAggregatePosteriorPrior.from_posterior(encoder, iter(batches), num_atoms=20)
    assert torch.equal(mixture.atom_means, means) and means.shape == (20, 3)
    flow = VRFMFlowPrior.from_posterior(encoder, iter(batches), num_atoms=20, num_train_steps=5, hidden_dim=8)
    assert flow.latent_dim == 3 and flow.config.hidden_dim == 8 and not flow.training
    aggregate_variance = means.var(dim=0, unbiased=False) + logvars.exp().mean(dim=0)
    assert torch.allclose(flow.data_mean, means.mean(dim=0)) and torch.allclose(
        2 * flow.data_log_std, aggregate_variance.log(), atol=1e-5
    ), "z is standardised with the aggregate posterior's moments"
    with pytest.raises(ValueError, match="fewer than `num_atoms` \\(100\\)"):
        VRFMFlowPrior.from_posterior(encoder, iter(batches), num_atoms=100)


def test_from_posterior_with_a_generator_is_the_same_prior_whatever_the_global_random_state():
    """The flow's initial weights come from the generator's seed, not from torch's global generator: the same
    generator gives the same fitted prior in any process (benchmarks refit priors in fresh processes)."""
    torch.manual_seed(0)
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=3, posterior_inputs=("x1",), hidden_dim=16).eval()
    batches = [(torch.randn(8, 2), 3 * torch.randn(8, 2)) for _ in range(3)]

    def fit(global_seed: int, seed: int) -> VRFMFlowPrior:
        torch.manual_seed(global_seed)
        generator = torch.Generator().manual_seed(seed)
        return VRFMFlowPrior.from_posterior(encoder, iter(batches), 20, generator, num_train_steps=5, hidden_dim=8)

    first, second, other = fit(1, seed=7), fit(2, seed=7), fit(1, seed=8)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    assert not all(torch.equal(value, other.state_dict()[name]) for name, value in first.state_dict().items())


def test_fitting_a_prior_with_a_generator_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=3, hidden_dim=16).eval()
    batches = [(torch.randn(8, 2), 3 * torch.randn(8, 2)) for _ in range(3)]
    state = torch.get_rng_state()
    VRFMAggregatePosteriorPrior.from_posterior(encoder, iter(batches), 20, torch.Generator().manual_seed(1))
    VRFMFlowPrior.from_posterior(encoder, iter(batches), 20, torch.Generator().manual_seed(1), num_train_steps=3)
    assert torch.equal(torch.get_rng_state(), state), "the encoder's unused draw of z must not come from torch's own"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"latent_dim": 0}, "`latent_dim` must be an integer >= 1, but got 0"),
        ({"num_layers": 1.5}, "`num_layers` must be an integer >= 1, but got 1.5"),
        ({"hidden_dim": True}, "`hidden_dim` must be an integer >= 1, but got True"),
        ({"condition_dim": -1}, "`condition_dim` must be an integer >= 0, but got -1"),
        ({"log_scale_bound": 0}, "`log_scale_bound` must be a positive number, but got 0"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VRFMFlowPrior(**kwargs)


def test_bad_inputs_are_refused():
    flow = VRFMFlowPrior(latent_dim=2)
    means, logvars = _two_modes(8)
    with pytest.raises(
        ValueError, match=r"`means` must have shape \(8, 2\) \(num_atoms, latent_dim\), but got \(8, 3\)"
    ):
        flow.fit(torch.zeros(8, 3), logvars)
    with pytest.raises(ValueError, match=r"`logvars` must have shape \(8, 2\)"):
        flow.fit(means, logvars[:4])
    with pytest.raises(ValueError, match="`means` must be finite"):
        flow.fit(means.clone().fill_(float("nan")), logvars)
    with pytest.raises(ValueError, match="`num_train_steps` must be a positive integer, but got 0"):
        flow.fit(means, logvars, num_train_steps=0)
    with pytest.raises(ValueError, match="`learning_rate` must be a positive number, but got -1"):
        flow.fit(means, logvars, learning_rate=-1)
    with pytest.raises(ValueError, match=r"`z` must have shape \(B, 2\), but got \(4, 3\)"):
        flow.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="`batch_size`"):
        flow()
    with pytest.raises(ValueError, match="`generator` is a list of 2, but the batch size is 3"):
        flow(batch_size=3, generator=[torch.Generator(), torch.Generator()])


def _pipeline_with_flow(latent_dim=3):
    torch.manual_seed(0)
    model = VRFMMLPModel(sample_size=2, latent_dim=latent_dim, hidden_dim=16)
    torch.nn.init.normal_(model.z_embedding.linear_2.weight)  # zero-initialised: make the velocity depend on z
    return VRFMPipeline(velocity_model=model, scheduler=VRFMScheduler(), prior=_random_flow(latent_dim))


def test_the_pipeline_draws_z_from_the_flow_and_saves_and_loads_it(tmp_path):
    pipe = _pipeline_with_flow()
    out = pipe(batch_size=8, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(8, 2, generator=generator)  # the pipeline draws the source points first, then z
    assert torch.equal(out.z, pipe.prior(x0=source, generator=generator).sample), "z is the flow's draw"
    pipe.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path / "prior")) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "vrfmflowprior.py",
    ]
    remote = (tmp_path / "prior" / "vrfmflowprior.py").read_text()
    assert remote.strip().splitlines()[-1] == "from diffusers_vrfm import VRFMFlowPrior  # noqa: F401"
    for loaded in (
        VRFMPipeline.from_pretrained(tmp_path),
        DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True),
    ):
        assert type(loaded.prior).__name__ == "VRFMFlowPrior"
        again = loaded(batch_size=8, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        assert torch.equal(again.z, out.z) and torch.equal(again.samples, out.samples)


def _saved_flow(tmp_path, edit) -> str:
    from safetensors.torch import load_file, save_file

    folder = str(tmp_path / "flow")
    _random_flow().save_pretrained(folder)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def test_loading_refuses_an_incomplete_or_non_finite_flow(tmp_path):
    folder = _saved_flow(tmp_path, lambda tensors: tensors.pop("data_log_std"))
    with pytest.raises(ValueError, match=r"lack \['data_log_std'\]: the file is incomplete"):
        VRFMFlowPrior.from_pretrained(folder)
    folder = _saved_flow(tmp_path, lambda tensors: tensors["conditioners.2.4.weight"].__setitem__(0, float("nan")))
    with pytest.raises(ValueError, match=r"hold NaN or inf in \['conditioners.2.4.weight'\]"):
        VRFMFlowPrior.from_pretrained(folder)
    folder = _saved_flow(tmp_path, lambda tensors: None)
    prior, info = VRFMFlowPrior.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and torch.equal(prior.data_mean, _random_flow().data_mean)


def test_the_likelihood_marginal_and_proposal_use_the_flow_log_prob():
    pipe = _pipeline_with_flow()
    x = torch.randn(3, 2)
    kwargs = {"num_inference_steps": 4, "solver": "euler", "num_z_samples": 3}
    marginal = pipe.log_likelihood(x, generator=torch.Generator().manual_seed(0), **kwargs)
    explicit = log_likelihood(
        pipe.velocity_model, x, prior=pipe.prior, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert torch.equal(marginal.log_prob, explicit.log_prob) and torch.isfinite(marginal.log_prob).all()
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=3, posterior_inputs=("x1",), hidden_dim=16)
    weighted, standard = (  # the same draws from q(z | x), weighted by log p(z) of the flow or of N(0, I)
        log_likelihood(
            pipe.velocity_model, x, prior=prior, proposal=encoder, generator=torch.Generator().manual_seed(1), **kwargs
        )
        for prior in (pipe.prior, None)
    )
    assert torch.isfinite(weighted.log_prob).all() and not torch.allclose(weighted.log_prob, standard.log_prob)


# --------------------------------------------------------------------- a flow conditional on labels or prompts
def _labelled_modes(rows=400):
    """Label 0's atoms at (-3, 0), label 1's at (3, 1), keyed by the one-hot label."""
    labels = torch.arange(rows) % 2
    means = torch.tensor([[-3.0, 0.0], [3.0, 1.0]])[labels]
    return means, torch.full_like(means, -2.0), label_condition(labels, 2)


def test_a_conditional_flow_learns_each_conditions_atoms_and_the_marginal():
    means, logvars, conditions = _labelled_modes()
    flow = VRFMFlowPrior(latent_dim=2, num_layers=6, hidden_dim=32, condition_dim=2)
    flow.fit(
        means, logvars, num_train_steps=300, batch_size=256, learning_rate=3e-3,
        generator=torch.Generator().manual_seed(0), conditions=conditions,
    )  # fmt: skip
    with torch.no_grad():
        for label, sign in ((0, -1.0), (1, 1.0)):
            asked = label_condition(torch.full((2000,), label), 2)
            draws = flow(condition=asked, generator=torch.Generator().manual_seed(label)).sample
            assert (draws[:, 0] * sign > 1.5).float().mean() > 0.95, f"label {label} draws its own mode"
        marginal = flow(batch_size=4000, generator=torch.Generator().manual_seed(2)).sample
        assert (marginal[:, 0] < 0).float().mean().item() == pytest.approx(0.5, abs=0.1), "no condition: both"
        at_mode = torch.tensor([[-3.0, 0.0]])
        own, other = (flow.log_prob(at_mode, condition=label_condition(torch.tensor([k]), 2)) for k in (0, 1))
    assert own.item() > other.item() + 5.0


def test_a_conditional_flow_inverts_and_round_trips_through_save_and_load(tmp_path):
    torch.manual_seed(0)
    flow = VRFMFlowPrior(latent_dim=3, num_layers=4, hidden_dim=16, condition_dim=5)
    with torch.no_grad():
        for net in flow.conditioners:
            torch.nn.init.normal_(net[-1].weight, std=0.5)
        flow.null_condition.normal_()
    condition, z = torch.randn(6, 5), 2 * torch.randn(6, 3)
    features = flow.condition_features(condition, 6)
    u, _ = flow.to_base(z, features)
    assert torch.allclose(flow.from_base(u, features), z, atol=1e-5)
    assert not torch.allclose(flow.to_base(z, flow.condition_features(None, 6))[0], u, atol=1e-3)
    flow.save_pretrained(tmp_path / "flow")
    loaded = VRFMFlowPrior.from_pretrained(tmp_path / "flow")
    assert loaded.condition_dim == 5
    assert torch.equal(loaded.log_prob(z, condition=condition), flow.log_prob(z, condition=condition))


def test_the_pipeline_draws_z_from_the_flow_given_its_class_labels():
    means, logvars, conditions = _labelled_modes()
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=2, posterior_inputs=("x1",), hidden_dim=8)
    flow = VRFMFlowPrior(latent_dim=2, num_layers=4, hidden_dim=32, condition_dim=2)
    flow.fit(means, logvars, num_train_steps=200, generator=torch.Generator().manual_seed(0), conditions=conditions)
    model = VRFMMLPModel(sample_size=2, latent_dim=2, num_classes=2)
    pipe = VRFMPipeline(velocity_model=model, scheduler=VRFMScheduler(), prior=flow, posterior_encoder=encoder)
    wanted = torch.tensor([0, 1] * 50)
    out = pipe(class_labels=wanted, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert ((out.z[:, 0] > 0).long() == wanted).float().mean() > 0.95
    likelihood = pipe.log_likelihood(
        torch.randn(100, 2), class_labels=wanted, num_z_samples=2, num_inference_steps=1, solver="euler",
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert ((likelihood.z[..., 0] > 0).long() == wanted).float().mean() > 0.95, "log p(x | label) draws z | label"


def test_conditional_flow_inputs_are_checked_with_the_argument_named():
    means, logvars, conditions = _labelled_modes(8)
    conditional = VRFMFlowPrior(latent_dim=2, num_layers=2, hidden_dim=8, condition_dim=2)
    with pytest.raises(ValueError, match="`conditions` must be given exactly when the prior is conditional"):
        conditional.fit(means, logvars, num_train_steps=1)
    with pytest.raises(ValueError, match=r"`conditions` must have shape \(8, 2\), but got \(8, 3\)"):
        conditional.fit(means, logvars, num_train_steps=1, conditions=torch.zeros(8, 3))
    with pytest.raises(ValueError, match=r"`condition_dropout` must be a number in \[0, 1\), but got 1.0"):
        conditional.fit(means, logvars, num_train_steps=1, conditions=conditions, condition_dropout=1.0)
    with pytest.raises(ValueError, match=r"`condition` must have shape \(3, 2\)"):
        conditional(batch_size=3, condition=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="`condition` must be finite"):
        conditional.log_prob(torch.zeros(1, 2), condition=torch.full((1, 2), float("inf")))
    with pytest.raises(ValueError, match="`condition` was given, but this prior is unconditional"):
        VRFMFlowPrior(latent_dim=2)(condition=torch.zeros(1, 2))
