"""Which prior to sample a trained VRFM image model with: fits several priors over `z` to saved pipelines' posteriors
and scores each as `benchmarks.mnist_quality` does (classifier-feature FD at several step counts, and the copy check),
and by how well it predicts the codes of the test images (`test_code_nll`).
Nothing is trained again: the velocity model stays fixed, only where `z` is drawn from changes, and `z` is kept along
each trajectory (no `reencode_z_at`, whatever the saved pipeline's default).

A prior is a name and a spec, `{"type": "atoms" | "flow", "num_atoms": ..., ...}`; the other keys go to its
`from_posterior` (the flow's `num_train_steps`, `num_layers`, `hidden_dim`). Each run (`--run`, a saved
`train_vrfm.py` output, e.g. one seed each) is fitted and sampled with seed `--seed` plus its index; cells are mean
± std over the runs. Run from the repository root::

    python -m benchmarks.prior_fit --dataset builtin:mnist --run runs/vrfm_seed0 runs/vrfm_seed1 \
        --priors '{"atoms": {"type": "atoms"}, "flow, 20k steps": {"type": "flow", "num_train_steps": 20000}}'

Writes `<name>.md` and `<name>.json` in `--output-dir`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/prior_fit.py` as well as `python -m benchmarks.prior_fit`
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    count_parameters,
    format_mean_std,
    machine_description,
    markdown_table,
    torch_threads,
    write_json,
)
from benchmarks.mnist_quality import (  # noqa: E402
    DATASETS,
    MAX_TRAIN_SAMPLES_HELP,
    QUICK_POSTERIOR,
    QUICK_UNET,
    draw_noise_rows,
    fd_sizes,
    fds_over_draws,
    fit_prior,
    load_image_data,
    make_scorer,
    ruler_digest,
    train_with_script,
)

DEFAULT_PRIORS = {"atoms": {"type": "atoms"}, "flow": {"type": "flow"}}
QUICK_PRIORS = {
    "atoms": {"type": "atoms", "num_atoms": 32},
    "flow": {"type": "flow", "num_atoms": 32, "num_train_steps": 5},
}
PRIOR_TYPES = ("atoms", "flow")


def priors_argument(text: str) -> dict:
    """`--priors`: a JSON object (or the path of a JSON file) of name -> spec, each spec with a known `type`."""
    from diffusers_vrfm.training.factory import parse_json_config

    try:
        priors = parse_json_config(text, "--priors")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    for name, spec in priors.items():
        if not isinstance(spec, dict) or spec.get("type") not in PRIOR_TYPES:
            raise argparse.ArgumentTypeError(
                f"entry {name!r} must be an object with `type` in {list(PRIOR_TYPES)}, but got {spec!r}."
            )
    if not priors:
        raise argparse.ArgumentTypeError("must name at least one prior, but got {}.")
    return priors


def test_code_nll(prior, posterior, test_images: torch.Tensor, seed: int, draws: int = 8) -> float:
    """The mean of ``-log p(z)`` under `prior` over `draws` draws of ``z ~ q(z | x)`` for each test image in [0, 1]
    (nats per code): how well the prior predicts the codes of images it was not fitted to. Lower is better; a prior
    that keeps only the training images' codes (the atoms) scores badly however good its samples look."""
    from diffusers_vrfm import collect_posterior_atoms, reparameterize

    generator = torch.Generator().manual_seed(20_000 + seed)
    x1 = test_images * 2 - 1
    pairs = ((torch.randn(batch.shape, generator=generator), batch) for batch in x1.split(500))
    means, logvars = collect_posterior_atoms(posterior, pairs, len(x1), generator)
    noise = torch.randn((draws, *means.shape), generator=generator)
    z = reparameterize(means.expand(draws, -1, -1), logvars.expand(draws, -1, -1), noise=noise)
    with torch.no_grad():  # in chunks: the atoms' density holds a (rows, atoms, latent_dim) tensor
        return float(-torch.cat([prior.log_prob(chunk) for chunk in z.flatten(0, 1).split(512)]).mean())


