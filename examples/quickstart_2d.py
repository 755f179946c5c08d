"""Train a tiny VRFM on the paper's 2D ring task, sample it in one and two steps, save it and load it back."""

import torch

from diffusers_vrfm import (
    VRFMAggregatePosteriorPrior,
    VRFMMLPModel,
    VRFMPipeline,
    VRFMPosteriorEncoder,
    VRFMScheduler,
    adapt_beta,
    interpolate,
    target_velocity,
    vrfm_loss,
)
from diffusers_vrfm.data import get_toy_task

task = get_toy_task("ring_2d")  # 6 Gaussians at radius 1/3 (t = 0) to 6 Gaussians at radius 1 (t = 1)
model = VRFMMLPModel(sample_size=2, latent_dim=8)
encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=8, posterior_inputs=("x1",))  # q(z | x1): one z per path
optimizer = torch.optim.Adam([*model.parameters(), *encoder.parameters()], lr=1e-3)
generator = torch.Generator().manual_seed(0)
beta = 0.1

for _ in range(2000):
    x0, x1 = task.sample_pairs(256, generator)
    t = torch.rand(256, generator=generator)
    x_t = interpolate(x0, x1, t)
    posterior = encoder(x1=x1, generator=generator)
    velocity = model(x_t, t, z=posterior.sample).sample
    out = vrfm_loss(velocity, target_velocity(x0, x1), posterior.mean, posterior.logvar, beta=beta)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    beta = adapt_beta(beta, out.kl.item(), kl_target=3.0)  # hold the KL at 3 nats
print(f"loss {out.loss.item():.3f}  mse {out.mse.item():.3f}  kl {out.kl.item():.3f} nats  beta {beta:.3g}")

# Sample z where training put it: the aggregate posterior of the trained encoder, kept as 4096 atoms.
pairs = (task.sample_pairs(1024, generator) for _ in range(4))
prior = VRFMAggregatePosteriorPrior.from_posterior(encoder.eval(), pairs, num_atoms=4096)
pipe = VRFMPipeline(velocity_model=model.eval(), scheduler=VRFMScheduler(), posterior_encoder=encoder, prior=prior)
x0 = task.sample_source(1000, generator)  # this task's source is not N(0, I), so pass it as `latents`
for steps in (1, 2):
    samples = pipe(batch_size=1000, num_inference_steps=steps, latents=x0, generator=generator).samples
    print(f"{steps} Euler step(s): {task.fraction_on_mode(samples):.0%} of samples on a target mode")

pipe.save_pretrained("vrfm-ring")  # reload with DiffusionPipeline.from_pretrained(..., trust_remote_code=True) too
reloaded = VRFMPipeline.from_pretrained("vrfm-ring")
same = reloaded(batch_size=4, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).samples
assert torch.equal(same, pipe(batch_size=4, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).samples)
print("reloaded pipeline reproduces the samples exactly")
