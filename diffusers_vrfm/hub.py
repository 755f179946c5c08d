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

from diffusers.utils import logging

logger = logging.get_logger(__name__)

PIPELINE_FILE = "pipeline.py"
PIPELINE_CLASS = "VRFMPipeline"
PIPELINE_CLASSES = (PIPELINE_CLASS, "VRFMTextToImagePipeline")

# Component classes a VRFM pipeline folder may name, and where they come from.
ALLOWED_COMPONENT_CLASSES = {
    "VRFMMLPModel": "diffusers_vrfm",
    "VRFMUNet2DModel": "diffusers_vrfm",
    "VRFMUNet2DConditionModel": "diffusers_vrfm",
    "VRFMDiTTransformer2DModel": "diffusers_vrfm",
    "VRFMPosteriorEncoder": "diffusers_vrfm",
    "VRFMConvPosteriorEncoder": "diffusers_vrfm",
    "VRFMAggregatePosteriorPrior": "diffusers_vrfm",
    "VRFMFlowPrior": "diffusers_vrfm",
    "VRFMScheduler": "diffusers_vrfm",
    "VRFMSD3Transformer2DModel": "diffusers_vrfm",
    "FlowMatchEulerDiscreteScheduler": "diffusers",
    "FlowMatchHeunDiscreteScheduler": "diffusers",
    "DPMSolverMultistepScheduler": "diffusers",
    "UniPCMultistepScheduler": "diffusers",
    "AutoencoderKL": "diffusers",
    "AutoencoderTiny": "diffusers",
    "CLIPTextModel": "transformers",
    "CLIPTextModelWithProjection": "transformers",
    "T5EncoderModel": "transformers",
    "CLIPTokenizer": "transformers",
    "CLIPTokenizerFast": "transformers",
    "T5Tokenizer": "transformers",
    "T5TokenizerFast": "transformers",
    "PreTrainedTokenizerFast": "transformers",
    "TokenizersBackend": "transformers",
}
# Entries of `model_index.json` that are pipeline settings (registered config, checked by `__init__`), not components.
PIPELINE_CONFIG_ENTRIES = ("reencode_z_at",)
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


def read_model_index(folder: str, pipeline_class: str | None = None) -> dict:
    """Reads and checks a pipeline folder's `model_index.json` (written for `pipeline_class`, or any VRFM pipeline)."""
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
    expected = (pipeline_class,) if pipeline_class else PIPELINE_CLASSES
    if class_name not in expected:
        raise ValueError(f"model_index.json: `_class_name` must be one of {expected}, but got {class_name!r}.")
    return model_index


