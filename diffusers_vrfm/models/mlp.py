"""VRFMMLPModel: a velocity network for vector data (1D, 2D, tabular)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..objective import check_integer
from .z_embedding import (
    LatentEmbedding,
    VRFMVelocityOutput,
    check_velocity_inputs,
)

ACTIVATIONS = {"selu": nn.SELU, "silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU}


class VRFMMLPModel(ModelMixin, ConfigMixin):
    """A velocity MLP ``v(x_t, t, z)`` for vector data.

    ``x``, the sinusoidal embedding of ``t`` and the embedding of ``z`` (a [`LatentEmbedding`], zero-initialised
    last layer) are each projected to `hidden_dim`. The time and latent embeddings are **summed** into one
    conditioning vector, concatenated with the embedding of ``x`` and fed through `num_layers` hidden layers.
    With `latent_dim=0` there is no ``z`` path at all: the model is the plain rectified-flow baseline of equal width.

    Args:
        sample_size (`int`): the data dimension.
        latent_dim (`int`, defaults to 4): the dimension of ``z``; 0 gives plain rectified flow.
        hidden_dim (`int`, defaults to 64): the width.
        num_layers (`int`, defaults to 3): the number of hidden layers after the embeddings.
        activation (`str`, defaults to `"selu"`): one of `"selu"`, `"silu"`, `"relu"`, `"gelu"`, `"elu"`.
        time_embed_dim (`int`, defaults to 64): the sinusoidal embedding size of ``t`` (``t`` is scaled by 1000).
        num_classes (`int`, *optional*): the number of classes for class conditioning; label `num_classes` is the
            null label of classifier-free guidance.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import VRFMMLPModel
    >>> model = VRFMMLPModel(sample_size=2, latent_dim=4)
    >>> model(torch.randn(8, 2), torch.rand(8), z=torch.randn(8, 4)).sample.shape
    torch.Size([8, 2])
    ```
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: int = 2,
        latent_dim: int = 4,
        hidden_dim: int = 64,
        num_layers: int = 3,
        activation: str = "selu",
        time_embed_dim: int = 64,
        num_classes: int | None = None,
    ):
        super().__init__()
        for name, value, minimum in (
            ("sample_size", sample_size, 1),
            ("latent_dim", latent_dim, 0),
            ("hidden_dim", hidden_dim, 1),
            ("num_layers", num_layers, 1),
            ("time_embed_dim", time_embed_dim, 4),  # below 4, diffusers' sinusoidal embedding divides 0 by 0
        ):
            check_integer(value, name, minimum)
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {tuple(ACTIVATIONS)}, but got {activation!r}.")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(f"`num_classes` must be None or a positive integer, but got {num_classes!r}.")
        act = ACTIVATIONS[activation]
        self.x_embedding = nn.Linear(sample_size, hidden_dim)
        self.t_embedding = nn.Sequential(
            nn.Linear(time_embed_dim, hidden_dim), act(), nn.Linear(hidden_dim, hidden_dim)
        )
        self.z_embedding = LatentEmbedding(latent_dim, hidden_dim) if latent_dim > 0 else None
        self.class_embedding = nn.Embedding(num_classes + 1, hidden_dim) if num_classes is not None else None
        layers = [nn.Linear(2 * hidden_dim, hidden_dim), act()]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), act()]
        layers.append(nn.Linear(hidden_dim, sample_size))
        self.net = nn.Sequential(*layers)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def num_classes(self) -> int | None:
        return self.config.num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one example, `(sample_size,)`."""
        return (self.config.sample_size,)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        z: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> VRFMVelocityOutput | tuple:
        """Predicts the velocity.

        Args:
            sample (`torch.Tensor` of shape `(B, sample_size)`): the state ``x_t`` (run on the model's device and
                dtype; the velocity comes back there).
            timestep (`float` or `torch.Tensor` of shape `(B,)`): ``t`` in `[0, 1]` (0 = noise, 1 = data).
            z (`torch.Tensor` of shape `(B, latent_dim)`): the latent; must be `None` when `latent_dim=0`.
            class_labels (`torch.Tensor` of shape `(B,)`, *optional*): labels, `num_classes` meaning "no label".
            return_dict (`bool`): return a [`VRFMVelocityOutput`] rather than a tuple.
        """
        sample, t, labels = check_velocity_inputs(self, sample, timestep, z, class_labels)

        t_features = get_timestep_embedding(t * 1000.0, self.config.time_embed_dim, flip_sin_to_cos=True)
        cond = self.t_embedding(t_features.to(sample.dtype))
        if self.z_embedding is not None:
            cond = cond + self.z_embedding(z.to(device=sample.device, dtype=sample.dtype))
        if self.class_embedding is not None:
            cond = cond + self.class_embedding(labels)
        velocity = self.net(torch.cat([self.x_embedding(sample), cond], dim=-1))
        if not return_dict:
            return (velocity,)
        return VRFMVelocityOutput(sample=velocity)
