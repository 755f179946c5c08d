"""The prior-hole options of training (issue 6): a learned conditional prior `--learned_prior`, `--prior_mix`, and the
aggregate-posterior diagnostics in the training log. Small and fast: an MLP on a toy task."""

import json
import os
from unittest import mock

import pytest
import torch
from train_helpers import FAST, read_metrics, train_runner

from diffusers_vrfm import (
    VRFMAggregatePosteriorPrior,
    VRFMFlowPrior,
    VRFMMLPModel,
    VRFMPipeline,
    VRFMPosteriorEncoder,
    VRFMScheduler,
    adapt_beta,
    count_active_units,
    gaussian_kl,
)
from diffusers_vrfm.training.checkpointing import PRIOR_DIR, list_checkpoints
from diffusers_vrfm.training.step import draw_step_randomness, posterior_mean_statistics, vrfm_training_loss


@pytest.fixture
def train():
    yield from train_runner()


def _models(seed=0):
    torch.manual_seed(seed)
    model = VRFMMLPModel(sample_size=2, latent_dim=3, hidden_dim=16)
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=3, hidden_dim=16)
    prior = VRFMPosteriorEncoder(sample_size=2, latent_dim=3, hidden_dim=16, posterior_inputs=("x0",))
    # make the prior non-trivial so that its KL differs from the N(0, I) one
    torch.nn.init.normal_(prior.to_mean.weight)
    return model, encoder, prior


def test_learned_prior_enters_the_kl_and_is_trained_through_it():
    model, encoder, prior = _models()
    x0, x1, t = torch.randn(16, 2), torch.randn(16, 2), torch.rand(16)
    noise = torch.randn(16, 3)
    out = vrfm_training_loss(model, encoder, x0, x1, t, posterior_noise=noise, beta=0.5, prior_encoder=prior)
    post = encoder(x0=x0, x1=x1, x_t=(1 - t[:, None]) * x0 + t[:, None] * x1, t=t)
    p = prior(x0=x0)
    expected = gaussian_kl(post.mean, post.logvar, p.mean, p.logvar).sum(dim=1).mean() / 2  # "mean" reduction, D=2
    assert torch.allclose(out.loss.kl, expected, atol=1e-6)
    standard = vrfm_training_loss(model, encoder, x0, x1, t, beta=0.5)
    assert not torch.allclose(out.loss.kl, standard.loss.kl)
    out.loss.loss.backward()
    assert prior.to_mean.weight.grad is not None and prior.to_mean.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("learned", [False, True])
def test_prior_mask_feeds_the_prior_draw_to_the_velocity_model(learned):
    model, encoder, prior = _models(1)
    for param in model.z_embedding.parameters():  # zero-initialised: make the velocity depend on z
        torch.nn.init.normal_(param, std=0.5)
    x0, x1, t = torch.randn(8, 2), torch.randn(8, 2), torch.rand(8)
    posterior_noise, prior_noise = torch.randn(8, 3), torch.randn(8, 3)
    mask = torch.tensor([True, False] * 4)

    def run(prior_mask):
        return vrfm_training_loss(
            model,
            encoder,
            x0,
            x1,
            t,
            posterior_noise=posterior_noise,
            prior_encoder=prior if learned else None,
            prior_noise=prior_noise,
            prior_mask=prior_mask,
        )

    mixed, all_prior, none = run(mask), run(torch.ones(8, dtype=torch.bool)), run(None)
    # the z that reached the model: the prior draw, rebuilt from the same noise
    z_prior = prior(x0=x0, noise=prior_noise).sample if learned else prior_noise
    x_t = (1 - t[:, None]) * x0 + t[:, None] * x1
    v_prior = model(x_t, t, z=z_prior).sample
    expected = (v_prior - (x1 - x0)).pow(2).sum(dim=1).mean() / 2
    assert torch.allclose(all_prior.loss.mse, expected, atol=1e-6)
    # the KL never depends on the mask
    assert torch.allclose(mixed.loss.kl, none.loss.kl) and torch.allclose(all_prior.loss.kl, none.loss.kl)


