"""Posterior (recognition) encoders q(z | x0, x1, x_t, t)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..objective import gaussian_kl, reparameterize
from .z_embedding import check_sample, check_timestep, value_checks_enabled

POSTERIOR_INPUTS = ("x0", "x1", "x_t", "t")
LOGVAR_RANGE = (-30.0, 20.0)


@dataclass
class VRFMPosteriorOutput(BaseOutput):
    """Output of a posterior encoder.

    Args:
        mean (`torch.Tensor` of shape `(B, latent_dim)`): the posterior mean.
        logvar (`torch.Tensor` of shape `(B, latent_dim)`): the posterior log-variance.
        sample (`torch.Tensor` of shape `(B, latent_dim)`): a reparameterised draw ``mean + exp(logvar / 2) * eps``.
        kl (`torch.Tensor` of shape `(B,)`): ``KL(q || N(0, I))`` of each example, summed over latent dimensions.
    """

    mean: torch.Tensor = None
    logvar: torch.Tensor = None
    sample: torch.Tensor = None
    kl: torch.Tensor = None


def validate_posterior_inputs(posterior_inputs) -> tuple[str, ...]:
    """Checks a subset of {x0, x1, x_t, t} and returns it in canonical order."""
    if isinstance(posterior_inputs, str):
        posterior_inputs = [posterior_inputs]
    if not isinstance(posterior_inputs, (list, tuple)):
        raise TypeError(
            f"`posterior_inputs` must be a list or tuple of names from {POSTERIOR_INPUTS}, but got "
            f"{type(posterior_inputs).__name__} {posterior_inputs!r}."
        )
    chosen = list(posterior_inputs)
    unknown = [name for name in chosen if name not in POSTERIOR_INPUTS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"`posterior_inputs` must be a non-empty subset of {POSTERIOR_INPUTS} without repeats, but got {chosen!r}."
        )
    if chosen == ["t"]:
        raise ValueError("`posterior_inputs` must include at least one of 'x0', 'x1', 'x_t', not only 't'.")
    return tuple(name for name in POSTERIOR_INPUTS if name in chosen)


class PosteriorEncoderMixin:
    """The interface every posterior encoder shares: which inputs it reads, validation, and the Gaussian head.

    Subclasses set `self.posterior_inputs`, `self.sample_shape` and implement `encode(inputs, t) -> (mean, logvar)`,
    where `inputs` maps each chosen data input name to a tensor and `t` is the time (or `None` when not read).
    """

    def _gather_inputs(self, x0, x1, x_t, t):
        given = {"x0": x0, "x1": x1, "x_t": x_t}
        inputs = {}
        batch_size = first = None
        for name in self.posterior_inputs:
            if name == "t":
                continue
            value = given[name]
            if value is None:
                raise ValueError(f"This posterior reads {self.posterior_inputs}, so `{name}` is required.")
            check_sample(value, self.sample_shape, argument=name)
            if batch_size is not None and value.shape[0] != batch_size:
                raise ValueError(f"`{name}` has batch size {value.shape[0]}, but `{first}` has {batch_size}.")
            batch_size, first = value.shape[0], first or name
            if value_checks_enabled() and not torch.isfinite(value).all():
                raise ValueError(f"`{name}` must be finite, but it contains NaN or inf.")
            inputs[name] = value
        reference = next(iter(inputs.values()))
        time = None
        if "t" in self.posterior_inputs:
            if t is None:
                raise ValueError(f"This posterior reads {self.posterior_inputs}, so `t` is required.")
            time = check_timestep(t, batch_size, reference.device, torch.float32, argument="t", batch_from=first)
        return inputs, time

    def forward(
        self,
        x0: torch.Tensor | None = None,
        x1: torch.Tensor | None = None,
        x_t: torch.Tensor | None = None,
        t: torch.Tensor | float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        noise: torch.Tensor | None = None,
    ) -> VRFMPosteriorOutput | tuple:
        """Encodes the chosen inputs into a diagonal Gaussian and draws one reparameterised sample.

        The sample's standard-normal draw comes from `generator` (one for the batch, or one per row), or is given as
        `noise` of shape `(B, latent_dim)` (the training loop draws it for the whole global batch on the device).

        Inputs that the encoder does not read may be passed and are ignored, so a training loop can always pass all
        four. Returns a [`VRFMPosteriorOutput`] (or the tuple `(mean, logvar, sample, kl)`).
        """
        inputs, time = self._gather_inputs(x0, x1, x_t, t)
        mean, logvar = self.encode(inputs, time)
        logvar = logvar.clamp(*LOGVAR_RANGE)
        sample = reparameterize(mean, logvar, generator=generator, noise=noise)
        kl = gaussian_kl(mean.float(), logvar.float()).sum(dim=-1)
        if not return_dict:
            return (mean, logvar, sample, kl)
        return VRFMPosteriorOutput(mean=mean, logvar=logvar, sample=sample, kl=kl)


class VRFMPosteriorEncoder(PosteriorEncoderMixin, ModelMixin, ConfigMixin):
    """An MLP posterior ``q(z | x0, x1, x_t, t)`` for vector data.

    It concatenates the chosen inputs (flattened; ``t`` through a sinusoidal embedding) and maps them to the mean and
    log-variance of a diagonal Gaussian over ``z``.

    Args:
        sample_size (`int`): the data dimension.
        latent_dim (`int`, defaults to 4): the dimension of ``z``.
        posterior_inputs (`tuple[str]`, defaults to `("x0", "x1", "x_t", "t")`): which of the four to read.
        hidden_dim (`int`, defaults to 64), num_layers (`int`, defaults to 2): the MLP's width and depth.
        time_embed_dim (`int`, defaults to 32): the sinusoidal embedding size of ``t``.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import VRFMPosteriorEncoder
    >>> encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=4)
    >>> x0, x1, t = torch.randn(8, 2), torch.randn(8, 2), torch.rand(8)
    >>> out = encoder(x0=x0, x1=x1, x_t=(1 - t[:, None]) * x0 + t[:, None] * x1, t=t)
    >>> out.mean.shape, out.kl.shape
    (torch.Size([8, 4]), torch.Size([8]))
    ```
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 2,
        latent_dim: int = 4,
        posterior_inputs: tuple[str, ...] = ("x0", "x1", "x_t", "t"),
        hidden_dim: int = 64,
        num_layers: int = 2,
        time_embed_dim: int = 32,
    ):
        super().__init__()
        for name, value in (
            ("sample_size", sample_size),
            ("latent_dim", latent_dim),
            ("hidden_dim", hidden_dim),
            ("num_layers", num_layers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, but got {value!r}.")
        # below 4, diffusers' sinusoidal embedding divides 0 by 0
        if isinstance(time_embed_dim, bool) or not isinstance(time_embed_dim, int) or time_embed_dim < 4:
            raise ValueError(f"`time_embed_dim` must be an integer >= 4, but got {time_embed_dim!r}.")
        self.posterior_inputs = validate_posterior_inputs(posterior_inputs)
        self.register_to_config(posterior_inputs=list(self.posterior_inputs))
        num_data_inputs = sum(name != "t" for name in self.posterior_inputs)
        in_features = num_data_inputs * sample_size + (time_embed_dim if "t" in self.posterior_inputs else 0)
        layers = [nn.Linear(in_features, hidden_dim), nn.SiLU()]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.to_mean = nn.Linear(hidden_dim, latent_dim)
        self.to_logvar = nn.Linear(hidden_dim, latent_dim)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.config.sample_size,)

    def encode(self, inputs: dict[str, torch.Tensor], time: torch.Tensor | None):
        weight = self.to_mean.weight  # inputs run on the model's device and dtype
        features = [
            inputs[name].flatten(1).to(device=weight.device, dtype=weight.dtype)
            for name in self.posterior_inputs
            if name != "t"
        ]
        if time is not None:
            embedding = get_timestep_embedding(time * 1000.0, self.config.time_embed_dim, flip_sin_to_cos=True)
            features.append(embedding.to(device=weight.device, dtype=weight.dtype))
        hidden = self.net(torch.cat(features, dim=-1))
        return self.to_mean(hidden), self.to_logvar(hidden)
