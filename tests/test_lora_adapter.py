"""LoRA fine-tuning of a wrapped SD3 transformer through peft, and the VRFM adapter folder round trip."""

import fnmatch
import shutil

import huggingface_hub
import pytest
import torch
from text_to_image_helpers import tiny_stock_sd3_pipeline, tiny_text_pipeline

from diffusers_vrfm import VRFMConvPosteriorEncoder, VRFMTextEncoders, VRFMTextToImagePipeline
from diffusers_vrfm.lora import ADAPTER_CONFIG_NAME, load_vrfm_adapter, read_vrfm_adapter_config, save_vrfm_adapter
from diffusers_vrfm.training.lora import prepare_lora_training
from diffusers_vrfm.training.step import vrfm_training_loss
from diffusers_vrfm.training.text_data import TextEmbeddingCache, encode_vae_latents

torch.set_num_threads(1)
CAPTIONS = ["a handwritten seven", "a handwritten three", "a blurry one", "a handwritten zero"]


def _snapshot(*modules):
    return [{name: value.detach().clone() for name, value in module.state_dict().items()} for module in modules]


def _fine_tune(pipe, posterior, steps=3):
    """A few LoRA steps on cached latents and text embeddings; returns the optimised parameters."""
    parameters = prepare_lora_training(pipe.velocity_model, posterior, rank=2)
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(len(CAPTIONS), 3, 16, 16, generator=generator) * 2 - 1
    latents = encode_vae_latents(images, pipe.vae)
    text = TextEmbeddingCache(CAPTIONS, VRFMTextEncoders.from_pipeline(pipe)).lookup(CAPTIONS)
    model_kwargs = {"encoder_hidden_states": text.prompt_embeds, "pooled_projections": text.pooled_prompt_embeds}
    pipe.velocity_model.train()
    for _ in range(steps):
        x0 = torch.randn(latents.shape, generator=generator)
        t = torch.rand(len(latents), generator=generator)
        loss = vrfm_training_loss(pipe.velocity_model, posterior, x0, latents, t, beta=0.1, model_kwargs=model_kwargs)
        optimizer.zero_grad()
        loss.loss.loss.backward()
        optimizer.step()
    pipe.velocity_model.eval()
    return parameters


