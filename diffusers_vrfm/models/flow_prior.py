"""A learned prior over ``z``: a small RealNVP flow fitted to the aggregate posterior after training, optionally
conditional on a label or prompt key.

[`VRFMAggregatePosteriorPrior`] keeps `K` posteriors of training examples and samples their equal-weight mixture: an
estimate of the aggregate posterior ``q(z)`` whose draws stay close to the training examples' codes.
[`VRFMFlowPrior`] fits a smooth density to draws from that same mixture by maximum likelihood: a stack of affine
coupling layers (Dinh et al., 2017, "Density estimation using Real NVP") over a standardised ``z``. It has a fixed
size whatever `K` was, an exact `log_prob`, and it can put mass between training codes, which the mixture cannot.
`benchmarks/prior_fit.py` compares them on the same trained models: on MNIST (with the `z` map) the atoms' FD is lower
at every step count and the flow's samples are newer; on the digits the atoms replay training images and the flow does
not (docs/benchmarks.md).

The flow maps ``z`` to a standard normal ``u``: ``u = f_L(... f_1((z - m) / s))``, each ``f_l`` keeping the dimensions
its mask selects and moving the others by ``x * exp(a(x_kept)) + b(x_kept)``. Sampling runs the inverse from
``u ~ N(0, I)``; ``log p(z) = log N(u; 0, I) + log |det du / dz|``. A conditional flow (`condition_dim > 0`) also
feeds every layer's MLP an embedding of the condition, so that ``p(z | c)`` is fitted to the atoms of each condition;
a learned null embedding, fitted on a tenth of the draws, stands for "no condition" and gives the marginal.
"""

from __future__ import annotations

import os

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..likelihood import standard_normal_log_prob
from ..objective import check_generator, check_integer, check_tensor, reparameterize
from .latent_prior import (
    check_atom_conditions,
    check_atom_tensors,
    check_condition,
    collect_posterior_atoms,
    prior_batch_size,
)
from .posterior import VRFMPosteriorOutput


