import math

import pytest
import torch

from diffusers_vrfm import (
    VRFMScheduler,
    count_active_units,
    drop_labels,
    flow_match_output_to_velocity,
    gaussian_kl,
    interpolate,
    predicted_end_point,
    reparameterize,
    sample_timesteps,
    sigma_to_t,
    slerp,
    t_to_sigma,
    target_velocity,
    velocity_to_flow_match_output,
    vrfm_loss,
)
from diffusers_vrfm.objective import dropout_mask


@pytest.mark.parametrize("shape", [(5, 1), (5, 2), (5, 3, 4, 4)])
def test_path_and_target_closed_form(shape):
    generator = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    t = torch.rand(shape[0], generator=generator)
    t_b = t.reshape(-1, *([1] * (len(shape) - 1)))
    torch.testing.assert_close(interpolate(x0, x1, t), x0 + t_b * (x1 - x0))
    torch.testing.assert_close(interpolate(x0, x1, torch.zeros(shape[0])), x0)
    torch.testing.assert_close(interpolate(x0, x1, torch.ones(shape[0])), x1)
    # the target is the time derivative of the path
    h = 1e-3
    finite_difference = (interpolate(x0.double(), x1.double(), t + h) - interpolate(x0.double(), x1.double(), t)) / h
    torch.testing.assert_close(finite_difference.float(), target_velocity(x0, x1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(5, 2), (5, 3, 4, 4)])
def test_predicted_end_point_of_the_straight_path_is_its_data_point(shape):
    generator = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    t = torch.rand(shape[0], generator=generator)  # one time per example
    torch.testing.assert_close(predicted_end_point(interpolate(x0, x1, t), t, target_velocity(x0, x1)), x1)
    torch.testing.assert_close(predicted_end_point(x0, 0.0, x1), x0 + x1)  # a scalar time; at t = 0, x0 + v
    assert torch.equal(predicted_end_point(x1, 1.0, x0), x1), "at t = 1 the state is the end point"
    with pytest.raises(ValueError, match=r"`x_t` and `velocity` must have the same shape, but got \(5, 2\)"):
        predicted_end_point(torch.zeros(5, 2), 0.5, torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"`t` must be a scalar or have shape \(5,\), the batch size of `x_t`"):
        predicted_end_point(x0, torch.zeros(4), x1)


def test_path_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="`x0` and `x1`"):
        interpolate(torch.zeros(2, 3), torch.zeros(2, 4), 0.5)
    with pytest.raises(ValueError, match="`t`"):
        interpolate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))


def test_clock_converters_round_trip_and_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t)), t)
    v = torch.randn(4, 2)
    torch.testing.assert_close(flow_match_output_to_velocity(velocity_to_flow_match_output(v)), v)
    # One diffusers Euler step with the converted model output equals our Euler step in our clock.
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    x = torch.randn(4, 2)
    sigma, sigma_next = scheduler.sigmas[0], scheduler.sigmas[1]
    ours = x + (sigma_to_t(sigma_next) - sigma_to_t(sigma)) * v
    theirs = scheduler.step(velocity_to_flow_match_output(v), scheduler.timesteps[0], x).prev_sample
    torch.testing.assert_close(ours, theirs)


def test_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(6, 3, generator=generator), torch.randn(6, 3, generator=generator)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(gaussian_kl(mean, logvar), expected)
    prior_mean, prior_logvar = torch.randn(6, 3, generator=generator), torch.randn(6, 3, generator=generator)
    p = torch.distributions.Normal(prior_mean, (0.5 * prior_logvar).exp())
    torch.testing.assert_close(
        gaussian_kl(mean, logvar, prior_mean, prior_logvar), torch.distributions.kl_divergence(q, p)
    )


def test_reparameterize_moments_and_determinism():
    mean, logvar = torch.full((20000, 2), 1.5), torch.full((20000, 2), math.log(0.25))
    z = reparameterize(mean, logvar, generator=torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 1.5) < 0.01 and abs(z.std().item() - 0.5) < 0.01
    again = reparameterize(mean, logvar, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, again)