def test_draw_step_randomness_prior_mix_keeps_the_old_stream_and_splits_rows():
    scheduler = VRFMScheduler()
    base = draw_step_randomness(scheduler, 0, 3, 8, slice(0, 8), (2,), latent_dim=3)
    mixed = draw_step_randomness(scheduler, 0, 3, 8, slice(0, 8), (2,), latent_dim=3, prior_mix=0.5)
    assert base.prior_mask is None and base.prior_noise is None
    assert torch.equal(base.t, mixed.t) and torch.equal(base.x0, mixed.x0), "t and x0 unchanged by the option"
    half = draw_step_randomness(scheduler, 0, 3, 8, slice(4, 8), (2,), latent_dim=3, prior_mix=0.5)
    assert torch.equal(half.prior_mask, mixed.prior_mask[4:]), "each process keeps its rows of one global draw"
    big = draw_step_randomness(scheduler, 0, 3, 4000, slice(0, 4000), None, latent_dim=3, prior_mix=0.3)
    assert abs(big.prior_mask.float().mean().item() - 0.3) < 0.03
    learned = draw_step_randomness(scheduler, 0, 3, 8, slice(0, 8), (2,), latent_dim=3, learned_prior=True)
    assert learned.prior_mask is None and learned.prior_noise.shape == (8, 3)


def test_posterior_mean_statistics():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4000, 4, generator=g) * torch.tensor([2.0, 2.0, 2.0, 0.01]) + 3.0
    active_units, mean_norm, variance = posterior_mean_statistics(means).tolist()
    assert active_units == count_active_units(means) == 3, "the fourth unit barely varies"
    assert abs(mean_norm - 6.0) < 0.2 and abs(variance - 3.0) < 0.3
    with pytest.raises(ValueError, match="posterior_means"):
        posterior_mean_statistics(torch.zeros(1, 4))


def _toy_args(output_dir, *extra):
    return ["--output_dir", output_dir, *_toy_common(*extra)]


def _toy_common(*extra):
    return [
        "--backbone", "mlp", "--dataset_name", "toy:8gaussians_moons", "--train_batch_size", "32",
        "--max_train_steps", "6", "--checkpointing_steps", "3", "--validation_steps", "100",
        "--num_validation_samples", "16", "--latent_dim", "3", *FAST, *extra,
    ]  # fmt: skip


def test_learned_prior_run_saves_the_prior_component_and_logs_diagnostics(tmp_path, train):
    output_dir = str(tmp_path / "run")
    summary = train(_toy_args(output_dir, "--learned_prior", "--prior_mix", "0.3"))
    assert summary["finished"]
    assert os.path.isdir(os.path.join(output_dir, "checkpoint-3", PRIOR_DIR)), "checkpoints hold the prior"
    pipe = VRFMPipeline.from_pretrained(output_dir)
    assert pipe.prior is not None and tuple(pipe.prior.config.posterior_inputs) == ("x0",)
    samples = pipe(batch_size=5, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).samples
    assert samples.shape == (5, 2) and torch.isfinite(samples).all()
    metrics = read_metrics(output_dir)
    for key in ("mu_mean_norm", "mu_var", "active_units"):
        assert key in metrics[6], key


def test_resume_with_learned_prior_and_prior_mix_is_exact(tmp_path, train):
    common = _toy_common("--learned_prior", "--prior_mix", "0.3")
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    train(["--output_dir", straight, *common])
    first = train(["--output_dir", interrupted, "--stop_after_steps", "3", *common])
    assert not first["finished"] and [s for s, _ in list_checkpoints(interrupted)] == [3]
    assert train(["--output_dir", interrupted, "--resume_from_checkpoint", "latest", *common])["finished"]
    expected, resumed = read_metrics(straight), read_metrics(interrupted)
    for step in expected:
        for key in ("loss", "mse", "kl", "mu_var"):
            assert resumed[step][key] == expected[step][key], (step, key)
    records = [json.load(open(os.path.join(d, "logs", "rank_0.json"))) for d in (straight, interrupted)]
    assert records[0]["prior_sha256"] is not None and records[0] == records[1], "prior weights are bit-identical"


