"""`train_vrfm.py` on text-to-image: LoRA and full fine-tuning of a tiny SD3 pipeline, a small model from scratch,
imagefolder captions, the text-embedding cache, and what each run saves."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from text_to_image_helpers import tiny_stock_sd3_pipeline
from train_helpers import FAST, assert_same_tensors, count_forward_calls, read_card_metadata, train_runner

from diffusers_vrfm import VRFMTextEncoders, VRFMTextToImagePipeline
from diffusers_vrfm.lora import read_vrfm_adapter_config
from diffusers_vrfm.training.text_data import TextEmbeddingCache, digit_caption
from diffusers_vrfm.training.text_to_image import text_validation_grid
from diffusers_vrfm.training.visuals import fixed_validation_inputs

TINY_SCRATCH = json.dumps({"num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2})
SHORT = [*FAST, "--max_train_steps", "3", "--train_batch_size", "4", "--max_train_samples", "16"]
SHORT += ["--num_validation_samples", "3", "--aggregate_prior_atoms", "8", "--validation_steps", "100"]


@pytest.fixture
def train():
    yield from train_runner()


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """A stock StableDiffusion3Pipeline folder (two tiny CLIPs, no T5: saved as absent, as SD3 users often do)."""
    folder = str(tmp_path_factory.mktemp("tiny-sd3"))
    tiny_stock_sd3_pipeline(with_t5=False).save_pretrained(folder)
    return folder


def _final_grid_again(pipeline, output_dir: str, seed: int = 0, count: int = 3) -> np.ndarray:
    """The final sample grid, made again from a loaded pipeline with the run's fixed validation inputs."""
    captions = [digit_caption(label) for label in range(10)]
    cache = TextEmbeddingCache(captions, VRFMTextEncoders.from_pipeline(pipeline))
    prompts = [sorted(captions)[i % 10] for i in range(count)]
    shape = pipeline.velocity_model.sample_shape
    x0, z = fixed_validation_inputs(seed, count, shape[:1] + (8, 8), pipeline.velocity_model.latent_dim)
    return np.asarray(text_validation_grid(pipeline, prompts, cache, x0, z, [1, 2], seed))


def test_lora_run_saves_an_adapter_that_loads_on_the_base_with_one_call(train, sd3_folder, tmp_path):
    output_dir = tmp_path / "lora"
    argv = ["--pretrained_model_name_or_path", sd3_folder, "--rank", "2", "--latent_dim", "4", "--resolution", "16"]
    argv += ["--model_config", '{"z_map_channels": 2}']  # a z map: the one setting a pretrained model takes
    summary = train([*argv, "--cache_latents", "--output_dir", output_dir, *SHORT])
    assert summary["finished"]
    names = set(os.listdir(output_dir))
    adapter_files = {"vrfm_adapter.json", "lora_weights.safetensors", "z_path.safetensors", "posterior_encoder"}
    assert adapter_files | {"prior"} <= names
    assert "model_index.json" not in names  # an adapter, not a copy of the base
    assert {"logs", "README.md", "sample_grid.png"} <= names  # the run's own files are kept

    # The documented call; this base was saved without its T5, which its loader must be told (a Hub SD3 has one).
    pipeline = VRFMTextToImagePipeline.from_vrfm_adapter(output_dir, text_encoder_3=None, tokenizer_3=None)
    stock = tiny_stock_sd3_pipeline(with_t5=False)
    base_weights = stock.transformer.state_dict()
    for name, value in pipeline.velocity_model.transformer.state_dict().items():
        in_z_path = name.startswith("pos_embed.proj.")  # the patch embedding reads the z map: part of the z path
        if "lora_" not in name and "base_layer" not in name and name in base_weights and not in_z_path:
            assert torch.equal(value, base_weights[name]), f"{name} changed: LoRA must leave the base frozen"
    assert pipeline.velocity_model.z_embedding.linear_2.weight.abs().sum() > 0  # the zero-initialised z path trained
    assert pipeline.velocity_model.z_map.linear.weight.abs().sum() > 0  # and so did the z map
    assert read_vrfm_adapter_config(output_dir)["z_map_channels"] == 2
    card = (output_dir / "README.md").read_text()
    assert sd3_folder in card  # the card names the base
    assert "VRFMTextToImagePipeline.from_vrfm_adapter(" in card and "trust_remote_code" not in card
    assert read_card_metadata(output_dir / "README.md")["pipeline_tag"] == "text-to-image"

    # The loaded adapter reproduces the run's final samples exactly.
    pipeline.set_progress_bar_config(disable=True)
    saved = np.asarray(PIL.Image.open(output_dir / "sample_grid.png").convert("RGB"))
    again = _final_grid_again(pipeline, str(output_dir))
    np.testing.assert_array_equal(saved, again)


