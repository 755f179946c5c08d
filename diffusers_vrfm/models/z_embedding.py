"""The z -> conditioning MLP that every velocity model shares, and the model output dataclass."""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput
from torch import nn

from ..objective import check_integer, check_tensor

_VALUE_CHECKS = contextvars.ContextVar("diffusers_vrfm_value_checks", default=True)
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch >= 2.3; before it nothing is skipped


@contextlib.contextmanager
def skip_value_checks():
    """Inside this context the models check their inputs' shapes and dtypes but not their values (finite, in range).

    A value check reads the tensor back to the host, which stalls a GPU until all queued work is done. The training
    loop draws every time, label and noise itself and guards the loss and gradients on the device, so it runs its
    forward passes in this context; everything else keeps the checks.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm.models.z_embedding import check_timestep, skip_value_checks
    >>> with skip_value_checks():
    ...     check_timestep(torch.tensor([2.0]), 1, "cpu", torch.float32)  # out of [0, 1], but not read back
    tensor([2.])
    ```
    """
    token = _VALUE_CHECKS.set(False)
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def value_checks_enabled() -> bool:
    """Whether input values are checked here (see [`skip_value_checks`]). Never inside `torch.compile`: a check reads
    a value back to the host, which a compiled graph cannot do, and dynamo cannot read the context variable, so each
    check would split the graph in two."""
    return not _is_compiling() and _VALUE_CHECKS.get()


@dataclass
class VRFMVelocityOutput(BaseOutput):
    """Output of a VRFM velocity model.

    Args:
        sample (`torch.Tensor`): the predicted velocity ``dx/dt`` (towards data), shaped like the input sample.
    """

    sample: torch.Tensor


class LatentEmbedding(nn.Module):
    """A two-layer MLP ``z -> SiLU(Linear) -> Linear`` whose last layer starts at zero.

    With the zero-initialised last layer a freshly wrapped backbone ignores ``z`` and reproduces its output exactly,
    which is what makes turning a pretrained flow model into a VRFM model sound.
    """

    def __init__(self, latent_dim: int, embed_dim: int, hidden_dim: int | None = None, zero_init: bool = True):
        super().__init__()
        hidden_dim = hidden_dim or embed_dim
        self.linear_1 = nn.Linear(latent_dim, hidden_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_dim, embed_dim)
        if zero_init:
            nn.init.zeros_(self.linear_2.weight)
            nn.init.zeros_(self.linear_2.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(z)))


class LatentMap(nn.Module):
    """``z`` as a spatial map: a linear layer to a `(channels, ceil(H / stride), ceil(W / stride))` grid, resized
    (nearest) to `(H, W)` and fed to the backbone as extra input channels. The linear layer starts at zero.

    The time-embedding path gives ``z`` to every block, but as a per-channel shift that is the same at every pixel;
    this map lets ``z`` say *where* things go. With a posterior that sees where strokes are, it is what lets one
    sampling step decode ``z`` into the image (`docs/benchmarks.md`, "z where the UNet can use it"), and
    `train_vrfm.py` adds one (4 channels) to every VRFM UNet it builds from scratch.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm import LatentMap
    >>> latent_map = LatentMap(latent_dim=4, channels=2, size=(28, 28), stride=4)
    >>> latent_map.grid
    (2, 7, 7)
    >>> latent_map(torch.randn(3, 4)).shape
    torch.Size([3, 2, 28, 28])
    ```
    """

    def __init__(self, latent_dim: int, channels: int, size: tuple[int, int], stride: int):
        super().__init__()
        self.size = tuple(size)
        self.grid = (channels, math.ceil(self.size[0] / stride), math.ceil(self.size[1] / stride))
        self.linear = nn.Linear(latent_dim, self.grid[0] * self.grid[1] * self.grid[2])
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, z: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The map at `size` (default: the `size` it was built for; a transformer may take other sizes)."""
        size = self.size if size is None else tuple(size)
        grid = self.linear(z).view(z.shape[0], *self.grid)
        return grid if grid.shape[-2:] == size else nn.functional.interpolate(grid, size=size)

    def append_to(self, sample: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """`sample` `(B, C, H, W)` with the map of ``z`` at its size as `channels` more input channels."""
        return torch.cat([sample, self(z.to(sample.dtype), sample.shape[-2:])], dim=1)


def check_z_map(latent_dim: int, channels, stride) -> None:
    """Refuses a wrapper's bad `z_map_channels` or `z_map_stride` with a message that names them."""
    for name, value, minimum in (("z_map_channels", channels, 0), ("z_map_stride", stride, 1)):
        check_integer(value, name, minimum)
    if channels > 0 and latent_dim == 0:
        raise ValueError(f"`z_map_channels` ({channels}) needs a `z`, but `latent_dim` is 0; set it to 0.")