@pytest.mark.parametrize(
    "extra, message",
    [(["--prior_mix", "1.5"], "prior_mix"), (["--learned_prior", "--latent_dim", "0"], "latent_dim")],
)
def test_bad_prior_arguments_fail(tmp_path, train, extra, message):
    with pytest.raises(ValueError, match=message):
        train(["--backbone", "mlp", "--output_dir", str(tmp_path), *FAST, *extra])


# ---------------------------------------------------------------- the defaults measured in issue 6: KL target + AP
def test_default_run_holds_the_kl_at_its_target_and_fits_the_aggregate_prior(tmp_path, train):
    output_dir = str(tmp_path / "run")
    assert train(_toy_args(output_dir, "--aggregate_prior_atoms", "40"))["finished"]
    metrics = read_metrics(output_dir)
    steps = sorted(metrics)
    assert metrics[1]["beta"] == pytest.approx(0.1, rel=1e-7), "beta starts at --beta (kept in float32 on the device)"
    for step, following in zip(steps, steps[1:]):  # each step's beta is the dual-ascent update of the previous one
        expected = adapt_beta(metrics[step]["beta"], metrics[step]["kl_nats"], 3.0)
        assert metrics[following]["beta"] == pytest.approx(expected, rel=1e-6), step
    pipe = VRFMPipeline.from_pretrained(output_dir)
    assert tuple(pipe.posterior_encoder.config.posterior_inputs) == ("x1",), "the default posterior reads x1 only"
    assert pipe.config.reencode_z_at is None, "calls keep the drawn z unless `--reencode_z_at` is given"
    assert isinstance(pipe.prior, VRFMAggregatePosteriorPrior) and pipe.prior.num_atoms == 40
    with torch.no_grad():  # the atoms are the trained posterior's means at training targets
        assert torch.isfinite(pipe.prior.atom_means).all() and pipe.prior.atom_means.std() > 0
    out = pipe(batch_size=5, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    atoms = pipe.prior.atom_means
    assert torch.isfinite(out.samples).all()
    chosen = (out.z[:, None, :] - atoms).norm(dim=-1).argmin(dim=1)  # each z lies near one of the atoms
    assert ((out.z - atoms[chosen]).abs() <= 6 * (0.5 * pipe.prior.atom_logvars[chosen]).exp()).all()


def test_aggregate_prior_type_flow_fits_and_saves_a_flow_prior(tmp_path, train):
    output_dir = str(tmp_path / "run")
    extra = ("--aggregate_prior_atoms", "40", "--aggregate_prior_type", "flow", "--flow_prior_steps", "12")
    extra += ("--reencode_z_at", "0.2")  # saved as the pipeline's default
    assert train(_toy_args(output_dir, *extra))["finished"]
    pipe = VRFMPipeline.from_pretrained(output_dir)
    assert isinstance(pipe.prior, VRFMFlowPrior) and pipe.prior.latent_dim == 3
    assert pipe.config.reencode_z_at == 0.2, "the pipeline's calls re-encode z along the way unless told otherwise"
    assert pipe.prior.data_log_std.abs().sum() > 0, "standardised with the fitted posteriors' moments"
    assert torch.isfinite(pipe(batch_size=5, num_inference_steps=2).samples).all()
    card = open(os.path.join(output_dir, "README.md"), encoding="utf-8").read()
    assert "`VRFMFlowPrior`, a small RealNVP fitted after training to the posteriors of 40 training examples" in card
    assert "The pipeline's calls re-encode `z` once, at the first step at or after `t = 0.2`" in card
    with pytest.raises(ValueError, match="flow_prior_steps"):
        train(_toy_args(str(tmp_path / "bad"), "--flow_prior_steps", "0"))


def test_kl_target_off_keeps_beta_fixed_and_resume_restores_the_adapted_beta(tmp_path, train):
    fixed = str(tmp_path / "fixed")
    train(_toy_args(fixed, "--kl_target", "off", "--beta", "0.4", "--aggregate_prior_atoms", "0"))
    assert {record["beta"] for record in read_metrics(fixed).values()} == {0.4}
    assert VRFMPipeline.from_pretrained(fixed).prior is None, "--aggregate_prior_atoms 0: z ~ N(0, I)"
    common = _toy_common("--kl_target", "1.5", "--aggregate_prior_atoms", "16")
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    train(["--output_dir", straight, *common])
    train(["--output_dir", interrupted, "--stop_after_steps", "3", *common])
    train(["--output_dir", interrupted, "--resume_from_checkpoint", "latest", *common])
    expected, resumed = read_metrics(straight), read_metrics(interrupted)
    assert len({record["beta"] for record in expected.values()}) == len(expected), "beta adapts every step"
    for step in expected:
        for key in ("loss", "kl_nats", "beta"):
            assert resumed[step][key] == expected[step][key], (step, key)
    priors = [VRFMPipeline.from_pretrained(d).prior for d in (straight, interrupted)]
    assert torch.equal(priors[0].atom_means, priors[1].atom_means), "the fitted prior is reproducible"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--aggregate_prior_atoms", "8", "--learned_prior"], "aggregate_prior_atoms"),
        (["--aggregate_prior_atoms", "8", "--latent_dim", "0"], "aggregate_prior_atoms"),
        (["--aggregate_prior_atoms", "-1"], "aggregate_prior_atoms"),
        (["--kl_target", "3", "--beta_warmup_steps", "10"], "beta_warmup_steps"),
    ],
)
def test_bad_kl_target_and_aggregate_prior_arguments_fail(tmp_path, train, extra, message):
    with pytest.raises(ValueError, match=message):
        train(["--backbone", "mlp", "--output_dir", str(tmp_path), *FAST, *extra])


