"""Shared helpers for the tests of `train_vrfm.py` (not a test module)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import PIL.Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "train_vrfm.py")

# A tiny UNet (2 levels, 8 and 16 channels) so that a step takes milliseconds.
TINY_UNET = json.dumps(
    {
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 4,
        "layers_per_block": 1,
    }
)
TINY_POSTERIOR = json.dumps({"block_out_channels": [8], "norm_num_groups": 4, "hidden_dim": 16})
FAST = ["--report_to", "none", "--num_threads", "1", "--validation_inference_steps", "1,2", "--flow_prior_steps", "20"]


def load_script():
    """Imports train_vrfm.py from the repository root as a module."""
    if "train_vrfm" in sys.modules:
        return sys.modules["train_vrfm"]
    spec = importlib.util.spec_from_file_location("train_vrfm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_vrfm"] = module
    spec.loader.exec_module(module)
    return module


def reset_accelerate():
    """accelerate keeps process-wide singletons; reset them so that each in-process run starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_runner():
    """Body of the `train` fixture of the test modules: yields `run(argv)`, which runs `main(parse_args(argv))` in
    this process with fresh accelerate state and returns the summary."""
    import torch

    script = load_script()
    threads = torch.get_num_threads()

    def run(argv):
        reset_accelerate()
        try:
            return script.main(script.parse_args([str(a) for a in argv]))
        finally:
            reset_accelerate()

    yield run
    torch.set_num_threads(threads)


def read_metrics(output_dir: str) -> dict[int, dict]:
    """The logged metrics by step (the last record wins when a resumed run logs a step again)."""
    records = {}
    with open(os.path.join(output_dir, "logs", "metrics.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            records[record["step"]] = record
    return records


def make_image_folder(root: str, num_per_class: int = 6, size: int = 10, classes=("cats", "dogs")) -> str:
    """A tiny `imagefolder` dataset: RGB PNGs in one subfolder per class."""
    rng = np.random.default_rng(0)
    for name in classes:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(num_per_class):
            array = rng.integers(0, 256, size=(size, size + 2, 3), dtype=np.uint8)
            PIL.Image.fromarray(array).save(os.path.join(root, name, f"{i}.png"))
    return root


def read_card_metadata(path: str) -> dict:
    """Parses the YAML header of a model card."""
    import yaml

    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    assert text.startswith("---\n"), "a model card starts with a YAML header"
    header = text.split("---\n")[1]
    return yaml.safe_load(header)


def count_forward_calls(monkeypatch, module_class) -> dict:
    """Patches `module_class.forward` (for the test) to count its calls in the returned `{"count": n}`."""
    calls = {"count": 0}
    forward = module_class.forward

    def counted(self, *args, **kwargs):
        calls["count"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(module_class, "forward", counted)
    return calls


def assert_same_tensors(actual: dict, expected: dict) -> None:
    """Two state dicts (or safetensors files' contents) with the same names and values, to float tolerance."""
    import torch

    assert actual.keys() == expected.keys() and expected
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, msg=name)
