"""End-to-end runs of train_vrfm.py in this process: a tiny run producing a loadable pipeline, a card and a grid;
fine-tuning a pretrained backbone; the Hub push path without a network; bad arguments failing before training."""

import glob
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (
    FAST,
    TINY_POSTERIOR,
    TINY_UNET,
    load_script,
    make_image_folder,
    read_card_metadata,
    read_metrics,
    train_runner,
)

from diffusers_vrfm.training.checkpointing import list_checkpoints, verify_checkpoint


@pytest.fixture
def train():
    yield from train_runner()


def tiny_unet_args(output_dir, *extra):
    return [
        "--output_dir", output_dir,
        "--resolution", "8",
        "--model_config", TINY_UNET,
        "--posterior_config", TINY_POSTERIOR,
        "--train_batch_size", "8",
        "--num_validation_samples", "4",
        *FAST,
        *extra,
    ]  # fmt: skip


def test_tiny_end_to_end_run(tmp_path, train, caplog):
    from diffusers import DiffusionPipeline

    from diffusers_vrfm import VRFMFlowPrior, VRFMPipeline, VRFMUNet2DModel

    output_dir = str(tmp_path / "run")
    argv = tiny_unet_args(
        output_dir, "--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "2"
    )
    argv += ["--checkpoints_total_limit", "1", "--report_to", "tensorboard", "--latent_dim", "3"]
    z_map_unet = json.dumps({**json.loads(TINY_UNET), "z_map_channels": 1, "z_map_stride": 2})  # z as an input too
    argv[argv.index(TINY_UNET)] = z_map_unet
    summary = train(argv)
    assert summary["finished"] and summary["global_step"] == 4
    assert "The atom prior holds" not in caplog.text  # 4096 atoms would cover the 1797 digits: the flow instead

    # The pipeline loads through both routes and samples images.
    pipe = VRFMPipeline.from_pretrained(output_dir)
    assert isinstance(pipe.prior, VRFMFlowPrior) and pipe.prior.condition_dim == 0
    assert isinstance(pipe.velocity_model, VRFMUNet2DModel) and pipe.velocity_model.latent_dim == 3
    assert pipe.velocity_model.z_map.grid == (1, 4, 4)
    assert pipe.posterior_encoder is not None
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (8, 8)
    remote = DiffusionPipeline.from_pretrained(output_dir, trust_remote_code=True)
    assert type(remote).__name__ == "VRFMPipeline"

    # The saved weights are the EMA weights of the last checkpoint, not the raw ones.
    ((step, checkpoint),) = list_checkpoints(output_dir)  # checkpoints_total_limit=1
    assert step == 4
    verify_checkpoint(checkpoint, ("velocity_model", "posterior_encoder", "ema_velocity_model"))
    saved = load_file(glob.glob(os.path.join(output_dir, "velocity_model", "*.safetensors"))[0])
    ema = load_file(glob.glob(os.path.join(checkpoint, "ema_velocity_model", "*.safetensors"))[0])
    raw = load_file(glob.glob(os.path.join(checkpoint, "velocity_model", "*.safetensors"))[0])
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)

    # Model card with valid metadata, the grid, logs.
    metadata = read_card_metadata(os.path.join(output_dir, "README.md"))
    assert metadata["library_name"] == "diffusers" and {"vrfm", "rectified-flow"} <= set(metadata["tags"])
    card = open(os.path.join(output_dir, "README.md")).read()
    assert "train_vrfm.py --output_dir" in card and "| train loss (mean of last 4 steps) |" in card
    # --posterior_config without `pooled_size` keeps the default 4x4 grid (8x8 images, one stage: an 8x8 last map)
    assert "its last feature map averaged to a 4x4 grid" in card
    assert "`z` also enters as input channels (a `LatentMap`: 1 channel(s) on a 4x4 grid)" in card
    grid = PIL.Image.open(os.path.join(output_dir, "sample_grid.png"))
    assert grid.format == "PNG" and grid.size[1] > grid.size[0] / 8  # 2 rows (NFE 1 and 2) of 4 samples
    assert np.asarray(grid.convert("L")).std() > 0
    assert os.path.isfile(os.path.join(output_dir, "validation", "step_000002.png"))
    assert glob.glob(os.path.join(output_dir, "logs", "train_vrfm", "events.out.tfevents.*"))
    metrics = read_metrics(output_dir)
    assert sorted(metrics) == [1, 2, 3, 4]
    for key in ("loss", "mse", "kl", "kl_nats", "lr", "active_units", "kl_dim/0", "kl_dim/2", "grad_norm"):
        assert key in metrics[4], key
    assert all(np.isfinite(m["loss"]) for m in metrics.values())
    assert metrics[1]["lr"] < metrics[2]["lr"], "the learning rate warms up"


