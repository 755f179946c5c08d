"""Checkpoint files, the training step, and the model card, tested without running the script."""

import hashlib
import json
import os
import re

import pytest
import torch
from safetensors.torch import save
from train_helpers import read_card_metadata

from diffusers_vrfm import VRFMMLPModel, VRFMPosteriorEncoder, VRFMScheduler, interpolate, target_velocity, vrfm_loss
from diffusers_vrfm.training.checkpointing import (
    MANIFEST_NAME,
    CheckpointError,
    FileDigests,
    describe_last_checkpoint,
    finalize_checkpoint,
    find_resumable_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    resolve_resume_path,
    rewind_metrics_log,
    verify_checkpoint,
)
from diffusers_vrfm.training.model_card import render_model_card, training_command
from diffusers_vrfm.training.step import beta_at_step, draw_step_randomness, vrfm_training_loss


# ------------------------------------------------------------------------------------------------- checkpoints
def _write_checkpoint(output_dir, step, with_manifest=True):
    temporary = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    os.makedirs(os.path.join(temporary, "velocity_model"))
    digests = FileDigests(temporary)
    digests.write_bytes(
        os.path.join(temporary, "velocity_model", "m.safetensors"), save({"w": torch.full((4, 4), float(step))})
    )
    digests.write_bytes(os.path.join(temporary, "optimizer.bin"), b"x" * 100)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if with_manifest:
        return finalize_checkpoint(temporary, final, {"global_step": step}, digests)
    os.replace(temporary, final)
    return final


def test_finalize_writes_a_manifest_and_renames(tmp_path):
    path = _write_checkpoint(str(tmp_path), 3)
    assert os.path.basename(path) == "checkpoint-3"
    assert not any(name.startswith(".tmp") for name in os.listdir(tmp_path)), "the temporary folder is gone"
    manifest = verify_checkpoint(path, ("velocity_model",))
    assert manifest["global_step"] == 3
    assert manifest["files"]["optimizer.bin"] == {"size": 100, "sha256": hashlib.sha256(b"x" * 100).hexdigest()}
    assert "velocity_model/m.safetensors" in manifest["files"]


def test_truncated_weights_missing_files_and_components_are_detected(tmp_path):
    path = _write_checkpoint(str(tmp_path), 1)
    weights = os.path.join(path, "velocity_model", "m.safetensors")
    with open(weights, "r+b") as handle:
        handle.truncate(os.path.getsize(weights) - 7)
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(path)
    path = _write_checkpoint(str(tmp_path), 2)
    os.remove(os.path.join(path, "optimizer.bin"))
    with pytest.raises(CheckpointError, match="optimizer.bin .*missing"):
        verify_checkpoint(path)
    path = _write_checkpoint(str(tmp_path), 3)
    with pytest.raises(CheckpointError, match="`posterior_encoder` is missing"):
        verify_checkpoint(path, ("velocity_model", "posterior_encoder"))


@pytest.mark.parametrize("relative", ["velocity_model/m.safetensors", "optimizer.bin"])
@pytest.mark.parametrize("offset", [0, 60])  # in the safetensors header, or in the data
def test_flipped_bytes_of_the_same_size_are_detected(tmp_path, relative, offset):
    path = _write_checkpoint(str(tmp_path), 1)
    target = os.path.join(path, relative)
    size = os.path.getsize(target)
    with open(target, "r+b") as handle:
        handle.seek(offset)
        original = handle.read(8)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in original))
    assert os.path.getsize(target) == size
    with pytest.raises(CheckpointError, match=f"{relative} does not match the SHA-256"):
        verify_checkpoint(path)


def _edit_manifest(path, edit):
    manifest_path = os.path.join(path, MANIFEST_NAME)
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    edit(manifest)
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle)


def test_a_step_that_disagrees_with_the_folder_name_is_refused(tmp_path):
    path = _write_checkpoint(str(tmp_path), 20)
    _edit_manifest(path, lambda manifest: manifest.update(global_step=25))
    with pytest.raises(CheckpointError, match="says global_step 25, but the folder is named for step 20"):
        verify_checkpoint(path)
    with pytest.raises(ValueError, match="--resume_from_checkpoint.*not usable.*global_step 25"):
        resolve_resume_path("checkpoint-20", str(tmp_path))


@pytest.mark.parametrize("outside", ["/etc/hostname", "../outside.bin", "velocity_model/../../outside.bin", "./x"])
def test_manifest_paths_outside_the_folder_are_refused(tmp_path, outside):
    (tmp_path / "outside.bin").write_bytes(b"x")
    path = _write_checkpoint(str(tmp_path), 3)
    _edit_manifest(path, lambda manifest: manifest["files"].update({outside: {"size": 1, "sha256": "0" * 64}}))
    with pytest.raises(CheckpointError, match=f"the manifest lists '{re.escape(outside)}'"):
        verify_checkpoint(path)


