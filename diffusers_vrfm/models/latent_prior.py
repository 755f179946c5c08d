"""An unconditional prior over ``z`` fitted after training: the aggregate posterior, kept as a mixture of atoms.

VRFM trains with ``z ~ q(z | x0, x1, x_t, t)`` and samples with ``z`` from a prior. Where the *aggregate*
posterior ``q(z) = E_data q(z | ...)`` has its mass in clusters (for example one per mode of the data) and ``N(0, I)``
fills the space between them, prior draws land where training never put ``z`` (the "prior hole") and give samples
between modes. The remedy here is a two-stage one, in the spirit of ex-post density estimation for autoencoders and
of the VampPrior: after training, the posteriors of `num_atoms` training examples are kept, and inference draws ``z``
from their equal-weight mixture ``(1 / K) sum_k N(mu_k, diag(sigma_k^2))``, an estimate of ``q(z)`` itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..objective import check_generator, check_tensor, interpolate, reparameterize
from .posterior import LOGVAR_RANGE, VRFMPosteriorOutput


def prior_batch_size(x0: torch.Tensor | None, batch_size: int | None, generator) -> int:
    """The number of draws an unconditional prior makes: `x0`'s rows, else `batch_size`; checks `generator` (one,
    or one per row) against it."""
    if x0 is not None:
        check_tensor(x0, "x0")
        batch_size = x0.shape[0]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` (or `x0.shape[0]`) must be a positive integer, but got {batch_size!r}.")
    check_generator(generator, batch_size=batch_size)
    return batch_size


def check_atom_tensors(
    means: torch.Tensor, logvars: torch.Tensor, latent_dim: int, num_atoms: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks posterior atoms: finite `means` and `logvars` of one shape `(num_atoms, latent_dim)` (any number of
    rows when `num_atoms` is `None`)."""
    for name, value in (("means", means), ("logvars", logvars)):
        check_tensor(value, name)
        rows = num_atoms if num_atoms is not None else means.shape[0]
        if value.ndim != 2 or tuple(value.shape) != (rows, latent_dim) or rows < 1:
            raise ValueError(
                f"`{name}` must have shape {(rows, latent_dim)} (num_atoms, latent_dim), but got {tuple(value.shape)}."
            )
        if not torch.isfinite(value).all():
            raise ValueError(f"`{name}` must be finite, but it contains NaN or inf.")
    return means, logvars


