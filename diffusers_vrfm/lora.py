"""LoRA for VRFM velocity models through peft, and the VRFM adapter folder that loads on top of a base pipeline.

LoRA goes on the inner backbone's attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`, as diffusers'
`train_dreambooth_lora_sd3.py` does); the backbone's own weights are frozen, while the ``z`` path (and, in training,
the posterior encoder and the prior) stay fully trainable.

A VRFM adapter folder holds everything a LoRA run trained, in safetensors:

```
adapter/
  vrfm_adapter.json           the format, the base pipeline, the velocity model's class and z settings, the LoRA
                              config, the pipeline's `reencode_z_at`
  lora_weights.safetensors    peft's LoRA weights of the backbone
  z_path.safetensors          the z path (`z_embedding.*`, or the conditional UNet's `unet.class_embedding.*`; with a
                              z map also `z_map.*` and the input layer that reads it)
  posterior_encoder/          save_pretrained of the posterior encoder (optional)
  prior/                      save_pretrained of the prior (optional)
```

Load it with one call: `VRFMTextToImagePipeline.from_vrfm_adapter(folder_or_hub_id)` (base from the folder's record,
or `base_model=`), or [`load_vrfm_adapter`] on a pipeline you already have.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_CONFIG_NAME = "vrfm_adapter.json"
LORA_WEIGHTS_NAME = "lora_weights.safetensors"
Z_PATH_WEIGHTS_NAME = "z_path.safetensors"
ADAPTER_FORMAT = "diffusers-vrfm-lora"
ADAPTER_FORMAT_VERSION = 1
BASE_FORMATS = ("stable_diffusion_3", "vrfm")


def _require_peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError("LoRA needs peft: `pip install diffusers-vrfm[lora]` (or `pip install peft`).") from error
    return peft


def backbone_of(velocity_model) -> torch.nn.Module:
    """The wrapped diffusers backbone (the module LoRA goes into): `.transformer` or `.unet`."""
    for name in ("transformer", "unet"):
        backbone = getattr(velocity_model, name, None)
        if isinstance(backbone, torch.nn.Module):
            return backbone
    raise TypeError(
        f"`velocity_model` must be a VRFM wrapper of a diffusers backbone (with `.transformer` or `.unet`), but got "
        f"{type(velocity_model).__name__}."
    )


def z_path_prefixes(velocity_model) -> tuple[str, ...]:
    """The parameter-name prefixes of the ``z`` path: `z_embedding.` (or the conditional UNet's projection path)
    and, with a z map, `z_map.` and the backbone's input layer (`z_map_input_layer`), whose weights for the map's
    channels are new."""
    if getattr(velocity_model, "z_embedding", None) is not None:
        prefixes = ("z_embedding.",)
    elif getattr(getattr(velocity_model, "unet", None), "class_embedding", None) is not None:
        prefixes = ("unet.class_embedding.",)
    else:
        raise ValueError("`velocity_model` has no z path (`latent_dim=0`): there is nothing VRFM-specific to train.")
    if getattr(velocity_model, "z_map", None) is not None:
        prefixes += ("z_map.", f"{velocity_model.z_map_input_layer}.")
    return prefixes


Z_MAP_DEFAULTS = {"z_map_channels": 0, "z_map_stride": 1}


def z_map_settings(velocity_model) -> dict:
    """The velocity model's `z_map_channels` and `z_map_stride` (a model without them has no map)."""
    return {key: velocity_model.config.get(key, default) for key, default in Z_MAP_DEFAULTS.items()}


def recorded_z_map(record: dict) -> dict:
    """The z map settings an adapter's record holds (records from before z maps hold none: no map)."""
    return {key: record.get(key, default) for key, default in Z_MAP_DEFAULTS.items()}


def z_path_state_dict(velocity_model) -> dict[str, torch.Tensor]:
    """The ``z`` path's weights, keyed as in the velocity model's state dict."""
    prefixes = z_path_prefixes(velocity_model)
    return {key: value for key, value in velocity_model.state_dict().items() if key.startswith(prefixes)}


def add_lora(
    velocity_model,
    rank: int = 4,
    lora_alpha: float | None = None,
    target_modules: tuple[str, ...] | list[str] = LORA_TARGET_MODULES,
    lora_dropout: float = 0.0,
):
    """Freezes the backbone's own weights, adds peft LoRA layers to its attention projections, and leaves the ``z``
    path trainable. Returns the `peft.LoraConfig`.

    Example:

    ```py
    >>> from diffusers_vrfm import VRFMSD3Transformer2DModel
    >>> from diffusers_vrfm.lora import add_lora
    >>> model = VRFMSD3Transformer2DModel(
    ...     sample_size=8, in_channels=4, out_channels=4, latent_dim=4, num_layers=1, attention_head_dim=8,
    ...     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
    ...     pos_embed_max_size=8,
    ... )
    >>> config = add_lora(model, rank=2)
    >>> sorted({name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad})
    ['transformer', 'z_embedding']
    >>> all("lora_" in name for name, p in model.transformer.named_parameters() if p.requires_grad)
    True
    ```
    """
    peft = _require_peft()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be a positive integer, but got {rank!r}.")
    backbone = backbone_of(velocity_model)
    prefixes = z_path_prefixes(velocity_model)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=rank if lora_alpha is None else lora_alpha,
        lora_dropout=lora_dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    backbone.requires_grad_(False)
    backbone.add_adapter(config)  # the new LoRA weights are trainable
    for name, parameter in velocity_model.named_parameters():
        if name.startswith(prefixes):
            parameter.requires_grad_(True)
    return config


def lora_state_dict(velocity_model) -> dict[str, torch.Tensor]:
    """The backbone's LoRA weights (peft's keys, without the adapter name)."""
    from peft.utils import get_peft_model_state_dict

    _require_peft()
    return get_peft_model_state_dict(backbone_of(velocity_model))


def _lora_config_dict(velocity_model) -> dict:
    backbone = backbone_of(velocity_model)
    configs = getattr(backbone, "peft_config", None)
    if not configs:
        raise ValueError("`velocity_model` has no LoRA layers: call `add_lora` first.")
    config = configs[next(iter(configs))]
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(config.target_modules),
    }