def test_a_symlink_leading_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"x" * 100)
    path = _write_checkpoint(str(tmp_path), 3)
    os.remove(os.path.join(path, "optimizer.bin"))
    os.symlink(str(tmp_path / "secret.bin"), os.path.join(path, "optimizer.bin"))
    with pytest.raises(CheckpointError, match="'optimizer.bin', which resolves outside the folder"):
        verify_checkpoint(path)


def test_manifests_without_checksums_are_refused(tmp_path):
    path = _write_checkpoint(str(tmp_path), 3)
    _edit_manifest(path, lambda manifest: manifest.pop("manifest_version"))
    with pytest.raises(CheckpointError, match="written without SHA-256 checksums"):
        verify_checkpoint(path)


def test_describe_last_checkpoint(tmp_path):
    output_dir = str(tmp_path)
    assert describe_last_checkpoint(output_dir) == f"no checkpoint has been written to {output_dir} yet"
    path = _write_checkpoint(output_dir, 2)
    assert describe_last_checkpoint(output_dir) == f"the newest checkpoint {path} is intact (verified)"
    with open(os.path.join(path, "optimizer.bin"), "r+b") as handle:
        handle.write(b"y")
    assert "is NOT intact" in describe_last_checkpoint(output_dir)
    assert "optimizer.bin does not match the SHA-256" in describe_last_checkpoint(output_dir)


def test_rewind_metrics_log_keeps_one_record_per_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    assert rewind_metrics_log(path, 3) == 0 and not os.path.exists(path)
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4, 5)] + ['{"step": 6, "lo']
    with open(path, "w") as handle:
        handle.writelines(lines)
    assert rewind_metrics_log(path, 3) == 3  # steps 4 and 5, and the torn last line
    with open(path) as handle:
        assert handle.readlines() == lines[:3]
    assert rewind_metrics_log(path, 0) == 3 and open(path).read() == ""


def test_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    output_dir = str(tmp_path)
    _write_checkpoint(output_dir, 2)
    _write_checkpoint(output_dir, 4)
    _write_checkpoint(output_dir, 6, with_manifest=False)  # e.g. renamed by hand, never completed
    broken = _write_checkpoint(output_dir, 8)
    os.remove(os.path.join(broken, "velocity_model", "m.safetensors"))
    messages = []
    path, skipped = find_resumable_checkpoint(output_dir, ("velocity_model",), log=messages.append)
    assert os.path.basename(path) == "checkpoint-4"
    assert [os.path.basename(p) for p, _ in skipped] == ["checkpoint-8", "checkpoint-6"]
    assert any("Falling back" in m and "checkpoint-4" in m for m in messages)
    assert resolve_resume_path("latest", output_dir, ("velocity_model",), log=messages.append) == path
    with pytest.raises(ValueError, match="--resume_from_checkpoint.*not usable"):
        resolve_resume_path("checkpoint-8", output_dir, ("velocity_model",))
    with pytest.raises(ValueError, match="--resume_from_checkpoint.*does not exist"):
        resolve_resume_path("checkpoint-99", output_dir)
    assert resolve_resume_path("latest", str(tmp_path / "empty")) is None


def test_prune_keeps_the_newest_and_removes_leftovers(tmp_path):
    output_dir = str(tmp_path)
    for step in (1, 2, 3, 4):
        _write_checkpoint(output_dir, step)
    os.makedirs(os.path.join(output_dir, ".tmp-checkpoint-5"))
    removed = prune_checkpoints(output_dir, total_limit=2)
    assert sorted(os.path.basename(r) for r in removed) == ["checkpoint-1", "checkpoint-2"]
    assert [s for s, _ in list_checkpoints(output_dir)] == [3, 4]
    assert not os.path.exists(os.path.join(output_dir, ".tmp-checkpoint-5"))


def test_rewriting_an_existing_step_replaces_it(tmp_path):
    output_dir = str(tmp_path)
    _write_checkpoint(output_dir, 5)
    path = _write_checkpoint(output_dir, 5)
    assert verify_checkpoint(path)["global_step"] == 5
    assert sorted(os.listdir(output_dir)) == ["checkpoint-5"]
    with open(os.path.join(path, MANIFEST_NAME)) as handle:
        assert json.load(handle)["files"]


# ------------------------------------------------------------------------------------------------ training step
def test_beta_warmup_is_a_linear_ramp():
    assert [beta_at_step(0.2, s, 4) for s in (0, 1, 2, 4, 100)] == pytest.approx([0.0, 0.05, 0.1, 0.2, 0.2])
    assert beta_at_step(0.3, 0, 0) == 0.3
    with pytest.raises(ValueError, match="beta"):
        beta_at_step(-1.0, 0)