def test_vector_run_and_push_to_hub_without_network(tmp_path, train, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = {}

    class Repo:
        repo_id = "someone/tiny-ring"

    def fake_create_repo(repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return Repo()

    def fake_upload_folder(*, repo_id, folder_path, ignore_patterns, **kwargs):
        files = []
        for root, _, names in os.walk(folder_path):
            files += [os.path.relpath(os.path.join(root, n), folder_path).replace(os.sep, "/") for n in names]
        calls["uploaded"] = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        calls["upload_repo"] = repo_id

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    output_dir = str(tmp_path / "ring")
    argv = ["--backbone", "mlp", "--output_dir", output_dir, "--max_train_steps", "3", "--train_batch_size", "32"]
    argv += ["--checkpointing_steps", "2", "--num_validation_samples", "64", *FAST]
    argv += ["--push_to_hub", "--hub_model_id", "tiny-ring", "--hub_token", "hf_do_not_leak"]
    train(argv)

    assert calls["create_repo"][0] == "tiny-ring" and calls["create_repo"][1]["token"] == "hf_do_not_leak"
    assert calls["upload_repo"] == "someone/tiny-ring"
    uploaded = calls["uploaded"]
    for required in (
        "model_index.json",
        "pipeline.py",
        "README.md",
        "samples.png",
        "velocity_model/config.json",
        "velocity_model/diffusion_pytorch_model.safetensors",
        "posterior_encoder/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ):
        assert required in uploaded, required
    for component in ("velocity_model", "posterior_encoder", "scheduler"):
        assert [f for f in uploaded if f.startswith(component + "/") and f.endswith(".py")], "remote-code file"
    assert not [f for f in uploaded if f.startswith(("checkpoint-", "logs/", "validation/", ".tmp"))], uploaded
    assert os.path.isdir(os.path.join(output_dir, "checkpoint-2")), "checkpoints exist locally, just not uploaded"
    card = open(os.path.join(output_dir, "README.md")).read()
    assert 'VRFMPipeline.from_pretrained("someone/tiny-ring")' in card
    assert "hf_do_not_leak" not in card
    assert "w2_nfe1" in card, "vector runs report W2 per step count"


def test_finetune_a_pretrained_backbone_and_continue_the_pipeline(tmp_path, train):
    from diffusers import UNet2DModel

    from diffusers_vrfm import VRFMPipeline

    torch.manual_seed(0)
    backbone = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    backbone.save_pretrained(str(tmp_path / "base" / "unet"))
    output_dir = str(tmp_path / "finetuned")
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "base"), "--output_dir", output_dir]
    argv += ["--max_train_steps", "2", "--train_batch_size", "8", "--posterior_config", TINY_POSTERIOR]
    argv += ["--num_validation_samples", "2", "--latent_dim", "2", "--learning_rate", "1e-4", *FAST]
    train(argv)

    pipe = VRFMPipeline.from_pretrained(output_dir)
    model = pipe.velocity_model
    assert model.latent_dim == 2 and model.sample_shape == (1, 8, 8), "resolution comes from the backbone"
    trained, original = model.unet.state_dict(), backbone.state_dict()
    assert set(trained) == set(original)
    drift = max((trained[k] - original[k]).abs().max().item() for k in original)
    assert 0 < drift < 0.01, "the backbone's weights were loaded, then fine-tuned a little"
    card = open(os.path.join(output_dir, "README.md")).read()
    assert "fine-tuned from the backbone" in card and "zero-initialised" in card
    # `--model_config` may give the wrapped backbone a z map, and nothing else: the backbone keeps its config
    from diffusers_vrfm.training.factory import build_models, inspect_pretrained

    source = inspect_pretrained(str(tmp_path / "base"))
    with_map = build_models("unet", (1, 8, 8), 2, ("x1",), model_config={"z_map_channels": 3}, pretrained=source)
    assert with_map.velocity_model.z_map.grid == (3, 8, 8)
    with pytest.raises(ValueError, match=r"when wrapping a pretrained UNet2DModel, but got \['layers_per_block'\]"):
        build_models("unet", (1, 8, 8), 2, ("x1",), model_config={"layers_per_block": 2}, pretrained=source)

    # Continue training from the saved VRFM pipeline.
    continued = str(tmp_path / "continued")
    train(["--pretrained_model_name_or_path", output_dir, "--output_dir", continued, "--max_train_steps", "1",
           "--train_batch_size", "8", "--num_validation_samples", "2", *FAST])  # fmt: skip
    again = VRFMPipeline.from_pretrained(continued)
    assert again.velocity_model.latent_dim == 2
    assert type(again.posterior_encoder) is type(pipe.posterior_encoder)
    assert "training continued from the VRFM pipeline" in open(os.path.join(continued, "README.md")).read()
    with pytest.raises(ValueError, match=r"cannot change a VRFM pipeline .* got \['z_map_channels'\]"):
        train(["--pretrained_model_name_or_path", output_dir, "--output_dir", str(tmp_path / "third"),
               "--model_config", '{"z_map_channels": 4}', *FAST])  # fmt: skip


def test_latent_space_training_with_a_vae(tmp_path, train):
    from diffusers import AutoencoderKL

    from diffusers_vrfm import VRFMPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=2,
        norm_num_groups=4,
        sample_size=16,
    )
    vae.save_pretrained(str(tmp_path / "vae"))
    output_dir = str(tmp_path / "latent")
    dit = '{"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "norm_num_groups": 2}'
    argv = ["--vae_name_or_path", str(tmp_path / "vae"), "--backbone", "dit", "--model_config", dit]
    argv += ["--posterior_config", TINY_POSTERIOR, "--output_dir", output_dir, "--resolution", "16"]
    argv += ["--max_train_steps", "2", "--train_batch_size", "4", "--num_validation_samples", "2", *FAST]
    train(argv)
    pipe = VRFMPipeline.from_pretrained(output_dir)
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert pipe.velocity_model.sample_shape == (2, 8, 8), "the model works on the VAE's latents"
    images = pipe(batch_size=2, num_inference_steps=1).images
    assert images[0].size == (16, 16) and images[0].mode == "RGB", "samples are decoded to pixels"
    grid = PIL.Image.open(os.path.join(output_dir, "sample_grid.png"))
    assert grid.size[1] >= 2 * 16, "the grid shows decoded images"
    assert "VAE" in open(os.path.join(output_dir, "README.md")).read()
    # A resolution the VAE and the DiT patches do not divide fails before training.
    with pytest.raises(
        ValueError, match="`--resolution` 14 must be a multiple of 4: the DiT cuts 2x2 patches.*VAE downsamples 2x"
    ):
        train([*argv[: argv.index("--resolution")], "--resolution", "14", "--output_dir", str(tmp_path / "bad")])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--beta", "-1"], r"`--beta` must be a finite number >= 0.*-1\.0"),
        (["--free_bits", "-0.5"], "`--free_bits`"),
        (["--label_dropout", "1.5"], "`--label_dropout`"),
        (
            ["--reencode_z_at", "-0.1"],
            r"`--reencode_z_at` must be a time in \[0, 1\], but got -0\.1",
        ),
        (["--reencode_z_at", "0.2", "--latent_dim", "0"], r"`--reencode_z_at` must be unset with --latent_dim 0"),
        (
            ["--logit_std", "0"],
            r"`--logit_std` must be a finite number > 0 for the logit-normal density, but got 0\.0",
        ),
        (
            ["--timestep_density", "mode", "--mode_scale", "-1.5"],
            r"`--mode_scale` must be in \[-1, 2 / \(pi - 2\) = 1\.7519\]",
        ),
        (["--noise_end_fraction", "1"], r"`--noise_end_fraction` must be in \[0, 1\), but got 1\.0"),
        (["--latent_dim", "-2"], "`--latent_dim`"),
        (["--backbone", "unet", "--dataset_name", "toy:ring_2d"], "needs `--backbone mlp`"),
        (["--mixed_precision", "fp16"], "`--mixed_precision`"),
        (["--posterior_inputs", "t"], "`--posterior_inputs`"),
        (["--model_config", "{not json"], "`--model_config` must be a JSON object"),
    ],
)
def test_bad_arguments_fail_in_parse_args(argv, message):
    script = load_script()
    if "fp16" in argv and torch.cuda.is_available():
        pytest.skip("fp16 is valid with a GPU")
    with pytest.raises(ValueError, match=message):
        script.parse_args(argv)