@torch.no_grad()
def collect_posterior_atoms(
    posterior_encoder: torch.nn.Module,
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_atoms: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior means and log-variances (float32, `(num_atoms, latent_dim)` each) of the first `num_atoms`
    examples of `pairs`, each `(x0, x1)` batch encoded as training encodes it: with ``t ~ U(0, 1)`` drawn from
    `generator` and ``x_t = (1 - t) x0 + t x1`` for encoders that read them."""
    if isinstance(num_atoms, bool) or not isinstance(num_atoms, int) or num_atoms < 1:
        raise ValueError(f"`num_atoms` must be a positive integer, but got {num_atoms!r}.")
    check_generator(generator)
    parameter = next(posterior_encoder.parameters())
    means, logvars, collected = [], [], 0
    for x0, x1 in pairs:
        x0, x1 = (x.to(device=parameter.device, dtype=parameter.dtype) for x in (x0, x1))
        t_device = generator.device if generator is not None else x1.device
        t = torch.rand(x1.shape[0], generator=generator, device=t_device).to(x1.device)
        output = posterior_encoder(x0=x0, x1=x1, x_t=interpolate(x0, x1, t), t=t)
        means.append(output.mean.float())
        logvars.append(output.logvar.float())
        collected += x1.shape[0]
        if collected >= num_atoms:
            break
    if collected < num_atoms:
        raise ValueError(f"`pairs` gave {collected} examples, fewer than `num_atoms` ({num_atoms}).")
    return torch.cat(means)[:num_atoms], torch.cat(logvars)[:num_atoms]


class VRFMAggregatePosteriorPrior(ModelMixin, ConfigMixin):
    """An unconditional prior ``p(z) = (1 / K) sum_k N(z; mu_k, diag(exp(logvar_k)))`` over posterior atoms.

    Fill it with [`~VRFMAggregatePosteriorPrior.from_posterior`] (or [`~VRFMAggregatePosteriorPrior.set_atoms`]) and
    give it to [`VRFMPipeline`] as its `prior` component: every trajectory then draws its ``z`` from it instead of from
    ``N(0, I)``. It is saved and loaded like any other component (the atoms are buffers in its safetensors file).

    Calling it draws one ``z`` per row: an atom uniformly at random, then a reparameterised draw from its Gaussian. It
    takes the source points `x0` only for the batch size (it does not depend on them), so that it is called exactly
    like a conditional prior.

    Args:
        latent_dim (`int`, defaults to 4): the dimension of ``z``.
        num_atoms (`int`, defaults to 4096): `K`, the number of posterior atoms kept.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import VRFMAggregatePosteriorPrior, VRFMPosteriorEncoder
    >>> encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=4, posterior_inputs=("x1",))
    >>> pairs = [(torch.randn(64, 2), torch.randn(64, 2)) for _ in range(4)]  # (x0, x1) batches of training data
    >>> prior = VRFMAggregatePosteriorPrior.from_posterior(encoder, pairs, num_atoms=128)
    >>> prior(batch_size=8, generator=torch.Generator().manual_seed(0)).sample.shape
    torch.Size([8, 4])
    ```
    """

    @register_to_config
    def __init__(self, latent_dim: int = 4, num_atoms: int = 4096):
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("num_atoms", num_atoms)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, but got {value!r}.")
        self.register_buffer("atom_means", torch.zeros(num_atoms, latent_dim))
        self.register_buffer("atom_logvars", torch.zeros(num_atoms, latent_dim))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`, then the checks of [`~VRFMAggregatePosteriorPrior.check_atoms`]: a weights
        file missing an atom tensor, or holding atoms that are not finite or outside the log-variance clamp, is
        refused (diffusers itself would keep the missing buffer at its initial zeros and only warn)."""
        want_info = kwargs.pop("output_loading_info", False)
        prior, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        missing = [name for name in ("atom_means", "atom_logvars") if name in info["missing_keys"]]
        if missing:
            raise ValueError(
                f"The VRFMAggregatePosteriorPrior weights in {pretrained_model_name_or_path!r} lack {missing}: the "
                "file is incomplete (a prior needs both `atom_means` and `atom_logvars`)."
            )
        prior.check_atoms(source=os.fspath(pretrained_model_name_or_path))
        return (prior, info) if want_info else prior

    def check_atoms(self, source: str = "the prior") -> None:
        """Raises a `ValueError` unless every atom mean is finite and every log-variance lies in the clamp range
        `LOGVAR_RANGE` that [`~VRFMAggregatePosteriorPrior.set_atoms`] applies."""
        low, high = LOGVAR_RANGE
        if not torch.isfinite(self.atom_means).all():
            count = int((~torch.isfinite(self.atom_means)).any(dim=1).sum())
            raise ValueError(f"{source}: `atom_means` of {count} atom(s) contain NaN or inf; atoms must be finite.")
        logvars = self.atom_logvars
        outside = ~torch.isfinite(logvars) | (logvars < low) | (logvars > high)
        if outside.any():
            raise ValueError(
                f"{source}: `atom_logvars` of {int(outside.any(dim=1).sum())} atom(s) are not finite or lie outside "
                f"the log-variance range [{low}, {high}] (e.g. {logvars[outside][0].item()}); set_atoms clamps to it, "
                "so these atoms were not written by this class."
            )

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def num_atoms(self) -> int:
        return self.config.num_atoms

    @torch.no_grad()
    def set_atoms(self, means: torch.Tensor, logvars: torch.Tensor) -> VRFMAggregatePosteriorPrior:
        """Stores `means` and `logvars`, each of shape `(num_atoms, latent_dim)`, as the mixture's atoms."""
        means, logvars = check_atom_tensors(means, logvars, self.latent_dim, self.num_atoms)
        self.atom_means.copy_(means)
        self.atom_logvars.copy_(logvars.clamp(*LOGVAR_RANGE))
        return self

    @classmethod
    @torch.no_grad()
    def from_posterior(
        cls,
        posterior_encoder: torch.nn.Module,
        pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
        num_atoms: int = 4096,
        generator: torch.Generator | None = None,
    ) -> VRFMAggregatePosteriorPrior:
        """Fits the prior to a trained posterior: the posteriors of the first `num_atoms` training examples.

        Each `(x0, x1)` batch of `pairs` is encoded as training encodes it: with ``t ~ U(0, 1)`` and
        ``x_t = (1 - t) x0 + t x1`` for encoders that read them. Batches are consumed until `num_atoms` examples are
        collected.

        Args:
            posterior_encoder: a trained posterior encoder (for example [`VRFMPosteriorEncoder`]).
            pairs (iterable of `(x0, x1)` tensor pairs): source and data batches, as in training.
            num_atoms (`int`, defaults to 4096): `K`.
            generator (`torch.Generator`, *optional*): for the times ``t``.
        """
        means, logvars = collect_posterior_atoms(posterior_encoder, pairs, num_atoms, generator)
        device = next(posterior_encoder.parameters()).device
        prior = cls(latent_dim=posterior_encoder.latent_dim, num_atoms=num_atoms)
        return prior.set_atoms(means.cpu(), logvars.cpu()).to(device=device)

    def forward(
        self,
        x0: torch.Tensor | None = None,
        batch_size: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> VRFMPosteriorOutput | tuple:
        """Draws one ``z`` per row (`x0` gives the number of rows; or pass `batch_size`).

        Returns a [`VRFMPosteriorOutput`] whose `mean` and `logvar` are those of the atom each row drew, and whose `kl`
        is `None` (the mixture has no closed-form KL to a single Gaussian).
        """
        batch_size = prior_batch_size(x0, batch_size, generator)
        if isinstance(generator, list):
            index = torch.cat(
                [torch.randint(self.num_atoms, (1,), generator=g, device=g.device).cpu() for g in generator]
            )
        else:
            index_device = generator.device if generator is not None else self.atom_means.device
            index = torch.randint(self.num_atoms, (batch_size,), generator=generator, device=index_device)
        index = index.to(self.atom_means.device)
        mean, logvar = self.atom_means[index], self.atom_logvars[index]
        sample = reparameterize(mean, logvar, generator=generator)
        if not return_dict:
            return (mean, logvar, sample, None)
        return VRFMPosteriorOutput(mean=mean, logvar=logvar, sample=sample, kl=None)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log p(z)`` of each row of `z` `(B, latent_dim)` under the mixture, shape `(B,)`."""
        check_tensor(z, "z")
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"`z` must have shape (B, {self.latent_dim}), but got {tuple(z.shape)}.")
        z = z.to(self.atom_means)[:, None, :]  # (B, 1, d) against (K, d)
        log_density = -0.5 * (
            (z - self.atom_means).pow(2) / self.atom_logvars.exp() + self.atom_logvars + math.log(2 * math.pi)
        ).sum(dim=-1)
        return torch.logsumexp(log_density, dim=1) - math.log(self.num_atoms)
