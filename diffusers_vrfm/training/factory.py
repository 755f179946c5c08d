"""Building the velocity model and the posterior encoder for `train_vrfm.py`: from scratch, from a pretrained diffusers
backbone (wrapped with a zero-initialised ``z`` path), or from an existing VRFM pipeline (to continue training).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

BACKBONES = ("unet", "dit", "mlp", "sd3")

# Small, CPU-friendly defaults; `--model_config` / `--posterior_config` override any key.
DEFAULT_MODEL_CONFIGS = {
    "mlp": {"hidden_dim": 64, "num_layers": 3, "activation": "selu"},
    "unet": {
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
        "attention_head_dim": 8,
    },
    "dit": {
        "num_layers": 4,
        "num_attention_heads": 4,
        "attention_head_dim": 16,
        "patch_size": 2,
        "norm_num_groups": 8,
    },
    # a small text-to-image MMDiT trained from scratch (diffusers_vrfm.training.text_to_image)
    "sd3": {"patch_size": 2, "num_layers": 4, "attention_head_dim": 16, "num_attention_heads": 4},
}
DEFAULT_POSTERIOR_CONFIGS = {
    "mlp": {"hidden_dim": 64, "num_layers": 2},
    # a 4x4 grid of the last feature map, not a global average pool: z must be able to say where strokes are
    # (docs/benchmarks.md, "What the image posterior sees"); capped at that map's side on small images
    "image": {
        "block_out_channels": [16, 32, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "hidden_dim": 64,
        "pooled_size": 4,
    },
}
# z also enters the UNet and the DiT as input channels (a LatentMap): their time-embedding (adaLN) path shifts every
# pixel or token of a channel alike, so without the map the net cannot put a stroke where z says (docs/benchmarks.md,
# "z where the UNet can use it"). The map's grid is at most this many pixels a side (its stride grows with the image),
# to bound its size.
DEFAULT_Z_MAP = {"z_map_channels": 4, "max_grid_side": 32}
DEFAULT_POSTERIOR_INPUTS = {"mlp": ("x1",), "image": ("x1",)}
DEFAULT_LATENT_DIM = {"mlp": 8, "unet": 16, "dit": 16, "sd3": 16}  # images: see DEFAULT_KL_TARGET in cli.py

# diffusers backbones that can be wrapped, by the `_class_name` in their config.json.
WRAPPABLE_BACKBONES = {
    "UNet2DModel": ("unet", "VRFMUNet2DModel"),
    "UNet2DConditionModel": ("unet", "VRFMUNet2DConditionModel"),
    "DiTTransformer2DModel": ("dit", "VRFMDiTTransformer2DModel"),
}
_BACKBONE_SUBFOLDERS = (None, "unet", "transformer")
# text-to-image pipelines train_vrfm.py fine-tunes: class name -> (PretrainedSource kind, velocity model folder)
TEXT_TO_IMAGE_PIPELINES = {
    "StableDiffusion3Pipeline": ("sd3_pipeline", "transformer"),
    "VRFMTextToImagePipeline": ("pipeline", "velocity_model"),
}


def parse_json_config(value: str | None, argument: str) -> dict:
    """`--model_config` and `--posterior_config`: a JSON object, or the path of a JSON file (e.g. a config.json)."""
    if value is None:
        return {}
    text = value
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as handle:
            text = handle.read()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"`{argument}` must be a JSON object or the path of a JSON file, but got {value!r}."
        ) from error
    if not isinstance(config, dict):
        raise ValueError(f"`{argument}` must be a JSON object, but got {type(config).__name__}.")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def downsample_factor(backbone: str, model_config: dict) -> int:
    """How many pixels one cell of the coarsest feature map covers: the resolution must be a multiple of it."""
    if backbone == "unet":
        return 2 ** (len(model_config["block_out_channels"]) - 1)
    if backbone in ("dit", "sd3"):
        return int(model_config["patch_size"])
    return 1


@dataclass
class PretrainedSource:
    """What `--pretrained_model_name_or_path` points at.

    Args:
        kind (`str`): `"pipeline"` (a VRFM pipeline, to continue), `"backbone"` (a diffusers model, to wrap) or
            `"sd3_pipeline"` (a stock `StableDiffusion3Pipeline`, converted).
        path (`str`): the folder (or Hub id) as given.
        backbone (`str`): `"unet"`, `"dit"`, `"mlp"` or `"sd3"` (text-to-image).
        config (`dict`): the velocity model's (or backbone's) config.
        subfolder (`str`, *optional*): the backbone's subfolder.
    """

    kind: str
    path: str
    backbone: str
    config: dict
    subfolder: str | None = None
    components: dict = field(default_factory=dict)

    @property
    def sample_size(self):
        return self.config.get("sample_size")

    @property
    def in_channels(self):
        return self.config.get("in_channels")


def _read_config(folder: str, subfolder: str | None, filename: str):
    path = os.path.join(folder, subfolder or "", filename)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    return None


def inspect_pretrained(path: str, subfolder: str | None = None, revision: str | None = None) -> PretrainedSource:
    """Finds out whether `path` (a folder or a Hub id) holds a VRFM pipeline or a wrappable diffusers backbone."""
    from diffusers_vrfm.hub import PIPELINE_CLASS

    folder = path
    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download

        folder = snapshot_download(path, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.md"])
    model_index = _read_config(folder, None, "model_index.json")
    class_name = (model_index or {}).get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, list) else class_name
    if class_name in TEXT_TO_IMAGE_PIPELINES and subfolder is None:
        kind, model_folder = TEXT_TO_IMAGE_PIPELINES[class_name]
        return PretrainedSource(kind, folder, "sd3", _read_config(folder, model_folder, "config.json") or {})
    if class_name == PIPELINE_CLASS and subfolder is None:
        velocity_config = _read_config(folder, "velocity_model", "config.json") or {}
        backbone = {"VRFMMLPModel": "mlp", "VRFMDiTTransformer2DModel": "dit"}.get(
            velocity_config.get("_class_name"), "unet"
        )
        return PretrainedSource("pipeline", folder, backbone, velocity_config)
    candidates = [subfolder] if subfolder is not None else list(_BACKBONE_SUBFOLDERS)
    for candidate in candidates:
        config = _read_config(folder, candidate, "config.json")
        if config is None:
            continue
        class_name = config.get("_class_name")
        if class_name not in WRAPPABLE_BACKBONES:
            raise ValueError(
                f"`--pretrained_model_name_or_path` {path!r} holds a {class_name!r}; only "
                f"{sorted(WRAPPABLE_BACKBONES)} backbones or VRFM pipelines can be trained."
            )
        return PretrainedSource("backbone", folder, WRAPPABLE_BACKBONES[class_name][0], config, candidate)
    raise ValueError(
        f"`--pretrained_model_name_or_path` {path!r} has neither a model_index.json (a VRFM pipeline) nor a "
        f"config.json of a diffusers backbone{' in ' + repr(subfolder) if subfolder else ''}."
    )


@dataclass
class BuiltModels:
    """The models [`build_models`] returns, with where they came from (for the model card)."""

    velocity_model: object
    posterior_encoder: object | None
    base_model: str | None = None
    origin: str = "scratch"


def default_z_map(sample_size: tuple[int, int], model_config: dict) -> dict:
    """The z map a from-scratch VRFM UNet, DiT or MMDiT gets unless `--model_config` sets its own:
    `DEFAULT_Z_MAP["z_map_channels"]` channels on a grid of at most `DEFAULT_Z_MAP["max_grid_side"]` a side (stride 1
    up to 32x32 images).

    Example:

    ```py
    >>> from diffusers_vrfm.training.factory import default_z_map
    >>> default_z_map((28, 28), {}), default_z_map((64, 48), {}), default_z_map((28, 28), {"z_map_channels": 0})
    ({'z_map_channels': 4, 'z_map_stride': 1}, {'z_map_channels': 4, 'z_map_stride': 2}, {'z_map_channels': 0})
    ```
    """
    channels = model_config.get("z_map_channels", DEFAULT_Z_MAP["z_map_channels"])
    if channels == 0 or "z_map_stride" in model_config:
        return {"z_map_channels": channels}
    return {"z_map_channels": channels, "z_map_stride": math.ceil(max(sample_size) / DEFAULT_Z_MAP["max_grid_side"])}


# What `--model_config` may set when the script wraps a pretrained backbone: the backbone keeps its own config.
WRAPPED_BACKBONE_KEYS = ("z_map_channels", "z_map_stride")


def wrapper_options(model_config: dict, wrapped: str) -> dict:
    """The `--model_config` settings of a wrapped pretrained `wrapped` (its z map), refusing any other key, which
    the pretrained config fixes.

    Example:

    ```py
    >>> from diffusers_vrfm.training.factory import wrapper_options
    >>> wrapper_options({"z_map_channels": 4}, "UNet2DModel")
    {'z_map_channels': 4}
    ```
    """
    others = sorted(set(model_config) - set(WRAPPED_BACKBONE_KEYS))
    if others:
        raise ValueError(
            f"`--model_config` can only set {list(WRAPPED_BACKBONE_KEYS)} when wrapping a pretrained {wrapped}, "
            f"but got {others}: the backbone keeps its pretrained config."
        )
    return dict(model_config)


def refuse_model_config(model_config: dict) -> None:
    """A VRFM pipeline whose training continues keeps its whole config: any `--model_config` is refused."""
    if model_config:
        raise ValueError(
            f"`--model_config` cannot change a VRFM pipeline that training continues, but got {sorted(model_config)}: "
            "the pipeline keeps its config (leave `--model_config` unset)."
        )


def build_posterior(kind: str, sample_shape, latent_dim: int, posterior_inputs, posterior_config: dict):
    import diffusers_vrfm
    from diffusers_vrfm.models.posterior_conv import last_feature_map_size

    if latent_dim == 0:
        return None
    if kind == "vector":
        config = {**DEFAULT_POSTERIOR_CONFIGS["mlp"], **posterior_config}
        return diffusers_vrfm.VRFMPosteriorEncoder(
            sample_size=sample_shape[0], latent_dim=latent_dim, posterior_inputs=tuple(posterior_inputs), **config
        )
    config = {**DEFAULT_POSTERIOR_CONFIGS["image"], **posterior_config}
    if "pooled_size" not in posterior_config:
        last_map = last_feature_map_size(tuple(sample_shape[1:]), len(config["block_out_channels"]) - 1)
        config["pooled_size"] = min(config["pooled_size"], *last_map)
    return diffusers_vrfm.VRFMConvPosteriorEncoder(
        sample_size=sample_shape[1],
        in_channels=sample_shape[0],
        latent_dim=latent_dim,
        posterior_inputs=tuple(posterior_inputs),
        **config,
    )


def build_models(
    backbone: str,
    sample_shape: tuple[int, ...],
    latent_dim: int,
    posterior_inputs,
    num_classes: int | None = None,
    model_config: dict | None = None,
    posterior_config: dict | None = None,
    pretrained: PretrainedSource | None = None,
) -> BuiltModels:
    """Creates (or loads) the velocity model and, when `latent_dim > 0`, the posterior encoder.

    Args:
        backbone (`str`): `"unet"`, `"dit"` or `"mlp"`.
        sample_shape (`tuple[int, ...]`): `(C, H, W)` for images, `(D,)` for vectors.
        latent_dim (`int`): the dimension of ``z`` (0 = plain rectified flow, no posterior).
        posterior_inputs (`tuple[str]`): what the posterior reads.
        num_classes (`int`, *optional*): for class conditioning.
        model_config (`dict`, *optional*), posterior_config (`dict`, *optional*): overrides of the default configs.
        pretrained ([`PretrainedSource`], *optional*): a pipeline to continue or a backbone to wrap.
    """
    model_config = dict(model_config or {})
    kind = "vector" if backbone == "mlp" else "image"

    def new_posterior():
        return build_posterior(kind, sample_shape, latent_dim, posterior_inputs, dict(posterior_config or {}))

    if pretrained is not None and pretrained.kind == "pipeline":
        refuse_model_config(model_config)
        velocity_model, posterior = _pipeline_to_continue(pretrained, latent_dim, num_classes)
        posterior = new_posterior() if posterior is None else posterior
        return BuiltModels(velocity_model, posterior, base_model=pretrained.path, origin="pipeline")
    if pretrained is not None:
        velocity_model = _wrapped_backbone(pretrained, latent_dim, num_classes, model_config)
        return BuiltModels(velocity_model, new_posterior(), base_model=pretrained.path, origin="backbone")
    velocity_model = _new_velocity_model(backbone, sample_shape, latent_dim, num_classes, model_config)
    return BuiltModels(velocity_model, new_posterior())


def _pipeline_to_continue(pretrained: PretrainedSource, latent_dim: int, num_classes: int | None):
    """The velocity model and posterior (`None` if it was not saved) of a VRFM pipeline that training continues."""
    from diffusers_vrfm.hub import load_pipeline_components

    components = load_pipeline_components(pretrained.path)
    velocity_model = components["velocity_model"]
    if velocity_model.latent_dim != latent_dim:
        raise ValueError(
            f"`--latent_dim` {latent_dim} differs from the pipeline's velocity model "
            f"({velocity_model.latent_dim}); leave `--latent_dim` unset to continue the pipeline."
        )
    if velocity_model.num_classes != num_classes:
        raise ValueError(
            f"The pipeline's velocity model has num_classes={velocity_model.num_classes}, but the training data "
            f"gives {num_classes}; set `--class_conditional` to match the pipeline."
        )
    return velocity_model, components.get("posterior_encoder")


def _wrapped_backbone(pretrained: PretrainedSource, latent_dim: int, num_classes: int | None, model_config: dict):
    """A pretrained diffusers backbone in its VRFM wrapper, with a zero-initialised `z` path."""
    import diffusers

    import diffusers_vrfm

    class_name = pretrained.config["_class_name"]
    backbone_class = getattr(diffusers, class_name)
    wrapper_class = getattr(diffusers_vrfm, WRAPPABLE_BACKBONES[class_name][1])
    options = wrapper_options(model_config, class_name)
    loaded = backbone_class.from_pretrained(pretrained.path, subfolder=pretrained.subfolder)
    return wrapper_class.from_backbone(loaded, latent_dim=latent_dim, num_classes=num_classes, **options)


def _new_velocity_model(
    backbone: str, sample_shape: tuple[int, ...], latent_dim: int, num_classes: int | None, model_config: dict
):
    """A velocity model of `backbone` from the default config updated with `model_config` (and, for images with
    `z`, the default `z` map)."""
    import diffusers_vrfm

    config = {**DEFAULT_MODEL_CONFIGS[backbone], **model_config}
    if backbone != "mlp" and latent_dim > 0:
        config.update(default_z_map(tuple(sample_shape[1:]), model_config))
    if backbone == "mlp":
        return diffusers_vrfm.VRFMMLPModel(
            sample_size=sample_shape[0], latent_dim=latent_dim, num_classes=num_classes, **config
        )
    image = {"sample_size": sample_shape[1], "in_channels": sample_shape[0], "latent_dim": latent_dim}
    if backbone == "unet":
        return diffusers_vrfm.VRFMUNet2DModel(**image, out_channels=sample_shape[0], num_classes=num_classes, **config)
    if backbone == "dit":
        return diffusers_vrfm.VRFMDiTTransformer2DModel(**image, num_classes=num_classes, **config)
    raise ValueError(f"`--backbone` must be one of {BACKBONES}, but got {backbone!r}.")


def count_parameters(model) -> int:
    return 0 if model is None else sum(p.numel() for p in model.parameters())


def clean_copy(model):
    """A fresh copy of a model built from its config (no accelerate forward wrappers, no DDP), in eval mode."""
    if model is None:
        return None
    copy = type(model).from_config(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def build_pipeline(velocity_model, posterior_encoder, scheduler, ema_model=None, vae=None, prior=None):
    """A VRFMPipeline: a clean copy of the velocity model holding the EMA weights (if any), the VAE (if any) and the
    prior (if any)."""
    from diffusers_vrfm import VRFMPipeline, VRFMScheduler

    velocity = clean_copy(velocity_model)
    if ema_model is not None:
        ema_model.copy_to(velocity.parameters())
    pipeline = VRFMPipeline(
        velocity_model=velocity,
        scheduler=VRFMScheduler.from_config(scheduler.config),
        posterior_encoder=clean_copy(posterior_encoder),
        vae=vae,
        prior=clean_copy(prior),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