def _sample(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(CAPTIONS[:2], guidance_scale=2.0, num_inference_steps=2, max_sequence_length=6,
                generator=torch.Generator().manual_seed(4), output_type="latent").images  # fmt: skip


def test_lora_fine_tune_changes_only_adapter_z_path_and_posterior_and_round_trips(tmp_path):
    stock = tiny_stock_sd3_pipeline()
    stock.save_pretrained(tmp_path / "base")
    pipe = VRFMTextToImagePipeline.from_stable_diffusion_3(str(tmp_path / "base"), latent_dim=4)
    posterior = VRFMConvPosteriorEncoder(sample_size=8, in_channels=4, latent_dim=4, block_out_channels=(8,))
    frozen = (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae)
    before_frozen = _snapshot(*frozen)
    before_base = _snapshot(pipe.velocity_model)[0]
    before_posterior = _snapshot(posterior)[0]
    parameters = _fine_tune(pipe, posterior)

    after = pipe.velocity_model.state_dict()
    lora_names = [name for name in after if "lora_" in name]
    originals = {name.replace(".base_layer", ""): value for name, value in after.items() if "lora_" not in name}
    assert originals.keys() == before_base.keys()
    moved = sorted(name for name, value in originals.items() if not torch.equal(value, before_base[name]))
    assert moved and all(name.startswith("z_embedding.") for name in moved), moved[:5]  # the backbone stayed frozen
    assert len(lora_names) == 2 * 4 * 2  # A and B of to_q, to_k, to_v, to_out.0 in each of the 2 blocks
    assert all(after[name].abs().sum() > 0 for name in lora_names if "lora_B" in name)  # zero-initialised, trained
    assert any(not torch.equal(v, before_posterior[k]) for k, v in posterior.state_dict().items())
    for module, snapshot in zip(frozen, before_frozen):
        assert all(torch.equal(v, snapshot[k]) for k, v in module.state_dict().items())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in parameters)

    pipe.register_modules(posterior_encoder=posterior)
    expected = _sample(pipe)
    save_vrfm_adapter(tmp_path / "adapter", pipe)
    record = read_vrfm_adapter_config(tmp_path / "adapter")
    assert record["base_model"] == str(tmp_path / "base") and record["base_format"] == "stable_diffusion_3"
    assert record["lora"]["target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(
        [ADAPTER_CONFIG_NAME, "lora_weights.safetensors", "z_path.safetensors", "posterior_encoder"]
    )
    adapter_bytes = sum(p.stat().st_size for p in (tmp_path / "adapter").rglob("*.safetensors"))
    assert adapter_bytes < sum(p.stat().st_size for p in (tmp_path / "base" / "transformer").rglob("*.safetensors"))

    reloaded = VRFMTextToImagePipeline.from_vrfm_adapter(tmp_path / "adapter")
    assert torch.equal(_sample(reloaded), expected)
    assert not torch.allclose(_sample(VRFMTextToImagePipeline.from_stable_diffusion_3(stock, latent_dim=4)), expected)
    reloaded_posterior = reloaded.posterior_encoder.state_dict()
    assert all(torch.equal(v, reloaded_posterior[k]) for k, v in posterior.state_dict().items())
    assert record["reencode_z_at"] is None and reloaded.config.reencode_z_at is None
    pipe.set_default_reencode_z_at(0.3)  # as `train_vrfm.py --reencode_z_at 0.3` saves a run
    save_vrfm_adapter(tmp_path / "reencoding", pipe)
    assert VRFMTextToImagePipeline.from_vrfm_adapter(tmp_path / "reencoding").config.reencode_z_at == 0.3


def test_adapter_on_a_vrfm_pipeline_folder_and_mismatches_are_refused(tmp_path):
    base = tiny_text_pipeline()
    base.save_pretrained(tmp_path / "base")
    pipe = VRFMTextToImagePipeline.from_pretrained(tmp_path / "base")
    _fine_tune(pipe, VRFMConvPosteriorEncoder(sample_size=8, in_channels=4, latent_dim=4, block_out_channels=(8,)), 2)
    save_vrfm_adapter(tmp_path / "adapter", pipe)
    assert read_vrfm_adapter_config(tmp_path / "adapter")["base_format"] == "vrfm"
    assert torch.equal(_sample(VRFMTextToImagePipeline.from_vrfm_adapter(tmp_path / "adapter")), _sample(pipe))

    with pytest.raises(ValueError, match="latent_dim=4, but the pipeline's velocity model is a .* latent_dim=3"):
        load_vrfm_adapter(tiny_text_pipeline(latent_dim=3), tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="is not a VRFM adapter folder"):
        VRFMTextToImagePipeline.from_vrfm_adapter(tmp_path / "base")
    with pytest.raises(ValueError, match="has no LoRA layers"):
        save_vrfm_adapter(tmp_path / "other", tiny_text_pipeline())


