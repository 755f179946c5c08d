"""Runs the ```python blocks of docs/text-to-image.md in order, in one namespace (```py blocks are GPU commands,
marked on the page as not run here)."""

import pathlib
import re

import torch

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "text-to-image.md"


def test_text_to_image_page_runs_as_written(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)
    assert len(blocks) >= 5
    namespace = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)
