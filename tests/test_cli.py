"""The command line of `train_vrfm.py` and `import diffusers_vrfm` stay light: parsing, checking and `--help` import
neither torch nor diffusers; a bad value is one error line with exit status 2; the help text is clean."""

import json
import re
import subprocess
import sys

import pytest
from train_helpers import REPO_ROOT, SCRIPT

import diffusers_vrfm
from diffusers_vrfm.training.cli import build_parser

HEAVY = ("torch", "diffusers", "accelerate", "datasets", "transformers")


def _run(argv, **kwargs):
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True, **kwargs)


def test_parsing_checking_and_the_package_import_load_nothing_heavy():
    code = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("train_vrfm", {SCRIPT!r})
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
script.parse_args(["--backbone", "mlp", "--output_dir", "x"])
try:
    script.parse_args(["--beta", "-1"])
except ValueError:
    pass
import diffusers_vrfm
from diffusers_vrfm.training import cli
print(json.dumps(sorted(name for name in {HEAVY!r} if name in sys.modules)))
"""
    result = _run(["-c", code], check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_bad_value_is_one_error_line_with_status_2():
    result = _run([SCRIPT, "--beta", "-1"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "train_vrfm.py: error: `--beta` must be a finite number >= 0 (the KL weight), but got -1.0."
    )


def test_help_runs_and_names_every_group():
    result = _run([SCRIPT, "--help"], check=True)
    for group in ("data:", "model:", "objective:", "optimisation:", "output, logging and checkpoints:", "system:"):
        assert group in result.stdout


def test_help_states_each_default_once_and_names_no_issue():
    parser = build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not re.search(r"issue \d", text, flags=re.IGNORECASE)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help is None:
            continue
        rendered = formatter._get_help_string(action) % {**vars(action), "prog": parser.prog}
        assert rendered.lower().count("default") <= 1, (action.dest, rendered)


def test_lazy_package_exports_every_public_name():
    for name in diffusers_vrfm.__all__:
        assert getattr(diffusers_vrfm, name).__name__ == name
    assert set(diffusers_vrfm.__all__) <= set(dir(diffusers_vrfm))
    assert diffusers_vrfm.objective.vrfm_loss is diffusers_vrfm.vrfm_loss  # submodules load on access too
    with pytest.raises(AttributeError, match="no attribute 'NotAName'"):
        diffusers_vrfm.NotAName  # noqa: B018
    from diffusers_vrfm import VRFMPipeline  # the form of the remote-code re-export files

    assert VRFMPipeline.__module__ == "diffusers_vrfm.pipelines.pipeline_vrfm"


def test_cli_startup_benchmark_quick_run(tmp_path):
    from benchmarks import cli_startup

    results = cli_startup.main(["--quick", "--output-dir", str(tmp_path)])
    statuses = {name: entry["exit_status"] for name, entry in results["timings"]["this tree"].items()}
    assert statuses == {
        "train_vrfm.py --help": 0,
        "train_vrfm.py --beta -1 (invalid value)": 2,
        "train_vrfm.py --lerning_rate 1e-3 (mistyped flag)": 2,
        "python -c 'import diffusers_vrfm'": 0,
    }
    assert (tmp_path / "cli_startup.md").read_text().startswith("# Command-line start-up time")
    assert json.loads((tmp_path / "cli_startup.json").read_text())["meta"]["quick"] is True
