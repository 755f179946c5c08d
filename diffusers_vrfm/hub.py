"""Saving, loading and sharing pipelines: the remote-code re-export files, a safe loader, and the component allowlist.

A saved pipeline folder has diffusers' usual layout. On top of it, `write_remote_code_files` writes, for the Hub's
`trust_remote_code` route, a root `pipeline.py` and one file per component, each exactly one import line from the
installed package, and records them in `model_index.json` (`"_class_name": ["pipeline", "VRFMPipeline"]`).
`load_pipeline_components` reads such a folder **without executing any file in it**: every class named in
`model_index.json` must be on an allowlist, and weights load from safetensors only.
"""

from __future__ import annotations

import importlib
import json
import os
import re

PIPELINE_FILE = "pipeline.py"
PIPELINE_CLASS = "VRFMPipeline"

# Component classes a VRFM pipeline folder may name, and where they come from.
ALLOWED_COMPONENT_CLASSES = {
    "VRFMMLPModel": "diffusers_vrfm",
    "VRFMUNet2DModel": "diffusers_vrfm",
    "VRFMUNet2DConditionModel": "diffusers_vrfm",
    "VRFMDiTTransformer2DModel": "diffusers_vrfm",
    "VRFMPosteriorEncoder": "diffusers_vrfm",
    "VRFMConvPosteriorEncoder": "diffusers_vrfm",
    "VRFMAggregatePosteriorPrior": "diffusers_vrfm",
    "VRFMScheduler": "diffusers_vrfm",
    "AutoencoderKL": "diffusers",
    "AutoencoderTiny": "diffusers",
}
_SAFE_FILE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def remote_code_file_name(class_name: str) -> str:
    """The module name of the one-line re-export file for `class_name`: the lower-cased class name."""
    return class_name.lower()


def remote_code_line(class_name: str) -> str:
    """The whole content of a re-export file: one import from the installed package."""
    return f"from diffusers_vrfm import {class_name}  # noqa: F401\n"