def test_an_adapter_with_a_z_map_carries_the_map_and_the_input_layer_that_reads_it(tmp_path):
    tiny_stock_sd3_pipeline().save_pretrained(tmp_path / "base")
    pipe = VRFMTextToImagePipeline.from_stable_diffusion_3(str(tmp_path / "base"), latent_dim=4, z_map_channels=2)
    input_before = pipe.velocity_model.transformer.pos_embed.proj.weight.detach().clone()
    _fine_tune(pipe, VRFMConvPosteriorEncoder(sample_size=8, in_channels=4, latent_dim=4, block_out_channels=(8,)), 2)
    model = pipe.velocity_model
    assert model.z_map.linear.weight.abs().sum() > 0  # the map trained (it starts at zero)
    assert not torch.equal(model.transformer.pos_embed.proj.weight, input_before)  # so did the layer that reads it
    save_vrfm_adapter(tmp_path / "adapter", pipe)
    record = read_vrfm_adapter_config(tmp_path / "adapter")
    assert (record["z_map_channels"], record["z_map_stride"]) == (2, 1)
    # a fresh conversion draws other weights for the map's input channels: the adapter brings the trained ones
    reloaded = VRFMTextToImagePipeline.from_vrfm_adapter(tmp_path / "adapter")
    reloaded_input = reloaded.velocity_model.transformer.pos_embed.proj.weight
    assert torch.equal(reloaded_input, model.transformer.pos_embed.proj.weight)
    assert torch.equal(_sample(reloaded), _sample(pipe))
    without_map = VRFMTextToImagePipeline.from_stable_diffusion_3(str(tmp_path / "base"), latent_dim=4)
    with pytest.raises(ValueError, match=r"z map \{'z_map_channels': 2, 'z_map_stride': 1\}, but the pipeline's"):
        load_vrfm_adapter(without_map, tmp_path / "adapter")


def _adapter_on_a_vrfm_base(tmp_path):
    """A base VRFM text-to-image folder, a pipeline fine-tuned from it for one step, and its adapter folder."""
    tiny_text_pipeline().save_pretrained(tmp_path / "base")
    pipe = VRFMTextToImagePipeline.from_pretrained(tmp_path / "base")
    _fine_tune(pipe, VRFMConvPosteriorEncoder(sample_size=8, in_channels=4, latent_dim=4, block_out_channels=(8,)), 1)
    save_vrfm_adapter(tmp_path / "adapter", pipe)
    return pipe, tmp_path / "adapter"


def test_adapter_loads_from_a_hub_id_in_the_local_cache(tmp_path):
    pipe, adapter = _adapter_on_a_vrfm_base(tmp_path)
    cache = tmp_path / "hub-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--you--tiny-vrfm-lora"  # the cache layout huggingface_hub reads offline
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(adapter, repo / "snapshots" / commit)
    reloaded = VRFMTextToImagePipeline.from_vrfm_adapter(
        "you/tiny-vrfm-lora", local_files_only=True, cache_dir=str(cache)
    )  # the base is the local folder the adapter records
    assert torch.equal(_sample(reloaded), _sample(pipe))
    with pytest.raises(FileNotFoundError, match="could be fetched in the local cache"):
        VRFMTextToImagePipeline.from_vrfm_adapter("you/not-cached", local_files_only=True, cache_dir=str(cache))
    with pytest.raises(FileNotFoundError, match="No such folder"):
        VRFMTextToImagePipeline.from_vrfm_adapter(str(tmp_path / "mistyped" / "adapter"))


def test_adapter_snapshot_asks_for_its_files_and_no_pickle(tmp_path, monkeypatch):
    pipe, adapter = _adapter_on_a_vrfm_base(tmp_path)
    requests = []

    def fake_snapshot_download(repo_id, **kwargs):
        requests.append((repo_id, kwargs))
        return str(adapter)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    reloaded = VRFMTextToImagePipeline.from_vrfm_adapter("you/tiny-vrfm-lora", adapter_revision="v1", token="t")
    assert torch.equal(_sample(reloaded), _sample(pipe))
    [(repo_id, kwargs)] = requests  # only the adapter is fetched: its base is a local folder
    assert repo_id == "you/tiny-vrfm-lora" and kwargs["revision"] == "v1" and kwargs["token"] == "t"
    patterns = kwargs["allow_patterns"]
    files = [str(path.relative_to(adapter)) for path in adapter.rglob("*") if path.is_file()]
    assert files and all(any(fnmatch.fnmatch(name, pattern) for pattern in patterns) for name in files), files
    assert not any(fnmatch.fnmatch("lora_weights.bin", pattern) for pattern in patterns)
