"""Checkpoints for `train_vrfm.py`: atomic writes, integrity checks, pruning, and the accelerate save/load hooks.

A checkpoint is the folder `checkpoint-<global_step>` in the output folder. It is first written under a temporary
name (`.tmp-checkpoint-<step>`), then a manifest (`training_state.json`, listing every file with its size) is written
last, and only then is the folder renamed into place: a run killed mid-write leaves a temporary folder that is never
mistaken for a checkpoint. [`find_resumable_checkpoint`] walks the checkpoints from the newest down, checks each
against its manifest (present files, same sizes, readable safetensors headers) and returns the newest intact one,
saying which ones it skipped and why.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

from ..hub import write_text_atomic

CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-checkpoint-"
MANIFEST_NAME = "training_state.json"
VELOCITY_MODEL_DIR = "velocity_model"
POSTERIOR_ENCODER_DIR = "posterior_encoder"
PRIOR_DIR = "prior"
EMA_DIR = "ema_velocity_model"
_CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or corrupt."""


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """`(step, path)` of every `checkpoint-<step>` folder in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _fsync_directory(path: str) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - not every platform can open a directory
        return
    try:
        os.fsync(descriptor)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(descriptor)


def write_json_atomic(path: str, payload: dict) -> None:
    """Writes JSON to a temporary file in the same folder, flushes it to disk, then renames it into place."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def build_manifest(folder: str) -> dict[str, int]:
    """`{relative path: size in bytes}` of every file under `folder` (the manifest excluded), fsync'ing each file."""
    files = {}
    for root, _, names in os.walk(folder):
        _fsync_directory(root)  # the entries of every subfolder, not only the files' contents
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            if relative == MANIFEST_NAME:
                continue
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            files[relative] = os.path.getsize(path)
    return files


def finalize_checkpoint(temporary_dir: str, final_dir: str, state: dict) -> str:
    """Writes the manifest into `temporary_dir` and renames it to `final_dir` (replacing an older folder there).

    Call on the main process only, after every process has finished writing into `temporary_dir`.
    """
    manifest = dict(state)
    manifest["files"] = build_manifest(temporary_dir)
    write_json_atomic(os.path.join(temporary_dir, MANIFEST_NAME), manifest)
    _fsync_directory(temporary_dir)
    if os.path.exists(final_dir):
        # Only reached when a resumed run reaches the same step again: move the old one aside before replacing it.
        stale = final_dir.replace(CHECKPOINT_PREFIX, TEMPORARY_PREFIX + "stale-", 1)
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final_dir, stale)
        os.replace(temporary_dir, final_dir)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(temporary_dir, final_dir)
    _fsync_directory(os.path.dirname(final_dir) or ".")
    return final_dir


def prune_checkpoints(output_dir: str, total_limit: int | None) -> list[str]:
    """Removes the oldest checkpoints so that at most `total_limit` remain; returns the removed paths.

    Called after a new checkpoint has been renamed into place, so an older complete checkpoint is never removed
    before a newer complete one exists.
    """
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = []
    for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for name in os.listdir(output_dir):  # leftovers of killed writes
        if name.startswith(TEMPORARY_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return removed


def verify_checkpoint(path: str, required_dirs: tuple[str, ...] = ()) -> dict:
    """Checks a checkpoint folder against its manifest; returns the manifest or raises [`CheckpointError`].

    Checks that the manifest exists and parses, that every listed file exists with its recorded size, that every
    safetensors file has a readable header, and that each folder of `required_dirs` (for example the velocity model's)
    is present with weights in it.
    """
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{path}: no {MANIFEST_NAME}, so the checkpoint was never completed.")
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: {MANIFEST_NAME} is unreadable ({error}).") from error
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("global_step"), int):
        raise CheckpointError(f"{path}: {MANIFEST_NAME} lacks `files` or `global_step`.")
    for relative, size in files.items():
        file_path = os.path.join(path, relative)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"{path}: the file {relative} listed in the manifest is missing.")
        actual = os.path.getsize(file_path)
        if actual != size:
            raise CheckpointError(f"{path}: {relative} has {actual} bytes, but {size} were written (truncated?).")
        if relative.endswith(".safetensors"):
            _check_safetensors_header(file_path)
    for directory in required_dirs:
        weights = [r for r in files if r.startswith(directory + "/") and r.endswith(".safetensors")]
        if not weights:
            raise CheckpointError(f"{path}: the component `{directory}` is missing (no weights under {directory}/).")
    return manifest


def _check_safetensors_header(path: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()
    except Exception as error:  # noqa: BLE001 - any failure here means the file is unusable
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}).") from error