def test_lora_run_with_gradient_checkpointing_recomputes_the_blocks_and_learns_the_same(
    train, sd3_folder, tmp_path, monkeypatch
):
    from diffusers.models.attention import JointTransformerBlock
    from safetensors.torch import load_file

    calls = count_forward_calls(monkeypatch, JointTransformerBlock)
    argv = ["--pretrained_model_name_or_path", sd3_folder, "--rank", "2", "--latent_dim", "4", "--resolution", "16"]
    runs = {}
    for name, extra in (("plain", []), ("checkpointed", ["--gradient_checkpointing"])):
        calls["count"] = 0
        assert train([*argv, "--output_dir", tmp_path / name, *SHORT, *extra])["finished"]
        runs[name] = calls["count"], load_file(str(tmp_path / name / "lora_weights.safetensors"))
    (plain_calls, plain), (checkpointed_calls, checkpointed) = runs["plain"], runs["checkpointed"]
    assert checkpointed_calls > plain_calls, "the backward passes run the transformer's blocks again"
    assert_same_tensors(checkpointed, plain)


def test_full_fine_tune_saves_the_whole_pipeline_and_its_card_names_the_base(train, sd3_folder, tmp_path):
    output_dir = tmp_path / "full"
    argv = ["--pretrained_model_name_or_path", sd3_folder, "--latent_dim", "4", "--resolution", "16"]
    train([*argv, "--output_dir", output_dir, *SHORT])
    with open(output_dir / "model_index.json", encoding="utf-8") as handle:
        assert json.load(handle)["_class_name"][-1] == "VRFMTextToImagePipeline"
    pipeline = VRFMTextToImagePipeline.from_pretrained(output_dir)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline("a handwritten seven", num_inference_steps=2, output_type="pt").samples
    assert images.shape == (1, 3, 16, 16)
    stock = tiny_stock_sd3_pipeline(with_t5=False).transformer.state_dict()
    trained = pipeline.velocity_model.transformer.state_dict()
    assert any(not torch.equal(trained[name], stock[name]) for name in stock)  # the backbone itself trained
    card = (output_dir / "README.md").read_text()
    assert sd3_folder in card and "VRFMTextToImagePipeline.from_pretrained(" in card
    assert "base_model" not in read_card_metadata(output_dir / "README.md")  # a local folder is no Hub id


