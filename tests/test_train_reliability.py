"""Issue 17, through the training script: a broken run never looks like a success, checkpoints are verified by
content, and one run at a time writes an output folder. Each test reproduces the attack of the issue on a tiny MLP."""

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import FAST, REPO_ROOT, SCRIPT, read_metrics, train_runner

from diffusers_vrfm import VRFMMLPModel, VRFMPipeline, VRFMScheduler
from diffusers_vrfm.data import get_toy_task
from diffusers_vrfm.training.checkpointing import (
    CheckpointError,
    find_resumable_checkpoint,
    verify_checkpoint,
)
from diffusers_vrfm.training.health import TrainingFailedError, check_trained_pipeline
from diffusers_vrfm.training.lock import LOCK_FILE_NAME, OutputDirLockedError
from diffusers_vrfm.training.visuals import toy_metrics

ARGS = ["--backbone", "mlp", "--train_batch_size", "16", "--num_validation_samples", "32", *FAST]
DIVERGING = ["--max_train_steps", "30", "--checkpointing_steps", "10", "--learning_rate", "1e6", *ARGS]


@pytest.fixture
def train():
    yield from train_runner()


def _assert_no_result(output_dir):
    for name in ("model_index.json", "README.md", "velocity_model"):
        assert not os.path.exists(os.path.join(output_dir, name)), f"a failed run wrote {name}"
    assert not os.path.exists(os.path.join(output_dir, LOCK_FILE_NAME)), "the lock is released on failure"


# -------------------------------------------------------------------------------------------- honest end states
def test_diverging_lr_with_skip_stops_after_max_skipped_updates(tmp_path, train):
    output_dir = str(tmp_path / "skip")
    with pytest.raises(TrainingFailedError, match=r"the last 21 updates .* more than --max_skipped_updates 20"):
        train(["--output_dir", output_dir, "--nonfinite_policy", "skip", *DIVERGING])
    _assert_no_result(output_dir)


def test_diverging_lr_with_a_high_skip_limit_refuses_the_pipeline(tmp_path, train):
    output_dir = str(tmp_path / "skip-many")
    with pytest.raises(TrainingFailedError, match=r"The trained pipeline cannot sample.*No pipeline was written"):
        train(["--output_dir", output_dir, "--nonfinite_policy", "skip", "--max_skipped_updates", "100", *DIVERGING])
    _assert_no_result(output_dir)
    assert os.path.isdir(os.path.join(output_dir, "checkpoint-30")), "checkpoints are kept for inspection"


def test_diverging_lr_with_stop_fails_and_describes_the_checkpoint(tmp_path, train):
    output_dir = str(tmp_path / "stop")
    with pytest.raises(RuntimeError, match=r"Non-finite .* at step \d+.*no checkpoint has been written to"):
        train(["--output_dir", output_dir, "--nonfinite_policy", "stop", *DIVERGING])
    _assert_no_result(output_dir)


def test_max_skipped_updates_is_checked():
    from train_helpers import load_script

    with pytest.raises(ValueError, match=r"`--max_skipped_updates` must be an integer >= 0, but got -1"):
        load_script().parse_args(["--max_skipped_updates", "-1"])


def _nan_pipeline():
    model = VRFMMLPModel(sample_size=2, latent_dim=0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    pipe = VRFMPipeline(velocity_model=model, scheduler=VRFMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_toy_metrics_refuse_non_finite_samples_instead_of_scoring_zero():
    with pytest.raises(ValueError, match=r"toy metrics at 1 step\(s\): 50 of 50 samples contain NaN or inf"):
        toy_metrics(_nan_pipeline(), get_toy_task("ring_2d"), [1, 2], num_samples=50)
    task = get_toy_task("two_modes_1d")
    with pytest.raises(ValueError, match="contain NaN or inf"):
        task.fraction_on_mode(torch.tensor([[1.0], [float("nan")]]))


def test_check_trained_pipeline_names_the_non_finite_component():
    with pytest.raises(TrainingFailedError, match=r"non-finite weights in `velocity_model` \(.*3 updates were"):
        check_trained_pipeline(_nan_pipeline(), 1, skipped_updates=3)
    healthy = VRFMPipeline(velocity_model=VRFMMLPModel(sample_size=2, latent_dim=0), scheduler=VRFMScheduler())
    healthy.set_progress_bar_config(disable=True)
    assert check_trained_pipeline(healthy, 2) is None


# --------------------------------------------------------------------------------- checkpoints verified by content
def _flip_bytes(path, count=8):
    """Inverts `count` bytes in the middle of a file (same size), as silent disk corruption would."""
    offset = os.path.getsize(path) // 2
    with open(path, "r+b") as handle:
        handle.seek(offset)
        original = handle.read(count)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in original))
    return offset, original