def save_vrfm_adapter(folder: str | os.PathLike, pipeline, base_model: str | None = None) -> None:
    """Writes a VRFM adapter folder (module docstring) from a pipeline whose velocity model has LoRA layers.

    The base defaults to what the pipeline was made from: the stock SD3 pipeline it was converted from
    ([`~VRFMTextToImagePipeline.from_stable_diffusion_3`]) or the VRFM pipeline folder it was loaded from. The
    folder is written under a temporary name and renamed into place.
    """
    from safetensors.torch import save_file

    from .hub import write_text_atomic

    velocity_model = pipeline.velocity_model
    converted_from = pipeline.config.get("_base_model")
    base_model = base_model or converted_from or pipeline.config.get("_name_or_path")
    record = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "base_model": base_model,
        "base_format": "stable_diffusion_3" if converted_from else "vrfm",
        "velocity_model_class": type(velocity_model).__name__,
        "latent_dim": velocity_model.latent_dim,
        "z_embed_hidden_dim": velocity_model.config.get("z_embed_hidden_dim"),
        **z_map_settings(velocity_model),
        "lora": _lora_config_dict(velocity_model),
        "components": [name for name in ("posterior_encoder", "prior") if getattr(pipeline, name, None) is not None],
        "reencode_z_at": pipeline.config.get("reencode_z_at"),
    }
    folder = os.fspath(folder)
    temporary = f"{folder.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    save_file({k: v.detach().contiguous() for k, v in lora_state_dict(velocity_model).items()},
              os.path.join(temporary, LORA_WEIGHTS_NAME))  # fmt: skip
    save_file({k: v.detach().contiguous() for k, v in z_path_state_dict(velocity_model).items()},
              os.path.join(temporary, Z_PATH_WEIGHTS_NAME))  # fmt: skip
    for name in record["components"]:
        getattr(pipeline, name).save_pretrained(os.path.join(temporary, name), safe_serialization=True)
    write_text_atomic(os.path.join(temporary, ADAPTER_CONFIG_NAME), json.dumps(record, indent=2, sort_keys=True))
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.replace(temporary, folder)