@pytest.mark.parametrize("density", ["uniform", "logit_normal", "mode"])
def test_sample_timesteps_range_and_determinism(density):
    t = sample_timesteps(4096, density, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4096,) and (t >= 0).all() and (t <= 1).all()
    torch.testing.assert_close(t, sample_timesteps(4096, density, generator=torch.Generator().manual_seed(0)))


def test_sample_timesteps_uses_diffusers_sigma_clock():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    sigma = compute_density_for_timestep_sampling(
        "mode", 64, mode_scale=1.29, generator=torch.Generator().manual_seed(3)
    )
    t = sample_timesteps(64, "mode", mode_scale=1.29, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(t, 1 - sigma)
    # a positive logit mean puts mass near the noisy end, i.e. small t in our clock
    assert sample_timesteps(4096, "logit_normal", logit_mean=1.0).mean() < 0.4


def test_sample_timesteps_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`density`"):
        sample_timesteps(4, "cosine")
    with pytest.raises(ValueError, match="`batch_size`"):
        sample_timesteps(0)
    for outside in (-1.5, 1.8):  # beyond [-1, 2 / (pi - 2)] the map folds (and below -1 it leaves [0, 1])
        with pytest.raises(
            ValueError,
            match=r"`mode_scale` must be in \[-1, 2 / \(pi - 2\) = 1.7519\] for the mode density .* got "
            + str(outside),
        ):
            sample_timesteps(4, "mode", mode_scale=outside)
        with pytest.raises(ValueError, match="`mode_scale`"):
            VRFMScheduler(timestep_density="mode", mode_scale=outside)
    sample_timesteps(4, "logit_normal", mode_scale=5.0)  # only the mode density reads it
    with pytest.raises(ValueError, match="`timestep_density` must be one of"):
        VRFMScheduler(timestep_density="cosine")


def test_noise_end_fraction_puts_an_atom_at_t_zero_and_leaves_the_density_alone():
    def draw(n, fraction, seed=0):
        return sample_timesteps(
            n, "logit_normal", noise_end_fraction=fraction, generator=torch.Generator().manual_seed(seed)
        )

    plain, mixed = draw(20000, 0.0), draw(20000, 0.2)
    assert (plain == 0).sum() == 0 and (mixed == 0).float().mean().item() == pytest.approx(0.2, abs=0.01)
    kept = mixed != 0  # the other times are the density's own draw, number for number
    torch.testing.assert_close(mixed[kept], plain[kept])
    # 0 draws nothing more: the generator is left where the plain density leaves it
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    sample_timesteps(8, "logit_normal", generator=generators[0])
    sample_timesteps(8, "logit_normal", noise_end_fraction=0.0, generator=generators[1])
    assert torch.equal(generators[0].get_state(), generators[1].get_state())
    scheduler = VRFMScheduler(timestep_density="logit_normal", noise_end_fraction=0.2)
    scheduler = VRFMScheduler.from_config(scheduler.config)
    torch.testing.assert_close(
        scheduler.sample_training_timesteps(20000, generator=torch.Generator().manual_seed(0)), mixed
    )
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=rf"`noise_end_fraction` must .*but got {bad}"):
            sample_timesteps(4, noise_end_fraction=bad)
        with pytest.raises(ValueError, match="`noise_end_fraction`"):
            VRFMScheduler(noise_end_fraction=bad)


def test_mode_density_weights_the_middle_or_both_ends():
    def share_near_the_ends(mode_scale):
        t = sample_timesteps(20000, "mode", mode_scale=mode_scale, generator=torch.Generator().manual_seed(0))
        return ((t < 0.1) | (t > 0.9)).float().mean().item()

    assert share_near_the_ends(0.0) == pytest.approx(0.2, abs=0.015)  # uniform
    assert share_near_the_ends(1.29) < 0.12 < 0.27 < share_near_the_ends(-0.5) < 0.33 < share_near_the_ends(-1.0)


