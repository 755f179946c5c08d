"""What must z carry for images? A one-seed study of VRFM settings on digits, run through `mnist_quality`.

Every configuration is one `python -m benchmarks.mnist_quality` command (listed in `STUDY`, printed by `--list`):
the study adds no training or scoring code of its own. RF is trained once per time density (`--methods rf`) instead
of beside every VRFM row, which halves the compute. `--run` runs the commands whose JSON is missing, one at a time;
without it the script only joins the JSONs in `--runs-dir` into one report (`image_study_digits.md` + `.json`),
followed by `--runs-dir`'s `findings.md` (the reading of the tables, written by hand) when there is one.

Run from the repository root::

    python -m benchmarks.image_study --list        # the commands
    python -m benchmarks.image_study --run         # run the missing ones (about 5 min each on a busy 2-core CPU)
    python -m benchmarks.image_study               # only the report
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as `python benchmarks/image_study.py`
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import markdown_table, write_json  # noqa: E402

# 360 samples: as many as test images, what its reports scored (before 53608a5 a larger --num-samples was cut to that)
BUDGET = "--dataset builtin:digits --steps 800 --seeds 0 --num-samples 360 --inception-samples 0"
LOGIT_NORMAL = "--train-args '--timestep_density logit_normal'"


@dataclass(frozen=True)
class StudyRun:
    """One row of the study: `name` (its outputs' basename), what it varies, and its `mnist_quality` flags."""

    name: str
    label: str
    flags: str
    baseline: str = "rf"  # the RF run it is compared with (same time density)

    def command(self, runs_dir: Path) -> str:
        return f"python -m benchmarks.mnist_quality {BUDGET} {self.flags} --output-dir {runs_dir} --name {self.name}"


STUDY = (
    StudyRun("rf", "RF (uniform t)", "--methods rf"),
    StudyRun("kl3_d4", "VRFM defaults: KL 3, dim z 4", "--methods vrfm"),
    StudyRun("kl30_d16_fb", "KL 30, dim z 16, free bits 0.5", "--methods vrfm --kl-target 30 --latent-dim 16 "
             "--train-args '--free_bits 0.5'"),
    StudyRun("kl10_d4", "KL 10, dim z 4", "--methods vrfm --kl-target 10"),
    StudyRun("kl100_d64_fb", "KL 100, dim z 64, free bits 0.5", "--methods vrfm --kl-target 100 --latent-dim 64 "
             "--train-args '--free_bits 0.5'"),
    StudyRun("rf_logitnormal", "RF, logit-normal t", f"--methods rf {LOGIT_NORMAL}", baseline="rf_logitnormal"),
    StudyRun("kl3_d4_logitnormal", "KL 3, dim z 4, logit-normal t", f"--methods vrfm {LOGIT_NORMAL}",
             baseline="rf_logitnormal"),
    # Does the velocity net learn to use z given more steps? (The KL rows above have the same training MSE.)
    StudyRun("rf_1600", "RF, 1600 steps", "--methods rf --steps 1600", baseline="rf_1600"),
    StudyRun("kl30_d16_fb_1600", "KL 30, dim z 16, free bits 0.5, 1600 steps", "--methods vrfm --kl-target 30 "
             "--latent-dim 16 --train-args '--free_bits 0.5' --steps 1600", baseline="rf_1600"),
    # Issue 13's candidate against the defaults at one budget: logit-normal t and 1600 steps for all three.
    StudyRun("rf_logitnormal_1600", "RF, logit-normal t, 1600 steps", f"--methods rf {LOGIT_NORMAL} --steps 1600",
             baseline="rf_logitnormal_1600"),
    StudyRun("kl3_d4_logitnormal_1600", "KL 3, dim z 4, logit-normal t, 1600 steps",
             f"--methods vrfm {LOGIT_NORMAL} --steps 1600", baseline="rf_logitnormal_1600"),
    StudyRun("kl30_d16_fb_logitnormal_1600", "KL 30, dim z 16, free bits 0.5, logit-normal t, 1600 steps",
             "--methods vrfm --kl-target 30 --latent-dim 16 --train-args '--free_bits 0.5 --timestep_density "
             "logit_normal' --steps 1600", baseline="rf_logitnormal_1600"),
    # Not run within the study's hour (lower priority): KL 30 and 100 at dim z 4.
    StudyRun("kl30_d4", "KL 30, dim z 4", "--methods vrfm --kl-target 30"),
    StudyRun("kl100_d4", "KL 100, dim z 4", "--methods vrfm --kl-target 100"),
)

POSTERIOR_HEADERS = [
    "run", "train MSE", "KL", "active", "dim z", "KL per dim (largest)", "aggregate var", "MMD^2 q vs N(0,I)", "beta"
]


def run_missing(runs_dir: Path) -> None:
    """Runs, one after the other, every study command whose JSON is not in `runs_dir`."""
    from benchmarks import mnist_quality

    for run in STUDY:
        if not (runs_dir / f"{run.name}.json").exists():
            print(f"=== {run.command(runs_dir)}", flush=True)
            mnist_quality.main(shlex.split(run.command(runs_dir))[3:])


def fd_row(curves: dict, nfes: list[str]) -> list[float]:
    return [curves["0"][n] for n in nfes] if curves else []


def summarise(runs_dir: Path) -> dict:
    """Every finished run's FD curve, its ratio to its RF, and the posterior's KL and active units."""
    loaded = {r.name: json.loads((runs_dir / f"{r.name}.json").read_text()) for r in STUDY
              if (runs_dir / f"{r.name}.json").exists()}
    rulers = {(r["meta"].get("classifier_accuracy"), r["meta"].get("classifier_sha256")) for r in loaded.values()}
    if len(rulers) > 1:  # FDs in two classifiers' features do not compare (as `mnist_quality --join` refuses)
        raise ValueError(f"The runs in {runs_dir} were scored by different classifiers {sorted(rulers, key=str)}.")
    rows = []
    for run in STUDY:
        if run.name not in loaded:
            continue
        result, nfes = loaded[run.name], [str(n) for n in loaded[run.name]["meta"]["nfes"]]
        method = "rf" if "rf" in result["fd"] else "vrfm"
        baseline = loaded.get(run.baseline, {}).get("fd", {}).get("rf")
        row = {"name": run.name, "label": run.label, "command": run.command(runs_dir), "nfes": nfes,
               "fd": fd_row(result["fd"][method], nfes), "fd_normal": fd_row(result["fd"].get("vrfm_normal"), nfes),
               "rf_fd": fd_row(baseline, nfes), "fd_floor": result["meta"]["fd_floor"],
               "train": result["train"][method]["0"], "posterior": result["posterior"].get("0")}
        rows.append(row)
    return {"runs": rows, "meta": next(iter(loaded.values()))["meta"] if loaded else {}}


def render(summary: dict) -> str:
    from benchmarks.mnist_quality import fd_sizes, ruler_digest

    rows, meta = summary["runs"], summary["meta"]
    nfes = rows[0]["nfes"]
    fd_rows, ratio_rows, prior_rows, posterior_rows = [], [], [], []
    for row in rows:
        fd_rows.append([row["label"], *[f"{v:.2f}" for v in row["fd"]]])
        if row["rf_fd"] and row["name"] != "rf" and not row["name"].startswith("rf_"):
            ratio_rows.append([row["label"], *[f"{v / r:.2f}x" for v, r in zip(row["fd"], row["rf_fd"])]])
        if row["fd_normal"]:
            prior_rows.append([row["label"], *[f"{n / v:.2f}x" for v, n in zip(row["fd"], row["fd_normal"])]])
        train = row["train"]
        mse = f"{train.get('train mse (mean of last 50 steps)', float('nan')):.4f}"
        if row["posterior"]:
            p = row["posterior"]
            per_dim = sorted(p["kl_per_dim"], reverse=True)
            posterior_rows.append([
                row["label"], mse, f"{p['kl']:.1f}", str(p["active_units"]), f"{len(per_dim)}",
                ", ".join(f"{v:.2f}" for v in per_dim[:6]) + (" ..." if len(per_dim) > 6 else ""),
                f"{p['aggregate_var']:.2f}", f"{p['mmd']:.3f}",
                f"{train.get('beta (last step, adapted to the KL target)', float('nan')):.3g}",
            ])
        else:
            posterior_rows.append([row["label"], mse, *["-"] * 7])
    heads = [f"NFE {n}" for n in nfes]
    lines = [
        "# Image study on digits: what must z carry? (one seed, CPU)",
        "",
        f"- Machine: {meta.get('machine')}; one training at a time, `--threads 1` (torch threads of the benchmark "
        "and `--num_threads 1` of every `train_vrfm.py` run).",
        f"- Data: {meta.get('data')}. Budget: {meta.get('steps')} steps at batch {meta.get('batch_size')}, seed "
        f"{meta.get('seeds')}, UNet {json.dumps(meta.get('model_config'))}.",
        f"- Metric: classifier-feature FD (classifier test accuracy {meta.get('classifier_accuracy', 0):.3f}"
        f"{ruler_digest(meta.get('classifier_sha256'))}), "
        f"{fd_sizes(meta)} (all of digits' test split), Euler.",
        "- Commands: below, or `python -m benchmarks.image_study --list`; each row's own report is "
        "`image_study/<name>.md`.",
        "",
        "## FD (VRFM sampled as saved: z from its fitted aggregate prior)",
        "",
        markdown_table(["run", *heads], fd_rows),
        "",
        "## VRFM / RF (RF of the same time density)",
        "",
        markdown_table(["run", *heads], ratio_rows),
        "",
        "## z ~ N(0, I) / fitted prior (above 1: the fitted prior helps)",
        "",
        markdown_table(["run", *heads], prior_rows),
        "",
        "## Training MSE (last 50 steps); posterior on test images (KL nats, active units, largest per-dim KLs); beta",
        "",
        markdown_table(POSTERIOR_HEADERS, posterior_rows),
        "",
        "## Commands",
        "",
        "```bash",
        *[row["command"] for row in rows],
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("benchmarks/results/image_study"))
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--list", action="store_true", help="print the commands and stop")
    parser.add_argument("--run", action="store_true", help="run the commands whose JSON is missing")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(run.command(args.runs_dir) for run in STUDY))
        return {}
    if args.run:
        run_missing(args.runs_dir)
    summary = summarise(args.runs_dir)
    if not summary["runs"]:
        raise SystemExit(f"no study run has finished in {args.runs_dir}; use --run")
    write_json(args.output_dir / "image_study_digits.json", summary)
    notes = args.runs_dir / "findings.md"  # the reading of the tables, written by hand, appended to the report
    report = render(summary) + ("\n" + notes.read_text() if notes.exists() else "")
    (args.output_dir / "image_study_digits.md").write_text(report)
    print(report)
    return summary


if __name__ == "__main__":
    main()
