"""Train a tiny VRFM on the paper's 2D ring task, sample it in one and two steps, save it and load it back."""

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

task = get_toy_task("ring_2d")  # 6 Gaussians at radius 1/3 (t = 0) to 6 Gaussians at radius 1 (t = 1)
model = VRFMMLPModel(sample_size=2, latent_dim=8)
encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=8)  # q(z | x0, x1, x_t, t)
optimizer = torch.optim.Adam([*model.parameters(), *encoder.parameters()], lr=1e-3)
generator = torch.Generator().manual_seed(0)

for _ in range(2000):
    x0, x1 = task.sample_pairs(256, generator)
    t = torch.rand(256, generator=generator)
    x_t = interpolate(x0, x1, t)
    posterior = encoder(x0=x0, x1=x1, x_t=x_t, t=t, generator=generator)
    velocity = model(x_t, t, z=posterior.sample).sample
    out = vrfm_loss(velocity, target_velocity(x0, x1), posterior.mean, posterior.logvar, beta=0.1)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
print(f"loss {out.loss.item():.3f}  mse {out.mse.item():.3f}  kl {out.kl.item():.3f} nats")

pipe = VRFMPipeline(velocity_model=model.eval(), scheduler=VRFMScheduler(), posterior_encoder=encoder)
x0 = task.sample_source(1000, generator)  # this task's source is not N(0, I), so pass it as `latents`
for steps in (1, 2):
    samples = pipe(batch_size=1000, num_inference_steps=steps, latents=x0, generator=generator).samples
    print(f"{steps} Euler step(s): {task.fraction_on_mode(samples):.0%} of samples on a target mode")

pipe.save_pretrained("vrfm-ring")
reloaded = VRFMPipeline.from_pretrained(
    "vrfm-ring"
)  # or DiffusionPipeline.from_pretrained(..., trust_remote_code=True)
same = reloaded(batch_size=4, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).samples
assert torch.equal(same, pipe(batch_size=4, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).samples)
print("reloaded pipeline reproduces the samples exactly")