def score_priors(args, run: Path, seed: int, data, scorer, num_samples: int) -> dict:
    """For each prior of `args.priors`: fitted to the run's posterior, then the FD and copy ratio of its samples at
    every NFE, the NLL of the test images' codes under it ([`test_code_nll`]), and the seconds its fit took."""
    from diffusers_vrfm import VRFMPipeline

    saved = VRFMPipeline.from_pretrained(str(run))
    if saved.posterior_encoder is None or saved.velocity_model.latent_dim == 0:
        raise ValueError(f"`--run` {str(run)!r} must be a VRFM pipeline saved with its posterior encoder.")
    posterior = saved.posterior_encoder.eval()
    scores = {}
    for name, spec in args.priors.items():
        config = {key: value for key, value in spec.items() if key != "type"}
        start = time.perf_counter()
        prior = fit_prior(posterior, data, spec["type"], seed, **config)
        fit_seconds = time.perf_counter() - start
        pipeline = VRFMPipeline(**{**saved.components, "prior": prior})
        pipeline.set_progress_bar_config(disable=True)
        fd, ratio, fd_draws = {}, {}, {}
        for nfe in args.nfe:
            fds, samples = fds_over_draws(pipeline, scorer, num_samples, nfe, seed, args.draws)
            fd[str(nfe)], ratio[str(nfe)] = float(np.mean(fds)), scorer.distance_ratio(samples)
            if args.draws > 1:
                fd_draws[str(nfe)] = fds
            each = ", ".join(f"{value:.2f}" for value in fds)
            print(f"{run.name} {name} NFE {nfe}: FD {each}, copy ratio {ratio[str(nfe)]:.3f}", flush=True)
        nll = test_code_nll(prior, posterior, data.test, seed)
        print(f"{run.name} {name}: test-code NLL {nll:.2f} nats", flush=True)
        scores[name] = {"fd": fd, "distance_ratio": ratio, "test_code_nll": nll, "fit_seconds": fit_seconds}
        if fd_draws:
            scores[name]["fd_draws"] = fd_draws
        scores[name]["parameters"] = count_parameters(prior)
    return scores


def render_report(results: dict) -> str:
    meta, nfes = results["meta"], [str(n) for n in results["meta"]["nfes"]]
    per_run = results["runs"].values()

    def cells(name: str, section: str) -> list[str]:
        return [format_mean_std([run[name][section][nfe] for run in per_run]) for nfe in nfes]

    fd_rows = [[name, *cells(name, "fd")] for name in meta["priors"]]
    draws_note = f" (each run's FD the mean of {meta['draws']} sample sets)" if meta.get("draws", 1) > 1 else ""
    ratio_rows = [[name, *cells(name, "distance_ratio")] for name in meta["priors"]]
    spec_rows = [
        [
            name,
            f"`{json.dumps(spec)}`",
            format_mean_std([run[name]["test_code_nll"] for run in per_run]),
            format_mean_std([run[name]["fit_seconds"] for run in per_run]),
        ]
        for name, spec in meta["priors"].items()
    ]
    columns = [f"NFE {nfe}" for nfe in nfes]
    noise = []
    if meta.get("draws", 1) > 1:
        runs = results["runs"].items()
        fd_draws = {name: {run: scores[name]["fd_draws"] for run, scores in runs} for name in meta["priors"]}
        noise = [
            f"## Sampling noise: the FD's std over {meta['draws']} draws of noise and z per run, and over runs",
            "",
            markdown_table(["FD std", *columns], draw_noise_rows(fd_draws, nfes, across="runs")),
            "",
        ]
    return "\n".join(
        [
            f"# Priors over z for one trained model: {meta['dataset']}",
            "",
            f"- Command: `{meta['command']}`",
            f"- Machine: {meta['machine']}.",
            f"- Runs (one model each; cells are mean ± std over them): {', '.join(meta['run_names'])}.",
            f"- Metric: `benchmarks.mnist_quality`'s classifier-feature FD (test accuracy "
            f"{meta['classifier_accuracy']:.4f}{ruler_digest(meta['classifier_sha256'])}), Euler samples with the "
            "drawn z kept to the end (no re-encoding), "
            f"{fd_sizes(meta)}{draws_note}. The copy ratio is the median distance from a sample to its nearest "
            "training image over that of a test image (1: as new as held-out data).",
            f"- Total wall time: {meta['total_seconds']:.0f} s.",
            "",
            "## Classifier-feature FD (lower is better)",
            "",
            markdown_table(["prior", *columns], fd_rows),
            "",
            *noise,
            "## Copy ratio",
            "",
            markdown_table(["prior", *columns], ratio_rows),
            "",
            "## The priors",
            "",
            "The test-code NLL is the mean of `-log p(z)` under the prior over 8 draws of `z ~ q(z | x)` for each "
            "test image (nats; lower: the prior predicts the codes of images it was not fitted to).",
            "",
            markdown_table(["prior", "spec", "test-code NLL", "fit seconds"], spec_rows),
            "",
        ]
    )