def test_kl_target_must_be_nats_or_off(capsys):
    from train_helpers import load_script

    with pytest.raises(SystemExit):
        load_script().parse_args(["--kl_target", "-2"])
    assert "--kl_target: must be a number of nats >= 0 or `off`, but got '-2'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, num_examples, expected",
    [
        ([], 50_000, (30.0, "atoms")),  # 4096 atoms: a sample of the data
        ([], 2000, (20.0, "flow")),  # the atoms would replay it: the flow, and fewer nats
        ([], None, (30.0, "atoms")),  # a data set of unknown size
        (["--kl_target", "30"], 2000, (30.0, "flow")),
        (["--aggregate_prior_type", "atoms"], 2000, (20.0, "atoms")),
        (["--aggregate_prior_atoms", "1000"], 2000, (30.0, "atoms")),  # fewer atoms than images: not small
        (["--aggregate_prior_atoms", "0"], 2000, (20.0, None)),  # no prior saved; the size still sets the KL
    ],
)
def test_the_image_kl_target_and_prior_follow_the_size_of_the_data(argv, num_examples, expected):
    from diffusers_vrfm.training.cli import parse_args, resolve_defaults

    args = parse_args(["--backbone", "unet", *argv])
    assert (resolve_defaults(args, "image", num_examples=num_examples), args.aggregate_prior_type) == expected
    assert resolve_defaults(parse_args(["--backbone", "mlp"]), "vector", num_examples=2000) == 3.0, "vectors keep 3"


def test_a_vector_pipeline_continues_training_without_naming_its_backbone(tmp_path, train):
    first = str(tmp_path / "first")
    train(_toy_args(first, "--aggregate_prior_atoms", "16"))
    common = ["--dataset_name", "toy:8gaussians_moons", "--train_batch_size", "32", "--max_train_steps", "2", *FAST]
    summary = train(["--output_dir", str(tmp_path / "second"), "--pretrained_model_name_or_path", first, *common])
    assert summary["finished"], "the backbone (mlp) comes from the pretrained pipeline, not from --backbone"
    with pytest.raises(ValueError, match="is vector data: it needs `--backbone mlp`"):
        train(["--output_dir", str(tmp_path / "third"), *common])


