"""Checkpoints for `train_vrfm.py`: atomic writes, integrity checks, pruning, and the accelerate save/load hooks.

A checkpoint is the folder `checkpoint-<global_step>` in the output folder. It is first written under a temporary
name (`.tmp-checkpoint-<step>`), then a manifest (`training_state.json`, listing every file with its size and SHA-256,
and the step) is written last, and only then is the folder renamed into place: a run killed mid-write leaves a
temporary folder that is never mistaken for a checkpoint.

The SHA-256 of each file is computed from the bytes as they are written (see [`FileDigests`]), not by reading the
files back: the model components are serialised here, and the files accelerate writes itself (optimizer, scheduler
and random states) are written through a hashing file object. [`find_resumable_checkpoint`] walks the checkpoints from
the newest down, checks each against its manifest (paths inside the folder, present files, same sizes and SHA-256,
the step of the folder name) and returns the newest intact one, saying which ones it skipped and which file failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil

import torch

from ..hub import write_text_atomic

CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-checkpoint-"
MANIFEST_NAME = "training_state.json"
VELOCITY_MODEL_DIR = "velocity_model"
POSTERIOR_ENCODER_DIR = "posterior_encoder"
PRIOR_DIR = "prior"
EMA_DIR = "ema_velocity_model"
MANIFEST_VERSION = 2  # 2: every file with its size and SHA-256
CONFIG_FILE_NAME = "config.json"
WEIGHTS_FILE_NAME = "diffusion_pytorch_model.safetensors"  # the names diffusers' `from_pretrained` reads
_HASH_CHUNK = 1 << 22
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


class FileDigests:
    """The size and SHA-256 of every file written under a folder, computed from the bytes as they are written.

    Each file is written through a [`HashingFile`] (opened with [`FileDigests.open`]), flushed and fsync'ed when it is
    closed. Paths are recorded relative to `root`, with `/` separators, as the manifest lists them.

    Example:

    ```py
    >>> import tempfile
    >>> from diffusers_vrfm.training.checkpointing import FileDigests
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     digests = FileDigests(folder)
    ...     digests.write_bytes(f"{folder}/a/b.txt", b"abc")
    ...     digests.entries["a/b.txt"]["sha256"][:12], digests.entries["a/b.txt"]["size"]
    ('ba7816bf8f01', 3)
    ```
    """

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.entries: dict[str, dict] = {}

    def relative(self, path) -> str | None:
        """`path` relative to the root (with `/`), or `None` when it lies outside it."""
        absolute = os.path.abspath(os.fspath(path))
        if os.path.commonpath([absolute, self.root]) != self.root or absolute == self.root:
            return None
        return os.path.relpath(absolute, self.root).replace(os.sep, "/")

    @contextlib.contextmanager
    def open(self, path):
        """Opens `path` (inside the root) for binary writing through a [`HashingFile`]; records it on close."""
        relative = self.relative(path)
        if relative is None:
            raise ValueError(f"{path!r} is not inside the checkpoint folder {self.root!r}.")
        os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
        with open(path, "wb") as handle:
            hashing = HashingFile(handle)
            yield hashing
            handle.flush()
            os.fsync(handle.fileno())
        self.entries[relative] = {"size": hashing.size, "sha256": hashing.digest.hexdigest()}

    def write_bytes(self, path, data: bytes) -> None:
        with self.open(path) as handle:
            handle.write(data)

    @contextlib.contextmanager
    def hashing_torch_save(self):
        """While active, `torch.save(obj, path)` with `path` inside the root streams through a [`HashingFile`].

        accelerate's `save_state` writes the optimizer, scheduler and random states with `torch.save` to paths; this is
        the one place where those bytes pass through Python, so it is where they are hashed. Every other call of
        `torch.save` is passed on unchanged, and the original function is restored on exit.
        """
        original = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and self.relative(f) is not None:
                with self.open(f) as handle:
                    return original(obj, handle, *args, **kwargs)
            return original(obj, f, *args, **kwargs)

        torch.save = save
        try:
            yield self
        finally:
            torch.save = original


class HashingFile:
    """A write-only file object that feeds every byte written to a SHA-256 and counts them."""

    def __init__(self, handle):
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += memoryview(data).nbytes
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def file_sha256(path: str) -> str:
    """The SHA-256 of a file on disk, read in chunks (for verification)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(folder: str, digests: FileDigests) -> dict[str, dict]:
    """`{relative path: {"size", "sha256"}}` of every file under `folder` (the manifest excluded).

    Digests come from `digests` (computed while writing). A file that did not pass through it (written by code that
    bypasses `torch.save` and this module) is hashed from disk and named in a warning, so that it is still verified.
    """
    files, hashed_after = {}, []
    for root, _, names in os.walk(folder):
        _fsync_directory(root)  # the entries of every subfolder
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            if relative == MANIFEST_NAME:
                continue
            entry = digests.entries.get(relative)
            if entry is None or entry["size"] != os.path.getsize(path):
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
                entry = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
                hashed_after.append(relative)
            files[relative] = entry
    if hashed_after:
        names = ", ".join(sorted(hashed_after))
        logger.warning(f"Hashed after writing (they bypassed the checkpoint writer): {names}")
    return files


