"""A small, deterministic toy trainer shared by the tests (VRFM, or plain RF with `latent_dim=0`)."""

from __future__ import annotations

import torch

from diffusers_vrfm import (
    VRFMMLPModel,
    VRFMPipeline,
    VRFMPosteriorEncoder,
    VRFMScheduler,
    interpolate,
    target_velocity,
    vrfm_loss,
)
from diffusers_vrfm.data import get_toy_task


def train_toy(
    task_name: str,
    latent_dim: int,
    beta: float = 1.0,
    steps: int = 1500,
    batch_size: int = 256,
    hidden_dim: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    posterior_inputs=("x0", "x1", "x_t", "t"),
    learned_prior: bool = False,
) -> VRFMPipeline:
    """Trains a toy model with Adam and returns the pipeline (posterior included for VRFM)."""
    torch.manual_seed(seed)
    task = get_toy_task(task_name)
    generator = torch.Generator().manual_seed(seed)
    model = VRFMMLPModel(sample_size=task.dim, latent_dim=latent_dim, hidden_dim=hidden_dim)
    encoder = (
        VRFMPosteriorEncoder(
            sample_size=task.dim, latent_dim=latent_dim, hidden_dim=hidden_dim, posterior_inputs=posterior_inputs
        )
        if latent_dim > 0
        else None
    )
    prior = (
        VRFMPosteriorEncoder(
            sample_size=task.dim, latent_dim=latent_dim, hidden_dim=hidden_dim, posterior_inputs=("x0",)
        )
        if learned_prior and latent_dim > 0
        else None
    )
    params = [p for m in (model, encoder, prior) if m is not None for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        x0, x1 = task.sample_pairs(batch_size, generator)
        t = torch.rand(batch_size, generator=generator)
        x_t = interpolate(x0, x1, t)
        if encoder is not None:
            posterior = encoder(x0=x0, x1=x1, x_t=x_t, t=t, generator=generator)
            pred = model(x_t, t, z=posterior.sample).sample
            prior_mean = prior_logvar = None
            if prior is not None:
                prior_out = prior(x0=x0)
                prior_mean, prior_logvar = prior_out.mean, prior_out.logvar
            out = vrfm_loss(
                pred,
                target_velocity(x0, x1),
                posterior.mean,
                posterior.logvar,
                beta=beta,
                prior_mean=prior_mean,
                prior_logvar=prior_logvar,
            )
        else:
            out = vrfm_loss(model(x_t, t).sample, target_velocity(x0, x1))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    return VRFMPipeline(velocity_model=model, scheduler=VRFMScheduler(), posterior_encoder=encoder, prior=prior)


def wasserstein2(a: torch.Tensor, b: torch.Tensor) -> float:
    """W2 between two equal-size samples: exact via sorting in 1D, via POT's exact EMD otherwise."""
    if a.shape[1] == 1:
        return (a.flatten().sort().values - b.flatten().sort().values).pow(2).mean().sqrt().item()
    import ot

    cost = torch.cdist(a.double(), b.double()).pow(2).numpy()
    return float(ot.emd2([], [], cost, numItermax=1_000_000)) ** 0.5