def backbone_state_for(model, backbone) -> dict:
    """`backbone`'s state dict, ready to load into the wrapper `model`'s inner backbone: when `model` has a z map, its
    input layer (`model.z_map_input_layer`, a convolution) gets the map's input channels, after the backbone's, with
    `model`'s freshly initialised weights for them. The map starts at zero, so the wrapped model's output is the
    backbone's until training moves it."""
    state = dict(backbone.state_dict())
    if getattr(model, "z_map", None) is None:
        return state
    inner, layer = model.z_map_input_layer.split(".", 1)
    key = f"{layer}.weight"
    new_weights = getattr(model, inner).get_submodule(layer).weight.detach()[:, state[key].shape[1] :]
    state[key] = torch.cat([state[key], new_weights.to(state[key])], dim=1)
    return state


def check_latent(
    z: torch.Tensor | None, latent_dim: int, batch_size: int, argument: str = "z", batch_from: str = "sample"
) -> None:
    """Validates a latent against a model's `latent_dim` with a message that names the argument."""
    if latent_dim == 0:
        if z is not None:
            raise ValueError(f"This model has `latent_dim=0` (plain rectified flow) and takes no `{argument}`.")
        return
    if z is None:
        raise ValueError(
            f"This model has `latent_dim={latent_dim}` and needs `{argument}` of shape (B, {latent_dim})."
        )
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"`{argument}` must be a torch.Tensor, but got {type(z).__name__}.")
    if z.ndim != 2 or z.shape[1] != latent_dim or z.shape[0] != batch_size:
        raise ValueError(
            f"`{argument}` must have shape ({batch_size}, {latent_dim}) (the batch size of `{batch_from}`, "
            f"`latent_dim`), but got {tuple(z.shape)}."
        )
    check_tensor(z, argument)


