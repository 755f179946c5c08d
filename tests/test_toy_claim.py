"""The method's claim on the paper's own toy tasks, trained in seconds with fixed seeds.

VRFM must beat the same network with z off (plain rectified flow) at 1 and 2 Euler steps by a clear margin, be no
worse at 50 steps, and represent the multi-modal velocity at a crossing point where rectified flow gives the mean.
"""

import math

import pytest
import torch
from toy_training import train_toy, wasserstein2

from diffusers_vrfm.data import get_toy_task

# task -> (latent_dim, beta, training steps); beta and dim follow vrfm-method.md ("Settings the paper used" and the
# reference measurements). The loss is the default "sum" reduction.
SETTINGS = {"two_modes_1d": (4, 1.0, 1500), "ring_2d": (8, 0.1, 3000)}
NUM_SAMPLES = 2000
FEW_STEP_RATIO = 0.6  # VRFM's W2 at NFE 1 and 2 must be at most this fraction of RF's
MANY_STEP_TOLERANCE = 0.03  # at NFE 50 VRFM may exceed RF's W2 by at most this (well under the sampling floor)


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def trained(request):
    name = request.param
    latent_dim, beta, steps = SETTINGS[name]
    vrfm = train_toy(name, latent_dim, beta=beta, steps=steps)
    rf = train_toy(name, 0, steps=steps)
    return name, vrfm, rf


def w2_by_nfe(task, pipe, nfes):
    target = task.sample_target(NUM_SAMPLES, torch.Generator().manual_seed(123))
    source = task.sample_source(NUM_SAMPLES, torch.Generator().manual_seed(5))
    result = {}
    for nfe in nfes:
        samples = pipe(
            batch_size=NUM_SAMPLES,
            num_inference_steps=nfe,
            latents=source,
            generator=torch.Generator().manual_seed(99),
        ).samples
        result[nfe] = wasserstein2(samples, target)
    return result


def test_vrfm_beats_rf_at_few_steps_and_is_no_worse_at_many(trained):
    name, vrfm, rf = trained
    task = get_toy_task(name)
    vrfm_w2, rf_w2 = w2_by_nfe(task, vrfm, (1, 2, 50)), w2_by_nfe(task, rf, (1, 2, 50))
    print(f"{name}: VRFM W2 {vrfm_w2}  RF W2 {rf_w2}")
    for nfe in (1, 2):
        assert vrfm_w2[nfe] <= FEW_STEP_RATIO * rf_w2[nfe], (nfe, vrfm_w2, rf_w2)
    assert vrfm_w2[50] <= rf_w2[50] + MANY_STEP_TOLERANCE, (vrfm_w2, rf_w2)


def test_velocity_at_a_crossing_point_is_multimodal(trained):
    name, vrfm, rf = trained
    latent_dim = vrfm.velocity_model.latent_dim
    num_z = 512
    z = torch.randn(num_z, latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if name == "two_modes_1d":
            # x_t = 0 at t = 1/2: the true velocities are 2 * x1, about +2 and -2
            t, x = 0.5, torch.zeros(num_z, 1)
            v_vrfm = vrfm.velocity_model(x, t, z=z).sample.squeeze(1)
            v_rf = rf.velocity_model(x[:1], t).sample.squeeze()
            assert abs(v_rf.item()) < 0.5  # RF gives the mean
            assert (v_vrfm > 1.0).float().mean() > 0.2 and (v_vrfm < -1.0).float().mean() > 0.2
        else:
            # the centre of the ring at t = 1/4: six true velocities at k * 60 degrees, of length 4/3
            t, x = 0.25, torch.zeros(num_z, 2)
            v_vrfm = vrfm.velocity_model(x, t, z=z).sample
            v_rf = rf.velocity_model(x[:1], t).sample.squeeze(0)
            assert v_rf.norm() < 0.5  # RF gives one short vector, the mean
            assert v_vrfm.norm(dim=1).median() > 0.8
            angles = torch.atan2(v_vrfm[:, 1], v_vrfm[:, 0])
            directions = torch.arange(6) * (math.pi / 3)
            gap = torch.remainder(angles[:, None] - directions[None] + math.pi, 2 * math.pi) - math.pi
            share = torch.bincount(gap.abs().argmin(dim=1), minlength=6).float() / num_z
            assert (share > 0.05).sum() >= 3, share  # at least three of the six directions are represented