def test_loss_without_posterior_is_plain_rectified_flow():
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(8, 3, generator=generator), torch.randn(8, 3, generator=generator)
    out = vrfm_loss(pred, target, beta=5.0)
    torch.testing.assert_close(out.loss, (pred - target).pow(2).sum(dim=1).mean())
    assert out.kl.item() == 0.0 and out.kl_per_dim.numel() == 0
    # "mean" reduction is torch's MSE, as torchcfm's I-CFM computes it
    torch.testing.assert_close(
        vrfm_loss(pred, target, reduction="mean").loss, torch.nn.functional.mse_loss(pred, target)
    )


def test_loss_reductions_share_beta():
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator)
    mean, logvar = torch.randn(8, 2, generator=generator), torch.randn(8, 2, generator=generator)
    summed = vrfm_loss(pred, target, mean, logvar, beta=0.3, reduction="sum")
    averaged = vrfm_loss(pred, target, mean, logvar, beta=0.3, reduction="mean")
    expected_kl = gaussian_kl(mean, logvar).sum(dim=1).mean()
    torch.testing.assert_close(summed.kl, expected_kl)
    torch.testing.assert_close(summed.loss, summed.mse + 0.3 * expected_kl)
    torch.testing.assert_close(averaged.loss, summed.loss / 4)
    torch.testing.assert_close(summed.kl_per_dim, gaussian_kl(mean, logvar).mean(dim=0))


def test_free_bits_floor_only_changes_the_optimised_term():
    mean = torch.zeros(4, 3, requires_grad=True)
    logvar = torch.zeros(4, 3)
    out = vrfm_loss(torch.zeros(4, 2), torch.zeros(4, 2), mean, logvar, beta=1.0, free_bits=0.5)
    assert out.kl.item() == 0.0  # the reported KL is the real one
    assert out.loss.item() == pytest.approx(1.5)  # three dimensions floored at 0.5 nats
    out.loss.backward()
    assert mean.grad.abs().sum() == 0  # below the floor, no pressure towards the prior


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta": -1.0}, "`beta`"),
        ({"beta": float("nan")}, "`beta`"),
        ({"reduction": "none"}, "`reduction`"),
        ({"free_bits": -0.1}, "`free_bits`"),
    ],
)
def test_loss_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vrfm_loss(torch.zeros(2, 2), torch.zeros(2, 2), **kwargs)


def test_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="`velocity_pred`"):
        vrfm_loss(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`posterior_mean`"):
        vrfm_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(3, 4), torch.zeros(3, 4))


def test_drop_labels():
    labels = torch.arange(10).repeat(100)
    dropped = drop_labels(labels, 0.3, null_class=10, generator=torch.Generator().manual_seed(0))
    fraction = (dropped == 10).float().mean().item()
    assert 0.25 < fraction < 0.35
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)
    with pytest.raises(ValueError, match="`dropout_prob`"):
        drop_labels(labels, 1.5, 10)
    # the mask it applies, as the training step draws it for captions too: the same draws from the same generator
    mask = dropout_mask(1000, 0.3, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and torch.equal(mask, dropped == 10)
    assert not dropout_mask((4, 3), 0.0).any() and dropout_mask(5, 1.0).all()
    with pytest.raises(ValueError, match="`dropout_prob`"):
        dropout_mask(3, -0.1)


def test_active_units():
    means = torch.cat([torch.randn(500, 2), torch.full((500, 3), 0.2)], dim=1)
    assert count_active_units(means) == 2


def test_slerp_endpoints_and_norm():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    path = slerp(a, b, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b, atol=1e-5, rtol=1e-5)
    # the midpoint keeps a norm between the two ends, unlike the linear midpoint that shrinks towards 0
    assert path[2].norm() > 0.9 * min(a.norm(), b.norm())
    assert (a + b).norm() / 2 < path[2].norm()
