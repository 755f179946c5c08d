"""`--resume_from_checkpoint latest` resumes exactly: the same loss sequence and the same final weights (model,
posterior, EMA) as an uninterrupted run, on CPU."""

import json
import os

import pytest
from train_helpers import FAST, TINY_POSTERIOR, TINY_UNET, read_metrics, train_runner

from diffusers_vrfm.training.checkpointing import list_checkpoints


@pytest.fixture
def train():
    yield from train_runner()


def _rank_record(output_dir):
    with open(os.path.join(output_dir, "logs", "rank_0.json")) as handle:
        record = json.load(handle)
    return {k: v for k, v in record.items() if k.endswith("sha256")}


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path, train):
    # 24 digits, 4 per process and micro-step, 2 micro-steps per update: an epoch is 6 micro-steps (3 updates), so
    # the 7 updates cross two epoch boundaries and the interruption after update 4 falls mid-epoch. Random flips, label
    # dropout, a posterior and the cosine schedule all draw from the saved or derived state.
    common = [
        "--resolution", "8", "--model_config", TINY_UNET, "--posterior_config", TINY_POSTERIOR,
        "--max_train_samples", "24", "--train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--max_train_steps", "7", "--random_flip", "--class_conditional", "--label_dropout", "0.3",
        "--lr_warmup_steps", "2", "--learning_rate", "3e-3", "--checkpointing_steps", "100",
        "--validation_steps", "100", "--num_validation_samples", "2", "--beta_warmup_steps", "3", *FAST,
    ]  # fmt: skip
    straight = str(tmp_path / "straight")
    train(["--output_dir", straight, *common])

    interrupted = str(tmp_path / "interrupted")
    first = train(["--output_dir", interrupted, "--stop_after_steps", "4", *common])
    assert not first["finished"] and first["global_step"] == 4
    assert [s for s, _ in list_checkpoints(interrupted)] == [4]
    assert not os.path.exists(os.path.join(interrupted, "model_index.json")), "an interrupted run saves no pipeline"
    # A newer checkpoint that was never completed must be skipped, falling back to checkpoint-4.
    os.makedirs(os.path.join(interrupted, "checkpoint-6", "velocity_model"))
    second = train(["--output_dir", interrupted, "--resume_from_checkpoint", "latest", *common])
    assert second["finished"] and second["global_step"] == 7

    expected, resumed = read_metrics(straight), read_metrics(interrupted)
    assert sorted(expected) == sorted(resumed) == list(range(1, 8))
    for step in expected:
        for key in ("loss", "mse", "kl", "lr", "beta", "grad_norm", "ema_decay"):
            assert resumed[step][key] == expected[step][key], (step, key)
    assert _rank_record(interrupted) == _rank_record(straight), "model, posterior and EMA weights are bit-identical"
    # And the run did learn something across the interruption (the loss is not constant).
    assert len({round(m["loss"], 6) for m in expected.values()}) > 1


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path, train, caplog):
    output_dir = str(tmp_path / "fresh")
    summary = train(
        ["--backbone", "mlp", "--output_dir", output_dir, "--max_train_steps", "2", "--train_batch_size", "16",
         "--resume_from_checkpoint", "latest", "--num_validation_samples", "16", *FAST]
    )  # fmt: skip
    assert summary["finished"] and sorted(read_metrics(output_dir)) == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"--resume_from_checkpoint latest: no intact checkpoint in {output_dir!r}" in "\n".join(warnings)
    assert not os.path.exists(os.path.join(output_dir, "validation")), "no empty validation/ without a validation"
