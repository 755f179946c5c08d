"""VRFMDiTTransformer2DModel: a velocity DiT whose adaLN conditioning reads ``z`` (and, optionally, a class label).

diffusers' [`~diffusers.DiTTransformer2DModel`] builds, inside every block, ``norm1.emb`` = time embedding plus a label
embedding (`norm1.emb.class_embedder`, an `nn.Embedding` that also drops labels with probability 0.1 in train mode).
The wrapper replaces each block's label embedder by a [`AdaLNConditionEmbedding`]: the block's own label table
(row `num_classes` is the null label, no dropout of any kind) plus one shared MLP of ``z`` with a zero-initialised
last layer. The sum enters the adaLN-Zero modulation of every block and of the output layer, which is how the
paper conditions SiT-XL on ``z``.

(This module is deliberately not called `dit.py`: diffusers' loader mistakes modules named after its pipelines.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel
from torch import nn

from ..objective import check_integer
from .z_embedding import (
    LatentEmbedding,
    LatentMap,
    VRFMVelocityOutput,
    backbone_state_for,
    check_velocity_inputs,
    check_z_map,
)

# Arguments of `DiTTransformer2DModel` that the wrapper mirrors one to one (`num_embeds_ada_norm` is its own).
DIT_ARGUMENTS = (
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "num_layers",
    "dropout",
    "norm_num_groups",
    "attention_bias",
    "sample_size",
    "patch_size",
    "activation_fn",
    "upcast_attention",
    "norm_type",
    "norm_elementwise_affine",
    "norm_eps",
)
_LABEL_TABLE_KEY = "norm1.emb.class_embedder.embedding_table.weight"


class AdaLNCondition(NamedTuple):
    """What the wrapper passes down the DiT in place of class labels: the labels and the embedded ``z``."""

    labels: torch.Tensor
    z_embedding: torch.Tensor | None


class AdaLNConditionEmbedding(nn.Module):
    """Replaces a DiT block's `LabelEmbedding`: ``table[label] + z_embedding``, with no label dropout.

    The table has ``num_classes + 1`` rows (the last is the null label); an unconditional model keeps one row, a
    learned constant, which is where a wrapped class-conditional backbone's null-label embedding goes.
    """

    def __init__(self, num_rows: int, embedding_dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_rows, embedding_dim)

    def forward(self, condition: AdaLNCondition) -> torch.Tensor:
        if not isinstance(condition, AdaLNCondition):
            raise TypeError(
                "This DiT block belongs to a VRFMDiTTransformer2DModel; call the wrapper, not its inner transformer."
            )
        embedding = self.embedding_table(condition.labels)
        if condition.z_embedding is not None:
            embedding = embedding + condition.z_embedding.to(embedding.dtype)
        return embedding


class VRFMDiTTransformer2DModel(ModelMixin, ConfigMixin):
    """A velocity DiT ``v(x_t, t, z, class)`` around diffusers' [`~diffusers.DiTTransformer2DModel`].

    ``z`` goes through one [`LatentEmbedding`] (last layer zero-initialised) of width
    `num_attention_heads * attention_head_dim`; its output is added, in every block, to the time embedding and the
    block's label embedding before the adaLN-Zero modulation. Labels are never dropped inside the model (train and
    eval behave alike): drop them in the training loop with [`drop_labels`] for classifier-free guidance.
    With `z_map_channels > 0`, ``z`` also enters as that many extra input channels (a [`LatentMap`]), which the patch
    embedding reads with the image: the adaLN path gives every token the same shift, the map tells each patch what
    ``z`` says about it. With `latent_dim=0` there is no ``z`` path (plain rectified flow). The inner DiT sees
    ``t * timestep_scale``.

    Args:
        sample_size (`int`, defaults to 32): the height and width (in pixels or latent cells).
        in_channels (`int`, defaults to 4): the channels; `out_channels` must be `None` or equal.
        latent_dim (`int`, defaults to 16): the dimension of ``z``; 0 gives plain rectified flow.
        num_classes (`int`, *optional*): the number of classes; label `num_classes` means "no label".
        timestep_scale (`float`, defaults to 1000): the factor from ``t`` in `[0, 1]` to the inner DiT's timestep.
        z_embed_hidden_dim (`int`, *optional*): the hidden width of the ``z`` MLP; the model width if unset.
        z_map_channels (`int`, defaults to 0): the channels of the ``z`` map fed in with the image (0: none).
        z_map_stride (`int`, defaults to 1): the map's grid is `ceil(sample_size / stride)` a side, resized (nearest)
            to the image.
        num_attention_heads, attention_head_dim, num_layers, patch_size, ...: as in `DiTTransformer2DModel`.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import VRFMDiTTransformer2DModel
    >>> model = VRFMDiTTransformer2DModel(
    ...     sample_size=8, in_channels=3, latent_dim=4, num_layers=1, num_attention_heads=2, attention_head_dim=8
    ... )
    >>> model(torch.randn(2, 3, 8, 8), torch.rand(2), z=torch.randn(2, 4)).sample.shape
    torch.Size([2, 3, 8, 8])
    ```
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    z_map_input_layer = "transformer.pos_embed.proj"  # the layer whose weights read the z map's channels

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 4,
        out_channels: int | None = None,
        latent_dim: int = 16,
        num_classes: int | None = None,
        timestep_scale: float = 1000.0,
        z_embed_hidden_dim: int | None = None,
        z_map_channels: int = 0,
        z_map_stride: int = 1,
        num_attention_heads: int = 6,
        attention_head_dim: int = 64,
        num_layers: int = 12,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        for name, value, minimum in (
            ("sample_size", sample_size, 1),
            ("in_channels", in_channels, 1),
            ("latent_dim", latent_dim, 0),
            ("num_attention_heads", num_attention_heads, 1),
            ("attention_head_dim", attention_head_dim, 1),
            ("num_layers", num_layers, 1),
            ("patch_size", patch_size, 1),
        ):
            check_integer(value, name, minimum)
        if sample_size % patch_size != 0:
            raise ValueError(f"`sample_size` ({sample_size}) must be a multiple of `patch_size` ({patch_size}).")
        if out_channels is not None and out_channels != in_channels:
            raise ValueError(
                f"`out_channels` ({out_channels!r}) must be None or equal `in_channels` ({in_channels}): a velocity "
                "has the shape of the sample."
            )
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(f"`num_classes` must be None or a positive integer, but got {num_classes!r}.")
        if isinstance(timestep_scale, bool) or not isinstance(timestep_scale, (int, float)) or not timestep_scale > 0:
            raise ValueError(f"`timestep_scale` must be a positive number, but got {timestep_scale!r}.")
        if z_embed_hidden_dim is not None and (
            isinstance(z_embed_hidden_dim, bool) or not isinstance(z_embed_hidden_dim, int) or z_embed_hidden_dim < 1
        ):
            raise ValueError(
                f"`z_embed_hidden_dim` must be None or a positive integer, but got {z_embed_hidden_dim!r}."
            )
        check_z_map(latent_dim, z_map_channels, z_map_stride)
        self.transformer = DiTTransformer2DModel(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels + z_map_channels,
            out_channels=in_channels,
            num_layers=num_layers,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            activation_fn=activation_fn,
            num_embeds_ada_norm=num_classes or 1,
            upcast_attention=upcast_attention,
            norm_type=norm_type,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
        )
        inner_dim = num_attention_heads * attention_head_dim
        num_rows = (num_classes or 0) + 1
        for block in self.transformer.transformer_blocks:
            block.norm1.emb.class_embedder = AdaLNConditionEmbedding(num_rows, inner_dim)
            nn.init.zeros_(block.norm1.emb.class_embedder.embedding_table.weight)
        self.z_embedding = LatentEmbedding(latent_dim, inner_dim, z_embed_hidden_dim) if latent_dim > 0 else None
        size = (sample_size, sample_size)
        self.z_map = LatentMap(latent_dim, z_map_channels, size, z_map_stride) if z_map_channels > 0 else None

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def num_classes(self) -> int | None:
        return self.config.num_classes

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The shape of one example, `(channels, height, width)`."""
        size = self.config.sample_size
        return (self.config.in_channels, size, size)

    @classmethod
    def from_backbone(
        cls,
        backbone: DiTTransformer2DModel,
        latent_dim: int = 16,
        num_classes: int | None = None,
        timestep_scale: float = 1000.0,
        z_embed_hidden_dim: int | None = None,
        z_map_channels: int = 0,
        z_map_stride: int = 1,
    ) -> VRFMDiTTransformer2DModel:
        """Wraps an existing (for example pretrained) `DiTTransformer2DModel`, loading every one of its weights.

        With `num_classes` equal to the backbone's `num_embeds_ada_norm`, each block keeps its label table, and at
        first ``wrapper(x, t, z, labels)`` equals ``backbone.eval()(x, t * 1000, labels)`` exactly. With
        `num_classes=None` the wrapper is unconditional and each block keeps the backbone's **null-label** row, so at
        first it equals the backbone called with the null label. The backbone must predict as many channels as it
        reads (DiTs with a learned variance, `out_channels = 2 * in_channels`, are refused). With `z_map_channels`,
        the patch embedding gains freshly initialised weights for the map's channels (the map itself starts at zero).

        Example:

        ```py
        >>> import torch
        >>> from diffusers import DiTTransformer2DModel
        >>> from diffusers_vrfm import VRFMDiTTransformer2DModel
        >>> backbone = DiTTransformer2DModel(
        ...     sample_size=8, in_channels=3, num_layers=1, num_attention_heads=2, attention_head_dim=8,
        ...     num_embeds_ada_norm=10,
        ... ).eval()
        >>> model = VRFMDiTTransformer2DModel.from_backbone(backbone, latent_dim=4, num_classes=10)
        >>> x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 7])
        >>> torch.equal(model(x, t, z=torch.randn(2, 4), class_labels=y).sample, backbone(x, t * 1000, y).sample)
        True
        ```
        """
        if not isinstance(backbone, DiTTransformer2DModel):
            raise TypeError(f"`backbone` must be a DiTTransformer2DModel, but got {type(backbone).__name__}.")
        backbone_classes = backbone.config.num_embeds_ada_norm
        if num_classes is not None and num_classes != backbone_classes:
            raise ValueError(
                f"`num_classes` must be None (unconditional) or the backbone's `num_embeds_ada_norm` "
                f"({backbone_classes}), but got {num_classes!r}."
            )
        config = {name: backbone.config[name] for name in DIT_ARGUMENTS if name in backbone.config}
        model = cls(
            **config,
            latent_dim=latent_dim,
            num_classes=num_classes,
            timestep_scale=timestep_scale,
            z_embed_hidden_dim=z_embed_hidden_dim,
            z_map_channels=z_map_channels,
            z_map_stride=z_map_stride,
        )
        state = backbone_state_for(model, backbone)
        table_rows = backbone_classes + 1
        for index in range(len(backbone.transformer_blocks)):
            key = f"transformer_blocks.{index}.{_LABEL_TABLE_KEY}"
            table = state[key]
            if table.shape[0] != table_rows:
                raise ValueError(
                    f"`backbone` has no null-label row in block {index} (label dropout 0); it cannot be wrapped."
                )
            if num_classes is None:
                state[key] = table[backbone_classes:]
        model.transformer.load_state_dict(state, strict=True)
        # nn.Module.to: ModelMixin.to warns on every dtype cast in diffusers 0.42, even with nothing kept in fp32.
        return nn.Module.to(model, device=backbone.device, dtype=backbone.dtype)

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
            sample (`torch.Tensor` of shape `(B, C, H, W)`): the state ``x_t``.
            timestep (`float` or `torch.Tensor` of shape `(B,)`): ``t`` in `[0, 1]` (0 = noise, 1 = data).
            z (`torch.Tensor` of shape `(B, latent_dim)`): the latent; must be `None` when `latent_dim=0`.
            class_labels (`torch.Tensor` of shape `(B,)`, *optional*): labels, `num_classes` meaning "no label"
                (the default when a class-conditional model gets none).
            return_dict (`bool`): return a [`VRFMVelocityOutput`] rather than a tuple.
        """
        sample, t, labels = check_velocity_inputs(self, sample, timestep, z, class_labels)  # now in the model's dtype
        if labels is None:
            labels = torch.zeros(sample.shape[0], dtype=torch.long, device=sample.device)
        z_embedding = self.z_embedding(z.to(sample.dtype)) if self.z_embedding is not None else None
        if self.z_map is not None:
            sample = self.z_map.append_to(sample, z)
        velocity = self.transformer(
            sample, timestep=t * self.config.timestep_scale, class_labels=AdaLNCondition(labels, z_embedding)
        ).sample
        if not return_dict:
            return (velocity,)
        return VRFMVelocityOutput(sample=velocity)
