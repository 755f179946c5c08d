"""The examples and every code block of the README and of `docs/*.md` run as written.

A fenced block tagged `python` runs in a fresh namespace, in an empty working directory. An HTML comment on the line
just above a fence changes that:

- `<!-- docs-test: continue -->` runs the block in the namespace of the block above it on the same page;
- `<!-- docs-test: skip: REASON -->` does not run it (a reason is required: e.g. it trains for minutes).

Shell blocks (`bash`, `sh`) must carry a skip marker; every `train_vrfm.py` command in them must still parse.
Blocks tagged `text`, `json` or untagged are output or data, not code.
"""

import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from train_helpers import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON, SHELL, TEXT = {"python", "py"}, {"bash", "sh", "shell"}, {"", "text", "json"}
MARKER = re.compile(r"<!-- docs-test: (continue|skip: \S.*?) -->")


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


# ------------------------------------------------------------------------------------------- code blocks of the docs
@dataclasses.dataclass
class CodeBlock:
    page: str
    line: int  # the line of the opening fence, 1-based
    language: str
    code: str
    directive: str | None  # "continue", "skip: <reason>" or None

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def code_blocks(path: pathlib.Path) -> list[CodeBlock]:
    """The fenced blocks of a markdown page, each with the docs-test directive on the line above its fence."""
    lines = path.read_text().splitlines()
    blocks, start = [], None
    for index, line in enumerate(lines):
        if not line.startswith("```"):
            continue
        if start is None:
            start = index
            continue
        marker = MARKER.fullmatch(lines[start - 1].strip()) if start > 0 else None
        page = str(path.relative_to(ROOT))
        language, code = lines[start][3:].strip(), "\n".join(lines[start + 1 : index]) + "\n"
        blocks.append(CodeBlock(page, start + 1, language, code, marker.group(1) if marker else None))
        start = None
    assert start is None, f"{path}: the fence at line {start + 1} is never closed"
    return blocks


ALL_BLOCKS = [block for page in DOC_PAGES for block in code_blocks(page)]


def runnable_chains() -> list[list[CodeBlock]]:
    """The python blocks that run, each with the blocks it continues (`<!-- docs-test: continue -->`)."""
    chains = []
    for block in ALL_BLOCKS:
        if block.language not in PYTHON or (block.directive or "").startswith("skip"):
            continue
        if block.directive == "continue":
            assert chains and chains[-1][-1].page == block.page, f"{block.name} continues no block"
            chains[-1] = [*chains[-1], block]
        else:
            chains.append([block])
    return chains


def test_every_doc_block_is_code_that_runs_or_says_why_not():
    assert len(DOC_PAGES) > 1 and ALL_BLOCKS
    for block in ALL_BLOCKS:
        known = PYTHON | SHELL | TEXT
        assert block.language in known, f"{block.name}: unknown fence language {block.language!r}; use one of {known}"
        if block.language in SHELL:
            assert (block.directive or "").startswith("skip: "), f"{block.name}: mark shell blocks docs-test: skip"
        if block.language in TEXT:
            assert block.directive is None, f"{block.name}: a {block.language or 'untagged'} block is never run"
    runnable = [block for chain in runnable_chains() for block in chain]
    assert all(block.language in PYTHON for block in runnable) and runnable


@pytest.mark.parametrize("chain", runnable_chains(), ids=lambda chain: chain[0].name)
def test_doc_code_block_runs_as_written(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for block in chain:
        # Pad with blank lines so that a traceback names the block's own line in the page.
        exec(compile("\n" * block.line + block.code, block.page, "exec"), namespace)


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block, split as bash would (continuation lines and multi-line quotes joined)."""
    commands, pending = [], ""
    for line in code.replace("\\\n", " ").splitlines():
        pending += line + "\n"
        if pending.count("'") % 2 == 0:
            commands.append(shlex.split(pending, comments=True))
            pending = ""
    return [command for command in commands if command]


def test_documented_train_vrfm_commands_parse():
    script = load_script()
    commands = [
        (block.name, command[command.index("train_vrfm.py") + 1 :])
        for block in ALL_BLOCKS
        if block.language in SHELL
        for command in shell_commands(block.code)
        if "train_vrfm.py" in command
    ]
    assert len(commands) >= 5
    for name, argv in commands:
        try:
            script.parse_args(argv)
        except (SystemExit, ValueError) as error:
            raise AssertionError(f"{name}: `train_vrfm.py {shlex.join(argv)}` does not parse: {error!r}") from error


def test_training_flag_table_names_only_real_flags():
    from diffusers_vrfm.training.cli import build_parser

    options = {option for action in build_parser()._actions for option in action.option_strings}
    rows = [line for line in (ROOT / "docs" / "training.md").read_text().splitlines() if line.startswith("| `--")]
    documented = {flag for row in rows for flag in re.findall(r"`(--[a-z_-]+)", row.split(" | ")[0])}
    assert len(documented) > 25
    assert documented <= options, f"not flags of train_vrfm.py: {sorted(documented - options)}"
