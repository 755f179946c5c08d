"""The README's examples run as written."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quickstart_is_the_example_file():
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "quickstart_2d.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert example in blocks


def test_quickstart_runs_as_written(tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart_2d.py")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "reloaded pipeline reproduces the samples exactly" in result.stdout
    fractions = [int(v) for v in re.findall(r"step\(s\): (\d+)% of samples", result.stdout)]
    assert len(fractions) == 2 and fractions[1] > 50  # two Euler steps put most samples on a target mode
    assert (tmp_path / "vrfm-ring" / "model_index.json").exists()