def test_from_scratch_encodes_each_distinct_caption_once(train, tmp_path, monkeypatch):
    encoded = []
    original = VRFMTextEncoders.encode

    def counting_encode(self, prompt, device=None):
        encoded.extend([prompt] if isinstance(prompt, str) else prompt)
        return original(self, prompt, device=device)

    monkeypatch.setattr(VRFMTextEncoders, "encode", counting_encode)
    output_dir = tmp_path / "scratch"
    summary = train(["--backbone", "sd3", "--model_config", TINY_SCRATCH, "--output_dir", output_dir, *SHORT,
                     "--max_train_samples", "64", "--validation_steps", "2",
                     "--aggregate_prior_type", "atoms"])  # fmt: skip
    assert summary["finished"]
    # each caption once, no more; the second "" is the final check's four samples of the empty prompt
    assert sorted(encoded) == sorted(["", "", *{digit_caption(label) for label in range(10)}])
    assert (output_dir / "validation" / "step_000002.png").is_file()
    pipeline = VRFMTextToImagePipeline.from_pretrained(output_dir)  # tokenizer and text encoder built by the run
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline("a handwritten three", num_inference_steps=2, output_type="pt").samples.shape == (1, 1, 16, 16)
    assert pipeline.velocity_model.z_map.grid == (4, 16, 16)  # a from-scratch model gets the z map by default
    assert pipeline.velocity_model.z_map.linear.weight.abs().sum() > 0  # and trained it
    # the prior keeps each atom's caption (its pooled embedding): a prompt draws z among its caption's atoms
    cache = TextEmbeddingCache([digit_caption(label) for label in range(10)], VRFMTextEncoders.from_pipeline(pipeline))
    pooled = cache.lookup(["", *(digit_caption(label) for label in range(10))]).pooled_prompt_embeds
    assert pipeline.prior.condition_dim == pooled.shape[1]
    distances = torch.cdist(pipeline.prior.atom_conditions, pooled)
    assert torch.allclose(distances.min(dim=1).values, torch.zeros(8), atol=1e-4)
    assert (
        "each with its example's caption; a trajectory draws among the atoms of its prompt"
        in (output_dir / "README.md").read_text()
    )


def test_a_text_to_image_flow_prior_is_conditional_on_the_prompt(train, tmp_path, monkeypatch):
    output_dir = tmp_path / "flow"
    argv = ["--backbone", "sd3", "--model_config", TINY_SCRATCH, "--output_dir", output_dir, *SHORT]
    assert train([*argv, "--aggregate_prior_type", "flow", "--flow_prior_steps", "5"])["finished"]
    pipeline = VRFMTextToImagePipeline.from_pretrained(output_dir)
    pipeline.set_progress_bar_config(disable=True)
    pooled = pipeline.encode_prompt("a handwritten three", do_classifier_free_guidance=False)[0].pooled_prompt_embeds
    assert type(pipeline.prior).__name__ == "VRFMFlowPrior" and pipeline.prior.condition_dim == pooled.shape[1]
    asked = []
    original = type(pipeline.prior).forward

    def recording_forward(prior, *args, **kwargs):
        asked.append(kwargs.get("condition"))
        return original(prior, *args, **kwargs)

    monkeypatch.setattr(type(pipeline.prior), "forward", recording_forward)
    pipeline("a handwritten three", num_inference_steps=1, num_images_per_prompt=2, output_type="pt")
    (condition,) = asked
    assert torch.allclose(condition, pooled.expand(2, -1)), "the prompt's pooled embedding picks p(z | prompt)"
    assert "a trajectory draws from the flow's `p(z | prompt)`" in (output_dir / "README.md").read_text()


def test_caption_dropout_trains_whole_batch_rows_on_the_empty_caption(train, tmp_path, monkeypatch):
    from diffusers_vrfm.training import loop as training_loop

    seen = []
    original = training_loop.drop_captions

    def recording(model_kwargs, drop, empty):
        seen.append((model_kwargs, drop, empty, original(model_kwargs, drop, empty)))
        return seen[-1][-1]

    monkeypatch.setattr(training_loop, "drop_captions", recording)
    argv = ["--backbone", "sd3", "--model_config", TINY_SCRATCH, *SHORT, "--train_batch_size", "8"]
    train([*argv, "--output_dir", tmp_path / "half", "--caption_dropout", "0.5"])
    drops = torch.cat([drop for _, drop, _, _ in seen])
    assert len(seen) == 3 and 0 < drops.float().mean() < 1, "one mask per step, dropping some rows of 24"
    for kwargs, drop, empty, out in seen:
        assert set(out) == {"encoder_hidden_states", "pooled_projections"}
        for key, value in out.items():
            assert torch.equal(value[drop], empty[key].expand_as(value[drop])), "a dropped row is the empty caption's"
            assert torch.equal(value[~drop], kwargs[key][~drop]), "the others keep their captions"
    assert not torch.equal(seen[0][0]["pooled_projections"][:1], seen[0][2]["pooled_projections"]), "captions differ"
    seen.clear()
    train([*argv, "--output_dir", tmp_path / "none", "--caption_dropout", "0"])
    assert seen == [], "no caption dropout: nothing replaced"


