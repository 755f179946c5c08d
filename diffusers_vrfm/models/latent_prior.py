"""A prior over ``z`` fitted after training: the aggregate posterior, kept as a mixture of atoms (per condition).

VRFM trains with ``z ~ q(z | x0, x1, x_t, t)`` and samples with ``z`` from a prior. Where the *aggregate*
posterior ``q(z) = E_data q(z | ...)`` has its mass in clusters (for example one per mode of the data) and ``N(0, I)``
fills the space between them, prior draws land where training never put ``z`` (the "prior hole") and give samples
between modes. The remedy here is a two-stage one, in the spirit of ex-post density estimation for autoencoders and
of the VampPrior: after training, the posteriors of `num_atoms` training examples are kept, and inference draws ``z``
from their equal-weight mixture ``(1 / K) sum_k N(mu_k, diag(sigma_k^2))``, an estimate of ``q(z)`` itself.

A conditional model (class labels, a text prompt) needs ``z`` from ``q(z | condition)``: the posterior sees the image,
so ``z`` carries its class too, and a velocity model that can read the class from ``z`` learns to ignore the label or
the prompt. With `condition_dim > 0` each atom keeps the condition of its training example (a one-hot label, a pooled
text embedding), and a draw for a condition picks among the atoms whose conditions are nearest to it: a
nearest-neighbour estimate of the aggregate posterior of that condition.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..objective import check_generator, check_integer, check_tensor, interpolate, reparameterize
from .posterior import LOGVAR_RANGE, VRFMPosteriorOutput


def prior_batch_size(x0: torch.Tensor | None, batch_size: int | None, generator, condition=None) -> int:
    """The number of draws a fitted prior makes: `x0`'s rows, else `batch_size`, else the rows of `condition`;
    checks `generator` (one, or one per row) against it."""
    if x0 is not None:
        check_tensor(x0, "x0")
        batch_size = x0.shape[0]
    elif batch_size is None and condition is not None:
        check_tensor(condition, "condition")
        batch_size = condition.shape[0]
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


def check_condition(condition: torch.Tensor, condition_dim: int, rows: int, argument: str) -> None:
    """Checks a prior's `condition` (or atom `conditions`): refused by an unconditional prior (`condition_dim` 0),
    else finite, of shape `(rows, condition_dim)`."""
    if condition_dim == 0:
        raise ValueError(f"`{argument}` was given, but this prior is unconditional (`condition_dim=0`).")
    check_tensor(condition, argument)
    if condition.ndim != 2 or tuple(condition.shape) != (rows, condition_dim):
        raise ValueError(f"`{argument}` must have shape {(rows, condition_dim)}, but got {tuple(condition.shape)}.")
    if not torch.isfinite(condition).all():
        raise ValueError(f"`{argument}` must be finite, but it contains NaN or inf.")


def check_atom_conditions(conditions: torch.Tensor | None, condition_dim: int, num_atoms: int) -> None:
    """Checks the `conditions` `(num_atoms, condition_dim)` of a prior's atoms: given exactly when it is
    conditional."""
    if (conditions is None) != (condition_dim == 0):
        raise ValueError(
            f"`conditions` must be given exactly when the prior is conditional; this one has `condition_dim="
            f"{condition_dim}`, and `conditions` is {'None' if conditions is None else 'given'}."
        )
    if conditions is not None:
        check_condition(conditions, condition_dim, num_atoms, "conditions")


def draw_atom_indices(
    num_atoms: int, batch_size: int, generator, device: torch.device, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """One atom index per row, uniform over the `num_atoms` atoms or, with `weights` `(batch_size, num_atoms)`, over
    each row's atoms of nonzero weight; drawn from `generator` (one, or one per row) on its device (else `device`)."""

    def draw(g, count: int, rows: torch.Tensor | None) -> torch.Tensor:
        on = g.device if g is not None else device
        if rows is None:
            return torch.randint(num_atoms, (count,), generator=g, device=on)
        return torch.multinomial(rows.to(on), 1, generator=g).flatten()

    if isinstance(generator, list):
        rows = [None if weights is None else weights[i : i + 1] for i in range(len(generator))]
        return torch.cat([draw(g, 1, row).cpu() for g, row in zip(generator, rows)])
    return draw(generator, batch_size, weights)


