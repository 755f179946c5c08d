"""Does the prompt control the class? A small text-to-image model trained from scratch on the digits, VRFM against RF.

Both models are trained by `train_vrfm.py --backbone sd3` (a small MMDiT in pixel space, a frozen random CLIP text
encoder over a word-level tokenizer the run builds, captions "a handwritten seven"), on scikit-learn's 8x8 digits
resized to 16x16 as the package does. For each digit, samples are drawn with the prompt "a handwritten <digit>" at
NFE 2, 4 and 16 (Euler), with and without classifier-free guidance, and a logistic-regression digit classifier
(scikit-learn, trained on the same 16x16 images average-pooled back to 8x8) says which digit each sample shows. The
figure is the share of samples assigned to the prompted digit (1.0 = the prompt always wins, 0.1 = chance).

    python -m benchmarks.text_to_image_digits                # the recorded run (~15 min on one CPU core)
    python -m benchmarks.text_to_image_digits --quick        # a smoke run in a few seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, machine_description, markdown_table

REPO_ROOT = Path(__file__).resolve().parent.parent
METHODS = {"VRFM": [], "RF": ["--latent_dim", "0"]}
QUICK_MODEL = json.dumps({"num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2})


def _train_script():
    """`train_vrfm.py` of this checkout, imported as a module."""
    if "train_vrfm" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_vrfm", REPO_ROOT / "train_vrfm.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_vrfm"] = module
        spec.loader.exec_module(module)
    return sys.modules["train_vrfm"]


def train(method: str, args, output_dir: Path) -> dict:
    """Trains one model with `train_vrfm.py` in this process; returns its summary."""
    from accelerate.state import AcceleratorState, GradientState

    argv = ["--backbone", "sd3", "--output_dir", str(output_dir), "--seed", str(args.seed), "--report_to", "none"]
    argv += ["--max_train_steps", str(args.max_train_steps), "--train_batch_size", str(args.batch_size)]
    argv += ["--num_threads", str(args.num_threads), "--validation_steps", str(10**9)]
    argv += ["--checkpointing_steps", "10000"]
    argv += ["--validation_inference_steps", "2,4,16", "--num_validation_samples", "10", *METHODS[method]]
    if args.quick:
        argv += ["--model_config", QUICK_MODEL, "--max_train_samples", "64"]
        argv += ["--aggregate_prior_atoms", "32"] if method == "VRFM" else []
    script = _train_script()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        return script.main(script.parse_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def to_classifier_features(images: torch.Tensor) -> np.ndarray:
    """`(N, 1, 16, 16)` images in `[-1, 1]` -> `(N, 64)` features on the 0-16 scale of scikit-learn's digits."""
    pooled = torch.nn.functional.avg_pool2d(images.float(), images.shape[-1] // 8)
    return ((pooled.clamp(-1, 1) + 1) * 8).flatten(1).numpy()


def digit_classifier(seed: int = 0):
    """A logistic-regression classifier of the training images (16x16, pooled to 8x8) and its held-out accuracy."""
    from sklearn.linear_model import LogisticRegression

    from diffusers_vrfm.training.data import load_training_data

    data = load_training_data("builtin:digits", "unet", resolution=16)
    source = data.dataset.source
    images = torch.stack([data.dataset[(index, 0)]["pixel_values"] for index in range(len(source))])
    labels = np.array([source.label(index) for index in range(len(source))])
    order = np.random.default_rng(seed).permutation(len(labels))
    train_rows, test_rows = order[:1400], order[1400:]
    features = to_classifier_features(images)
    classifier = LogisticRegression(max_iter=2000).fit(features[train_rows], labels[train_rows])
    return classifier, float(classifier.score(features[test_rows], labels[test_rows]))


@torch.no_grad()
def prompt_accuracy(pipeline, classifier, samples_per_class: int, nfe: int, guidance_scale: float, seed: int):
    """The share of samples that `classifier` assigns to the prompted digit."""
    from diffusers_vrfm.training.text_data import digit_caption

    correct = 0
    for digit in range(10):
        images = pipeline(
            digit_caption(digit), num_images_per_prompt=samples_per_class, num_inference_steps=nfe,
            guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed * 100 + digit),
            output_type="pt",
        ).samples  # fmt: skip
        predictions = classifier.predict(to_classifier_features(images * 2 - 1))
        correct += int((predictions == digit).sum())
    return correct / (10 * samples_per_class)


