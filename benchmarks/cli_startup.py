"""Start-up time of the command line: how long `train_vrfm.py --help`, a bad argument and `import diffusers_vrfm` take.

Each command runs in a fresh interpreter (as a user runs it), `--repeats` times, interleaved round by round so that
machine noise hits all commands alike; the table reports the median and the fastest wall time. With `--baseline REV`
the same commands also run in a copy of the repository at git revision `REV` (`git archive`), for a before/after
comparison. Nothing here imports torch: the numbers are those of the subprocesses alone.

The target (issue 16) is under 3 s for `--help` and for a bad argument on an idle 2-core machine; the load average
is recorded with the numbers because a busy machine is several times slower.

Run from the repository root::

    python -m benchmarks.cli_startup                        # this tree, 5 repeats
    python -m benchmarks.cli_startup --baseline 4933763     # and the revision before the lazy CLI, side by side
    python -m benchmarks.cli_startup --quick                # one repeat, without the torch reference
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# name -> argv after the interpreter; run with the repository copy as the working directory.
COMMANDS = {
    "train_vrfm.py --help": ["train_vrfm.py", "--help"],
    "train_vrfm.py --beta -1 (invalid value)": ["train_vrfm.py", "--beta", "-1"],
    "train_vrfm.py --lerning_rate 1e-3 (mistyped flag)": ["train_vrfm.py", "--lerning_rate", "1e-3"],
    "python -c 'import diffusers_vrfm'": ["-c", "import diffusers_vrfm"],
    "python -c 'import torch' (reference)": ["-c", "import torch"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="Runs of each command.")
    parser.add_argument("--baseline", default=None, help="A git revision to time side by side (e.g. a commit id).")
    parser.add_argument("--quick", action="store_true", help="One repeat, without the torch reference: a smoke run.")
    parser.add_argument("--output-dir", default=str(RESULTS_DIR), help="Where cli_startup.md and .json go.")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, but got {args.repeats}")
    if args.quick:
        args.repeats = 1
    return args


def export_revision(revision: str, destination: Path) -> Path:
    """Writes the files of `revision` (from `git archive`) under `destination`; returns the folder."""
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", revision], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise SystemExit(f"--baseline {revision!r}: git archive failed: {archive.stderr.decode().strip()}")
    archive_path = destination / "baseline.tar"
    archive_path.write_bytes(archive.stdout)
    tree = destination / "tree"
    with tarfile.open(archive_path) as handle:
        handle.extractall(tree, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return tree


def run_once(tree: Path, argv: list[str]) -> tuple[float, int]:
    """Wall time and exit status of `python argv...` run in `tree`, importing that tree's package."""
    environment = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, *argv], cwd=tree, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - start, completed.returncode


def imported_package(tree: Path) -> str:
    """Where `import diffusers_vrfm` resolves from in `tree` (to check that the tree's own copy is timed)."""
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    code = "import diffusers_vrfm, os; print(os.path.dirname(diffusers_vrfm.__file__))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tree, env=environment, capture_output=True, text=True)
    return result.stdout.strip()


def time_trees(trees: dict[str, Path], commands: dict[str, list[str]], repeats: int) -> dict[str, dict[str, dict]]:
    """`{tree label: {command: {"seconds": [...], "exit_status": int}}}`, rounds interleaved over trees, commands."""
    timings = {label: {name: {"seconds": [], "exit_status": None} for name in commands} for label in trees}
    for _ in range(repeats):
        for name, argv in commands.items():
            for label, tree in trees.items():
                seconds, status = run_once(tree, argv)
                timings[label][name]["seconds"].append(round(seconds, 3))
                timings[label][name]["exit_status"] = status
    return timings


def markdown(timings: dict, meta: dict) -> str:
    labels = list(timings)
    header = "| command | " + " | ".join(f"{label}: median s (fastest), exit status" for label in labels) + " |"
    lines = [
        "# Command-line start-up time",
        "",
        f"Fresh interpreter per run, {meta['repeats']} run(s) each, interleaved. Machine: {meta['machine']}; load "
        f"average before the runs {meta['load_before']}, after {meta['load_after']}.",
        f"Command: `{meta['command']}`",
        "",
        header,
        "|---" * (len(labels) + 1) + "|",
    ]
    for name in timings[labels[0]]:
        cells = []
        for label in labels:
            seconds = timings[label][name]["seconds"]
            status = timings[label][name]["exit_status"]
            cells.append(f"{statistics.median(seconds):.2f} ({min(seconds):.2f}), exit {status}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"this tree": REPO_ROOT}
        if args.baseline:
            trees[f"baseline {args.baseline}"] = export_revision(args.baseline, Path(scratch))
        for label, tree in trees.items():
            found = imported_package(tree)
            if Path(found).resolve() != (tree / "diffusers_vrfm").resolve():
                raise SystemExit(f"{label}: `import diffusers_vrfm` resolves to {found!r}, not the tree's own copy.")
        load_before = [round(v, 2) for v in os.getloadavg()]
        # --quick leaves out the torch reference, which alone takes seconds
        commands = {name: argv for name, argv in COMMANDS.items() if not (args.quick and "reference" in name)}
        timings = time_trees(trees, commands, args.repeats)
        load_after = [round(v, 2) for v in os.getloadavg()]
    meta = {
        "command": "python -m benchmarks.cli_startup " + " ".join(argv if argv is not None else sys.argv[1:]),
        "repeats": args.repeats,
        "quick": args.quick,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        "load_before": load_before,
        "load_after": load_after,
    }
    results = {"meta": meta, "timings": timings}
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(timings, meta)
    (output_dir / "cli_startup.md").write_text(table, encoding="utf-8")
    (output_dir / "cli_startup.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(table)
    return results


if __name__ == "__main__":
    main()
