"""`--nonfinite_policy`: a NaN loss either stops the run with a clear message (the default) or skips the update,
counted in the logs, so that no NaN reaches the weights, the EMA or the saved pipeline."""

import glob
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import FAST, read_metrics, train_runner

import diffusers_vrfm.training.step as step_module


@pytest.fixture
def train():
    yield from train_runner()


@pytest.fixture
def nan_on_call(monkeypatch):
    """Makes the training loss NaN on the given (1-based) calls of `vrfm_training_loss`."""

    def install(*calls):
        real = step_module.vrfm_training_loss
        counter = {"n": 0}

        def poisoned(*args, **kwargs):
            counter["n"] += 1
            out = real(*args, **kwargs)
            if counter["n"] in calls:
                out.loss.loss = out.loss.loss * float("nan")
            return out

        monkeypatch.setattr(step_module, "vrfm_training_loss", poisoned)

    return install


ARGS = ["--backbone", "mlp", "--train_batch_size", "16", "--num_validation_samples", "32", *FAST]


def test_nan_loss_stops_with_a_clear_message(tmp_path, train, nan_on_call):
    nan_on_call(3)
    output_dir = str(tmp_path / "stop")
    checkpoint = os.path.join(output_dir, "checkpoint-2")
    with pytest.raises(RuntimeError, match=rf"Non-finite loss at step 3.*{checkpoint} is intact \(verified\).*skip"):
        train(["--output_dir", output_dir, "--max_train_steps", "5", "--checkpointing_steps", "2", *ARGS])
    assert sorted(read_metrics(output_dir)) == [1, 2], "steps before the NaN were logged, none after"
    assert os.path.isdir(checkpoint), "the last checkpoint is intact"
    assert not os.path.exists(os.path.join(output_dir, "checkpoint-4")), "the read before a checkpoint stops the run"


def test_nan_loss_skip_leaves_ema_and_weights_clean(tmp_path, train, nan_on_call):
    nan_on_call(2)
    output_dir = str(tmp_path / "skip")
    train(["--output_dir", output_dir, "--max_train_steps", "4", "--nonfinite_policy", "skip", *ARGS])
    metrics = read_metrics(output_dir)
    assert math.isnan(metrics[2]["loss"])
    assert [metrics[s]["skipped_updates"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert all(math.isfinite(metrics[s]["loss"]) for s in (1, 3, 4))
    # The EMA still steps after a skipped update: it averages in the unchanged (finite) weights.
    from diffusers.training_utils import EMAModel

    reference = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.9999, use_ema_warmup=True, power=0.75)
    assert [metrics[s]["ema_decay"] for s in (2, 4)] == [pytest.approx(reference.get_decay(s)) for s in (2, 4)]
    (weights,) = glob.glob(os.path.join(output_dir, "velocity_model", "*.safetensors"))
    assert all(torch.isfinite(t).all() for t in load_file(weights).values())
    card = open(os.path.join(output_dir, "README.md")).read()
    assert "| skipped updates (non-finite) | 1 |" in card
    assert "Skipped updates (non-finite loss or gradient): 1 of 4 updates were skipped" in card