def find_resumable_checkpoint(
    output_dir: str, required_dirs: tuple[str, ...] = (), log=None
) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest intact checkpoint in `output_dir` (or `None`), and `(path, reason)` for each newer one skipped."""
    log = log or logger.warning
    skipped = []
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path, required_dirs)
        except CheckpointError as error:
            skipped.append((path, str(error)))
            log(f"Skipping checkpoint {path}: {error}")
            continue
        if skipped:
            log(f"Falling back to {path}, the newest intact checkpoint.")
        return path, skipped
    return None, skipped


def resolve_resume_path(resume_from_checkpoint: str, output_dir: str, required_dirs: tuple[str, ...] = (), log=None):
    """Turns `--resume_from_checkpoint` (`"latest"`, a checkpoint name or a path) into a verified folder or `None`.

    `"latest"` with no intact checkpoint returns `None` (a fresh start); a named checkpoint that is missing or corrupt
    raises with a clear message.
    """
    if resume_from_checkpoint == "latest":
        path, _ = find_resumable_checkpoint(output_dir, required_dirs, log=log)
        return path
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(output_dir, os.path.basename(resume_from_checkpoint))
    if not os.path.isdir(path):
        raise ValueError(
            f"`--resume_from_checkpoint` {resume_from_checkpoint!r} does not exist (neither as a path nor in "
            f"{output_dir!r}); pass 'latest' to resume from the newest intact checkpoint."
        )
    try:
        verify_checkpoint(path, required_dirs)
    except CheckpointError as error:
        raise ValueError(f"`--resume_from_checkpoint` {resume_from_checkpoint!r} is not usable: {error}") from error
    return path


def _saved_state_dict(model, folder: str) -> dict:
    """The weights `save_pretrained` wrote in `folder`, keyed as `model`'s state dict. A model with peft LoRA layers
    (whose keys `from_pretrained` would not know) is read from its safetensors file directly."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file

    backbone = getattr(model, "transformer", None) or getattr(model, "unet", None)
    if getattr(backbone, "peft_config", None):
        return load_file(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME))
    return type(model).from_pretrained(folder).state_dict()


def make_state_hooks(accelerator, ema_model=None, prior_model=None):
    """accelerate `save_state` / `load_state` pre-hooks that write each model with `save_pretrained`.

    Models are told apart by type: a posterior encoder (anything with `posterior_inputs` and an `encode` method) goes
    to `posterior_encoder/`, the velocity model to `velocity_model/`, and the EMA copy of the velocity model (if any)
    to `ema_velocity_model/` through `EMAModel.save_pretrained`. The learned prior `prior_model` (if any; an encoder
    too, told apart by identity) goes to `prior/`. Weights are written by the main process only.
    """

    def kind_of(model) -> str:
        unwrapped = accelerator.unwrap_model(model)
        if prior_model is not None and unwrapped is accelerator.unwrap_model(prior_model):
            return PRIOR_DIR
        if hasattr(unwrapped, "posterior_inputs") and hasattr(unwrapped, "encode"):
            return POSTERIOR_ENCODER_DIR
        if hasattr(unwrapped, "sample_shape") and hasattr(unwrapped, "latent_dim"):
            return VELOCITY_MODEL_DIR
        raise TypeError(f"Cannot checkpoint a model of type {type(unwrapped).__name__}: not a VRFM model.")

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            if ema_model is not None:
                ema_model.save_pretrained(os.path.join(output_dir, EMA_DIR))
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(
                    os.path.join(output_dir, kind_of(model)), safe_serialization=True
                )
        # Pop every entry so that accelerate does not also write `model.safetensors` files.
        while weights:
            weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            model = models.pop()
            unwrapped = accelerator.unwrap_model(model)
            folder = os.path.join(input_dir, kind_of(model))
            unwrapped.load_state_dict(_saved_state_dict(unwrapped, folder))
            if ema_model is not None and kind_of(model) == VELOCITY_MODEL_DIR:
                ema_model.load_state_dict(load_ema_state(os.path.join(input_dir, EMA_DIR), type(unwrapped)))
                ema_model.to(accelerator.device)

    return save_model_hook, load_model_hook


EMA_STATE_KEYS = (
    "decay",
    "min_decay",
    "optimization_step",
    "update_after_step",
    "use_ema_warmup",
    "inv_gamma",
    "power",
)


def load_ema_state(folder: str, model_cls) -> dict:
    """The state of an `EMAModel` written by `EMAModel.save_pretrained`: its settings (kept in the model config) and
    the averaged weights, in the order of `model.parameters()`."""
    config = model_cls.load_config(folder)
    state = {key: config[key] for key in EMA_STATE_KEYS if key in config}
    loaded = model_cls.from_pretrained(folder)
    state["shadow_params"] = [parameter.detach().clone() for parameter in loaded.parameters()]
    return state


def save_checkpoint(accelerator, output_dir: str, global_step: int, state: dict, total_limit: int | None = None):
    """Writes `checkpoint-<global_step>` atomically with `accelerator.save_state` (call on every process).

    Returns the checkpoint path. `state` (JSON-serialisable, e.g. the micro-step and the seed) goes into the manifest.
    """
    final_dir = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    temporary_dir = os.path.join(output_dir, f"{TEMPORARY_PREFIX}{global_step}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary_dir, ignore_errors=True)
        os.makedirs(temporary_dir)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finalize_checkpoint(temporary_dir, final_dir, {**state, "global_step": int(global_step)})
        removed = prune_checkpoints(output_dir, total_limit)
        if removed:
            logger.info(f"Removed {len(removed)} old checkpoint(s): {', '.join(os.path.basename(r) for r in removed)}")
    accelerator.wait_for_everyone()
    return final_dir
