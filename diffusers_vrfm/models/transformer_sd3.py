"""VRFMSD3Transformer2DModel: a velocity MMDiT around diffusers' `SD3Transformer2DModel`, with ``z`` in its adaLN.

`SD3Transformer2DModel` computes ``temb = time_text_embed(timestep, pooled_projections)`` (the timestep embedding
plus a projection of the pooled text embedding) and every joint block's adaLN-Zero, and the output norm, read
`temb`. The wrapper swaps `time_text_embed` for a [`TimestepTextLatentEmbedding`], the same module (same weights,
same state-dict keys) that also adds ``LatentEmbedding(z)``, an MLP of ``z`` whose last layer starts at zero. So a
wrapped pretrained transformer gives exactly the stock output until training moves the ``z`` path.

Clock: the wrapper takes this package's ``t`` (0 = noise, 1 = data) and returns the velocity ``dx/dt``. SD3 was
trained on diffusers' sigma clock (``sigma = 1 - t``, timestep ``sigma * 1000``) to predict ``noise - data = -v``;
[`~VRFMSD3Transformer2DModel.forward`] converts both, in that one place.

(This module is deliberately not called `sd3.py`: diffusers' loader mistakes modules named after its pipelines.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from torch import nn

from ..objective import check_integer, check_tensor, flow_match_output_to_velocity, t_to_sigma
from .z_embedding import (
    LatentEmbedding,
    LatentMap,
    VRFMVelocityOutput,
    backbone_state_for,
    check_context,
    check_latent,
    check_timestep,
    check_z_map,
    to_execution,
)

# Arguments of `SD3Transformer2DModel` that the wrapper mirrors one to one.
SD3_ARGUMENTS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "out_channels",
    "pos_embed_max_size",
    "dual_attention_layers",
    "qk_norm",
)


class PooledTextAndLatent(NamedTuple):
    """What the wrapper passes to the inner transformer as `pooled_projections`: the pooled text and embedded ``z``."""

    pooled_projections: torch.Tensor
    z_embedding: torch.Tensor | None


class TimestepTextLatentEmbedding(CombinedTimestepTextProjEmbeddings):
    """SD3's timestep + pooled-text embedding, plus the embedded ``z``: ``temb = t_emb + text_proj(pooled) + MLP(z)``.

    It has exactly the submodules of `CombinedTimestepTextProjEmbeddings`, so a stock transformer's weights load into
    it unchanged; the ``z`` MLP itself belongs to the wrapper (`VRFMSD3Transformer2DModel.z_embedding`).
    """

    def forward(self, timestep: torch.Tensor, pooled_projection: PooledTextAndLatent) -> torch.Tensor:
        if not isinstance(pooled_projection, PooledTextAndLatent):
            raise TypeError(
                "This SD3 transformer belongs to a VRFMSD3Transformer2DModel; call the wrapper, not its inner "
                "transformer."
            )
        conditioning = super().forward(timestep, pooled_projection.pooled_projections)
        if pooled_projection.z_embedding is not None:
            conditioning = conditioning + pooled_projection.z_embedding.to(conditioning.dtype)
        return conditioning


class VRFMSD3Transformer2DModel(ModelMixin, ConfigMixin):
    """A velocity MMDiT ``v(x_t, t, z, text)`` around diffusers' [`~diffusers.SD3Transformer2DModel`].

    ``z`` goes through one [`LatentEmbedding`] (last layer zero-initialised) of width
    `num_attention_heads * attention_head_dim`, added to the timestep + pooled-text embedding that every block's
    adaLN-Zero reads. With `z_map_channels > 0`, ``z`` also enters as that many extra input channels (a
    [`LatentMap`], resized to the sample), which the patch embedding reads with the latents. Text enters as in SD3:
    `encoder_hidden_states` (the joint-attention context, `(B, L, joint_attention_dim)`) and `pooled_projections`
    (`(B, pooled_projection_dim)`). Without text the model attends to no context tokens and reads an all-zero pooled
    vector (a fixed "no text" input). With `latent_dim=0` there is no ``z`` path (plain rectified flow).

    The sample may have any height and width that are multiples of `patch_size` (up to `pos_embed_max_size` patches);
    `sample_size` is the default one.

    Args:
        sample_size (`int`, defaults to 128): the default latent height and width.
        in_channels (`int`, defaults to 16): the latent channels; `out_channels` must equal it.
        latent_dim (`int`, defaults to 16): the dimension of ``z``; 0 gives plain rectified flow.
        timestep_scale (`float`, defaults to 1000): the factor from SD3's sigma to its timestep.
        z_embed_hidden_dim (`int`, *optional*): the hidden width of the ``z`` MLP; the model width if unset.
        z_map_channels (`int`, defaults to 0): the channels of the ``z`` map fed in with the latents (0: none).
        z_map_stride (`int`, defaults to 1): the map's grid is `ceil(sample_size / stride)` a side, resized (nearest)
            to each sample's height and width.
        patch_size, num_layers, attention_head_dim, num_attention_heads, joint_attention_dim, caption_projection_dim,
            pooled_projection_dim, pos_embed_max_size, dual_attention_layers, qk_norm: as in `SD3Transformer2DModel`.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import VRFMSD3Transformer2DModel
    >>> model = VRFMSD3Transformer2DModel(
    ...     sample_size=8, in_channels=4, out_channels=4, latent_dim=4, num_layers=1, attention_head_dim=8,
    ...     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
    ...     pos_embed_max_size=8,
    ... )
    >>> x, context, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.randn(2, 8)
    >>> model(x, 0.5, z=torch.randn(2, 4), encoder_hidden_states=context, pooled_projections=pooled).sample.shape
    torch.Size([2, 4, 8, 8])
    ```
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    _no_split_modules = ["JointTransformerBlock"]
    z_map_input_layer = "transformer.pos_embed.proj"  # the layer whose weights read the z map's channels

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        latent_dim: int = 16,
        timestep_scale: float = 1000.0,
        z_embed_hidden_dim: int | None = None,
        z_map_channels: int = 0,
        z_map_stride: int = 1,
        patch_size: int = 2,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        pos_embed_max_size: int | None = 96,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
    ):
        super().__init__()
        for name, value, minimum in (
            ("sample_size", sample_size, 1),
            ("in_channels", in_channels, 1),
            ("latent_dim", latent_dim, 0),
            ("patch_size", patch_size, 1),
            ("num_layers", num_layers, 1),
            ("attention_head_dim", attention_head_dim, 1),
            ("num_attention_heads", num_attention_heads, 1),
            ("joint_attention_dim", joint_attention_dim, 1),
            ("pooled_projection_dim", pooled_projection_dim, 1),
        ):
            check_integer(value, name, minimum)
        if z_embed_hidden_dim is not None:
            check_integer(z_embed_hidden_dim, "z_embed_hidden_dim", 1)
        if out_channels != in_channels:
            raise ValueError(
                f"`out_channels` ({out_channels!r}) must equal `in_channels` ({in_channels}): a velocity has the "
                "shape of the sample."
            )
        if isinstance(timestep_scale, bool) or not isinstance(timestep_scale, (int, float)) or not timestep_scale > 0:
            raise ValueError(f"`timestep_scale` must be a positive number, but got {timestep_scale!r}.")
        check_z_map(latent_dim, z_map_channels, z_map_stride)
        self.transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=in_channels + z_map_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            caption_projection_dim=caption_projection_dim,
            pooled_projection_dim=pooled_projection_dim,
            out_channels=out_channels,
            pos_embed_max_size=pos_embed_max_size,
            dual_attention_layers=tuple(dual_attention_layers),
            qk_norm=qk_norm,
        )
        inner_dim = num_attention_heads * attention_head_dim
        self.transformer.time_text_embed = TimestepTextLatentEmbedding(inner_dim, pooled_projection_dim)
        self.z_embedding = LatentEmbedding(latent_dim, inner_dim, z_embed_hidden_dim) if latent_dim > 0 else None
        size = (sample_size, sample_size)
        self.z_map = LatentMap(latent_dim, z_map_channels, size, z_map_stride) if z_map_channels > 0 else None

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def num_classes(self) -> None:
        """Text-conditioned: no class labels (kept for the pipelines' common interface)."""
        return None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The default shape of one example, `(channels, height, width)`."""
        size = self.config.sample_size
        return (self.config.in_channels, size, size)

    @property
    def context_dim(self) -> int:
        """The width of `encoder_hidden_states` (SD3's `joint_attention_dim`)."""
        return self.config.joint_attention_dim

    @property
    def pooled_projection_dim(self) -> int:
        """The width of `pooled_projections`."""
        return self.config.pooled_projection_dim

    @classmethod
    def from_backbone(
        cls,
        backbone: SD3Transformer2DModel,
        latent_dim: int = 16,
        timestep_scale: float = 1000.0,
        z_embed_hidden_dim: int | None = None,
        z_map_channels: int = 0,
        z_map_stride: int = 1,
    ) -> VRFMSD3Transformer2DModel:
        """Wraps an existing (for example pretrained) `SD3Transformer2DModel`, loading every one of its weights.

        At first ``wrapper(x, t, z, context, pooled)`` equals ``-backbone(x, context, pooled, (1 - t) * 1000)``
        exactly: the same model on this package's clock. With `z_map_channels`, the patch embedding gains freshly
        initialised weights for the map's channels (the map itself starts at zero).

        Example:

        ```py
        >>> import torch
        >>> from diffusers import SD3Transformer2DModel
        >>> from diffusers_vrfm import VRFMSD3Transformer2DModel
        >>> backbone = SD3Transformer2DModel(
        ...     sample_size=8, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        ...     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        ...     pos_embed_max_size=8,
        ... )
        >>> model = VRFMSD3Transformer2DModel.from_backbone(backbone, latent_dim=4)
        >>> x, context, pooled, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.randn(2, 8), torch.rand(2)
        >>> velocity = model(x, t, z=torch.randn(2, 4), encoder_hidden_states=context, pooled_projections=pooled)
        >>> torch.equal(velocity.sample, -backbone(x, context, pooled, (1 - t) * 1000).sample)
        True
        ```
        """
        if not isinstance(backbone, SD3Transformer2DModel):
            raise TypeError(f"`backbone` must be an SD3Transformer2DModel, but got {type(backbone).__name__}.")
        config = {name: backbone.config[name] for name in SD3_ARGUMENTS if name in backbone.config}
        if config.get("out_channels") is None:
            config["out_channels"] = config["in_channels"]
        model = cls(
            **config,
            latent_dim=latent_dim,
            timestep_scale=timestep_scale,
            z_embed_hidden_dim=z_embed_hidden_dim,
            z_map_channels=z_map_channels,
            z_map_stride=z_map_stride,
        )
        model.transformer.load_state_dict(backbone_state_for(model, backbone), strict=True)
        # nn.Module.to: ModelMixin.to warns on every dtype cast in diffusers 0.42, even with nothing kept in fp32.
        return nn.Module.to(model, device=backbone.device, dtype=backbone.dtype)

    def _check_sample(self, sample) -> torch.Tensor:
        check_tensor(sample, "sample")
        channels, patch = self.config.in_channels, self.config.patch_size
        max_patches = self.config.pos_embed_max_size
        if sample.ndim != 4 or sample.shape[1] != channels or sample.shape[0] == 0:
            raise ValueError(f"`sample` must have shape (B, {channels}, H, W), but got {tuple(sample.shape)}.")
        height, width = sample.shape[-2:]
        if height % patch or width % patch or (max_patches and max(height, width) > max_patches * patch):
            limit = f" and at most {max_patches * patch}" if max_patches else ""
            raise ValueError(
                f"`sample`'s height and width must be multiples of `patch_size` ({patch}){limit}, but got "
                f"{height}x{width}."
            )
        return to_execution(self, sample)

    def _text_inputs(self, encoder_hidden_states, pooled_projections, sample: torch.Tensor):
        """The context and pooled text, checked, or the "no text" inputs when they are not given, on the device and
        in the dtype of `sample` (already the model's)."""
        batch_size, like = sample.shape[0], {"device": sample.device, "dtype": sample.dtype}
        if encoder_hidden_states is None:
            encoder_hidden_states = torch.zeros(batch_size, 0, self.context_dim, **like)
        check_context(encoder_hidden_states, "encoder_hidden_states", batch_size, self.context_dim, ndim=3)
        if pooled_projections is None:
            pooled_projections = torch.zeros(batch_size, self.pooled_projection_dim, **like)
        check_context(pooled_projections, "pooled_projections", batch_size, self.pooled_projection_dim, ndim=2)
        return encoder_hidden_states.to(**like), pooled_projections.to(**like)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        z: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        joint_attention_kwargs: dict | None = None,
        class_labels: None = None,
        return_dict: bool = True,
    ) -> VRFMVelocityOutput | tuple:
        """Predicts the velocity.

        Args:
            sample (`torch.Tensor` of shape `(B, C, H, W)`): the state ``x_t`` (VAE latents).
            timestep (`float` or `torch.Tensor` of shape `(B,)`): ``t`` in `[0, 1]` (0 = noise, 1 = data).
            z (`torch.Tensor` of shape `(B, latent_dim)`): the latent; must be `None` when `latent_dim=0`.
            encoder_hidden_states (`torch.Tensor` of shape `(B, L, joint_attention_dim)`, *optional*): the text
                context; none means no context tokens.
            pooled_projections (`torch.Tensor` of shape `(B, pooled_projection_dim)`, *optional*): the pooled text
                embedding; none means all zeros.
            joint_attention_kwargs (`dict`, *optional*): passed to the attention processors (for example
                `{"scale": 0.5}` to scale LoRA layers).
            class_labels (`None`): the velocity models' common argument; this text-conditioned model takes none.
            return_dict (`bool`): return a [`VRFMVelocityOutput`] rather than a tuple.
        """
        if class_labels is not None:
            raise ValueError("This model is text-conditioned (`num_classes=None`) and takes no `class_labels`.")
        sample = self._check_sample(sample)  # now on the model's device, in its dtype
        batch_size = sample.shape[0]
        t = check_timestep(timestep, batch_size, sample.device, torch.float32)
        check_latent(z, self.latent_dim, batch_size)
        context, pooled = self._text_inputs(encoder_hidden_states, pooled_projections, sample)
        z_embedding = self.z_embedding(z.to(sample.dtype)) if self.z_embedding is not None else None
        if self.z_map is not None:
            sample = self.z_map.append_to(sample, z)
        # The one place where this package's clock meets SD3's: sigma = 1 - t, timestep = sigma * 1000, and the
        # backbone's `noise - data` output is minus the velocity.
        flow_match_output = self.transformer(
            sample,
            encoder_hidden_states=context,
            pooled_projections=PooledTextAndLatent(pooled, z_embedding),
            timestep=t_to_sigma(t) * self.config.timestep_scale,
            joint_attention_kwargs=joint_attention_kwargs,
        ).sample
        velocity = flow_match_output_to_velocity(flow_match_output)
        if not return_dict:
            return (velocity,)
        return VRFMVelocityOutput(sample=velocity)