@torch.no_grad()
def collect_posterior_atoms(
    posterior_encoder: torch.nn.Module,
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_atoms: int,
    generator: torch.Generator | None = None,
    return_conditions: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The posterior means and log-variances (float32, `(num_atoms, latent_dim)` each) of the first `num_atoms`
    examples of `pairs`, each `(x0, x1)` batch encoded as training encodes it: with ``t ~ U(0, 1)`` drawn from
    `generator` and ``x_t = (1 - t) x0 + t x1`` for encoders that read them.

    `pairs` may also yield `(x0, x1, condition)` batches, `condition` `(B, condition_dim)` (see
    [`label_condition`]); with `return_conditions=True` the result is `(means, logvars, conditions)`, `conditions`
    float32 `(num_atoms, condition_dim)`, or `None` when the batches have none."""
    if isinstance(num_atoms, bool) or not isinstance(num_atoms, int) or num_atoms < 1:
        raise ValueError(f"`num_atoms` must be a positive integer, but got {num_atoms!r}.")
    check_generator(generator)
    parameter = next(posterior_encoder.parameters())
    means, logvars, conditions, collected = [], [], [], 0
    for x0, x1, *condition in pairs:  # `condition`: [] or [the batch's condition]
        x0, x1 = (x.to(device=parameter.device, dtype=parameter.dtype) for x in (x0, x1))
        t_device = generator.device if generator is not None else x1.device
        t = torch.rand(x1.shape[0], generator=generator, device=t_device).to(x1.device)
        no_draw = x1.new_zeros(x1.shape[0], posterior_encoder.latent_dim)  # only the mean and log-variance are kept
        output = posterior_encoder(x0=x0, x1=x1, x_t=interpolate(x0, x1, t), t=t, noise=no_draw)
        means.append(output.mean.float())
        logvars.append(output.logvar.float())
        conditions += [value.float().to(parameter.device) for value in condition]
        collected += x1.shape[0]
        if collected >= num_atoms:
            break
    if collected < num_atoms:
        raise ValueError(f"`pairs` gave {collected} examples, fewer than `num_atoms` ({num_atoms}).")
    atoms = (torch.cat(means)[:num_atoms], torch.cat(logvars)[:num_atoms])
    if not return_conditions:
        return atoms
    if conditions and len(conditions) != len(means):
        raise ValueError("`pairs` must yield conditions with every batch or with none.")
    return (*atoms, torch.cat(conditions)[:num_atoms] if conditions else None)


def label_condition(class_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The condition key of class labels for a conditional [`VRFMAggregatePosteriorPrior`]: one-hot rows, float32.

    ```py
    >>> import torch
    >>> from diffusers_vrfm import label_condition
    >>> label_condition(torch.tensor([2, 0]), num_classes=3).tolist()
    [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    ```
    """
    return torch.nn.functional.one_hot(class_labels.long(), num_classes).float()


ATOM_BUFFERS = ("atom_means", "atom_logvars", "atom_conditions")


class VRFMAggregatePosteriorPrior(ModelMixin, ConfigMixin):
    """A prior ``p(z) = (1 / K) sum_k N(z; mu_k, diag(exp(logvar_k)))`` over posterior atoms, optionally conditional.

    Fill it with [`~VRFMAggregatePosteriorPrior.from_posterior`] (or [`~VRFMAggregatePosteriorPrior.set_atoms`]) and
    give it to [`VRFMPipeline`] as its `prior` component: every trajectory then draws its ``z`` from it instead of from
    ``N(0, I)``. It is saved and loaded like any other component (the atoms are buffers in its safetensors file).

    Calling it draws one ``z`` per row: an atom uniformly at random, then a reparameterised draw from its Gaussian. It
    takes the source points `x0` only for the batch size (it does not depend on them), so that it is called exactly
    like a conditional prior.

    With `condition_dim > 0` every atom also keeps the condition of its training example (`atom_conditions`), and a
    call with `condition` `(B, condition_dim)` draws row `i`'s atom uniformly among the atoms whose condition equals
    `condition[i]` (all atoms of that label or caption), or, where none does (a new prompt), among the
    `num_neighbors` nearest (Euclidean). A call without `condition` draws from all atoms.
    [`VRFMPipeline`] passes [`label_condition`] of its `class_labels`, [`VRFMTextToImagePipeline`] the prompt's pooled
    text embedding; `train_vrfm.py` fits such a prior for every class-conditional or text-to-image model.

    Args:
        latent_dim (`int`, defaults to 4): the dimension of ``z``.
        num_atoms (`int`, defaults to 4096): `K`, the number of posterior atoms kept.
        condition_dim (`int`, defaults to 0): the size of an atom's condition; 0 for an unconditional prior.
        num_neighbors (`int`, defaults to 32): how many nearest atoms a conditional draw picks among when no atom's
            condition equals the one asked for.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import VRFMAggregatePosteriorPrior, VRFMPosteriorEncoder
    >>> encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=4, posterior_inputs=("x1",))
    >>> pairs = [(torch.randn(64, 2), torch.randn(64, 2)) for _ in range(4)]  # (x0, x1) batches of training data
    >>> prior = VRFMAggregatePosteriorPrior.from_posterior(encoder, pairs, num_atoms=128)
    >>> prior(batch_size=8, generator=torch.Generator().manual_seed(0)).sample.shape
    torch.Size([8, 4])
    >>> from diffusers_vrfm import label_condition
    >>> labels = torch.arange(128) % 2
    >>> pairs = [(torch.randn(64, 2), torch.randn(64, 2), label_condition(labels[i * 64 : (i + 1) * 64], 2))
    ...          for i in range(2)]  # (x0, x1, condition) batches of a class-conditional model
    >>> conditional = VRFMAggregatePosteriorPrior.from_posterior(encoder, pairs, num_atoms=128)
    >>> conditional(condition=label_condition(torch.tensor([1, 1, 0]), 2)).sample.shape
    torch.Size([3, 4])
    ```
    """

    @register_to_config
    def __init__(self, latent_dim: int = 4, num_atoms: int = 4096, condition_dim: int = 0, num_neighbors: int = 32):
        super().__init__()
        for name, value, minimum in (
            ("latent_dim", latent_dim, 1),
            ("num_atoms", num_atoms, 1),
            ("condition_dim", condition_dim, 0),
            ("num_neighbors", num_neighbors, 1),
        ):
            check_integer(value, name, minimum)
        self.register_buffer("atom_means", torch.zeros(num_atoms, latent_dim))
        self.register_buffer("atom_logvars", torch.zeros(num_atoms, latent_dim))
        if condition_dim > 0:
            self.register_buffer("atom_conditions", torch.zeros(num_atoms, condition_dim))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`, then the checks of [`~VRFMAggregatePosteriorPrior.check_atoms`]: a weights
        file missing an atom tensor, or holding atoms that are not finite or outside the log-variance clamp, is
        refused (diffusers itself would keep the missing buffer at its initial zeros and only warn)."""
        want_info = kwargs.pop("output_loading_info", False)
        prior, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        missing = [name for name in ATOM_BUFFERS if name in info["missing_keys"]]
        if missing:
            raise ValueError(
                f"The VRFMAggregatePosteriorPrior weights in {pretrained_model_name_or_path!r} lack {missing}: the "
                "file is incomplete (a prior needs `atom_means` and `atom_logvars`, and a conditional one "
                "`atom_conditions`)."
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
        if self.condition_dim > 0 and not torch.isfinite(self.atom_conditions).all():
            raise ValueError(f"{source}: `atom_conditions` contain NaN or inf; conditions must be finite.")

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def num_atoms(self) -> int:
        return self.config.num_atoms

    @property
    def condition_dim(self) -> int:
        return self.config.condition_dim

    @torch.no_grad()
    def set_atoms(
        self, means: torch.Tensor, logvars: torch.Tensor, conditions: torch.Tensor | None = None
    ) -> VRFMAggregatePosteriorPrior:
        """Stores `means` and `logvars`, each of shape `(num_atoms, latent_dim)`, as the mixture's atoms, and for a
        conditional prior their `conditions` `(num_atoms, condition_dim)`."""
        means, logvars = check_atom_tensors(means, logvars, self.latent_dim, self.num_atoms)
        check_atom_conditions(conditions, self.condition_dim, self.num_atoms)
        if conditions is not None:
            self.atom_conditions.copy_(conditions)
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
        num_neighbors: int = 32,
    ) -> VRFMAggregatePosteriorPrior:
        """Fits the prior to a trained posterior: the posteriors of the first `num_atoms` training examples.

        Each `(x0, x1)` batch of `pairs` is encoded as training encodes it: with ``t ~ U(0, 1)`` and
        ``x_t = (1 - t) x0 + t x1`` for encoders that read them. Batches are consumed until `num_atoms` examples are
        collected. Batches `(x0, x1, condition)` give a conditional prior that keeps each atom's condition.

        Args:
            posterior_encoder: a trained posterior encoder (for example [`VRFMPosteriorEncoder`]).
            pairs (iterable of `(x0, x1)` or `(x0, x1, condition)` tensors): source and data batches, as in
                training, and the examples' conditions (e.g. [`label_condition`] of their labels).
            num_atoms (`int`, defaults to 4096): `K`.
            generator (`torch.Generator`, *optional*): for the times ``t``.
            num_neighbors (`int`, defaults to 32): for a conditional prior, see the class.
        """
        means, logvars, conditions = collect_posterior_atoms(
            posterior_encoder, pairs, num_atoms, generator, return_conditions=True
        )
        device = next(posterior_encoder.parameters()).device
        condition_dim = 0 if conditions is None else conditions.shape[1]
        prior = cls(
            latent_dim=posterior_encoder.latent_dim,
            num_atoms=num_atoms,
            condition_dim=condition_dim,
            num_neighbors=num_neighbors,
        )
        conditions = None if conditions is None else conditions.cpu()
        return prior.set_atoms(means.cpu(), logvars.cpu(), conditions).to(device=device)

    def forward(
        self,
        x0: torch.Tensor | None = None,
        batch_size: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        condition: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> VRFMPosteriorOutput | tuple:
        """Draws one ``z`` per row (`x0` gives the number of rows; or pass `batch_size`, or `condition`).

        `condition` `(B, condition_dim)`, for a conditional prior only: each row draws among the atoms nearest its
        condition (see the class). Returns a [`VRFMPosteriorOutput`] whose `mean` and `logvar` are those of the atom
        each row drew, and whose `kl` is `None` (the mixture has no closed-form KL to a single Gaussian).
        """
        batch_size = prior_batch_size(x0, batch_size, generator, condition)
        weights = None
        if condition is not None:
            check_condition(condition, self.condition_dim, batch_size, "condition")
            weights = self.neighbor_mask(condition)
        index = draw_atom_indices(self.num_atoms, batch_size, generator, self.atom_means.device, weights)
        index = index.to(self.atom_means.device)
        mean, logvar = self.atom_means[index], self.atom_logvars[index]
        sample = reparameterize(mean, logvar, generator=generator)
        if not return_dict:
            return (mean, logvar, sample, None)
        return VRFMPosteriorOutput(mean=mean, logvar=logvar, sample=sample, kl=None)

    def neighbor_mask(self, condition: torch.Tensor) -> torch.Tensor:
        """`(B, num_atoms)`, 1.0 where an atom is a candidate for that row's condition: every atom whose condition
        equals it (to a relative 1e-4), or where none does, the `num_neighbors` nearest (ties included)."""
        conditions = self.atom_conditions
        condition = condition.to(conditions)
        distance = torch.cdist(condition, conditions, compute_mode="donot_use_mm_for_euclid_dist")
        equal = distance <= 1e-4 * (1 + condition.norm(dim=1, keepdim=True))
        kth = distance.kthvalue(min(self.config.num_neighbors, self.num_atoms), dim=1, keepdim=True).values
        nearest = distance <= kth * (1 + 1e-5) + 1e-6
        return torch.where(equal.any(dim=1, keepdim=True), equal, nearest).float()

    def log_prob(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(z)`` of each row of `z` `(B, latent_dim)`, shape `(B,)`: under the mixture of all atoms (for a
        conditional prior, the marginal over conditions), or with `condition` `(B, condition_dim)`, ``log p(z | c)``
        under the mixture of the atoms a draw for that condition picks among (see the class)."""
        check_tensor(z, "z")
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"`z` must have shape (B, {self.latent_dim}), but got {tuple(z.shape)}.")
        candidates = None
        if condition is not None:
            check_condition(condition, self.condition_dim, z.shape[0], "condition")
            candidates = self.neighbor_mask(condition)
        z = z.to(self.atom_means)[:, None, :]  # (B, 1, d) against (K, d)
        log_density = -0.5 * (
            (z - self.atom_means).pow(2) / self.atom_logvars.exp() + self.atom_logvars + math.log(2 * math.pi)
        ).sum(dim=-1)
        if candidates is None:
            return torch.logsumexp(log_density, dim=1) - math.log(self.num_atoms)
        log_density = log_density.masked_fill(candidates == 0, -math.inf)
        return torch.logsumexp(log_density, dim=1) - candidates.sum(dim=1).log()