def coupling_masks(latent_dim: int, num_layers: int) -> torch.Tensor:
    """The `(num_layers, latent_dim)` 0/1 masks of the coupling layers: layer `l` keeps (mask 1) a fixed random half
    of the dimensions, from a permutation seeded with `l`, and the next layer keeps the complement, so that every
    dimension is moved by every other layer."""
    masks = torch.zeros(num_layers, latent_dim)
    for layer in range(0, num_layers, 2):
        order = torch.randperm(latent_dim, generator=torch.Generator().manual_seed(layer))
        masks[layer, order[: (latent_dim + 1) // 2]] = 1.0
        if layer + 1 < num_layers:
            masks[layer + 1] = 1.0 - masks[layer]
    return masks


def soft_clamp(value: torch.Tensor, bound: float) -> torch.Tensor:
    """``bound * tanh(value / bound)``: the identity near 0, never beyond ``+-bound`` (keeps ``exp`` of it finite)."""
    return bound * torch.tanh(value / bound)


class VRFMFlowPrior(ModelMixin, ConfigMixin):
    """A prior ``p(z)``, or ``p(z | c)``: a RealNVP flow fitted to the aggregate posterior of a trained VRFM model.

    Fit it with [`~VRFMFlowPrior.from_posterior`] (or [`~VRFMFlowPrior.fit`] on posterior atoms) and give it to
    [`VRFMPipeline`] as its `prior` component, like [`VRFMAggregatePosteriorPrior`]; `train_vrfm.py
    --aggregate_prior_type flow` does both. Calling it draws one ``z`` per row (`x0` only gives the number of rows).

    With `condition_dim > 0` it is fitted to `(x0, x1, condition)` batches (each atom with its example's condition,
    e.g. [`label_condition`] of its label or the pooled embedding of its caption), and a call with `condition`
    `(B, condition_dim)` draws from ``p(z | condition)``: [`VRFMPipeline`] and [`VRFMTextToImagePipeline`] pass it as
    they do to a conditional [`VRFMAggregatePosteriorPrior`]. Unlike the atoms, which replay the codes of training
    examples, the flow can draw new ones, and a prompt unlike every training caption still gets a smooth answer. A
    call without `condition` uses the learned null condition: the marginal over conditions.

    Args:
        latent_dim (`int`, defaults to 4): the dimension of ``z``.
        num_layers (`int`, defaults to 8): the number of affine coupling layers.
        hidden_dim (`int`, defaults to 128): the width of each layer's two-hidden-layer MLP.
        log_scale_bound (`float`, defaults to 3.0): each layer scales a coordinate by at most ``exp(+-bound)``.
        condition_dim (`int`, defaults to 0): the size of a condition; 0 for an unconditional prior.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import VRFMFlowPrior, VRFMPosteriorEncoder
    >>> encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=4, posterior_inputs=("x1",))
    >>> pairs = [(torch.randn(64, 2), torch.randn(64, 2)) for _ in range(4)]  # (x0, x1) batches of training data
    >>> prior = VRFMFlowPrior.from_posterior(encoder, pairs, num_atoms=128, num_train_steps=20)
    >>> prior(batch_size=8, generator=torch.Generator().manual_seed(0)).sample.shape
    torch.Size([8, 4])
    >>> prior.log_prob(torch.zeros(3, 4)).shape
    torch.Size([3])
    >>> from diffusers_vrfm import label_condition
    >>> labels = torch.arange(128) % 2
    >>> pairs = [(torch.randn(64, 2), torch.randn(64, 2), label_condition(labels[i * 64 : (i + 1) * 64], 2))
    ...          for i in range(2)]  # (x0, x1, condition) batches of a class-conditional model
    >>> conditional = VRFMFlowPrior.from_posterior(encoder, pairs, num_atoms=128, num_train_steps=20)
    >>> conditional(condition=label_condition(torch.tensor([1, 1, 0]), 2)).sample.shape
    torch.Size([3, 4])
    ```
    """

    @register_to_config
    def __init__(
        self,
        latent_dim: int = 4,
        num_layers: int = 8,
        hidden_dim: int = 128,
        log_scale_bound: float = 3.0,
        condition_dim: int = 0,
    ):
        super().__init__()
        for name, value, minimum in (
            ("latent_dim", latent_dim, 1),
            ("num_layers", num_layers, 1),
            ("hidden_dim", hidden_dim, 1),
            ("condition_dim", condition_dim, 0),
        ):
            check_integer(value, name, minimum)
        positive = isinstance(log_scale_bound, (int, float)) and log_scale_bound > 0
        if isinstance(log_scale_bound, bool) or not positive:
            raise ValueError(f"`log_scale_bound` must be a positive number, but got {log_scale_bound!r}.")
        self.register_buffer("masks", coupling_masks(latent_dim, num_layers))
        self.register_buffer("data_mean", torch.zeros(latent_dim))
        self.register_buffer("data_log_std", torch.zeros(latent_dim))
        feature_dim = hidden_dim if condition_dim > 0 else 0
        self.conditioners = nn.ModuleList(
            self._conditioner(latent_dim, hidden_dim, feature_dim) for _ in range(num_layers)
        )
        if condition_dim > 0:  # standardised condition -> features; a learned feature for "no condition"
            self.register_buffer("condition_mean", torch.zeros(condition_dim))
            self.register_buffer("condition_log_std", torch.zeros(condition_dim))
            self.condition_embedding = nn.Sequential(nn.Linear(condition_dim, hidden_dim), nn.SiLU())
            self.null_condition = nn.Parameter(torch.zeros(hidden_dim))

    @staticmethod
    def _conditioner(latent_dim: int, hidden_dim: int, feature_dim: int = 0) -> nn.Sequential:
        """An MLP from the kept coordinates (and `feature_dim` condition features) to a shift and a raw log-scale;
        zero last layer, so it starts as the identity."""
        net = nn.Sequential(
            nn.Linear(latent_dim + feature_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, 2 * latent_dim),
        )
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
        return net

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`, refusing a weights file that lacks any tensor (diffusers would keep the
        missing ones at their initial values and only warn) or holds NaN or inf."""
        want_info = kwargs.pop("output_loading_info", False)
        prior, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        source = os.fspath(pretrained_model_name_or_path)
        if info["missing_keys"]:
            raise ValueError(
                f"The VRFMFlowPrior weights in {source!r} lack {sorted(info['missing_keys'])}: the file is incomplete."
            )
        not_finite = [name for name, value in prior.state_dict().items() if not torch.isfinite(value).all()]
        if not_finite:
            raise ValueError(f"The VRFMFlowPrior weights in {source!r} hold NaN or inf in {not_finite}.")
        return (prior, info) if want_info else prior

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def condition_dim(self) -> int:
        return self.config.condition_dim

    def condition_features(self, condition: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        """What every layer's MLP reads besides the kept coordinates: the embedding of the standardised `condition`
        `(rows, condition_dim)`, or the learned null feature where `condition` is `None`; `None` for an
        unconditional flow (which refuses a `condition`)."""
        if condition is not None:
            check_condition(condition, self.condition_dim, rows, "condition")
        return self._features(condition, rows)

    def _features(self, condition: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        """[`~VRFMFlowPrior.condition_features`] without the checks (the fit checks its conditions once)."""
        if self.condition_dim == 0:
            return None
        if condition is None:
            return self.null_condition.expand(rows, -1)
        standardised = (condition.to(self.condition_mean) - self.condition_mean) * torch.exp(-self.condition_log_std)
        return self.condition_embedding(standardised)

    def _log_density(self, z: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """``log p(z)`` of each row by the change of variables, given the rows' condition features."""
        u, log_det = self.to_base(z, features)
        return standard_normal_log_prob(u) + log_det

    def _shift_and_log_scale(self, layer: int, kept: torch.Tensor, mask: torch.Tensor, features):
        inputs = kept if features is None else torch.cat([kept, features], dim=-1)
        shift, raw_log_scale = self.conditioners[layer](inputs).chunk(2, dim=-1)
        moved = 1.0 - mask
        return shift * moved, soft_clamp(raw_log_scale, self.config.log_scale_bound) * moved

    def to_base(self, z: torch.Tensor, features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``u = f(z)`` and ``log |det du / dz|`` of each row (shape `(B,)`); a conditional flow takes the rows'
        [`~VRFMFlowPrior.condition_features`]."""
        x = (z - self.data_mean) * torch.exp(-self.data_log_std)
        log_det = (-self.data_log_std.sum()).expand(z.shape[0])
        for layer, mask in enumerate(self.masks):
            shift, log_scale = self._shift_and_log_scale(layer, x * mask, mask, features)
            x = x * torch.exp(log_scale) + shift
            log_det = log_det + log_scale.sum(dim=-1)
        return x, log_det

    def from_base(self, u: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``z = f^{-1}(u)``: the layers of [`~VRFMFlowPrior.to_base`] undone in reverse order."""
        x = u
        for layer in reversed(range(len(self.masks))):
            mask = self.masks[layer]
            shift, log_scale = self._shift_and_log_scale(layer, x * mask, mask, features)
            x = (x - shift) * torch.exp(-log_scale)
        return x * torch.exp(self.data_log_std) + self.data_mean

    def log_prob(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(z)`` of each row of `z` `(B, latent_dim)`, or with `condition` `(B, condition_dim)` ``log p(z |
        c)``, shape `(B,)` (exact, by the change of variables)."""
        check_tensor(z, "z")
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"`z` must have shape (B, {self.latent_dim}), but got {tuple(z.shape)}.")
        return self._log_density(z.to(self.data_mean), self.condition_features(condition, z.shape[0]))

    def forward(
        self,
        x0: torch.Tensor | None = None,
        batch_size: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        condition: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> VRFMPosteriorOutput | tuple:
        """Draws one ``z`` per row (`x0` gives the number of rows; or pass `batch_size`, or `condition`).

        `condition` `(B, condition_dim)`, for a conditional flow only: row `i` draws from ``p(z | condition[i])``.
        Returns a [`VRFMPosteriorOutput`] with only `sample` set: a flow draw has no Gaussian `mean` and `logvar`.
        """
        batch_size = prior_batch_size(x0, batch_size, generator, condition)
        features = self.condition_features(condition, batch_size)
        shape, reference = (batch_size, self.latent_dim), self.data_mean
        u = randn_tensor(shape, generator=generator, device=reference.device, dtype=reference.dtype)
        sample = self.from_base(u, features)
        if not return_dict:
            return (None, None, sample, None)
        return VRFMPosteriorOutput(sample=sample)

    def fit(
        self,
        means: torch.Tensor,
        logvars: torch.Tensor,
        num_train_steps: int = 2000,
        batch_size: int = 512,
        learning_rate: float = 1e-3,
        generator: torch.Generator | None = None,
        conditions: torch.Tensor | None = None,
        condition_dropout: float = 0.1,
    ) -> list[float]:
        """Fits the flow by maximum likelihood to draws from the mixture of the posterior atoms ``N(means_k,
        diag(exp(logvars_k)))`` (the aggregate posterior that [`VRFMAggregatePosteriorPrior`] samples), with Adam
        and a cosine learning-rate decay. Returns the mean negative log-likelihood (nats) of each step's batch.

        Args:
            means, logvars (`torch.Tensor` of shape `(K, latent_dim)`): the atoms, e.g. from
                [`collect_posterior_atoms`].
            num_train_steps (`int`, defaults to 2000), batch_size (`int`, defaults to 512),
            learning_rate (`float`, defaults to 1e-3): the optimisation.
            generator (`torch.Generator`, *optional*, on the CPU): the atoms and noise of every batch.
            conditions (`torch.Tensor` of shape `(K, condition_dim)`): the atoms' conditions; required exactly when
                the flow is conditional.
            condition_dropout (`float`, defaults to 0.1): for a conditional flow, the share of draws fitted with the
                null condition instead of their own, which makes the null condition's flow the marginal.
        """
        means, logvars = check_atom_tensors(means, logvars, self.latent_dim)
        check_atom_conditions(conditions, self.condition_dim, means.shape[0])
        if isinstance(condition_dropout, bool) or not (
            isinstance(condition_dropout, (int, float)) and 0 <= condition_dropout < 1
        ):
            raise ValueError(f"`condition_dropout` must be a number in [0, 1), but got {condition_dropout!r}.")
        for name, value in (("num_train_steps", num_train_steps), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, but got {value!r}.")
        if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
            raise ValueError(f"`learning_rate` must be a positive number, but got {learning_rate!r}.")
        check_generator(generator)
        device = self.data_mean.device
        means, logvars = means.to(device=device, dtype=self.dtype), logvars.to(device=device, dtype=self.dtype)
        with torch.no_grad():  # standardise with the aggregate posterior's own mean and variance
            self.data_mean.copy_(means.mean(dim=0))
            variance = means.var(dim=0, unbiased=False) + logvars.exp().mean(dim=0)
            self.data_log_std.copy_(0.5 * variance.clamp_min(1e-12).log())
            if conditions is not None:  # and the conditions with theirs (a constant entry is left unscaled)
                conditions = conditions.to(device=device, dtype=self.dtype)
                self.condition_mean.copy_(conditions.mean(dim=0))
                self.condition_log_std.copy_(0.5 * conditions.var(dim=0, unbiased=False).clamp_min(1e-6).log())
        optimizer = torch.optim.Adam(self.parameters(), lr=learning_rate)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=num_train_steps)
        losses, atoms = [], (means, logvars, conditions, condition_dropout)
        self.train()
        with torch.enable_grad():
            for _ in range(num_train_steps):
                losses.append(self._fit_step(atoms, batch_size, optimizer, generator))
                schedule.step()
        self.eval()
        return torch.stack(losses).tolist()  # one read at the end, not one per step

    def _fit_step(self, atoms, batch_size: int, optimizer, generator) -> torch.Tensor:
        """One maximum-likelihood step of [`~VRFMFlowPrior.fit`] on a batch drawn from the atoms' mixture; `atoms`:
        `(means, logvars, conditions or None, condition_dropout)`."""
        means, logvars, conditions, condition_dropout = atoms
        device = means.device
        rows = torch.randint(means.shape[0], (batch_size,), generator=generator).to(device)
        noise = torch.randn(batch_size, self.latent_dim, generator=generator).to(device=device, dtype=means.dtype)
        z = reparameterize(means[rows], logvars[rows], noise=noise)
        features = None
        if conditions is not None:
            dropped = (torch.rand(batch_size, generator=generator) < condition_dropout).to(device)
            features = torch.where(
                dropped[:, None], self._features(None, batch_size), self._features(conditions[rows], batch_size)
            )
        loss = -self._log_density(z, features).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    @classmethod
    def from_posterior(
        cls,
        posterior_encoder: torch.nn.Module,
        pairs,
        num_atoms: int = 4096,
        generator: torch.Generator | None = None,
        num_train_steps: int = 2000,
        **config,
    ) -> VRFMFlowPrior:
        """Fits a flow to a trained posterior: the posteriors of `num_atoms` training examples, collected as
        [`VRFMAggregatePosteriorPrior.from_posterior`] collects them, then [`~VRFMFlowPrior.fit`] on them.

        Args:
            posterior_encoder, pairs, num_atoms: as in [`VRFMAggregatePosteriorPrior.from_posterior`].
            generator (`torch.Generator`, *optional*, on the CPU): the flow's initial weights (from its seed), the
                times of the encoding, then the fit's batches: the same generator gives the same prior in any process.
            num_train_steps (`int`, defaults to 2000): steps of [`~VRFMFlowPrior.fit`].
            **config: `num_layers`, `hidden_dim`, `log_scale_bound` of the flow.

        Batches `(x0, x1, condition)` give a conditional flow, fitted to each atom with its condition.
        """
        means, logvars, conditions = collect_posterior_atoms(
            posterior_encoder, pairs, num_atoms, generator, return_conditions=True
        )
        config["condition_dim"] = 0 if conditions is None else conditions.shape[1]
        device = next(posterior_encoder.parameters()).device
        with torch.random.fork_rng(devices=[]):  # the initial weights from `generator` too, not torch's global state
            if generator is not None:
                torch.manual_seed(generator.initial_seed())
            prior = cls(latent_dim=posterior_encoder.latent_dim, **config).to(device)
        prior.fit(means, logvars, num_train_steps=num_train_steps, generator=generator, conditions=conditions)
        return prior