def test_time_density_flags_reach_the_training_scheduler():
    from diffusers_vrfm.training.model_setup import training_noise_scheduler

    flags = {"timestep_density": "mode", "logit_mean": 0.3, "logit_std": 1.5, "mode_scale": -0.5}
    flags["noise_end_fraction"] = 0.25
    argv = [str(item) for name, value in flags.items() for item in (f"--{name}", value)]
    scheduler = training_noise_scheduler(load_script().parse_args(argv))
    assert {name: scheduler.config[name] for name in flags} == flags


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "10"], r"`--resolution` 10 must be a multiple of 4: the UNet halves the resolution 2 times"),
        (["--backbone", "dit", "--resolution", "9"], r"`--resolution` 9 must be a multiple of 2: the DiT cuts 2x2"),
        (["--image_column", "pixels"], r"`--image_column` 'pixels' is not a column"),
        (["--class_conditional", "--label_column", "kind"], r"`--label_column` 'kind' is not a column"),
    ],
)
def test_bad_data_or_model_arguments_fail_before_training(tmp_path, train, extra, message):
    folder = make_image_folder(str(tmp_path / "images"), num_per_class=2)
    output_dir = str(tmp_path / "out")
    with pytest.raises(ValueError, match=message):
        train(["--train_data_dir", folder, "--output_dir", output_dir, *FAST, *extra])
    assert not os.path.exists(os.path.join(output_dir, "logs", "metrics.jsonl")), "no training step ran"
    assert not list_checkpoints(output_dir)
    for folder in ("logs", "validation"):
        assert not os.path.exists(os.path.join(output_dir, folder)), f"a failed run leaves no empty {folder}/"


def test_bf16_on_cpu_runs_and_warns_where_bf16_is_emulated(tmp_path, train, caplog):
    from diffusers_vrfm.training.environment import cpu_has_native_bf16

    if torch.cuda.is_available():
        pytest.skip("the warning is for CPU runs")
    output_dir = str(tmp_path / "bf16")
    summary = train(
        ["--backbone", "mlp", "--output_dir", output_dir, "--max_train_steps", "1", "--train_batch_size", "8",
         "--mixed_precision", "bf16", "--aggregate_prior_atoms", "0", "--num_validation_samples", "8", *FAST]
    )  # fmt: skip
    assert summary["finished"]
    warned = "`--mixed_precision bf16` on a CPU without native bf16" in caplog.text
    assert warned == (not cpu_has_native_bf16())
