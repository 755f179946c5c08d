"""VRFMConvPosteriorEncoder: a small convolutional posterior q(z | x0, x1, x_t, t) for images and image latents."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F

from ..objective import check_integer
from .posterior import PosteriorEncoderMixin, validate_posterior_inputs
from .z_embedding import spatial_size


class _ConvBlock(nn.Module):
    """``Conv3x3 -> GroupNorm -> SiLU``, the stride of the conv setting the downsampling."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm_num_groups: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(norm_num_groups, out_channels)
        self.act = nn.SiLU()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(hidden)))


class VRFMConvPosteriorEncoder(PosteriorEncoderMixin, ModelMixin, ConfigMixin):
    """A convolutional posterior ``q(z | x0, x1, x_t, t)`` for images (pixels or VAE latents).

    The chosen image inputs are stacked along channels and go through `len(block_out_channels)` stages of
    ``Conv3x3 -> GroupNorm -> SiLU`` (`layers_per_block` per stage, each stage after the first starting with a
    stride-2 conv). The last feature map is then averaged to a ``pooled_size x pooled_size`` grid and flattened: a
    grid of 1 is a global average pool, blind to position; a larger grid lets ``z`` say where a stroke is and not only
    what strokes there are. When ``t`` is read, its sinusoidal embedding (``t * 1000``) is concatenated to the pooled
    features; an MLP maps them to the mean and log-variance of a diagonal Gaussian.

    The default inputs are ``("x1", "t")``, the setting of the paper's CIFAR-10 and ImageNet models. Keep the channels
    small relative to the velocity network: the encoder is only used in training. The class defaults (a global pool)
    keep saved configs loading as they were; `train_vrfm.py` builds it with ``("x1",)``, channels ``(16, 32, 32)``
    and ``pooled_size=4``, which make ``z`` name the image rather than its stroke statistics (docs/benchmarks.md,
    "What the image posterior sees").

    Args:
        sample_size (`int` or `(int, int)`, defaults to 32): the image height and width.
        in_channels (`int`, defaults to 3): the channels of one image input.
        latent_dim (`int`, defaults to 16): the dimension of ``z``.
        posterior_inputs (`tuple[str]`, defaults to `("x1", "t")`): a subset of `("x0", "x1", "x_t", "t")`.
        block_out_channels (`tuple[int]`, defaults to `(16, 32, 64)`): the channels of each stage.
        layers_per_block (`int`, defaults to 1): convolutions per stage.
        norm_num_groups (`int`, defaults to 8): GroupNorm groups (must divide every entry of `block_out_channels`).
        hidden_dim (`int`, defaults to 128): the width of the MLP head.
        time_embed_dim (`int`, defaults to 32): the sinusoidal embedding size of ``t``.
        pooled_size (`int`, defaults to 1): the side of the grid the last feature map is averaged to, at most that
            map's side (`ceil(H / 2^(stages - 1))`); the head reads `block_out_channels[-1] * pooled_size**2` features.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import VRFMConvPosteriorEncoder
    >>> encoder = VRFMConvPosteriorEncoder(sample_size=8, in_channels=3, latent_dim=4, block_out_channels=(8, 16))
    >>> out = encoder(x1=torch.randn(2, 3, 8, 8), t=torch.rand(2))
    >>> out.mean.shape, out.kl.shape
    (torch.Size([2, 4]), torch.Size([2]))
    ```
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] = 32,
        in_channels: int = 3,
        latent_dim: int = 16,
        posterior_inputs: tuple[str, ...] = ("x1", "t"),
        block_out_channels: tuple[int, ...] = (16, 32, 64),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        hidden_dim: int = 128,
        time_embed_dim: int = 32,
        pooled_size: int = 1,
    ):
        super().__init__()
        self._spatial = spatial_size(sample_size)
        check_integer(in_channels, "in_channels", 1)
        check_integer(latent_dim, "latent_dim", 1)
        check_integer(layers_per_block, "layers_per_block", 1)
        check_integer(norm_num_groups, "norm_num_groups", 1)
        check_integer(hidden_dim, "hidden_dim", 1)
        check_integer(time_embed_dim, "time_embed_dim", 4)  # below 4 the sinusoidal embedding divides by 0
        if isinstance(block_out_channels, int) or not block_out_channels:
            raise ValueError(f"`block_out_channels` must be a non-empty sequence, but got {block_out_channels!r}.")
        for channels in block_out_channels:
            check_integer(channels, "block_out_channels", 1)
            if channels % norm_num_groups != 0:
                raise ValueError(
                    f"`norm_num_groups` ({norm_num_groups}) must divide every entry of `block_out_channels`, "
                    f"but got {tuple(block_out_channels)}."
                )
        check_integer(pooled_size, "pooled_size", 1)
        last_map = last_feature_map_size(self._spatial, len(block_out_channels) - 1)
        if pooled_size > min(last_map):
            raise ValueError(
                f"`pooled_size` must be at most {min(last_map)}, the side of the last feature map ({last_map} for "
                f"sample_size {sample_size} and {len(block_out_channels)} stages), but got {pooled_size}."
            )
        self.posterior_inputs = validate_posterior_inputs(posterior_inputs)
        self.register_to_config(posterior_inputs=list(self.posterior_inputs))
        num_image_inputs = sum(name != "t" for name in self.posterior_inputs)

        layers = []
        channels = num_image_inputs * in_channels
        for stage, out_channels in enumerate(block_out_channels):
            for layer in range(layers_per_block):
                stride = 2 if stage > 0 and layer == 0 else 1
                layers.append(_ConvBlock(channels, out_channels, stride, norm_num_groups))
                channels = out_channels
        self.conv = nn.Sequential(*layers)
        head_in = channels * pooled_size**2 + (time_embed_dim if "t" in self.posterior_inputs else 0)
        self.head = nn.Sequential(
            nn.Linear(head_in, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU()
        )
        self.to_mean = nn.Linear(hidden_dim, latent_dim)
        self.to_logvar = nn.Linear(hidden_dim, latent_dim)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The shape of one image input, `(channels, height, width)`."""
        return (self.config.in_channels, *self._spatial)

    def encode(self, inputs: dict[str, torch.Tensor], time: torch.Tensor | None):
        """Maps the gathered inputs (and the time, when read) to `(mean, logvar)`, each `(B, latent_dim)`."""
        images = torch.cat([inputs[name] for name in self.posterior_inputs if name != "t"], dim=1)
        weight = self.to_mean.weight  # inputs run on the model's device and dtype (read off one weight: a hot path)
        feature_map = self.conv(images.to(device=weight.device, dtype=weight.dtype))
        grid = self.config.pooled_size
        features = feature_map.mean(dim=(2, 3)) if grid == 1 else F.adaptive_avg_pool2d(feature_map, grid).flatten(1)
        if time is not None:
            embedding = get_timestep_embedding(time.float() * 1000.0, self.config.time_embed_dim, flip_sin_to_cos=True)
            features = torch.cat([features, embedding.to(features.dtype)], dim=-1)
        hidden = self.head(features)
        return self.to_mean(hidden), self.to_logvar(hidden)


def last_feature_map_size(sample_size, num_stride_2_convs: int) -> tuple[int, int]:
    """The `(height, width)` of an image of `sample_size` after `num_stride_2_convs` stride-2 3x3 convs with padding 1
    (each: ceil(n / 2)); the conv posterior has one fewer than its stages."""
    height, width = spatial_size(sample_size)
    for _ in range(num_stride_2_convs):
        height, width = (height + 1) // 2, (width + 1) // 2
    return height, width