def test_imagefolder_captions_from_metadata_jsonl(train, tmp_path):
    folder = tmp_path / "captioned"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as handle:
        for index in range(8):
            PIL.Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{index}.png")
            color = ("red", "blue")[index % 2]
            handle.write(json.dumps({"file_name": f"{index}.png", "description": f"a {color} square"}) + "\n")
    output_dir = tmp_path / "out"
    base = ["--backbone", "sd3", "--model_config", TINY_SCRATCH, "--train_data_dir", folder]
    base += ["--output_dir", output_dir]
    with pytest.raises(ValueError, match="no caption column"):
        train([*base, *SHORT])
    train([*base, "--caption_column", "description", *SHORT])
    pipeline = VRFMTextToImagePipeline.from_pretrained(output_dir)
    assert pipeline.tokenizer.convert_tokens_to_ids("blue") != pipeline.tokenizer.unk_token_id


def test_bad_text_to_image_arguments_are_named(train, sd3_folder, tmp_path):
    from diffusers_vrfm.training.cli import parse_args

    with pytest.raises(ValueError, match="--rank"):
        parse_args(["--rank", "0"])
    with pytest.raises(ValueError, match="--random_flip"):
        parse_args(["--cache_latents", "--random_flip"])
    scratch = ["--backbone", "sd3", "--model_config", TINY_SCRATCH, "--output_dir", tmp_path / "x", *SHORT]
    with pytest.raises(ValueError, match="--rank.*pretrained"):
        train([*scratch, "--rank", "2"])
    with pytest.raises(ValueError, match="--cache_latents.*VAE"):
        train([*scratch, "--cache_latents"])
    pretrained = ["--pretrained_model_name_or_path", sd3_folder, "--output_dir", tmp_path / "y", *SHORT]
    with pytest.raises(ValueError, match=r"can only set \['z_map_channels', 'z_map_stride'\] .* got \['num_layers'\]"):
        train([*pretrained, "--model_config", '{"num_layers": 3}'])


def test_lora_run_resumes_exactly(train, sd3_folder, tmp_path):
    """A LoRA checkpoint (whose velocity model has peft layers) resumes to the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    argv = ["--pretrained_model_name_or_path", sd3_folder, "--rank", "2", "--latent_dim", "4", "--resolution", "16"]
    argv += ["--cache_latents", *SHORT, "--max_train_steps", "4", "--checkpointing_steps", "2"]
    train([*argv, "--output_dir", tmp_path / "straight"])
    train([*argv, "--output_dir", tmp_path / "resumed", "--stop_after_steps", "2"])
    train([*argv, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint", "latest"])
    for name in ("lora_weights.safetensors", "z_path.safetensors"):
        straight, resumed = (load_file(tmp_path / run / name) for run in ("straight", "resumed"))
        assert straight.keys() == resumed.keys()
        assert all(torch.equal(straight[key], resumed[key]) for key in straight), name


@pytest.mark.slow  # inductor compiles the tiny SD3 transformer's C++ kernels: about a minute on a small machine
def test_lora_run_with_torch_compile_trains_the_compiled_loss(train, sd3_folder, tmp_path):
    """`--torch_compile` compiles the step's loss with the LoRA-wrapped SD3 transformer and its text inputs inside."""
    output_dir = tmp_path / "compiled"
    argv = ["--pretrained_model_name_or_path", sd3_folder, "--rank", "2", "--latent_dim", "4", "--resolution", "16"]
    summary = train([*argv, "--cache_latents", "--torch_compile", "--output_dir", output_dir, *SHORT])
    assert summary["finished"]
    records = [json.loads(line) for line in open(output_dir / "logs" / "metrics.jsonl", encoding="utf-8")]
    assert [record["step"] for record in records] == [1, 2, 3]
    assert all(np.isfinite(record["loss"]) and record["kl"] >= 0 for record in records)
