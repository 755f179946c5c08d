"""Captioned data for text-to-image training: captions from a dataset column, an imagefolder's `metadata.jsonl` or
the builtin digits ("a handwritten seven"), and caches of text embeddings and VAE latents computed once."""

from __future__ import annotations

import torch

from ..text_encoding import VRFMPromptEmbeddings, VRFMTextEncoders, as_prompt_list
from .data import ArrayImageSource, HFImageSource, ImageSource

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_COLUMN_CANDIDATES = ("text", "caption", "captions", "prompt")


def digit_caption(label: int) -> str:
    """The caption of a digit image.

    Example:

    ```py
    >>> from diffusers_vrfm.training.text_data import digit_caption
    >>> digit_caption(7)
    'a handwritten seven'
    ```
    """
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 9:
        raise ValueError(f"`label` must be a digit 0-9, but got {label!r}.")
    return f"a handwritten {DIGIT_NAMES[label]}"


def digit_caption_words() -> list[str]:
    """Every word of the digit captions: the vocabulary of a word-level tokenizer for them."""
    return ["a", "handwritten", *DIGIT_NAMES]


def source_captions(source: ImageSource, caption_column: str | None = None) -> list[str]:
    """One caption per image of `source`.

    A `datasets` source (a Hub dataset, or an imagefolder whose `metadata.jsonl` has a caption field) reads
    `caption_column`, by default the first of `"text"`, `"caption"`, `"captions"`, `"prompt"` it has. The builtin
    digits get `"a handwritten <digit>"` from their labels.
    """
    if isinstance(source, HFImageSource):
        columns = list(source.dataset.column_names)
        if caption_column is None:
            caption_column = next((c for c in CAPTION_COLUMN_CANDIDATES if c in columns), None)
            if caption_column is None:
                raise ValueError(
                    f"The dataset {source.name!r} has no caption column (looked for {CAPTION_COLUMN_CANDIDATES}; its "
                    f"columns are {columns}); pass `--caption_column`, or add a 'text' field to metadata.jsonl."
                )
        elif caption_column not in columns:
            raise ValueError(
                f"`--caption_column` {caption_column!r} is not a column of the dataset {source.name!r}; its columns "
                f"are {columns}."
            )
        captions = source.dataset[caption_column]
        bad = next((value for value in captions if not isinstance(value, str)), None)
        if bad is not None:
            raise ValueError(f"`--caption_column` {caption_column!r} must hold strings, but it holds {bad!r}.")
        return list(captions)
    if isinstance(source, ArrayImageSource) and source.name == "builtin:digits":
        if caption_column is not None:
            raise ValueError("`--caption_column` does not apply to builtin:digits, whose captions come from labels.")
        return [digit_caption(source.label(index)) for index in range(len(source))]
    raise ValueError(f"The dataset {source.name!r} has no captions: use a dataset with a caption column.")


class TextEmbeddingCache:
    """Text embeddings of every distinct caption, computed once by frozen text encoders, looked up per batch.

    Example:

    ```py
    >>> from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    >>> from diffusers_vrfm import VRFMTextEncoders, word_level_tokenizer
    >>> from diffusers_vrfm.training.text_data import TextEmbeddingCache, digit_caption, digit_caption_words
    >>> tokenizer = word_level_tokenizer(digit_caption_words(), model_max_length=4)
    >>> encoder = CLIPTextModelWithProjection(CLIPTextConfig(
    ...     vocab_size=tokenizer.vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...     num_attention_heads=2, max_position_embeddings=4, projection_dim=4, eos_token_id=tokenizer.eos_token_id,
    ... ))
    >>> cache = TextEmbeddingCache([digit_caption(i % 10) for i in range(100)], VRFMTextEncoders(tokenizer, encoder))
    >>> len(cache), cache.lookup(["a handwritten two", ""]).prompt_embeds.shape
    (11, torch.Size([2, 4, 8]))
    ```

    The empty caption (the unconditional prompt of classifier-free guidance) is always cached.
    """

    def __init__(self, captions: list[str], text_encoders: VRFMTextEncoders, batch_size: int = 64, device=None):
        unique = list(dict.fromkeys(["", *as_prompt_list(captions, "captions")]))
        starts = range(0, len(unique), batch_size)
        parts = [text_encoders.encode(unique[start : start + batch_size], device=device) for start in starts]
        self.index = {caption: position for position, caption in enumerate(unique)}
        self.embeddings = VRFMPromptEmbeddings(
            prompt_embeds=torch.cat([part.prompt_embeds for part in parts]).cpu(),
            pooled_prompt_embeds=torch.cat([part.pooled_prompt_embeds for part in parts]).cpu(),
        )

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, captions: list[str]) -> VRFMPromptEmbeddings:
        """The cached embeddings of `captions` (each must have been cached)."""
        missing = [caption for caption in captions if caption not in self.index]
        if missing:
            raise KeyError(f"Captions not in the cache: {missing[:3]}.")
        return self.embeddings[torch.tensor([self.index[caption] for caption in captions], dtype=torch.long)]


@torch.no_grad()
def encode_vae_latents(images: torch.Tensor, vae, batch_size: int = 32) -> torch.Tensor:
    """The model-space latents of images in `[-1, 1]`: the VAE posterior's mean, shifted and scaled as SD3's
    training does (``(mean - shift_factor) * scaling_factor``), on the CPU in float32. The inverse of
    `VRFMPipeline.decode` up to the VAE's reconstruction error; compute them once and cache them."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"`images` must be a (N, C, H, W) tensor, but got {getattr(images, 'shape', images)!r}.")
    scaling = getattr(vae.config, "scaling_factor", 1.0)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device=vae.device, dtype=vae.dtype)
        mean = vae.encode(batch).latent_dist.mean
        latents.append(((mean - shift) * scaling).float().cpu())
    return torch.cat(latents)