def write_remote_code_files(save_directory: str | os.PathLike, pipeline) -> None:
    """Writes the re-export files of a saved pipeline and points `model_index.json` at them.

    Components from diffusers itself (a VAE) keep their usual `["diffusers", "Class"]` entry.
    """
    index_path = os.path.join(save_directory, "model_index.json")
    with open(index_path, encoding="utf-8") as handle:
        model_index = json.load(handle)
    model_index["_class_name"] = [PIPELINE_FILE.removesuffix(".py"), type(pipeline).__name__]
    write_text_atomic(os.path.join(save_directory, PIPELINE_FILE), remote_code_line(type(pipeline).__name__))
    for name, entry in model_index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        library, class_name = entry
        if not library.startswith("diffusers_vrfm"):
            continue
        file_name = remote_code_file_name(class_name)
        write_text_atomic(os.path.join(save_directory, name, file_name + ".py"), remote_code_line(class_name))
        model_index[name] = [file_name, class_name]
    write_text_atomic(index_path, json.dumps(model_index, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: str, text: str) -> None:
    """Writes a file atomically: to a temporary name in the same folder, then renamed into place."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def resolve_component_class(component: str, entry) -> type | None:
    """Maps a `model_index.json` entry to a class from the allowlist, refusing anything else with a clear error."""
    if entry is None or (isinstance(entry, (list, tuple)) and list(entry) == [None, None]):
        return None
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
        raise ValueError(f"model_index.json: the entry of `{component}` must be [library, class], but got {entry!r}.")
    library, class_name = entry
    if class_name not in ALLOWED_COMPONENT_CLASSES:
        raise ValueError(
            f"model_index.json: `{component}` names the class {class_name!r}, which a VRFM pipeline does not load. "
            f"Allowed classes: {sorted(ALLOWED_COMPONENT_CLASSES)}."
        )
    source = ALLOWED_COMPONENT_CLASSES[class_name]
    allowed_libraries = {source, remote_code_file_name(class_name)} if source == "diffusers_vrfm" else {source}
    if not (library in allowed_libraries or (source == "diffusers_vrfm" and library.startswith("diffusers_vrfm."))):
        raise ValueError(
            f"model_index.json: `{component}` names {class_name!r} from {library!r}; expected one of "
            f"{sorted(allowed_libraries)} (or a module of diffusers_vrfm)."
        )
    return getattr(importlib.import_module(source), class_name)


def read_model_index(folder: str) -> dict:
    """Reads and checks a pipeline folder's `model_index.json`."""
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{folder!r} is not a pipeline folder: it has no model_index.json.")
    with open(index_path, encoding="utf-8") as handle:
        model_index = json.load(handle)
    class_name = model_index.get("_class_name")
    if isinstance(class_name, list):
        if len(class_name) != 2 or class_name[0] != PIPELINE_FILE.removesuffix(".py"):
            raise ValueError(f"model_index.json: unexpected `_class_name` {class_name!r}.")
        class_name = class_name[1]
    if class_name != PIPELINE_CLASS:
        raise ValueError(f"model_index.json: `_class_name` must be {PIPELINE_CLASS!r}, but got {class_name!r}.")
    return model_index


def load_pipeline_components(folder: str, torch_dtype=None, allow_pickle: bool = False) -> dict:
    """Loads every component of a saved VRFM pipeline folder, executing no file from it.

    Args:
        folder (`str`): a local folder written by `VRFMPipeline.save_pretrained`.
        torch_dtype (`torch.dtype`, *optional*): the dtype to load models in.
        allow_pickle (`bool`, defaults to `False`): allow `.bin` (pickle) weights when no safetensors file exists.
            Pickle files can execute code when loaded; leave this off for files you did not write.
    """
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.modeling_utils import ModelMixin

    model_index = read_model_index(folder)
    components = {}
    for name, entry in model_index.items():
        if name.startswith("_"):
            continue
        if not _SAFE_FILE_NAME.match(name):
            raise ValueError(f"model_index.json: {name!r} is not a valid component name.")
        component_class = resolve_component_class(name, entry)
        if component_class is None:
            components[name] = None
            continue
        if issubclass(component_class, ModelMixin) == (name == "scheduler"):  # every other component is a model
            raise ValueError(
                f"model_index.json: `{name}` names {component_class.__name__}, which is "
                f"{'a model, not a scheduler' if name == 'scheduler' else 'not a model'}."
            )
        subfolder = os.path.join(folder, name)
        if not os.path.isdir(subfolder):
            raise FileNotFoundError(f"The pipeline folder {folder!r} names `{name}`, but has no `{name}/` folder.")
        if issubclass(component_class, ModelMixin):
            has_safetensors = any(f.endswith(".safetensors") for f in os.listdir(subfolder))
            if not has_safetensors and not allow_pickle:
                raise ValueError(
                    f"`{name}` in {folder!r} has no safetensors weights. Pickle (.bin) weights can run code when "
                    "loaded and are refused; pass `allow_pickle=True` only for files you trust."
                )
            components[name] = component_class.from_pretrained(
                subfolder, torch_dtype=torch_dtype, use_safetensors=has_safetensors
            )
        elif issubclass(component_class, ConfigMixin):
            components[name] = component_class.from_pretrained(subfolder)
        else:  # pragma: no cover - the allowlist holds models and schedulers only
            raise ValueError(f"`{name}`: {component_class.__name__} is neither a model nor a scheduler.")
    return components


# What never goes to the Hub: training checkpoints, logs, validation images of intermediate steps, temporary files.
UPLOAD_IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    ".tmp-*",
    ".tmp-*/**",
    "logs/**",
    "validation/**",
    "*.tmp-*",
    ".train_vrfm.lock",  # the output folder's lock (diffusers_vrfm.training.lock), held while the run uploads
]


def create_hub_repo(repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Creates (or reuses) the model repository and returns its full id (`user/name`)."""
    import huggingface_hub

    return huggingface_hub.create_repo(repo_id, exist_ok=True, token=token, private=private, repo_type="model").repo_id


def upload_pipeline_folder(
    folder: str, repo_id: str, token: str | None = None, commit_message: str = "Upload VRFM pipeline"
):
    """Uploads a pipeline folder: model_index.json, weights, remote-code files, README.md and sample images, but no
    checkpoints, logs or temporary files (see `UPLOAD_IGNORE_PATTERNS`)."""
    import huggingface_hub

    return huggingface_hub.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        token=token,
        repo_type="model",
    )