def resolve_adapter_folder(
    folder_or_repo: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> str:
    """The local folder of a VRFM adapter: `folder_or_repo` itself when it is a folder, else a snapshot of the Hub
    repository of that id, fetched like a pipeline's (configs and safetensors only, never pickle; see
    [`diffusers_vrfm.hub.resolve_pipeline_folder`], which also raises `FileNotFoundError` for a mistyped path or a
    repository that cannot be fetched)."""
    from .hub import resolve_pipeline_folder

    return resolve_pipeline_folder(
        os.fspath(folder_or_repo),
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
        allow_pickle=False,
    )


def read_vrfm_adapter_config(folder: str | os.PathLike) -> dict:
    """Reads and checks an adapter folder's `vrfm_adapter.json`."""
    path = os.path.join(os.fspath(folder), ADAPTER_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(folder)!r} is not a VRFM adapter folder (no {ADAPTER_CONFIG_NAME}).")
    with open(path, encoding="utf-8") as handle:
        record = json.load(handle)
    if record.get("format") != ADAPTER_FORMAT or record.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise ValueError(
            f"{path}: expected format {ADAPTER_FORMAT!r} version {ADAPTER_FORMAT_VERSION}, but got "
            f"{record.get('format')!r} version {record.get('format_version')!r}."
        )
    return record


def load_vrfm_adapter(pipeline, folder: str | os.PathLike):
    """Loads a VRFM adapter folder into `pipeline` in place (LoRA layers, ``z`` path, posterior, prior) and returns
    it. The pipeline's velocity model must have the adapter's class and `latent_dim`."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .hub import resolve_component_class

    _require_peft()
    folder = os.fspath(folder)
    record = read_vrfm_adapter_config(folder)
    velocity_model = pipeline.velocity_model
    found = (type(velocity_model).__name__, velocity_model.latent_dim)
    if found != (record["velocity_model_class"], record["latent_dim"]):
        raise ValueError(
            f"The adapter was trained on a {record['velocity_model_class']} with latent_dim={record['latent_dim']}, "
            f"but the pipeline's velocity model is a {found[0]} with latent_dim={found[1]}."
        )
    expected_map = recorded_z_map(record)
    if z_map_settings(velocity_model) != expected_map:
        raise ValueError(
            f"The adapter was trained with the z map {expected_map}, but the pipeline's velocity model has "
            f"{z_map_settings(velocity_model)}."
        )
    if not getattr(backbone_of(velocity_model), "peft_config", None):
        lora = record["lora"]
        add_lora(velocity_model, lora["r"], lora["lora_alpha"], lora["target_modules"], lora["lora_dropout"])
    result = set_peft_model_state_dict(backbone_of(velocity_model), load_file(os.path.join(folder, LORA_WEIGHTS_NAME)))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"The adapter's LoRA weights do not fit the backbone: {sorted(result.unexpected_keys)[:5]}.")
    z_path = load_file(os.path.join(folder, Z_PATH_WEIGHTS_NAME))
    expected = set(z_path_state_dict(velocity_model))
    if set(z_path) != expected:
        raise ValueError(f"The adapter's z-path weights {sorted(z_path)} do not match the model's {sorted(expected)}.")
    velocity_model.load_state_dict(z_path, strict=False)
    loaded = {}
    for name in record["components"]:
        subfolder = os.path.join(folder, name)
        with open(os.path.join(subfolder, "config.json"), encoding="utf-8") as handle:
            class_name = json.load(handle)["_class_name"]
        component = resolve_component_class(name, ["diffusers_vrfm", class_name]).from_pretrained(subfolder)
        if component.latent_dim != velocity_model.latent_dim:
            raise ValueError(f"The adapter's `{name}` has latent_dim={component.latent_dim}, not {found[1]}.")
        loaded[name] = component.to(device=velocity_model.device)
    if loaded:
        pipeline.register_modules(**loaded)
    if record.get("reencode_z_at") is not None:  # the sampling default the run was saved with (adapters since 12/2026)
        pipeline.set_default_reencode_z_at(record["reencode_z_at"])
    return pipeline