def render_report(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Text-to-image on the digits: does the prompt control the class?",
        "",
        "Written by `benchmarks/text_to_image_digits.py` (rerun: `python -m benchmarks.text_to_image_digits`).",
        "",
        f"A small MMDiT (`train_vrfm.py --backbone sd3`, {meta['parameters']}) trained from scratch for "
        f"{meta['max_train_steps']} steps of batch {meta['batch_size']} on the 8x8 digits resized to 16x16, with "
        "captions such as \"a handwritten seven\" (10% dropped to \"\" for guidance) and a frozen random CLIP text "
        "encoder. Each cell: the share of samples (10 digits x "
        f"{meta['samples_per_class']}) that a logistic-regression digit classifier (held-out accuracy "
        f"{meta['classifier_accuracy']:.3f} on real digits) assigns to the prompted digit; chance is 0.1. Euler "
        "steps; VRFM draws z from its aggregate-posterior prior; RF is the same run with `--latent_dim 0`.",
        "",
    ]
    headers = ["method", "guidance", *[f"NFE {nfe}" for nfe in meta["nfe"]], "train time (s)"]
    rows = []
    for method, entry in results["methods"].items():
        for guidance, scores in entry["accuracy"].items():
            shares = [f"{scores[str(nfe)]:.3f}" for nfe in meta["nfe"]]
            rows.append([method, guidance, *shares, entry["train_seconds"]])
    lines += [markdown_table(headers, rows), "", f"Machine: {meta['machine']}. Wall time {meta['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def run(args, argv: list[str] | None = None) -> dict:
    torch.set_num_threads(args.num_threads)
    start = time.time()
    output_dir = Path(args.output_dir)
    classifier, classifier_accuracy = digit_classifier(args.seed)
    from diffusers_vrfm import VRFMTextToImagePipeline

    results = {"methods": {}}
    for method in METHODS:
        folder = output_dir / "cache" / "runs" / f"{args.name}_{method.lower()}"  # cache/ is git-ignored
        if args.reuse_runs and (folder / "logs" / "summary.json").is_file():  # a finished run of the same settings
            summary = json.loads((folder / "logs" / "summary.json").read_text())
        else:
            summary = train(method, args, folder)
        pipeline = VRFMTextToImagePipeline.from_pretrained(folder)
        pipeline.set_progress_bar_config(disable=True)
        accuracy = {
            str(guidance): {
                str(nfe): prompt_accuracy(pipeline, classifier, args.samples_per_class, nfe, guidance, args.seed)
                for nfe in args.nfe
            }
            for guidance in args.guidance_scales
        }
        parameters = summary["metrics"]["parameters: velocity model / posterior"]
        results["methods"][method] = {
            "accuracy": accuracy,
            "train_seconds": summary["metrics"]["training wall time (s)"],
            "parameters": parameters,
        }
    results["meta"] = {
        "quick": bool(args.quick),
        "max_train_steps": args.max_train_steps,
        "batch_size": args.batch_size,
        "samples_per_class": args.samples_per_class,
        "nfe": list(args.nfe),
        "guidance_scales": list(args.guidance_scales),
        "classifier_accuracy": classifier_accuracy,
        "parameters": f"velocity / posterior parameters {results['methods']['VRFM']['parameters']}",
        "machine": machine_description(),
        "seconds": time.time() - start,
        "command": " ".join(["python -m benchmarks.text_to_image_digits", *(argv or [])]),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    (output_dir / f"{args.name}.md").write_text(render_report(results))
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="A tiny smoke run (seconds).")
    parser.add_argument("--max_train_steps", type=int, default=None, help="Default: 1000 (20 with --quick).")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--samples_per_class", type=int, default=None, help="Default: 100 (2 with --quick).")
    parser.add_argument("--nfe", type=int, nargs="+", default=[2, 4, 16])
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", dest="output_dir", default=str(RESULTS_DIR))
    parser.add_argument("--name", default="text_to_image_digits")
    parser.add_argument(
        "--reuse_runs",
        action="store_true",
        help="Evaluate a method's finished run in <output-dir>/cache/runs (same settings) instead of training again.",
    )
    args = parser.parse_args(argv)
    if args.max_train_steps is None:
        args.max_train_steps = 20 if args.quick else 1000
    if args.samples_per_class is None:
        args.samples_per_class = 2 if args.quick else 100
    if args.quick:
        args.batch_size = min(args.batch_size, 8)
    results = run(args, sys.argv[1:] if argv is None else argv)
    print(render_report(results))
    return results


if __name__ == "__main__":
    main()