def finalize_checkpoint(temporary_dir: str, final_dir: str, state: dict, digests: FileDigests | None = None) -> str:
    """Writes the manifest into `temporary_dir` and renames it to `final_dir` (replacing an older folder there).

    `state` must hold the `global_step`; `digests` are those recorded while the files were written. Call on the main
    process only, after every process has finished writing into `temporary_dir`.
    """
    manifest = {**state, "manifest_version": MANIFEST_VERSION}
    manifest["files"] = build_manifest(temporary_dir, digests or FileDigests(temporary_dir))
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

    Checks that the manifest exists and parses; that its step matches the folder name `checkpoint-<step>`; that
    every listed path stays inside the folder; that every listed file exists with its recorded size and SHA-256; and
    that each folder of `required_dirs` (for example the velocity model's) is present with weights in it. Every error
    names the checkpoint and the file that failed.
    """
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{path}: no {MANIFEST_NAME}, so the checkpoint was never completed.")
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: {MANIFEST_NAME} is unreadable ({error}).") from error
    files = manifest.get("files") if isinstance(manifest, dict) else None
    step = manifest.get("global_step") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or isinstance(step, bool) or not isinstance(step, int):
        raise CheckpointError(f"{path}: {MANIFEST_NAME} lacks `files` or an integer `global_step`.")
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise CheckpointError(
            f"{path}: {MANIFEST_NAME} has manifest_version {manifest.get('manifest_version')!r}, not "
            f"{MANIFEST_VERSION}: it was written without SHA-256 checksums, so its content cannot be verified."
        )
    match = _CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if match and int(match.group(1)) != step:
        raise CheckpointError(
            f"{path}: {MANIFEST_NAME} says global_step {step}, but the folder is named for step {match.group(1)}."
        )
    root = os.path.realpath(path)
    for relative, entry in files.items():
        file_path = _inside(root, relative, path)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and type(entry.get("size")) is int):
            raise CheckpointError(f"{path}: the manifest entry of {relative} lacks `size` or `sha256`.")
        if not os.path.isfile(file_path):
            raise CheckpointError(f"{path}: the file {relative} listed in the manifest is missing.")
        actual = os.path.getsize(file_path)
        if actual != entry["size"]:
            raise CheckpointError(
                f"{path}: {relative} has {actual} bytes, but {entry['size']} were written (truncated?)."
            )
        if file_sha256(file_path) != entry["sha256"]:
            raise CheckpointError(
                f"{path}: {relative} does not match the SHA-256 recorded when it was written (corrupted on disk?)."
            )
    for directory in required_dirs:
        weights = [r for r in files if r.startswith(directory + "/") and r.endswith(".safetensors")]
        if not weights:
            raise CheckpointError(f"{path}: the component `{directory}` is missing (no weights under {directory}/).")
    return manifest


def _inside(root: str, relative, path: str) -> str:
    """The file `relative` of the checkpoint at `path` (real path `root`); refuses paths that leave the folder."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative) or "\\" in relative:
        raise CheckpointError(f"{path}: the manifest lists {relative!r}, which is not a relative path in the folder.")
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise CheckpointError(f"{path}: the manifest lists {relative!r}, a path that leaves or skips the folder.")
    resolved = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([resolved, root]) != root:
        raise CheckpointError(f"{path}: the manifest lists {relative!r}, which resolves outside the folder.")
    return resolved


def describe_last_checkpoint(output_dir: str, required_dirs: tuple[str, ...] = ()) -> str:
    """A sentence about the newest checkpoint of `output_dir` for error messages: intact (verified now), corrupt, or
    none written yet."""
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return f"no checkpoint has been written to {output_dir} yet"
    path = checkpoints[-1][1]
    try:
        verify_checkpoint(path, required_dirs)
    except CheckpointError as error:
        return f"the newest checkpoint {path} is NOT intact ({error})"
    return f"the newest checkpoint {path} is intact (verified)"


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
    """accelerate `save_state` / `load_state` pre-hooks that write and read each model as `save_pretrained` does.

    Each model is written through [`write_model`] (`config.json`, `diffusion_pytorch_model.safetensors`), so that its
    SHA-256 is computed while it is written. Models are told apart by type: a posterior encoder (anything with
    `posterior_inputs` and an `encode` method) goes to `posterior_encoder/`, the velocity model to `velocity_model/`,
    and the EMA copy of the velocity model (if any) to `ema_velocity_model/` (as `EMAModel.save_pretrained` writes
    it). The learned prior `prior_model` (if any; an encoder too, told apart by identity) goes to `prior/`. Weights are
    written by the main process only.
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
            digests = active_digests(output_dir)
            for model in models:
                kind = kind_of(model)
                write_model(accelerator.unwrap_model(model), os.path.join(output_dir, kind), digests)
                if ema_model is not None and kind == VELOCITY_MODEL_DIR:
                    write_ema(ema_model, accelerator.unwrap_model(model), os.path.join(output_dir, EMA_DIR), digests)
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


_ACTIVE_DIGESTS: list[FileDigests] = []


def active_digests(folder: str) -> FileDigests:
    """The [`FileDigests`] of the checkpoint being written into `folder` (a fresh one when none is active)."""
    for digests in _ACTIVE_DIGESTS:
        if digests.root == os.path.abspath(folder):
            return digests
    return FileDigests(folder)


def write_model(model, folder: str, digests: FileDigests) -> None:
    """Writes a diffusers model as `save_pretrained` does (its config, then its weights in one safetensors file),
    hashing the bytes as they are written. The weights are serialised in memory first (one copy of the state dict)."""
    from safetensors.torch import save as serialize

    digests.write_bytes(os.path.join(folder, CONFIG_FILE_NAME), model.to_json_string().encode("utf-8"))
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    digests.write_bytes(os.path.join(folder, WEIGHTS_FILE_NAME), serialize(state, metadata={"format": "pt"}))


def write_ema(ema_model, model, folder: str, digests: FileDigests) -> None:
    """Writes what `EMAModel.save_pretrained` writes (the config of `model` with the EMA settings added, and the
    averaged weights under the parameter names of `model`, the velocity model it averages), without building a copy of
    the model. [`load_ema_state`] reads it back."""
    from safetensors.torch import save as serialize

    settings = ema_model.state_dict()
    settings.pop("shadow_params", None)
    config = {**json.loads(model.to_json_string()), **settings}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    digests.write_bytes(os.path.join(folder, CONFIG_FILE_NAME), text.encode("utf-8"))
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}  # buffers as the model has them
    names = [name for name, _ in model.named_parameters()]  # the order of `shadow_params`
    if len(names) != len(ema_model.shadow_params):
        raise ValueError(f"The EMA holds {len(ema_model.shadow_params)} tensors, the model {len(names)} parameters.")
    state.update(zip(names, ema_model.shadow_params))
    state = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    digests.write_bytes(os.path.join(folder, WEIGHTS_FILE_NAME), serialize(state, metadata={"format": "pt"}))


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

    Every file is hashed while it is written (each process hashes its own files; the main process gathers them into
    the manifest). Returns the checkpoint path. `state` (JSON-serialisable, e.g. the micro-step and the seed) goes into
    the manifest.
    """
    from accelerate.utils import gather_object

    final_dir = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    temporary_dir = os.path.join(output_dir, f"{TEMPORARY_PREFIX}{global_step}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary_dir, ignore_errors=True)
        os.makedirs(temporary_dir)
    accelerator.wait_for_everyone()
    digests = FileDigests(temporary_dir)
    _ACTIVE_DIGESTS.append(digests)
    try:
        with digests.hashing_torch_save():
            accelerator.save_state(temporary_dir)
    finally:
        _ACTIVE_DIGESTS.remove(digests)
    if accelerator.num_processes > 1:
        for entries in gather_object([digests.entries]):
            digests.entries.update(entries)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finalize_checkpoint(temporary_dir, final_dir, {**state, "global_step": int(global_step)}, digests)
        removed = prune_checkpoints(output_dir, total_limit)
        if removed:
            logger.info(f"Removed {len(removed)} old checkpoint(s): {', '.join(os.path.basename(r) for r in removed)}")
    accelerator.wait_for_everyone()
    return final_dir


def rewind_metrics_log(path: str, last_step: int) -> int:
    """Keeps only the records of `metrics.jsonl` up to `last_step` (the step training starts from); returns how many
    lines were dropped.

    A resumed run repeats the steps after its checkpoint, and a new run in an old folder starts again at step 0:
    without this the log would hold two records of those steps. Unreadable lines (a write cut short by a kill) are
    dropped too. The file is rewritten atomically; a missing file is left missing.
    """
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                step = None
            if isinstance(step, int) and step <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        write_text_atomic(path, "".join(kept))
    return dropped