def test_step_randomness_is_a_slice_of_the_global_draw():
    scheduler = VRFMScheduler()
    dropout = {"label_dropout": 0.5, "num_classes": 4, "caption_dropout": 0.5}
    full = draw_step_randomness(scheduler, 0, 7, 8, slice(0, 8), (3,), **dropout, latent_dim=2)
    half = draw_step_randomness(scheduler, 0, 7, 8, slice(4, 8), (3,), **dropout, latent_dim=2)
    torch.testing.assert_close(half.t, full.t[4:])
    torch.testing.assert_close(half.x0, full.x0[4:])
    assert torch.equal(half.label_drop, full.label_drop[4:]) and torch.equal(half.caption_drop, full.caption_drop[4:])
    assert torch.equal(half.posterior_noise, full.posterior_noise[4:])
    other = draw_step_randomness(scheduler, 0, 8, 8, slice(0, 8), (3,))
    assert not torch.equal(other.x0, full.x0), "each micro-step has its own noise"
    many = draw_step_randomness(scheduler, 0, 1, 4000, slice(0, 4000), None, 0.25, 3, caption_dropout=0.1)
    assert abs(many.label_drop.float().mean().item() - 0.25) < 0.03
    assert abs(many.caption_drop.float().mean().item() - 0.1) < 0.02
    assert not torch.equal(many.caption_drop[:400], many.label_drop[:400]), "a stream of its own"
    assert full.caption_drop is not None and other.caption_drop is None, "none drawn without caption dropout"


def test_training_loss_matches_the_objective():
    torch.manual_seed(0)
    model = VRFMMLPModel(sample_size=2, latent_dim=3)
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=3)
    x0, x1, t = torch.randn(6, 2), torch.randn(6, 2), torch.rand(6)
    noise = torch.randn(6, 3)
    out = vrfm_training_loss(model, encoder, x0, x1, t, posterior_noise=noise, beta=0.3, reduction="sum")
    x_t = interpolate(x0, x1, t)
    posterior = encoder(x0=x0, x1=x1, x_t=x_t, t=t, noise=noise)
    expected = vrfm_loss(
        model(x_t, t, z=posterior.sample).sample,
        target_velocity(x0, x1),
        posterior.mean,
        posterior.logvar,
        beta=0.3,
        reduction="sum",
    )
    torch.testing.assert_close(out.loss.loss, expected.loss)
    torch.testing.assert_close(out.posterior_mean, posterior.mean)
    # Without a posterior it is plain rectified flow: the loss is the squared error of the velocity.
    plain = VRFMMLPModel(sample_size=2, latent_dim=0)
    rf = vrfm_training_loss(plain, None, x0, x1, t, reduction="mean")
    manual = (plain(x_t, t).sample - (x1 - x0)).pow(2).mean()
    torch.testing.assert_close(rf.loss.loss, manual)
    assert rf.posterior_mean is None and rf.loss.kl.item() == 0.0


# --------------------------------------------------------------------------------------------------- model card
def _render(tmp_path, **overrides):
    kwargs = dict(
        repo_id="someone/vrfm-digits",
        args={
            "latent_dim": 4,
            "beta": 1.0,
            "loss_reduction": "mean",
            "max_train_steps": 100,
            "hub_token": "hf_secret",
        },
        argv=["--output_dir", "x", "--hub_token", "hf_secret", "--beta", "1.0"],
        data_kind="image",
        dataset_description="digits",
        hub_dataset_id="ylecun/mnist",
        velocity_class="VRFMUNet2DModel",
        velocity_parameters=1234,
        posterior_description="conv",
        base_model="google/ddpm-cifar10-32",
        num_processes=2,
        global_batch_size=64,
        metrics={"train loss": 0.5},
        metric_window=10,
        sample_image="sample_grid.png",
    )
    kwargs.update(overrides)
    card = render_model_card(**kwargs)
    path = str(tmp_path / "README.md")
    card.save(path)
    return path


def test_model_card_metadata_and_body(tmp_path):
    path = _render(tmp_path)
    metadata = read_card_metadata(path)
    assert metadata["library_name"] == "diffusers"
    assert {"vrfm", "rectified-flow"} <= set(metadata["tags"])
    assert metadata["license"] == "apache-2.0"
    assert metadata["datasets"] == ["ylecun/mnist"]
    assert metadata["base_model"] == "google/ddpm-cifar10-32"
    text = open(path).read()
    assert "hf_secret" not in text, "the Hub token never reaches the card"
    assert 'VRFMPipeline.from_pretrained("someone/vrfm-digits")' in text
    assert "trust_remote_code=True" in text
    assert "![Samples from the EMA weights](sample_grid.png)" in text
    assert "| train loss | 0.5 |" in text
    assert "accelerate launch --multi_gpu --num_processes 2 train_vrfm.py --output_dir x --beta 1.0" in text


def test_model_card_local_base_model_is_not_metadata(tmp_path):
    path = _render(tmp_path, base_model=str(tmp_path), hub_dataset_id=None, data_kind="vector")
    metadata = read_card_metadata(path)
    assert "base_model" not in metadata and "datasets" not in metadata
    assert "pipeline_tag" not in metadata
    assert "latents=" in open(path).read(), "vector cards explain how to pass the toy source"


def test_training_command_strips_the_token():
    assert training_command(["--hub_token=abc", "--seed", "1"]) == "accelerate launch train_vrfm.py --seed 1"
    assert training_command(["--seed", "1"], accelerate_launch=False) == "python train_vrfm.py --seed 1"
