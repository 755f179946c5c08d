"""VRFM velocity models around diffusers' UNets: ``z`` enters through the UNet's own added-conditioning path.

Both wrappers add an MLP of ``z`` to the UNet's time embedding, which every ResNet block then reads through its
(adaptive) GroupNorm. This is the "adaptive norm" variant of the paper's CIFAR-10 model. The last layer of the ``z``
path (and of the class path) starts at zero, so a wrapped pretrained backbone reproduces its output exactly until
training moves it.

Time: the wrappers take ``t`` in ``[0, 1]`` (0 = noise, 1 = data, the package's clock) and hand the inner UNet
``t * timestep_scale`` (default 1000), the scale diffusers' sinusoidal time embeddings are built for.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from ..objective import check_integer
from .z_embedding import (
    LatentEmbedding,
    LatentMap,
    VRFMVelocityOutput,
    backbone_state_for,
    check_context,
    check_velocity_inputs,
    check_z_map,
    spatial_size,
)

# Arguments of `UNet2DModel` that `VRFMUNet2DModel` mirrors one to one (the class path is the wrapper's own).
UNET_2D_ARGUMENTS = (
    "sample_size",
    "in_channels",
    "out_channels",
    "center_input_sample",
    "time_embedding_type",
    "time_embedding_dim",
    "freq_shift",
    "flip_sin_to_cos",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "mid_block_scale_factor",
    "downsample_padding",
    "downsample_type",
    "upsample_type",
    "dropout",
    "act_fn",
    "attention_head_dim",
    "norm_num_groups",
    "attn_norm_num_groups",
    "norm_eps",
    "resnet_time_scale_shift",
    "add_attention",
)

# Arguments of `UNet2DConditionModel` that `VRFMUNet2DConditionModel` mirrors; any other non-default backbone
# setting travels in `extra_unet_config`.
UNET_2D_CONDITION_ARGUMENTS = (
    "sample_size",
    "in_channels",
    "out_channels",
    "center_input_sample",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "dropout",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "use_linear_projection",
    "upcast_attention",
    "resnet_time_scale_shift",
    "time_embedding_dim",
    "conv_in_kernel",
    "conv_out_kernel",
)
# Settings the wrapper owns: a backbone or `extra_unet_config` may not set them.
_CONDITION_RESERVED = (
    "class_embed_type",
    "num_class_embeds",
    "projection_class_embeddings_input_dim",
    "class_embeddings_concat",
    "time_embedding_type",
)


def _check_num_classes(num_classes) -> None:
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(f"`num_classes` must be None or a positive integer, but got {num_classes!r}.")


def _check_timestep_scale(timestep_scale) -> None:
    if isinstance(timestep_scale, bool) or not isinstance(timestep_scale, (int, float)) or not timestep_scale > 0:
        raise ValueError(f"`timestep_scale` must be a positive number, but got {timestep_scale!r}.")


def _backbone_config(backbone, expected: type, argument_names: tuple[str, ...]) -> dict:
    if not isinstance(backbone, expected):
        raise TypeError(f"`backbone` must be a {expected.__name__}, but got {type(backbone).__name__}.")
    return {name: backbone.config[name] for name in argument_names if name in backbone.config}


class VRFMUNet2DModel(ModelMixin, ConfigMixin):
    """A pixel- or latent-space velocity UNet ``v(x_t, t, z, class)`` around diffusers' [`~diffusers.UNet2DModel`].

    The inner UNet is built with `class_embed_type="identity"`, so the vector passed as its `class_labels` is added to
    its time embedding. The wrapper passes ``LatentEmbedding(z) + class_embedding(label)``: an MLP of ``z`` (last layer
    zero-initialised) plus, for a class-conditional model, a learned class vector (zero-initialised; row `num_classes`
    is the null label of classifier-free guidance). With `latent_dim=0` and no classes the inner UNet has no class
    path at all: a plain rectified-flow UNet.

    The inner UNet sees the time ``t * timestep_scale``. Every other argument is `UNet2DModel`'s, with its meaning;
    only `time_embedding_type="positional"` is accepted (`"fourier"` divides the output by the time, a score-SDE
    convention, and `"learned"` needs integer steps).

    Args:
        sample_size (`int` or `(int, int)`, defaults to 32): the image height and width.
        in_channels (`int`, defaults to 3), out_channels (`int`, defaults to 3): must be equal for a velocity model.
        latent_dim (`int`, defaults to 16): the dimension of ``z``; 0 gives plain rectified flow.
        num_classes (`int`, *optional*): the number of classes; label `num_classes` means "no label".
        timestep_scale (`float`, defaults to 1000): the factor from ``t`` in `[0, 1]` to the inner UNet's timestep.
        z_embed_hidden_dim (`int`, *optional*): the hidden width of the ``z`` MLP; the time-embedding width if unset.
        z_map_channels (`int`, defaults to 0): when positive, ``z`` also enters as this many extra input channels: a
            [`LatentMap`] (a zero-initialised linear map of ``z`` to a grid, resized to the image). The time-embedding
            path shifts every pixel of a channel alike; the map tells the UNet *where* (see `docs/benchmarks.md`).
            0 here; `train_vrfm.py` builds its VRFM UNets with 4.
        z_map_stride (`int`, defaults to 1): the map's grid is `ceil(H / stride) x ceil(W / stride)`, resized
            (nearest) to the image; larger strides keep the linear layer small on large images.
        block_out_channels, layers_per_block, down_block_types, up_block_types, mid_block_type, norm_num_groups,
        attention_head_dim, ...: as in `UNet2DModel`.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import VRFMUNet2DModel
    >>> model = VRFMUNet2DModel(
    ...     sample_size=8, in_channels=3, out_channels=3, latent_dim=4, block_out_channels=(8, 16),
    ...     down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ...     norm_num_groups=4, layers_per_block=1,
    ... )
    >>> model(torch.randn(2, 3, 8, 8), torch.rand(2), z=torch.randn(2, 4)).sample.shape
    torch.Size([2, 3, 8, 8])
    ```
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["norm"]
    z_map_input_layer = "unet.conv_in"  # the layer whose weights read the z map's channels

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_dim: int = 16,
        num_classes: int | None = None,
        timestep_scale: float = 1000.0,
        z_embed_hidden_dim: int | None = None,
        z_map_channels: int = 0,
        z_map_stride: int = 1,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (64, 128, 128),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
    ):
        super().__init__()
        size = spatial_size(sample_size)
        check_integer(in_channels, "in_channels", 1)
        check_integer(latent_dim, "latent_dim", 0)
        _check_num_classes(num_classes)
        _check_timestep_scale(timestep_scale)
        if out_channels != in_channels:
            raise ValueError(
                f"`out_channels` ({out_channels!r}) must equal `in_channels` ({in_channels!r}): a velocity has the "
                "shape of the sample."
            )
        if time_embedding_type != "positional":
            raise ValueError(
                f"`time_embedding_type` must be 'positional', but got {time_embedding_type!r} ('fourier' divides the "
                "output by the time and 'learned' needs integer steps)."
            )
        if z_embed_hidden_dim is not None:
            check_integer(z_embed_hidden_dim, "z_embed_hidden_dim", 1)
        check_z_map(latent_dim, z_map_channels, z_map_stride)
        conditioned = latent_dim > 0 or num_classes is not None
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels + z_map_channels,
            out_channels=out_channels,
            center_input_sample=center_input_sample,
            time_embedding_type=time_embedding_type,
            time_embedding_dim=time_embedding_dim,
            freq_shift=freq_shift,
            flip_sin_to_cos=flip_sin_to_cos,
            down_block_types=tuple(down_block_types),
            mid_block_type=mid_block_type,
            up_block_types=tuple(up_block_types),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            mid_block_scale_factor=mid_block_scale_factor,
            downsample_padding=downsample_padding,
            downsample_type=downsample_type,
            upsample_type=upsample_type,
            dropout=dropout,
            act_fn=act_fn,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            attn_norm_num_groups=attn_norm_num_groups,
            norm_eps=norm_eps,
            resnet_time_scale_shift=resnet_time_scale_shift,
            add_attention=add_attention,
            class_embed_type="identity" if conditioned else None,
        )
        temb_dim = time_embedding_dim or 4 * block_out_channels[0]
        self.z_embedding = LatentEmbedding(latent_dim, temb_dim, z_embed_hidden_dim) if latent_dim > 0 else None
        self.z_map = LatentMap(latent_dim, z_map_channels, size, z_map_stride) if z_map_channels > 0 else None
        self.class_embedding = nn.Embedding(num_classes + 1, temb_dim) if num_classes is not None else None
        if self.class_embedding is not None:
            nn.init.zeros_(self.class_embedding.weight)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def num_classes(self) -> int | None:
        return self.config.num_classes

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The shape of one example, `(channels, height, width)`."""
        return (self.config.in_channels, *spatial_size(self.config.sample_size))

    @classmethod
    def from_backbone(
        cls,
        backbone: UNet2DModel,
        latent_dim: int = 16,
        num_classes: int | None = None,
        timestep_scale: float = 1000.0,
        z_embed_hidden_dim: int | None = None,
        z_map_channels: int = 0,
        z_map_stride: int = 1,
    ) -> VRFMUNet2DModel:
        """Wraps an existing (for example pretrained) `UNet2DModel`, loading every one of its weights.

        The ``z`` and class paths start at zero, so at first ``wrapper(x, t, z)`` equals ``backbone(x, t * 1000)``
        exactly, whatever ``z``. The backbone must have no class path of its own (`class_embed_type=None`,
        `num_class_embeds=None`) and a positional time embedding. With `z_map_channels`, the input convolution gains
        freshly initialised weights for the map's channels (the map itself starts at zero).

        Example:

        ```py
        >>> import torch
        >>> from diffusers import UNet2DModel
        >>> from diffusers_vrfm import VRFMUNet2DModel
        >>> backbone = UNet2DModel(
        ...     sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
        ...     down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        ... )
        >>> model = VRFMUNet2DModel.from_backbone(backbone, latent_dim=4)
        >>> x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
        >>> torch.equal(model(x, t, z=torch.randn(2, 4)).sample, backbone(x, t * 1000).sample)
        True
        ```
        """
        config = _backbone_config(backbone, UNet2DModel, UNET_2D_ARGUMENTS)
        if backbone.config.class_embed_type is not None or backbone.config.num_class_embeds is not None:
            raise ValueError(
                "`backbone` has its own class path (class_embed_type="
                f"{backbone.config.class_embed_type!r}, num_class_embeds={backbone.config.num_class_embeds!r}); "
                "only backbones without one can be wrapped."
            )
        model = cls(
            **config,
            latent_dim=latent_dim,
            num_classes=num_classes,
            timestep_scale=timestep_scale,
            z_embed_hidden_dim=z_embed_hidden_dim,
            z_map_channels=z_map_channels,
            z_map_stride=z_map_stride,
        )
        model.unet.load_state_dict(backbone_state_for(model, backbone), strict=True)
        # nn.Module.to: ModelMixin.to warns on every dtype cast in diffusers 0.42, even with nothing kept in fp32.
        return nn.Module.to(model, device=backbone.device, dtype=backbone.dtype)

    def condition_embedding(self, z: torch.Tensor | None, labels: torch.Tensor | None, dtype) -> torch.Tensor | None:
        """The vector added to the time embedding: ``LatentEmbedding(z)`` plus the class vector (or `None`)."""
        embedding = None
        if self.z_embedding is not None:
            embedding = self.z_embedding(z.to(dtype))
        if self.class_embedding is not None:
            class_vector = self.class_embedding(labels)
            embedding = class_vector if embedding is None else embedding + class_vector
        return embedding

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
        condition = self.condition_embedding(z, labels, sample.dtype)
        if self.z_map is not None:
            sample = self.z_map.append_to(sample, z)
        velocity = self.unet(sample, t * self.config.timestep_scale, class_labels=condition).sample
        if not return_dict:
            return (velocity,)
        return VRFMVelocityOutput(sample=velocity)


class VRFMUNet2DConditionModel(ModelMixin, ConfigMixin):
    """A velocity UNet around diffusers' [`~diffusers.UNet2DConditionModel`] (SD-style latent UNets).

    ``z`` (concatenated with a one-hot class vector for a class-conditional model) goes through the UNet's own
    `class_embed_type="projection"` path, a two-layer MLP whose output is added to the time embedding; its last
    layer (`unet.class_embedding.linear_2`) starts at zero. A one-hot vector through a linear layer is a learned class
    embedding, so this is ``MLP(z, class)``; label `num_classes` is the null label of classifier-free guidance.

    Context: a UNet with cross-attention blocks reads text as SD-style UNets do: `encoder_hidden_states` of shape
    `(B, L, context_dim)`, for example the last hidden states of a CLIP text encoder (what
    [`VRFMTextToImagePipeline`] passes). Without `encoder_hidden_states` it attends to one all-zero context token (a
    fixed null context), so that it can be trained and sampled without text; a UNet without cross-attention blocks
    gets an empty context `(B, 0, cross_attention_dim)`.

    Args:
        sample_size (`int` or `(int, int)`, defaults to 32): the height and width.
        in_channels (`int`, defaults to 4), out_channels (`int`, defaults to 4): must be equal.
        latent_dim (`int`, defaults to 16): the dimension of ``z``; 0 gives plain rectified flow.
        num_classes (`int`, *optional*): the number of classes; label `num_classes` means "no label".
        timestep_scale (`float`, defaults to 1000): the factor from ``t`` in `[0, 1]` to the inner UNet's timestep.
        z_map_channels (`int`, defaults to 0), z_map_stride (`int`, defaults to 1): ``z`` also as extra input
            channels, a [`LatentMap`] on a `ceil(H / stride) x ceil(W / stride)` grid, as in [`VRFMUNet2DModel`].
        extra_unet_config (`dict`, *optional*): any other `UNet2DConditionModel` argument (not the class path).
        down_block_types, up_block_types, mid_block_type, block_out_channels, cross_attention_dim, ...: as in
            `UNet2DConditionModel`.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import VRFMUNet2DConditionModel
    >>> model = VRFMUNet2DConditionModel(
    ...     sample_size=8, latent_dim=4, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
    ...     down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ...     mid_block_type="UNetMidBlock2D",
    ... )
    >>> model(torch.randn(2, 4, 8, 8), 0.5, z=torch.randn(2, 4)).sample.shape
    torch.Size([2, 4, 8, 8])
    >>> text_model = VRFMUNet2DConditionModel(
    ...     sample_size=8, latent_dim=4, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
    ...     cross_attention_dim=16, attention_head_dim=4,
    ... )
    >>> context = torch.randn(2, 7, text_model.context_dim)  # e.g. CLIP hidden states of 7 tokens
    >>> text_model(torch.randn(2, 4, 8, 8), 0.5, z=torch.randn(2, 4), encoder_hidden_states=context).sample.shape
    torch.Size([2, 4, 8, 8])
    ```
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["norm"]
    z_map_input_layer = "unet.conv_in"  # the layer whose weights read the z map's channels

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] = 32,
        in_channels: int = 4,
        out_channels: int = 4,
        latent_dim: int = 16,
        num_classes: int | None = None,
        timestep_scale: float = 1000.0,
        z_map_channels: int = 0,
        z_map_stride: int = 1,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (64, 128),
        layers_per_block: int | tuple[int, ...] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 64,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        attention_head_dim: int | tuple[int, ...] = 8,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        time_embedding_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        extra_unet_config: dict | None = None,
    ):
        super().__init__()
        spatial_size(sample_size)
        check_integer(in_channels, "in_channels", 1)
        check_integer(latent_dim, "latent_dim", 0)
        _check_num_classes(num_classes)
        _check_timestep_scale(timestep_scale)
        if out_channels != in_channels:
            raise ValueError(
                f"`out_channels` ({out_channels!r}) must equal `in_channels` ({in_channels!r}): a velocity has the "
                "shape of the sample."
            )
        extra = dict(extra_unet_config or {})
        reserved = sorted(set(extra) & (set(_CONDITION_RESERVED) | set(UNET_2D_CONDITION_ARGUMENTS)))
        if reserved:
            raise ValueError(
                f"`extra_unet_config` may not set {reserved}: pass mirrored arguments directly; the class path and "
                "the time embedding type belong to the wrapper."
            )
        check_z_map(latent_dim, z_map_channels, z_map_stride)
        condition_dim = latent_dim + (num_classes + 1 if num_classes is not None else 0)
        self.unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels + z_map_channels,
            out_channels=out_channels,
            center_input_sample=center_input_sample,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
            down_block_types=tuple(down_block_types),
            mid_block_type=mid_block_type,
            up_block_types=tuple(up_block_types),
            only_cross_attention=only_cross_attention,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            downsample_padding=downsample_padding,
            mid_block_scale_factor=mid_block_scale_factor,
            dropout=dropout,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers_per_block,
            attention_head_dim=attention_head_dim,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
            resnet_time_scale_shift=resnet_time_scale_shift,
            time_embedding_dim=time_embedding_dim,
            conv_in_kernel=conv_in_kernel,
            conv_out_kernel=conv_out_kernel,
            class_embed_type="projection" if condition_dim > 0 else None,
            projection_class_embeddings_input_dim=condition_dim if condition_dim > 0 else None,
            **extra,
        )
        if self.unet.class_embedding is not None:
            nn.init.zeros_(self.unet.class_embedding.linear_2.weight)
            nn.init.zeros_(self.unet.class_embedding.linear_2.bias)
        blocks = [*self.unet.down_blocks, *self.unet.up_blocks]
        if self.unet.mid_block is not None:
            blocks.append(self.unet.mid_block)
        self._has_cross_attention = any(getattr(block, "has_cross_attention", False) for block in blocks)
        size = spatial_size(sample_size)
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
        return (self.config.in_channels, *spatial_size(self.config.sample_size))

    @property
    def context_dim(self) -> int | None:
        """The width of `encoder_hidden_states` (the text context), or `None` when the UNet has several widths."""
        width = self.unet.config.encoder_hid_dim or self.unet.config.cross_attention_dim
        return width if isinstance(width, int) else None

    @property
    def pooled_projection_dim(self) -> None:
        """This UNet reads no pooled text embedding (the text enters through cross-attention only)."""
        return None

    @property
    def has_cross_attention(self) -> bool:
        """Whether the inner UNet has cross-attention blocks (and so reads `encoder_hidden_states`)."""
        return self._has_cross_attention

    @classmethod
    def from_backbone(
        cls,
        backbone: UNet2DConditionModel,
        latent_dim: int = 16,
        num_classes: int | None = None,
        timestep_scale: float = 1000.0,
        z_map_channels: int = 0,
        z_map_stride: int = 1,
    ) -> VRFMUNet2DConditionModel:
        """Wraps an existing `UNet2DConditionModel`, loading every one of its weights.

        The projection path starts at zero, so at first ``wrapper(x, t, z, encoder_hidden_states=c)`` equals
        ``backbone(x, t * 1000, c)`` exactly. The backbone must have no class path of its own. With
        `z_map_channels`, the input convolution gains freshly initialised weights for the map's channels (the map
        itself starts at zero).
        """
        config = _backbone_config(backbone, UNet2DConditionModel, UNET_2D_CONDITION_ARGUMENTS)
        if backbone.config.class_embed_type is not None or backbone.config.num_class_embeds is not None:
            raise ValueError(
                "`backbone` has its own class path (class_embed_type="
                f"{backbone.config.class_embed_type!r}, num_class_embeds={backbone.config.num_class_embeds!r}); "
                "only backbones without one can be wrapped."
            )
        if backbone.config.time_embedding_type != "positional":
            raise ValueError(
                f"`backbone` has time_embedding_type={backbone.config.time_embedding_type!r}; only 'positional' works."
            )
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }
        extra = {
            key: value
            for key, value in backbone.config.items()
            if not key.startswith("_")
            and key in defaults
            and key not in config
            and key not in _CONDITION_RESERVED
            and _differs(value, defaults[key])
        }
        model = cls(
            **config,
            latent_dim=latent_dim,
            num_classes=num_classes,
            timestep_scale=timestep_scale,
            z_map_channels=z_map_channels,
            z_map_stride=z_map_stride,
            extra_unet_config=extra or None,
        )
        state = model.unet.state_dict()
        backbone_state = backbone_state_for(model, backbone)
        missing = sorted(set(state) - set(backbone_state))
        if any(not key.startswith("class_embedding.") for key in missing):
            raise RuntimeError(f"The wrapped UNet has weights the backbone lacks: {missing}.")
        model.unet.load_state_dict(backbone_state, strict=False)
        unexpected = sorted(set(backbone_state) - set(state))
        if unexpected:
            raise RuntimeError(f"The backbone has weights the wrapper would drop: {unexpected}.")
        # nn.Module.to: ModelMixin.to warns on every dtype cast in diffusers 0.42, even with nothing kept in fp32.
        return nn.Module.to(model, device=backbone.device, dtype=backbone.dtype)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        z: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        added_cond_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> VRFMVelocityOutput | tuple:
        """Predicts the velocity.

        Args:
            sample (`torch.Tensor` of shape `(B, C, H, W)`): the state ``x_t``.
            timestep (`float` or `torch.Tensor` of shape `(B,)`): ``t`` in `[0, 1]` (0 = noise, 1 = data).
            z (`torch.Tensor` of shape `(B, latent_dim)`): the latent; must be `None` when `latent_dim=0`.
            class_labels (`torch.Tensor` of shape `(B,)`, *optional*): labels, `num_classes` meaning "no label".
            encoder_hidden_states (`torch.Tensor` of shape `(B, L, cross_attention_dim)`, *optional*): a context for
                the cross-attention blocks (see the class docstring for the default).
            added_cond_kwargs (`dict`, *optional*): passed to the inner UNet (SDXL-style added conditions).
            return_dict (`bool`): return a [`VRFMVelocityOutput`] rather than a tuple.
        """
        sample, t, labels = check_velocity_inputs(self, sample, timestep, z, class_labels)  # now in the model's dtype
        parts = []
        if z is not None:
            parts.append(z.to(sample.dtype))
        if labels is not None:
            parts.append(nn.functional.one_hot(labels, self.config.num_classes + 1).to(sample.dtype))
        condition = torch.cat(parts, dim=-1) if parts else None
        width = self.context_dim
        if encoder_hidden_states is None:
            context_length = 1 if self._has_cross_attention else 0
            if width is None:
                raise ValueError("This UNet has several cross-attention widths; pass `encoder_hidden_states`.")
            encoder_hidden_states = sample.new_zeros(sample.shape[0], context_length, width)
        elif width is not None:
            check_context(encoder_hidden_states, "encoder_hidden_states", sample.shape[0], width, ndim=3)
            encoder_hidden_states = encoder_hidden_states.to(device=sample.device, dtype=sample.dtype)
        if self.z_map is not None:
            sample = self.z_map.append_to(sample, z)
        velocity = self.unet(
            sample,
            t * self.config.timestep_scale,
            encoder_hidden_states=encoder_hidden_states,
            class_labels=condition,
            added_cond_kwargs=added_cond_kwargs,
        ).sample
        if not return_dict:
            return (velocity,)
        return VRFMVelocityOutput(sample=velocity)


def _differs(value, default) -> bool:
    """Whether a config value differs from a default, treating lists and tuples alike."""
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) != list(default)
    return value != default
