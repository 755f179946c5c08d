"""Captions for text-to-image training (column, imagefolder metadata.jsonl, digits) and the embedding caches."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from text_to_image_helpers import tiny_clip, tiny_vae

from diffusers_vrfm import VRFMTextEncoders
from diffusers_vrfm.training.data import ArrayImageSource, load_digits_source, load_hf_source
from diffusers_vrfm.training.text_data import (
    TextEmbeddingCache,
    digit_caption,
    digit_caption_words,
    encode_vae_latents,
    source_captions,
)

torch.set_num_threads(1)


def test_digit_captions_follow_the_labels():
    source = load_digits_source().subset(20)
    captions = source_captions(source)
    assert captions == [digit_caption(source.label(i)) for i in range(20)]
    assert captions[0] == "a handwritten zero" and set(" ".join(captions).split()) <= set(digit_caption_words())
    with pytest.raises(ValueError, match="`label` must be a digit 0-9, but got 10"):
        digit_caption(10)
    with pytest.raises(ValueError, match="does not apply to builtin:digits"):
        source_captions(source, caption_column="text")
    with pytest.raises(ValueError, match="has no captions"):
        source_captions(ArrayImageSource(np.zeros((2, 4, 4), dtype=np.uint8), name="arrays"))


def test_imagefolder_metadata_captions(tmp_path):
    captions = ["a handwritten seven", "a blurry one", "a handwritten three"]
    with open(tmp_path / "metadata.jsonl", "w") as handle:
        for index, caption in enumerate(captions):
            PIL.Image.fromarray(np.full((8, 8, 3), 40 * index, dtype=np.uint8)).save(tmp_path / f"{index}.png")
            handle.write(json.dumps({"file_name": f"{index}.png", "text": caption, "score": index}) + "\n")
    source = load_hf_source(train_data_dir=str(tmp_path))
    by_file = sorted(zip(source.dataset["text"], [np.asarray(source.image(i))[0, 0, 0] for i in range(3)]),
                     key=lambda pair: pair[1])  # fmt: skip
    assert [caption for caption, _ in by_file] == captions
    assert sorted(source_captions(source)) == sorted(captions)
    with pytest.raises(ValueError, match="`--caption_column` 'prompt' is not a column"):
        source_captions(source, caption_column="prompt")
    with pytest.raises(ValueError, match="must hold strings, but it holds 0"):
        source_captions(source, caption_column="score")


def test_text_embedding_cache_matches_direct_encoding():
    tokenizer, text_encoder = tiny_clip()
    encoders = VRFMTextEncoders(tokenizer, text_encoder, context_dim=16)
    captions = ["a handwritten seven", "a handwritten three", "a handwritten seven"]
    cache = TextEmbeddingCache(captions, encoders, batch_size=2)
    assert len(cache) == 3  # two distinct captions and the empty one
    direct = encoders.encode(["a handwritten three", "", "a handwritten seven"])
    looked_up = cache.lookup(["a handwritten three", "", "a handwritten seven"])
    assert torch.allclose(looked_up.prompt_embeds, direct.prompt_embeds, atol=1e-6)
    assert torch.allclose(looked_up.pooled_prompt_embeds, direct.pooled_prompt_embeds, atol=1e-6)
    with pytest.raises(KeyError, match="not in the cache"):
        cache.lookup(["a handwritten two"])


def test_vae_latents_are_the_shifted_and_scaled_posterior_mean():
    vae = tiny_vae()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    latents = encode_vae_latents(images, vae, batch_size=2)
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
    assert torch.allclose(latents, (mean - 0.1) * 1.5, atol=1e-6)
    with pytest.raises(ValueError, match=r"`images` must be a \(N, C, H, W\) tensor"):
        encode_vae_latents(images[0], vae)
