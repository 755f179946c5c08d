"""Tests of the prior-hole helpers of `diffusers_vrfm.objective`: `mix_latents` and `latent_mmd`."""

import pytest
import torch

from diffusers_vrfm.objective import latent_mmd, mix_latents


def test_mix_latents_extremes_and_fraction():
    post, prior = torch.zeros(4000, 3), torch.ones(4000, 3)
    assert torch.equal(mix_latents(post, prior, 0.0), post)
    assert torch.equal(mix_latents(post, prior, 1.0), prior)
    mixed = mix_latents(post, prior, 0.3, generator=torch.Generator().manual_seed(0))
    rows = mixed[:, 0]
    # whole rows are replaced, never single coordinates
    assert torch.equal(mixed, rows[:, None].expand(-1, 3))
    assert abs(rows.mean().item() - 0.3) < 0.03


def test_mix_latents_is_reproducible_and_keeps_gradients():
    post = torch.randn(64, 2, requires_grad=True)
    prior = torch.randn(64, 2, requires_grad=True)
    a = mix_latents(post, prior, 0.5, generator=torch.Generator().manual_seed(1))
    b = mix_latents(post, prior, 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    a.sum().backward()
    # each row's gradient reaches exactly one of the two sources
    assert torch.equal(post.grad[:, 0] + prior.grad[:, 0], torch.ones(64))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (
            {"posterior_sample": torch.zeros(3, 2), "prior_sample": torch.zeros(3, 3), "prior_fraction": 0.1},
            ValueError,
        ),
        ({"posterior_sample": torch.zeros(3), "prior_sample": torch.zeros(3), "prior_fraction": 0.1}, ValueError),
        (
            {"posterior_sample": torch.zeros(3, 2), "prior_sample": torch.zeros(3, 2), "prior_fraction": 1.5},
            ValueError,
        ),
        ({"posterior_sample": [0.0], "prior_sample": torch.zeros(3, 2), "prior_fraction": 0.1}, TypeError),
        ({"posterior_sample": torch.zeros(3, 2), "prior_sample": torch.zeros(3, 2), "prior_fraction": "a"}, TypeError),
    ],
)
def test_mix_latents_refuses_bad_arguments(kwargs, error):
    with pytest.raises(error):
        mix_latents(**kwargs)


def test_latent_mmd_separates_matched_and_shifted_draws():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(800, 8, generator=g), torch.randn(800, 8, generator=g)
    same = latent_mmd(a, b).item()
    shifted = latent_mmd(a + 1.0, b).item()
    narrow = latent_mmd(0.3 * a, b).item()
    assert abs(same) < 0.01
    assert shifted > 20 * max(abs(same), 1e-3)
    assert narrow > 20 * max(abs(same), 1e-3)
    # the estimator is symmetric in its two arguments
    assert latent_mmd(b, a).item() == pytest.approx(same, abs=1e-6)


def test_latent_mmd_is_differentiable_and_pulls_towards_the_prior():
    g = torch.Generator().manual_seed(1)
    prior = torch.randn(256, 4, generator=g)
    shift = torch.full((4,), 2.0, requires_grad=True)
    latent_mmd(torch.randn(256, 4, generator=g) + shift, prior).backward()
    # gradient descent on the MMD moves the shifted draws back towards 0
    assert (shift.grad > 0).all()


def test_latent_mmd_refuses_bad_shapes():
    with pytest.raises(ValueError, match="latent_dim"):
        latent_mmd(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        latent_mmd(torch.zeros(1, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="scales"):
        latent_mmd(torch.zeros(5, 2), torch.zeros(5, 2), scales=())
    with pytest.raises(TypeError):
        latent_mmd(torch.zeros(5, 2, dtype=torch.long), torch.zeros(5, 2))