def quick_run(output_dir: Path) -> Path:
    """`--quick` without `--run`: a tiny VRFM UNet trained on the digits for 3 steps by `train_vrfm.py`."""
    folder = output_dir / "cache" / "prior_fit_quick_run"
    train_with_script(
        ["--dataset_name", "builtin:digits", "--resolution", "16", "--output_dir", str(folder),
         "--model_config", json.dumps(QUICK_UNET), "--posterior_config", json.dumps(QUICK_POSTERIOR),
         "--max_train_steps", "3", "--train_batch_size", "8", "--aggregate_prior_atoms", "16",
         "--flow_prior_steps", "5", "--report_to", "none", "--num_threads", "1", "--validation_inference_steps", "1",
         "--num_validation_samples", "2", "--cpu"]
    )  # fmt: skip
    return folder


def run(args) -> dict:
    from diffusers_vrfm.objective import check_integer

    check_integer(args.draws, "--draws", 1)
    start = time.perf_counter()
    if args.quick:
        args.dataset, args.nfe, args.num_samples = "builtin:digits", args.nfe[:2], min(args.num_samples, 16)
        args.priors = QUICK_PRIORS if args.priors is DEFAULT_PRIORS else args.priors
        args.run = args.run or [quick_run(Path(args.output_dir))]
    data = load_image_data(args.dataset, DATASETS[args.dataset], args.max_train_samples)
    scorer_args = argparse.Namespace(quick=False, device="cpu", num_samples=args.num_samples, inception_samples=0)
    scorer, meta = make_scorer(scorer_args, data, Path(args.output_dir))
    runs = {
        run.name: score_priors(args, run, args.seed + index, data, scorer, meta["num_samples"])
        for index, run in enumerate(args.run)
    }
    meta |= {
        "command": "python -m benchmarks.prior_fit " + " ".join(shlex.quote(a) for a in args.argv),
        "machine": machine_description(),
        "dataset": args.dataset,
        "run_names": list(runs),
        "priors": args.priors,
        "nfes": list(args.nfe),
        "draws": args.draws,
        "total_seconds": time.perf_counter() - start,
    }
    results = {"meta": meta, "runs": runs}
    output_dir = Path(args.output_dir)
    write_json(output_dir / f"{args.name}.json", results)
    (output_dir / f"{args.name}.md").write_text(render_report(results))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", nargs="+", type=Path, default=None, help="saved VRFM pipelines (train_vrfm.py)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="builtin:mnist")
    parser.add_argument("--max-train-samples", type=int, default=None, help=MAX_TRAIN_SAMPLES_HELP)
    parser.add_argument(
        "--priors", type=priors_argument, default=DEFAULT_PRIORS, help="a JSON object: name -> prior spec"
    )
    parser.add_argument("--nfe", nargs="+", type=int, default=[1, 2, 8, 50])
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--draws", type=int, default=1, help="sample sets per cell (fresh noise and z): their mean FD")
    parser.add_argument("--seed", type=int, default=0, help="of the first run's fits and noise; the next add 1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="prior_fit")
    parser.add_argument("--quick", action="store_true", help="digits, 16 samples at NFE 1 and 2, small priors")
    return parser


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.run is None and not args.quick:
        build_parser().error("`--run` must name at least one saved VRFM pipeline (or pass --quick).")
    args.argv = argv
    with torch_threads(args.threads):
        results = run(args)
    print((Path(args.output_dir) / f"{args.name}.md").read_text())
    return results


if __name__ == "__main__":
    main()
