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


def test_sample_script_writes_a_grid(tmp_path):
    from PIL import Image

    from diffusers_vrfm import VRFMPipeline, VRFMScheduler, VRFMUNet2DModel

    model = VRFMUNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        latent_dim=2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    VRFMPipeline(velocity_model=model, scheduler=VRFMScheduler()).save_pretrained(tmp_path / "pipe")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "sample.py"),
            str(tmp_path / "pipe"),
            "--num_inference_steps",
            "1",
            "2",
        ]
        + ["--num_samples", "3", "--output", str(tmp_path / "grid.png")],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "2 Euler step(s): 2 model evaluations per sample" in result.stdout
    # 8x8 samples enlarged 8x to the default 64-pixel cells, 2-pixel gaps, and a 56-pixel column of row labels
    assert Image.open(tmp_path / "grid.png").size == (56 + 3 * (64 + 2), 2 * (64 + 2))