def _restore(path, offset, original):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(original)


def test_byte_flips_in_every_checkpoint_file_kind_are_detected(tmp_path, train):
    output_dir = str(tmp_path / "flips")
    train(["--output_dir", output_dir, "--max_train_steps", 2, "--checkpointing_steps", 1, "--learned_prior", *ARGS])
    newest = os.path.join(output_dir, "checkpoint-2")
    files = verify_checkpoint(newest)["files"]
    kinds = {name.split("/")[0] if "/" in name else name for name in files}
    assert kinds >= {
        "velocity_model",
        "posterior_encoder",
        "prior",
        "ema_velocity_model",
        "optimizer.bin",
        "scheduler.bin",
        "random_states_0.pkl",
    }
    for relative in files:
        path = os.path.join(newest, relative)
        offset, original = _flip_bytes(path)
        with pytest.raises(CheckpointError, match=f"{relative} does not match the SHA-256"):
            verify_checkpoint(newest)
        messages = []
        path_found, skipped = find_resumable_checkpoint(output_dir, log=messages.append)
        assert os.path.basename(path_found) == "checkpoint-1", relative
        assert relative in skipped[0][1] and any("Falling back" in m for m in messages)
        _restore(path, offset, original)
    assert verify_checkpoint(newest)["global_step"] == 2


def test_resume_falls_back_past_a_corrupted_checkpoint_and_logs_each_step_once(tmp_path, train, caplog):
    output_dir = str(tmp_path / "resume")
    common = ["--output_dir", output_dir, "--checkpointing_steps", "2", *ARGS]
    train(["--max_train_steps", "4", *common])
    weights = os.path.join(output_dir, "checkpoint-4", "velocity_model", "diffusion_pytorch_model.safetensors")
    _flip_bytes(weights)
    with caplog.at_level(logging.INFO):
        summary = train(["--max_train_steps", "5", "--resume_from_checkpoint", "latest", *common])
    assert summary["global_step"] == 5
    text = caplog.text
    assert "velocity_model/diffusion_pytorch_model.safetensors does not match the SHA-256" in text
    assert "Resumed from" in text and "checkpoint-2 at step 2" in text
    assert "Dropped the records after step 2" in text
    with open(os.path.join(output_dir, "logs", "metrics.jsonl")) as handle:
        steps = [json.loads(line)["step"] for line in handle]
    assert steps == [1, 2, 3, 4, 5], "the re-run steps replace the old records instead of duplicating them"
    assert set(read_metrics(output_dir)) == {1, 2, 3, 4, 5}


# ----------------------------------------------------------------------------------------- one writer per folder
def _wait_for(path, process, timeout=240):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, f"the first run exited early: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def test_a_second_run_on_the_same_folder_fails_and_a_dead_runs_lock_is_taken_over(tmp_path, train, caplog):
    output_dir = str(tmp_path / "shared")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, SCRIPT, "--output_dir", output_dir, "--max_train_steps", "1000000", "--checkpointing_steps",
         "1000000", "--validation_steps", "1000000", *ARGS],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(os.path.join(output_dir, LOCK_FILE_NAME), first)
        with pytest.raises(OutputDirLockedError, match=rf"Another training run \(pid {first.pid} on this host"):
            train(["--output_dir", output_dir, "--max_train_steps", "2", *ARGS])
        assert first.poll() is None, "the first run goes on"
    finally:
        first.kill()
        first.communicate()
    with open(os.path.join(output_dir, LOCK_FILE_NAME)) as handle:
        assert json.load(handle)["pid"] == first.pid, "a killed run leaves its lock behind"
    with caplog.at_level(logging.WARNING):
        summary = train(["--output_dir", output_dir, "--max_train_steps", "2", *ARGS])
    assert summary["finished"]
    assert f"Taking over the stale lock {os.path.join(output_dir, LOCK_FILE_NAME)}" in caplog.text
    assert f"pid {first.pid}" in caplog.text
    assert not os.path.exists(os.path.join(output_dir, LOCK_FILE_NAME)), "released at the end"
