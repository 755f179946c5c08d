"""A real 2-process CPU run (`accelerate launch --multi_gpu --num_processes 2 train_vrfm.py --cpu`, MULTI_CPU over
gloo): both ranks end with identical weights, and the run matches a 1-process run with the same global batch.

Tolerance: every random number is drawn for the global batch and sliced per process, so the two runs see the same
examples, noise, times and latents; they differ only in float rounding (the all-reduce averages two half-batch
gradients instead of one full-batch gradient), which Adam can amplify for weights with tiny gradients. We allow 1e-5
relative on logged losses and 1e-4 absolute on weights; measured here: 7e-8 relative on losses, 1e-5 on the velocity
model's (EMA) weights and 1e-7 on the posterior's after 4 steps at lr 3e-3.
"""

import glob
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import FAST, REPO_ROOT, SCRIPT, TINY_POSTERIOR, TINY_UNET, read_metrics, train_runner

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4


@pytest.fixture
def train():
    yield from train_runner()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _weights(output_dir, component):
    (path,) = glob.glob(os.path.join(output_dir, component, "*.safetensors"))
    return load_file(path)


def test_two_cpu_processes_match_one_process(tmp_path, train):
    common = [
        "--resolution", "8", "--model_config", TINY_UNET, "--posterior_config", TINY_POSTERIOR,
        "--max_train_samples", "64", "--max_train_steps", "4", "--class_conditional", "--random_flip",
        "--checkpointing_steps", "2", "--validation_steps", "100", "--num_validation_samples", "2",
        "--learning_rate", "3e-3", "--lr_warmup_steps", "1", *FAST,
    ]  # fmt: skip
    two = str(tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        SCRIPT, "--cpu", "--output_dir", two, "--train_batch_size", "8", *common,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    records = []
    for rank in (0, 1):
        with open(os.path.join(two, "logs", f"rank_{rank}.json")) as handle:
            records.append(json.load(handle))
    assert [r["num_processes"] for r in records] == [2, 2], "a real 2-process run, not two independent ones"
    assert all("MULTI_CPU" in r["distributed_type"] for r in records)
    for key in ("velocity_model_sha256", "posterior_encoder_sha256", "ema_sha256"):
        assert records[0][key] == records[1][key], f"ranks differ in {key}"

    one = str(tmp_path / "one")
    train(["--output_dir", one, "--train_batch_size", "16", *common])
    losses_two, losses_one = read_metrics(two), read_metrics(one)
    assert sorted(losses_two) == sorted(losses_one) == [1, 2, 3, 4]
    for step in losses_one:
        assert losses_two[step]["loss"] == pytest.approx(losses_one[step]["loss"], rel=LOSS_RTOL), step
        assert losses_two[step]["lr"] == pytest.approx(losses_one[step]["lr"], rel=1e-12), step
    for component in ("velocity_model", "posterior_encoder"):
        a, b = _weights(one, component), _weights(two, component)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < WEIGHT_ATOL, (component, worst)
    # The runs really moved the weights (so agreement is not trivial).
    first_checkpoint = _weights(os.path.join(two, "checkpoint-2"), "velocity_model")
    final = _weights(two, "velocity_model")
    assert any(not torch.equal(first_checkpoint[k], final[k]) for k in final)