def test_a_class_conditional_run_fits_a_prior_conditional_on_the_label(tmp_path, train, caplog):
    from train_helpers import TINY_POSTERIOR, TINY_UNET

    from diffusers_vrfm import label_condition

    output_dir = str(tmp_path / "labels")
    common = [
        "--resolution", "8", "--model_config", TINY_UNET, "--posterior_config", TINY_POSTERIOR,
        "--max_train_samples", "24", "--train_batch_size", "4", "--max_train_steps", "2", "--class_conditional",
        "--num_validation_samples", "2", "--aggregate_prior_atoms", "40", *FAST,
    ]  # fmt: skip
    assert train(["--output_dir", output_dir, *common, "--aggregate_prior_type", "atoms"])["finished"]
    # 40 atoms from 24 images: the run warns that samples may replay training images, and names the flow
    assert "The atom prior holds the posteriors of 40 draws from 24 training images" in caplog.text
    assert "Pass `--aggregate_prior_type flow`" in caplog.text
    pipe = VRFMPipeline.from_pretrained(output_dir)
    prior = pipe.prior
    assert isinstance(prior, VRFMAggregatePosteriorPrior) and prior.condition_dim == 10  # one-hot digit labels
    assert torch.equal(prior.atom_conditions.sum(dim=1), torch.ones(40))  # each atom keeps its example's label
    labels = prior.atom_conditions.argmax(dim=1)
    for label in labels.unique()[:2].tolist():  # a draw for a label comes from that label's atoms
        out = prior(condition=label_condition(torch.full((50,), label), 10), generator=torch.Generator())
        assert torch.isin(out.mean, prior.atom_means[labels == label]).all()
    card = open(os.path.join(output_dir, "README.md"), encoding="utf-8").read()
    assert "each with its example's label; a trajectory draws among the atoms of its label" in card
    flow_dir = str(tmp_path / "flow")
    # the default prior of an image data set that the atoms would cover (24 images, 40 atoms)
    assert train(["--output_dir", flow_dir, *common, "--flow_prior_steps", "5"])
    flow = VRFMPipeline.from_pretrained(flow_dir).prior
    assert isinstance(flow, VRFMFlowPrior) and flow.condition_dim == 10, "the flow prior is conditional too"
    assert flow.condition_mean.sum().item() == pytest.approx(1.0), "fitted to one-hot labels"
    card = open(os.path.join(flow_dir, "README.md"), encoding="utf-8").read()
    assert "each with its example's label; a trajectory draws from the flow's `p(z | label)`" in card


def test_the_prior_atoms_take_every_training_image_in_turn():
    """The aggregate prior's atoms come in passes over the training images (as training's epochs), not drawn with
    replacement: 2.5 passes' worth of atoms take every image two or three times, with fresh noise for each."""
    import argparse
    import collections
    import itertools

    from diffusers_vrfm.training.data import load_training_data
    from diffusers_vrfm.training.data_setup import PreparedData
    from diffusers_vrfm.training.finish import _aggregate_prior_pairs

    data = load_training_data("builtin:digits", "unet", resolution=8, max_train_samples=20)
    loaded = []
    dataset_getitem = type(data.dataset).__getitem__

    def recorded(dataset, key):
        loaded.append(key[0])
        return dataset_getitem(dataset, key)

    prepared = PreparedData(data=data, model_shape=(1, 8, 8))
    pairs = _aggregate_prior_pairs(argparse.Namespace(seed=3), prepared, batch_size=10)
    with mock.patch.object(type(data.dataset), "__getitem__", recorded):
        batches = list(itertools.islice(pairs, 5))
    assert sorted(collections.Counter(loaded).values()) == [2] * 10 + [3] * 10
    assert sorted(loaded[:20]) == list(range(20)) and sorted(loaded[20:40]) == list(range(20)), "whole passes"
    noise = torch.cat([x0 for x0, _ in batches])
    assert noise.shape == (50, 1, 8, 8) and torch.unique(noise.flatten(1), dim=0).shape[0] == 50