def given_tensor(value, argument: str, shape: tuple, device, dtype, described: str = "") -> torch.Tensor:
    """A caller's tensor `argument`, checked to have `shape` (`described` says what it is made of) and to be finite
    floating point once moved to `device` and `dtype` (a value beyond `dtype`'s range becomes inf)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{argument}` must be a torch.Tensor, but got {type(value).__name__}.")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"`{argument}` must have shape {tuple(shape)}{described}, but got {tuple(value.shape)}.")
    check_tensor(value, argument)  # floating point, not on the meta device; any other device is moved
    value = value.to(device=device, dtype=dtype)
    if not torch.isfinite(value).all():
        raise ValueError(
            f"`{argument}` must be a finite floating-point tensor (in dtype {dtype}), but it has NaN or inf."
        )
    return value


def given_latent(z, batch_size: int, latent_dim: int, device, dtype) -> torch.Tensor:
    """A caller's ``z`` for a batch of `batch_size` ([`given_tensor`]): a `(latent_dim,)` vector is shared by every
    row, a `(batch_size, latent_dim)` tensor gives each row its own.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_vrfm.models.z_embedding import given_latent
    >>> given_latent(torch.tensor([1.0, 2.0]), 3, 2, "cpu", torch.float64)
    tensor([[1., 2.],
            [1., 2.],
            [1., 2.]], dtype=torch.float64)
    ```
    """
    if isinstance(z, torch.Tensor) and z.ndim == 1:
        z = z.unsqueeze(0).expand(batch_size, -1)
    described = f" (the batch size, `latent_dim`) or ({latent_dim},)"
    return given_tensor(z, "z", (batch_size, latent_dim), device, dtype, described)


def spatial_size(sample_size) -> tuple[int, int]:
    """`sample_size` as `(height, width)`; an int means a square."""
    if isinstance(sample_size, int) and not isinstance(sample_size, bool) and sample_size > 0:
        return (sample_size, sample_size)
    if (
        isinstance(sample_size, (list, tuple))
        and len(sample_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sample_size)
    ):
        return (int(sample_size[0]), int(sample_size[1]))
    raise ValueError(f"`sample_size` must be a positive int or a (height, width) pair, but got {sample_size!r}.")


def check_timestep(
    timestep, batch_size: int, device, dtype, argument: str = "timestep", batch_from: str = "sample"
) -> torch.Tensor:
    """Turns a scalar or per-example time in [0, 1] into a float tensor of shape (B,), refusing bad values."""
    if not isinstance(timestep, torch.Tensor):
        if not isinstance(timestep, numbers.Real) or isinstance(timestep, bool):
            raise TypeError(f"`{argument}` must be a float or a tensor, but got {type(timestep).__name__}.")
        timestep = torch.tensor(float(timestep))
    check_tensor(timestep, argument, floating=False)
    if timestep.dtype == torch.bool or timestep.is_complex():
        raise TypeError(f"`{argument}` must be a real-valued tensor, but got dtype {timestep.dtype}.")
    timestep = timestep.to(device=device, dtype=torch.float32)
    if timestep.ndim == 0:
        timestep = timestep.expand(batch_size)
    if timestep.ndim != 1 or timestep.shape[0] != batch_size:
        raise ValueError(
            f"`{argument}` must be a scalar or have shape ({batch_size},) (the batch size of `{batch_from}`), but got "
            f"{tuple(timestep.shape)}."
        )
    if value_checks_enabled() and (~torch.isfinite(timestep) | (timestep < 0) | (timestep > 1)).any():  # one read
        if not torch.isfinite(timestep).all():
            raise ValueError(f"`{argument}` must be finite, but it contains NaN or inf.")
        raise ValueError(
            f"`{argument}` must lie in [0, 1] (0 = noise, 1 = data), but got values in "
            f"[{timestep.min().item():.4g}, {timestep.max().item():.4g}]."
        )
    return timestep.to(dtype)


def as_label_tensor(class_labels, device, argument: str = "class_labels") -> torch.Tensor:
    """Converts labels (an int, a list of ints, an array or a tensor) to an integer tensor on `device`, refusing
    anything else (floats, bools, strings, ragged lists, the meta device) with a message that names `argument`."""
    if isinstance(class_labels, torch.Tensor):
        check_tensor(class_labels, argument, floating=False)
    else:
        try:
            class_labels = torch.as_tensor(class_labels)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise TypeError(
                f"`{argument}` must be an int, a list of ints or an integer tensor, but got {class_labels!r} "
                f"({error})."
            ) from None
    if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
        raise TypeError(f"`{argument}` must hold integers, but got dtype {class_labels.dtype}.")
    return class_labels.to(device)


def check_class_labels(
    class_labels, num_classes: int | None, batch_size: int, device, batch_from: str = "sample"
) -> torch.Tensor | None:
    """Validates class labels; `num_classes` is the null (unconditional) label used by classifier-free guidance."""
    if num_classes is None:
        if class_labels is not None:
            raise ValueError("This model is unconditional (`num_classes=None`) and takes no `class_labels`.")
        return None
    if class_labels is None:
        return torch.full((batch_size,), num_classes, dtype=torch.long, device=device)
    class_labels = as_label_tensor(class_labels, device)
    if class_labels.ndim == 0:
        class_labels = class_labels.expand(batch_size)
    if class_labels.ndim != 1 or class_labels.shape[0] != batch_size:
        raise ValueError(
            f"`class_labels` must be integers of shape ({batch_size},) (the batch size of `{batch_from}`), but got "
            f"shape {tuple(class_labels.shape)}."
        )
    if value_checks_enabled() and ((class_labels < 0) | (class_labels > num_classes)).any():
        raise ValueError(
            f"`class_labels` must lie in [0, {num_classes}] ({num_classes} is the null label), but got values in "
            f"[{class_labels.min().item()}, {class_labels.max().item()}]."
        )
    return class_labels.long()


def check_sample(sample, expected_shape: tuple[int, ...], argument: str = "sample") -> None:
    """Validates a batch of samples against a model's per-example shape."""
    check_tensor(sample, argument)
    if tuple(sample.shape[1:]) != tuple(expected_shape) or sample.ndim != len(expected_shape) + 1:
        raise ValueError(
            f"`{argument}` must have shape (B, {', '.join(map(str, expected_shape))}), but got {tuple(sample.shape)}."
        )


def to_execution(model, sample: torch.Tensor) -> torch.Tensor:
    """`sample` on the device where `model`'s forward runs and in its dtype. That device is the one of its parameters,
    or, when they sit on the meta device because accelerate offloads them (`enable_sequential_cpu_offload`), the
    input's, which the offload hooks already moved to the execution device. diffusers' `device` and `dtype` walk
    every submodule, so a forward calls this once and takes both from the result after that."""
    device = model.device
    return sample.to(device=sample.device if device.type == "meta" else device, dtype=model.dtype)


def check_velocity_inputs(model, sample, timestep, z, class_labels):
    """Validates a velocity model's inputs and returns `(sample, t, labels)`.

    `sample` is moved to the model's device and dtype ([`to_execution`]), `t` is a float32 tensor of shape
    (B,) (full precision before the backbones scale it by 1000), and `labels` are long labels (the null label when a
    class-conditional model gets none) or `None`.
    """
    check_sample(sample, model.sample_shape)
    sample = to_execution(model, sample)
    batch_size = sample.shape[0]
    t = check_timestep(timestep, batch_size, sample.device, torch.float32)
    check_latent(z, model.latent_dim, batch_size)
    labels = check_class_labels(class_labels, model.num_classes, batch_size, sample.device)
    return sample, t, labels


def check_context(
    value, argument: str, batch_size: int, width: int, ndim: int, batch_from: str = "sample"
) -> torch.Tensor:
    """Validates a text context (`ndim=3`, `(B, L, width)`) or pooled text vector (`ndim=2`, `(B, width)`)."""
    check_tensor(value, argument)
    expected = f"({batch_size}, L, {width})" if ndim == 3 else f"({batch_size}, {width})"
    if value.ndim != ndim or value.shape[0] != batch_size or value.shape[-1] != width:
        raise ValueError(
            f"`{argument}` must have shape {expected} (the batch size of `{batch_from}`, the model's width), but got "
            f"{tuple(value.shape)}."
        )
    return value