def resolve_pipeline_folder(
    name_or_path: str,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    allow_pickle: bool = False,
) -> str:
    """The local folder of a pipeline: `name_or_path` itself when it is a folder, else a snapshot of the Hub repository
    of that id (configs, safetensors and the card; `.bin` files only with `allow_pickle`).

    A string that is no folder and cannot be a repository id (a mistyped path) raises `FileNotFoundError`, as does a
    repository that cannot be fetched (or is not in the cache with `local_files_only=True`).
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise FileNotFoundError(
            f"No such folder: {name_or_path!r} (and it is not a Hub repository id either)."
        ) from None
    patterns = ["*.json", "*.safetensors", "*.md", "*.txt", "*.model"] + (["*.bin"] if allow_pickle else [])
    try:
        return snapshot_download(
            name_or_path,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
            allow_patterns=patterns,
        )
    except (OSError, ValueError) as error:  # the hub's not-found, offline and cache errors derive from these
        where = "in the local cache (`local_files_only=True`)" if local_files_only else "on the Hub"
        raise FileNotFoundError(
            f"{name_or_path!r} is not a local folder, and no pipeline of that id could be fetched {where}: {error}"
        ) from error


def load_pipeline_components(
    folder: str,
    torch_dtype=None,
    allow_pickle: bool = False,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    device_map: str | None = None,
    low_cpu_mem_usage: bool = True,
    pipeline_class: str | None = None,
) -> dict:
    """Loads every component of a saved VRFM pipeline folder, executing no file from it; the pipeline's settings
    saved beside them (`PIPELINE_CONFIG_ENTRIES`) come back as values, to pass to its `__init__` with the components.

    Args:
        folder (`str`): a local folder written by `VRFMPipeline.save_pretrained`.
        pipeline_class (`str`, *optional*): the pipeline class the folder must have been saved from.
        torch_dtype (`torch.dtype`, *optional*): the dtype to load models in.
        allow_pickle (`bool`, defaults to `False`): allow `.bin` (pickle) weights. Pickle files can execute code when
            loaded; leave this off for files you did not write.
        variant (`str`, *optional*): load `*.<variant>.safetensors` weights (written by `save_pretrained(variant=...)`)
            where a component has them, the plain files elsewhere (as diffusers does); refused when no component has
            them.
        use_safetensors (`bool`, *optional*): `True` requires safetensors, `False` loads `.bin` files (which needs
            `allow_pickle=True`), `None` takes safetensors when present.
        device_map (`str`, *optional*): a device to load every model onto directly (e.g. `"cpu"`, `"cuda"`).
        low_cpu_mem_usage (`bool`, defaults to `True`): diffusers' low-memory loading.

    Every model's weights must match its class exactly: a missing or unexpected key raises a `ValueError` that names
    the component and the keys (diffusers would leave a missing weight on the `meta` device).
    """
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.modeling_utils import ModelMixin

    if use_safetensors is False and not allow_pickle:
        raise ValueError(
            "`use_safetensors=False` loads pickle (.bin) weights, which can run code when loaded; pass "
            "`allow_pickle=True` as well, and only for files you trust."
        )
    model_index = read_model_index(folder, pipeline_class)
    if variant is not None and not any(_has_variant(os.path.join(folder, name), variant) for name in model_index):
        raise ValueError(f"`variant={variant!r}`: no component in {folder!r} has `*.{variant}.*` weights.")
    components = {}
    for name, entry in model_index.items():
        if name.startswith("_"):
            continue
        if not _SAFE_FILE_NAME.match(name):
            raise ValueError(f"model_index.json: {name!r} is not a valid component name.")
        if name in PIPELINE_CONFIG_ENTRIES:
            components[name] = entry
            continue
        component_class = resolve_component_class(name, entry)
        if component_class is None:
            components[name] = None
            continue
        subfolder = os.path.join(folder, name)
        if ALLOWED_COMPONENT_CLASSES[component_class.__name__] == "transformers":
            components[name] = _load_transformers_component(component_class, subfolder, torch_dtype)
            continue
        if issubclass(component_class, ModelMixin) == (name == "scheduler"):  # every other component is a model
            raise ValueError(
                f"model_index.json: `{name}` names {component_class.__name__}, which is "
                f"{'a model, not a scheduler' if name == 'scheduler' else 'not a model'}."
            )
        if not os.path.isdir(subfolder):
            raise FileNotFoundError(f"The pipeline folder {folder!r} names `{name}`, but has no `{name}/` folder.")
        if issubclass(component_class, ModelMixin):
            component_variant = variant if variant is not None and _has_variant(subfolder, variant) else None
            if variant is not None and component_variant is None:
                logger.warning(f"`{name}` has no `{variant}` weights; loading its plain weights.")
            components[name] = load_model_component(
                name,
                component_class,
                subfolder,
                torch_dtype=torch_dtype,
                allow_pickle=allow_pickle,
                variant=component_variant,
                use_safetensors=use_safetensors,
                device_map=device_map,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        elif issubclass(component_class, ConfigMixin):
            components[name] = component_class.from_pretrained(subfolder)
        else:  # pragma: no cover - the allowlist holds models and schedulers only
            raise ValueError(f"`{name}`: {component_class.__name__} is neither a model nor a scheduler.")
        logger.info(f"Loaded `{name}` ({component_class.__name__}) from {subfolder}.")
    return components


def _has_variant(subfolder: str, variant: str) -> bool:
    """Whether a component folder holds weights of `variant` (`*.<variant>.safetensors` or `.bin`)."""
    return os.path.isdir(subfolder) and any(f".{variant}." in file_name for file_name in os.listdir(subfolder))


def load_model_component(
    name: str, component_class, subfolder: str, torch_dtype, allow_pickle: bool, use_safetensors, **loading_kwargs
):
    """Loads one model component, refusing pickle without the opt-in and weights that do not match the class."""
    has_safetensors = any(file_name.endswith(".safetensors") for file_name in os.listdir(subfolder))
    if use_safetensors is None:
        use_safetensors = has_safetensors
    if use_safetensors and not has_safetensors:
        raise ValueError(f"`{name}` in {subfolder!r} has no safetensors weights, and `use_safetensors=True`.")
    if not use_safetensors and not allow_pickle:
        raise ValueError(
            f"`{name}` in {subfolder!r} has no safetensors weights. Pickle (.bin) weights can run code when loaded "
            "and are refused; pass `allow_pickle=True` only for files you trust."
        )
    model, loading_info = component_class.from_pretrained(
        subfolder,
        torch_dtype=torch_dtype,
        use_safetensors=use_safetensors,
        output_loading_info=True,
        **loading_kwargs,
    )
    check_loading_info(name, loading_info)
    return model


def check_loading_info(component: str, loading_info: dict) -> None:
    """Raises when a component's weights file lacks keys of its class or holds keys the class does not have."""
    problems = [
        f"{kind.replace('_', ' ')} {sorted(loading_info[kind])}"
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if loading_info.get(kind)
    ]
    if problems:
        raise ValueError(
            f"The weights of `{component}` do not match its class: {'; '.join(problems)}. The file is incomplete or "
            "belongs to another model configuration; a saved pipeline must load completely."
        )


def _load_transformers_component(component_class: type, subfolder: str, torch_dtype=None):
    """A text encoder (safetensors weights only) or a tokenizer (vocabulary files, no pickle) from transformers."""
    if not os.path.isdir(subfolder):
        raise FileNotFoundError(f"The pipeline folder has no `{os.path.basename(subfolder)}/` folder.")
    from transformers import PreTrainedModel

    if issubclass(component_class, PreTrainedModel):
        model, loading_info = component_class.from_pretrained(
            subfolder, torch_dtype=torch_dtype, use_safetensors=True, output_loading_info=True
        )
        check_loading_info(os.path.basename(subfolder), loading_info)
        return model
    return component_class.from_pretrained(subfolder)


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
