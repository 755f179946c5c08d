r"""Conditional generation on the digits: VRFM against RF at both ends of the step range, and does the condition
(a prompt, or a class label) control the class?

`--conditioning text` (the default): every model is trained by `train_vrfm.py --backbone sd3` (a small MMDiT in pixel
space, a frozen random CLIP text encoder over a word-level tokenizer the run builds, captions "a handwritten seven",
10% dropped to "" for guidance). `--conditioning label`: by `train_vrfm.py --class_conditional` (a UNet with a class
embedding, 10% of labels dropped to the null label). Both train on the first 80% of scikit-learn's 8x8 digits resized
to 16x16; the other 20% are the test images. The methods:

- `vrfm`: the script's defaults, which give the backbone the 4-channel `z` map and save a conditional flow prior,
  `p(z | caption)` or `p(z | label)`;
- `vrfm_atoms`: the same model (training is deterministic) saved with the conditional atom prior instead
  (`--aggregate_prior_type atoms`: the posteriors of training images, keyed by caption or label);
- `vrfm_no_map`: `vrfm_atoms` without the map (`--model_config '{"z_map_channels": 0}'`): `z` reaches the blocks
  only through the time embedding;
- `rf`: `--latent_dim 0`;
- `vrfm_prior_mix` (not run by default): `vrfm_atoms` plus `--prior_mix 0.3`, which trains 30% of examples on a `z`
  from N(0, I), so that the velocity model must read the class from the condition for those.

For each digit, samples are drawn with the prompt "a handwritten <digit>" or the digit's label (Euler), with and
without classifier-free guidance. VRFM draws z from the prior `train_vrfm.py` saved, given the prompt or label;
`--extra-priors atoms` (or `flow`) also samples the same model with a prior fitted without the conditions, which
draws z of any digit whatever is asked for.

Two figures per cell: the Fréchet distance between the pooled, class-balanced samples and the test images in the
features of `benchmarks.mnist_quality`'s digit classifier (lower is better), and the share of samples that the same
small CNN, trained longer, assigns to the digit asked for (1.0 = the condition always wins, 0.1 = chance). A copy
check compares each sample's distance to its nearest training image with the test images' (near 1: new images; far
below 1: copies). One set of 100 samples per digit is a noisy FD: `--draws N` scores N sets per cell and averages
them, and `--reuse-runs` with `--work-dir` (where the trained runs are kept) scores kept models again.

    python -m benchmarks.conditional_digits --quick    # a smoke run in seconds
    # the recorded runs (3 seeds each):
    python -m benchmarks.conditional_digits --extra-priors atoms \
        --methods vrfm vrfm_atoms vrfm_no_map vrfm_prior_mix rf
    python -m benchmarks.conditional_digits --conditioning label --extra-priors atoms \
        --methods vrfm vrfm_atoms vrfm_no_map rf
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    RESULTS_DIR,
    format_mean_std,
    machine_description,
    markdown_table,
    write_json,
)
from benchmarks.mnist_quality import (
    CPU_UNET,
    EXTRA_PRIORS,
    QUICK_UNET,
    DigitClassifier,
    ImageData,
    Scorer,
    extra_prior_fits,
    get_classifier,
    load_image_data,
    make_scorer,
    reference_images,
    ruler_digest,
    train_or_reuse,
    training_key,
)
from diffusers_vrfm.objective import check_real
from diffusers_vrfm.training.checkpointing import file_sha256

RESOLUTION = 16
QUICK_MMDIT = {"num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2}
JUDGE_EPOCHS = 30
TARGETS = {1: 0.5, 2: 0.5, 8: 1.0, 16: 1.0, 50: 1.0}  # issue 13's image targets, applied to the FD here
DRAW_SEED_STRIDE = 1000  # draw d of seed s samples with the streams of seed s + 1000 d


@dataclass(frozen=True)
class Method:
    """One training recipe: its report label, the `--model_config` entries and the flags it adds to the defaults."""

    label: str
    model_config: dict = field(default_factory=dict)
    flags: tuple[str, ...] = ()

    @property
    def is_vrfm(self) -> bool:
        return "--latent_dim" not in self.flags


ATOM_PRIOR = ("--aggregate_prior_type", "atoms")
METHODS = {
    "vrfm": Method("VRFM"),
    "vrfm_atoms": Method("VRFM, atom prior", flags=ATOM_PRIOR),
    "vrfm_no_map": Method("VRFM without the z map, atom prior", {"z_map_channels": 0}, ATOM_PRIOR),
    "vrfm_prior_mix": Method("VRFM, prior_mix 0.3, atom prior", flags=("--prior_mix", "0.3", *ATOM_PRIOR)),
    "rf": Method("RF", flags=("--latent_dim", "0")),
}
DEFAULT_METHODS = ["vrfm", "vrfm_atoms", "vrfm_no_map", "rf"]


@dataclass(frozen=True)
class Conditioning:
    """How the models are told which digit to draw (`--conditioning`): by a caption or by a class label."""

    flags: tuple[str, ...]  # what `train_vrfm.py` adds for it
    model_config: dict  # the backbone's config on the benchmark's budget ...
    quick_model_config: dict  # ... and in the smoke run
    pipeline: str  # the pipeline class of `diffusers_vrfm` that samples it
    name: str  # the default `--name` of the report
    title: str
    model: str  # how the report describes the models
    key: str  # what a digit is asked for with, and the prior's atoms keyed by: "caption" or "label"


CONDITIONINGS = {
    "text": Conditioning(
        ("--backbone", "sd3"), {}, QUICK_MMDIT, "VRFMTextToImagePipeline", "text_to_image_digits",
        "Text-to-image on the digits: VRFM against RF at both ends, and does the prompt control the class?",
        "`train_vrfm.py --backbone sd3` (a small MMDiT in pixel space, a frozen random CLIP text encoder), captions "
        'such as "a handwritten seven" (10% dropped to "" for guidance)',
        "caption",
    ),
    "label": Conditioning(
        ("--backbone", "unet", "--class_conditional"), CPU_UNET, QUICK_UNET, "VRFMPipeline",
        "class_conditional_digits",
        "Class-conditional digits: VRFM against RF at both ends, and does the label control the class?",
        "`train_vrfm.py --class_conditional` (the UNet of `benchmarks.mnist_quality`'s CPU budget, with a class "
        "embedding; 10% of labels dropped to the null label for guidance)",
        "label",
    ),
}  # fmt: skip


def training_argv(args, data: ImageData, method: str, seed: int, output_dir: Path) -> list[str]:
    """The `train_vrfm.py` command line of one run."""
    conditioning = CONDITIONINGS[args.conditioning]
    argv = [*conditioning.flags, "--dataset_name", data.name, "--resolution", RESOLUTION]
    argv += ["--max_train_samples", data.max_train_samples, "--output_dir", output_dir, "--seed", seed]
    argv += ["--max_train_steps", args.max_train_steps, "--train_batch_size", args.batch_size]
    argv += ["--num_threads", args.num_threads, "--report_to", "none", "--cpu"]
    argv += ["--validation_steps", args.max_train_steps + 1, "--checkpointing_steps", args.max_train_steps + 1]
    argv += ["--validation_inference_steps", "2", "--num_validation_samples", "4"]
    recipe = METHODS[method]
    backbone_config = conditioning.quick_model_config if args.quick else conditioning.model_config
    model_config = {**backbone_config, **recipe.model_config}
    argv += ["--model_config", json.dumps(model_config)] if model_config else []
    argv += recipe.flags
    if recipe.is_vrfm:  # the flow prior's fit: the default here, where 4096 atoms would cover the 1437 digits
        argv += ["--flow_prior_steps", args.flow_prior_steps]
    if args.quick:
        argv += ["--lr_warmup_steps", "0"]
    return [str(a) for a in argv]


@torch.no_grad()
def prompted_samples(pipeline, samples_per_class: int, nfe: int, guidance_scale: float, seed: int, **call_kwargs):
    """`samples_per_class` images in [0, 1] for each digit (asked for by its caption, or its label for a
    class-conditional pipeline), and the asked-for digits; the same noise and z stream for every method.
    `call_kwargs` go to the pipeline's call (e.g. `reencode_z_at`)."""
    from diffusers_vrfm import VRFMTextToImagePipeline
    from diffusers_vrfm.training.text_data import digit_caption

    images = []
    for digit in range(10):
        if isinstance(pipeline, VRFMTextToImagePipeline):
            asked = {"prompt": digit_caption(digit), "num_images_per_prompt": samples_per_class}
        else:
            asked = {"class_labels": [digit] * samples_per_class}
        output = pipeline(
            **asked, num_inference_steps=nfe, guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed * 100 + digit), output_type="pt", **call_kwargs,
        )  # fmt: skip
        images.append(output.images.float().cpu())
    return torch.cat(images), torch.arange(10).repeat_interleave(samples_per_class)


