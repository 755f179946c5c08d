"""scripts/install.sh keeps an installed torch of any build and otherwise installs the pinned one, saying which.

The script runs for real, with a stand-in `python` first on PATH that records its pip commands instead of running them.
"""

import os
import pathlib
import stat
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == "-c" ]]; then  # the script's "which torch is installed" query
  [[ -n "${FAKE_TORCH_VERSION:-}" ]] && echo "${FAKE_TORCH_VERSION}" && exit 0
  exit 1
fi
line="$*"
while [[ $# -gt 0 ]]; do
  if [[ "$1" == "-c" ]]; then line="${line} [constraints: $(cat "$2")]"; fi
  shift
done
echo "${line}" >> "${PIP_LOG}"
"""


def run_install(tmp_path, extras="train", **environment):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "pip.log"
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_VERSION", "TORCH_INDEX_URL")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PIP_LOG=str(log), **environment)
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh"), extras], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout, log.read_text().splitlines()


def test_an_installed_torch_of_any_build_is_kept_and_pinned(tmp_path):
    stdout, pip_calls = run_install(tmp_path, FAKE_TORCH_VERSION="2.11.0+cu130")
    assert "Keeping the installed torch 2.11.0+cu130" in stdout
    assert len(pip_calls) == 1  # no torch install: only the package, with torch pinned to the installed version
    assert pip_calls[0].startswith("-m pip install --quiet -c ")
    assert pip_calls[0].endswith(" -e .[train] [constraints: torch==2.11.0]")


def test_without_torch_the_pinned_version_is_installed_and_the_build_is_named(tmp_path):
    stdout, pip_calls = run_install(tmp_path, extras="test")
    assert "Installing torch==2.13.0 from your pip index: the CPU build only where the index serves one" in stdout
    assert "PyPI serves the CUDA build" in stdout
    assert pip_calls[0] == "-m pip install --quiet torch==2.13.0"
    assert pip_calls[1].endswith("-e .[test] [constraints: torch==2.13.0]")
    assert pip_calls[2] == "-m pip install --quiet --no-deps torchcfm>=1.0.5"


def test_torch_version_and_index_can_be_chosen(tmp_path):
    index = "https://download.pytorch.org/whl/cpu"
    stdout, pip_calls = run_install(tmp_path, TORCH_VERSION="2.12.1", TORCH_INDEX_URL=index)
    assert f"Installing torch==2.12.1 from {index}." in stdout
    assert pip_calls[0] == f"-m pip install --quiet --index-url {index} torch==2.12.1"
    assert pip_calls[1].endswith("[constraints: torch==2.12.1]")