@dataclass
class Rulers:
    """What scores the samples: `scorer`, `benchmarks.mnist_quality`'s (FD in its CNN's features, trained for 2
    epochs as the other digit benchmarks use it, and the copy check), and `judge`, the same CNN trained for 30 epochs,
    which says which digit a sample shows (2 epochs leave it right on only 78% of the test digits). The FD stays in the
    2-epoch features: the 30-epoch CNN's separate the training writers from the test writers (an FD floor of 47
    against 2.5), so an FD in them would mostly measure that."""

    scorer: Scorer
    judge: DigitClassifier
    digests: dict[str, str]  # the SHA-256 of each one's weights, {"classifier": ..., "judge": ...}


@torch.no_grad()
def predicted_digits(classifier: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    """The digit `classifier` reads in each of `images` (in [0, 1])."""
    return classifier.eval()(images.clamp(0, 1) * 2 - 1).argmax(1)


def score(rulers: Rulers, images: torch.Tensor, digits: torch.Tensor) -> dict:
    """FD to the test images, the share of samples the judge reads as the prompted digit, and the copy ratio."""
    return {
        "fd": rulers.scorer.fd(images),
        "accuracy": float((predicted_digits(rulers.judge, images) == digits).float().mean()),
        "distance_ratio": rulers.scorer.distance_ratio(images),
    }


def score_draws(
    rulers: Rulers, pipeline, per_class: int, nfe: int, guidance: float, seed: int, draws: int, **call_kwargs
) -> dict:
    """[`score`] averaged over `draws` independent sample sets (draw 0's streams are those of one draw); with more
    than one, `"fd_draws"` keeps each set's FD. `call_kwargs` go to the pipeline's call."""
    scores = [
        score(
            rulers,
            *prompted_samples(pipeline, per_class, nfe, guidance, seed + DRAW_SEED_STRIDE * draw, **call_kwargs),
        )
        for draw in range(draws)
    ]
    mean = {metric: float(np.mean([each[metric] for each in scores])) for metric in scores[0]}
    return {**mean, "fd_draws": [each["fd"] for each in scores]} if draws > 1 else mean


def runs_dir(args) -> Path:
    """Where the trained runs are kept: `--work-dir`, or the git-ignored `cache/runs` of `--output-dir`."""
    return Path(args.work_dir) if args.work_dir else Path(args.output_dir) / "cache" / "runs"


def sampling_variants(
    path: Path, pipeline_class: str, prior_fits: dict, reencode_z_at: float | None = None
) -> dict[str, tuple]:
    """How each row samples, `{variant: (pipeline, call_kwargs)}`: the saved pipeline (of the class
    `pipeline_class`, with its own prior) and, for a VRFM run, the same model with each prior of `prior_fits` (kind
    -> a function of the saved posterior that returns the fitted prior) and, with `reencode_z_at`, the saved pipeline
    called with it."""
    import diffusers_vrfm

    pipeline_class = getattr(diffusers_vrfm, pipeline_class)
    saved = pipeline_class.from_pretrained(str(path))
    saved.set_progress_bar_config(disable=True)
    variants = {"saved": (saved, {})}
    if saved.velocity_model.latent_dim > 0:
        for kind, fit in prior_fits.items():
            fitted = pipeline_class(**{**saved.components, "prior": fit(saved.posterior_encoder)})
            fitted.set_progress_bar_config(disable=True)
            variants[kind] = (fitted, {})
        if reencode_z_at is not None:
            variants["reencoded"] = (saved, {"reencode_z_at": reencode_z_at})
    return variants


def evaluate_run(args, data: ImageData, rulers: Rulers, method: str, seed: int) -> dict:
    """Trains (or reuses, `--reuse-runs`) one run and scores each of its sampling variants; the result is cached in
    the run's folder as `evaluation.json`."""
    folder = runs_dir(args) / f"{args.runs_name or args.name}_{method}_s{seed}"
    argv = training_argv(args, data, method, seed, folder)
    key = training_key(argv, data.max_train_samples)
    settings = {**key, "nfe": args.nfe, "guidance": args.guidance_scales, "per_class": args.samples_per_class}
    settings["extra_priors"] = args.extra_priors if METHODS[method].is_vrfm else []
    reencode_z_at = args.reencode_z_at if METHODS[method].is_vrfm else None
    if reencode_z_at is not None:  # absent otherwise: the caches of runs from before the option stay valid
        settings["reencode_z_at"] = reencode_z_at
    settings["judge_epochs"] = judge_epochs(args)
    settings["rulers"] = rulers.digests  # other classifiers score again (the trained model is kept)
    if args.draws > 1:  # one draw is what every report before `--draws` scored: their caches stay valid
        settings["draws"] = args.draws
    evaluation = folder / "evaluation.json"
    cached = json.loads(evaluation.read_text()) if evaluation.is_file() else None
    if args.reuse_runs and cached is not None and cached["settings"] == settings:
        return cached
    summary = train_or_reuse(argv, folder, key, args.reuse_runs)
    fits = extra_prior_fits(args, data, seed) if settings["extra_priors"] else {}
    scores = {}
    variants = sampling_variants(folder, CONDITIONINGS[args.conditioning].pipeline, fits, reencode_z_at)
    for variant, (pipeline, call_kwargs) in variants.items():
        scores[variant] = {
            str(guidance): {
                str(nfe): score_draws(
                    rulers, pipeline, args.samples_per_class, nfe, guidance, seed, args.draws, **call_kwargs
                )
                for nfe in args.nfe
            }
            for guidance in args.guidance_scales
        }
    metrics = summary["metrics"]
    train = {
        "seconds": metrics["training wall time (s)"],
        "parameters": metrics["parameters: velocity model / posterior"],
        "kl_nats": metrics.get("train kl_nats (mean of last 50 steps)"),
        "active_units": metrics.get("active latent units (last step)"),
    }
    result = {"settings": settings, "scores": scores, "train": train}
    write_json(evaluation, result)
    return result


def judge_epochs(args) -> int:
    return 1 if args.quick else JUDGE_EPOCHS


def make_rulers(args, data: ImageData) -> tuple[Rulers, dict]:
    """The [`Rulers`] of the run (classifiers cached), and what the report says about them."""
    scorer_args = argparse.Namespace(quick=args.quick, device="cpu", num_samples=len(data.test), inception_samples=0)
    scorer, meta = make_scorer(scorer_args, data, Path(args.output_dir))  # what mnist_quality scores digits with
    epochs = judge_epochs(args)
    name, cache_dir = f"judge_digits_{RESOLUTION}_e{epochs}.safetensors", Path(args.output_dir) / "cache"
    judge, meta["judge_accuracy"], path = get_classifier(
        data, name, cache_dir, epochs=epochs, max_train=1000 if args.quick else None
    )
    meta["judge_sha256"] = file_sha256(path)
    meta["judge_training_accuracy"] = float((predicted_digits(judge, data.train) == data.train_labels).float().mean())
    meta["training_images_fd"] = scorer.fd(training_images(data, args.samples_per_class))
    return Rulers(scorer, judge, {"classifier": meta["classifier_sha256"], "judge": meta["judge_sha256"]}), meta


def training_images(data: ImageData, per_digit: int) -> torch.Tensor:
    """The first `per_digit` training images of each digit: a model that replayed the training set, scored at the
    samples' own count (an FD estimate shrinks with the number of images it is computed on)."""
    chosen = [torch.nonzero(data.train_labels == digit).flatten()[:per_digit] for digit in range(10)]
    return data.train[torch.cat(chosen)]


VARIANT_LABELS = {  # how a VRFM row draws z; {key}: "caption" or "label"
    "saved": "the saved prior",  # train_vrfm.py's, given the caption or label
    "atoms": "atoms without {key}s",
    "flow": "flow prior (no {key}s)",
    "reencoded": "the saved prior, z re-encoded along the way",
}


def row_label(method: str, variant: str, key: str) -> str:
    recipe = METHODS[method]
    return f"{recipe.label}, {VARIANT_LABELS[variant].format(key=key)}" if recipe.is_vrfm else recipe.label


def seed_values(results: dict, method: str, variant: str, guidance: str, nfe: str, metric: str) -> list[float]:
    return [run["scores"][variant][guidance][nfe][metric] for run in results["runs"][method].values()]


def metric_table(results: dict, metric: str, guidance: str, with_ratio: bool) -> str:
    """One row per (method, prior), one column per NFE: mean ± std over seeds (and the ratio to RF's mean)."""
    nfes = [str(nfe) for nfe in results["meta"]["nfe"]]
    with_ratio = with_ratio and "rf" in results["runs"]
    rf_means = {nfe: np.mean(seed_values(results, "rf", "saved", guidance, nfe, metric)) for nfe in nfes if with_ratio}
    rows = []
    for method, runs in results["runs"].items():
        for variant in next(iter(runs.values()))["scores"]:
            cells = []
            for nfe in nfes:
                values = seed_values(results, method, variant, guidance, nfe, metric)
                ratio = f" ({np.mean(values) / rf_means[nfe]:.2f}x)" if with_ratio and method != "rf" else ""
                cells.append(format_mean_std(values) + ratio)
            rows.append([row_label(method, variant, CONDITIONINGS[results["meta"]["conditioning"]].key), *cells])
    return markdown_table(["method", *[f"NFE {nfe}" for nfe in nfes]], rows)


def target_rows(results: dict) -> list[list[str]]:
    """Issue 13's image targets on the default VRFM's FD without guidance, mean of seeds."""
    rows = []
    if not {"vrfm", "rf"} <= set(results["runs"]):
        return rows
    for nfe in [n for n in results["meta"]["nfe"] if n in TARGETS]:
        vrfm = np.mean(seed_values(results, "vrfm", "saved", "1.0", str(nfe), "fd"))
        rf = np.mean(seed_values(results, "rf", "saved", "1.0", str(nfe), "fd"))
        status = "met" if vrfm <= TARGETS[nfe] * rf else "NOT met"
        rows.append(
            [f"FD at NFE {nfe}", f"{vrfm:.2f}", f"{rf:.2f}", f"{vrfm / rf:.2f}x", f"<= {TARGETS[nfe]}x", status]
        )
    return rows


def render_report(results: dict) -> str:
    meta = results["meta"]
    seeds = ", ".join(str(seed) for seed in meta["seeds"])
    conditioning = CONDITIONINGS[meta["conditioning"]]
    key, asked = conditioning.key, "prompt" if conditioning.key == "caption" else "label"
    lines = [
        f"# {conditioning.title}",
        "",
        f"Written by `benchmarks/conditional_digits.py`. Command: `{meta['command']}`.",
        "",
        f"Each model: {conditioning.model}, {meta['max_train_steps']} steps of batch {meta['batch_size']} on the "
        f"first 80% of the 8x8 digits resized to 16x16. Seeds {seeds}; cells are mean ± std over seeds"
        + (f" (each seed's score the mean of {meta['draws']} sample sets)" if meta.get("draws", 1) > 1 else "")
        + ". Samples: "
        f"{meta['samples_per_class']} per digit with its {asked}, Euler. FD in the features of "
        f"`benchmarks.mnist_quality`'s digit classifier (held-out accuracy {meta['classifier_accuracy']:.3f}"
        f"{ruler_digest(meta.get('classifier_sha256'))}) "
        f"against the {reference_images(meta)} test images (floor, training vs test images: {meta['fd_floor']:.2f}); "
        f"the digit asked for read by the same CNN trained for {JUDGE_EPOCHS} epochs (accuracy "
        f"{meta['judge_accuracy']:.3f} on the test images, {meta['judge_training_accuracy']:.3f} on the training "
        f"images{ruler_digest(meta.get('judge_sha256'))}: samples that replay training images can score above the "
        "first). Parameters (velocity / posterior): "
        f"{meta['parameters']}.",
        "",
        f"VRFM's saved prior is `train_vrfm.py`'s, conditional on the {key}: by default a flow `p(z | {key})`; with "
        f"the atom prior, the posteriors of training images keyed by {key}, so that a {asked} draws z among the atoms "
        f"of its {key}.",
    ]
    if meta["extra_priors"]:
        lines += [
            f"Rows without {key}s sample the same model with a prior ({', '.join(meta['extra_priors'])}) fitted "
            f"afterwards to its posterior without the {key}s: z of any digit, whatever the {asked}.",
        ]
    if meta.get("reencode_z_at") is not None:
        lines += [
            f"Rows `z re-encoded along the way` are the saved pipeline called with `reencode_z_at="
            f"{meta['reencode_z_at']}` (the same noise and z as the saved prior's row): z replaced once by the "
            "posterior mean of the image predicted at that time.",
        ]
    lines += [""]
    targets = target_rows(results)
    if targets:
        lines += ["## Targets (FD, no guidance, the default VRFM against RF)", ""]
        lines += [markdown_table(["quantity", "VRFM", "RF", "VRFM / RF", "target", "status"], targets), ""]
    if "training_images_fd" in meta:
        lines += [
            f"The training images themselves, {meta['samples_per_class']} per digit like the samples, score an FD of "
            f"{meta['training_images_fd']:.2f} against the test images: a cell at or below that is as close to the "
            "test images as the training set is, and this FD cannot rank it further.",
            "",
        ]
    for guidance in [str(g) for g in meta["guidance_scales"]]:
        lines += [f"## Guidance {guidance}", "", "FD to the test images (ratio to RF's mean):", ""]
        lines += [metric_table(results, "fd", guidance, with_ratio=True), ""]
        lines += ["Share of samples showing the digit asked for:", ""]
        lines += [metric_table(results, "accuracy", guidance, with_ratio=False), ""]
        lines += ["Copy check, nearest-training-image distance of samples over that of test images:", ""]
        lines += [metric_table(results, "distance_ratio", guidance, with_ratio=False), ""]
    train_rows = []
    for method, runs in results["runs"].items():
        trains = [run["train"] for run in runs.values()]
        kls = [t["kl_nats"] for t in trains if t["kl_nats"] is not None]
        is_vrfm = METHODS[method].is_vrfm
        train_rows.append([
            METHODS[method].label, format_mean_std([t["seconds"] for t in trains]),
            format_mean_std(kls) if kls and is_vrfm else "-",
            ", ".join(str(t["active_units"]) for t in trains) if is_vrfm else "-",
        ])  # fmt: skip
    lines += ["## Training", ""]
    headers = ["method", "train time (s)", "KL (nats)", "active latent units, per seed"]
    lines += [markdown_table(headers, train_rows), ""]
    lines += [f"Machine: {meta['machine']}. Wall time {meta['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def run(args, argv: list[str]) -> dict:
    torch.set_num_threads(args.num_threads)
    start = time.time()
    data = load_image_data("builtin:digits", RESOLUTION)
    rulers, rulers_meta = make_rulers(args, data)
    results = {"runs": {}}
    for method in args.methods:
        results["runs"][method] = {str(seed): evaluate_run(args, data, rulers, method, seed) for seed in args.seeds}
    first_vrfm = next(iter(results["runs"][args.methods[0]].values()))
    results["meta"] = {
        **rulers_meta,
        "conditioning": args.conditioning,
        "quick": bool(args.quick),
        "seeds": list(args.seeds),
        "max_train_steps": args.max_train_steps,
        "batch_size": args.batch_size,
        "samples_per_class": args.samples_per_class,
        "nfe": list(args.nfe),
        "guidance_scales": list(args.guidance_scales),
        "extra_priors": list(args.extra_priors),
        "reencode_z_at": args.reencode_z_at,
        "draws": args.draws,
        "parameters": first_vrfm["train"]["parameters"],
        "machine": machine_description(),
        "seconds": time.time() - start,
        "command": " ".join(["python -m benchmarks.conditional_digits", *argv]),
    }
    output_dir = Path(args.output_dir)
    write_json(output_dir / f"{args.name}.json", results)
    (output_dir / f"{args.name}.md").write_text(render_report(results))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="A tiny smoke run (seconds).")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--max-train-steps", "--max_train_steps", type=int, default=None, help="Default: 1600 (20 with --quick)."
    )
    parser.add_argument("--batch-size", "--batch_size", type=int, default=64)
    parser.add_argument(
        "--samples-per-class", "--samples_per_class", type=int, default=None, help="Default: 100 (2 with --quick)."
    )
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 8, 50])
    parser.add_argument("--guidance-scales", "--guidance_scales", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument(
        "--extra-priors",
        "--extra_priors",
        nargs="+",
        choices=EXTRA_PRIORS,
        default=[],
        help="VRFM: also sample with these priors, fitted to the saved posterior after training",
    )
    parser.add_argument(
        "--flow-prior-steps",
        "--flow_prior_steps",
        type=int,
        default=2000,
        help="fitting steps of the flow priors, saved and extra",
    )
    parser.add_argument(
        "--reencode-z-at",
        "--reencode_z_at",
        type=float,
        default=None,
        help="VRFM: also sample the saved pipeline with `reencode_z_at` set to this time (z re-encoded from the end "
        "point predicted there), on the same noise and z",
    )
    parser.add_argument("--threads", "--num_threads", dest="num_threads", type=int, default=1)
    parser.add_argument("--output-dir", "--output_dir", default=str(RESULTS_DIR))
    parser.add_argument(
        "--conditioning",
        choices=list(CONDITIONINGS),
        default="text",
        help="text: a caption picks the digit (an MMDiT with a text encoder); label: a class label (a UNet)",
    )
    parser.add_argument("--name", default=None, help="The report's name (default: by --conditioning).")
    parser.add_argument(
        "--runs-name",
        default=None,
        help="The runs' basename in the runs folder (default: --name): score runs kept under one name into a report "
        "of another.",
    )
    parser.add_argument(
        "--draws", type=int, default=1, help="Sample sets scored per cell and seed, their scores averaged (default 1)."
    )
    parser.add_argument(
        "--work-dir", default=None, help="Where the trained runs are kept (default: <output-dir>/cache/runs)."
    )
    parser.add_argument(
        "--reuse-runs",
        "--reuse_runs",
        action="store_true",
        help="Reuse finished runs (and their scores, when the settings match) in the runs folder (`--work-dir`).",
    )
    return parser


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The benchmark's arguments, with the defaults that depend on `--quick` and `--conditioning` filled in."""
    args = build_parser().parse_args(argv)
    args.name = args.name or CONDITIONINGS[args.conditioning].name
    if args.max_train_steps is None:
        args.max_train_steps = 20 if args.quick else 1600
    if args.samples_per_class is None:
        args.samples_per_class = 2 if args.quick else 100
    if args.draws < 1:
        raise ValueError(f"`--draws` must be >= 1, but got {args.draws}.")
    if args.reencode_z_at is not None:
        check_real(args.reencode_z_at, "--reencode-z-at", 0.0, 1.0)
    if args.quick:
        args.batch_size, args.seeds = min(args.batch_size, 8), args.seeds[:1]
        args.flow_prior_steps = min(args.flow_prior_steps, 20)
    args.aggregate_prior_atoms = 32 if args.quick else None  # what `extra_prior_fits` fits the extra priors on
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    results = run(parse_arguments(argv), argv)
    print(render_report(results))
    return results


if __name__ == "__main__":
    main()
