"""Prompts to text embeddings, the way SD3-class models read them: used by the text-to-image pipeline and by training.

The layout is SD3's (checked against diffusers' `StableDiffusion3Pipeline.encode_prompt`):

- each CLIP text encoder (`CLIPTextModelWithProjection`, one or two) reads its tokens padded to its maximum length;
  the context takes its penultimate hidden states (or an earlier layer with `clip_skip`), the pooled vector its
  projected `text_embeds`;
- the CLIP contexts are concatenated along the width, and the pooled vectors likewise;
- with a T5 encoder, the CLIP context is zero-padded to the T5 width and the T5 tokens (`max_sequence_length`) follow
  the CLIP tokens. Without one, the context is the CLIP tokens alone, zero-padded to `context_dim` (the velocity
  model's width). diffusers' SD3 pipeline appends `max_sequence_length` all-zero tokens instead; an SD3 transformer
  fine-tuned here without T5 learns this shorter context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput


@dataclass
class VRFMPromptEmbeddings(BaseOutput):
    """Text embeddings of a batch of prompts.

    Args:
        prompt_embeds (`torch.Tensor` of shape `(B, L, context_dim)`): the context the velocity model attends to.
        pooled_prompt_embeds (`torch.Tensor` of shape `(B, pooled_dim)`): the pooled text vector.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor

    def repeat_each(self, times: int) -> VRFMPromptEmbeddings:
        """Each prompt's embeddings `times` times in a row (`num_images_per_prompt`)."""
        return VRFMPromptEmbeddings(
            prompt_embeds=self.prompt_embeds.repeat_interleave(times, dim=0),
            pooled_prompt_embeds=self.pooled_prompt_embeds.repeat_interleave(times, dim=0),
        )

    def __getitem__(self, index):
        """`embeddings[indices]` selects prompts (an int or a string key keeps `BaseOutput`'s meaning)."""
        if isinstance(index, (str, int)):
            return super().__getitem__(index)
        return VRFMPromptEmbeddings(self.prompt_embeds[index], self.pooled_prompt_embeds[index])


def as_prompt_list(prompt, argument: str = "prompt") -> list[str]:
    """A prompt or a list of prompts as a non-empty list of strings, refusing anything else by name."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"`{argument}` must be a string or a non-empty list of strings, but got {prompt!r}.")
    return list(prompts)


def _token_length(tokenizer, text_encoder) -> int:
    """The padded CLIP token length: the tokenizer's maximum, capped by the encoder's positions."""
    return int(min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings))


def _tokenize(prompts: list[str], tokenizer, max_length: int, device) -> torch.Tensor:
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return tokens.input_ids.to(device)


def encode_clip(
    prompts: list[str], tokenizer, text_encoder, device=None, clip_skip: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(context, pooled)` of a `CLIPTextModelWithProjection`: its penultimate hidden states (or the layer
    `clip_skip` further back) and its projected `text_embeds`."""
    device = device if device is not None else text_encoder.device
    input_ids = _tokenize(prompts, tokenizer, _token_length(tokenizer, text_encoder), device)
    output = text_encoder(input_ids, output_hidden_states=True)
    context = output.hidden_states[-(2 + (clip_skip or 0))]
    return context, output[0]


def encode_t5(prompts: list[str], tokenizer, text_encoder, max_sequence_length: int, device=None) -> torch.Tensor:
    """The last hidden states of a T5 encoder over `max_sequence_length` tokens."""
    device = device if device is not None else text_encoder.device
    return text_encoder(_tokenize(prompts, tokenizer, max_sequence_length, device))[0]


def _output_width(text_encoder, names: tuple[str, ...]) -> int:
    config = text_encoder.config
    for name in names:
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"Cannot read the output width of {type(text_encoder).__name__} (no {names} in its config).")


class VRFMTextEncoders:
    """Frozen text encoders that turn prompts into [`VRFMPromptEmbeddings`] in SD3's layout (module docstring).

    Args:
        tokenizer, text_encoder: a CLIP tokenizer and `CLIPTextModelWithProjection`.
        tokenizer_2, text_encoder_2 (*optional*): a second CLIP pair (SD3's CLIP-G).
        tokenizer_3, text_encoder_3 (*optional*): a T5 tokenizer and `T5EncoderModel`.
        context_dim (`int`, *optional*): the width the context is zero-padded to (the velocity model's); the natural
            width when unset.
        max_sequence_length (`int`, defaults to 256): the number of T5 tokens.
        clip_skip (`int`, *optional*): read the CLIP layer this many layers before the penultimate one.

    Example:

    ```py
    >>> from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    >>> from diffusers_vrfm import VRFMTextEncoders, word_level_tokenizer
    >>> tokenizer = word_level_tokenizer(["a", "handwritten", "seven"], model_max_length=6)
    >>> encoder = CLIPTextModelWithProjection(CLIPTextConfig(
    ...     vocab_size=tokenizer.vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
    ...     num_attention_heads=2, max_position_embeddings=6, projection_dim=4, eos_token_id=tokenizer.eos_token_id,
    ... ))
    >>> embeddings = VRFMTextEncoders(tokenizer, encoder, context_dim=12).encode(["a handwritten seven", ""])
    >>> embeddings.prompt_embeds.shape, embeddings.pooled_prompt_embeds.shape
    (torch.Size([2, 6, 12]), torch.Size([2, 4]))
    ```
    """

    def __init__(
        self,
        tokenizer,
        text_encoder,
        tokenizer_2=None,
        text_encoder_2=None,
        tokenizer_3=None,
        text_encoder_3=None,
        context_dim: int | None = None,
        max_sequence_length: int = 256,
        clip_skip: int | None = None,
    ):
        pairs = {
            "": (tokenizer, text_encoder),
            "_2": (tokenizer_2, text_encoder_2),
            "_3": (tokenizer_3, text_encoder_3),
        }
        for suffix, pair in pairs.items():
            if (pair[0] is None) != (pair[1] is None):
                raise ValueError(f"`tokenizer{suffix}` and `text_encoder{suffix}` must be given together.")
        if text_encoder is None:
            raise ValueError("`text_encoder` (a CLIPTextModelWithProjection) and `tokenizer` are required.")
        length = max_sequence_length
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise ValueError(f"`max_sequence_length` must be a positive integer, but got {max_sequence_length!r}.")
        if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0):
            raise ValueError(f"`clip_skip` must be None or an integer >= 0, but got {clip_skip!r}.")
        self.clip = [pair for pair in (pairs[""], pairs["_2"]) if pair[1] is not None]
        self.t5 = (tokenizer_3, text_encoder_3) if text_encoder_3 is not None else None
        self.max_sequence_length = max_sequence_length
        self.clip_skip = clip_skip
        natural = self.clip_width if self.t5 is None else _output_width(text_encoder_3, ("d_model", "hidden_size"))
        if context_dim is not None and (context_dim < self.clip_width or (self.t5 and context_dim != natural)):
            raise ValueError(
                f"`context_dim` ({context_dim}) must be at least the CLIP width ({self.clip_width}) and, with a T5 "
                f"encoder, equal its width ({natural})."
            )
        self.context_dim = context_dim or natural

    @property
    def clip_width(self) -> int:
        """The width of the concatenated CLIP contexts."""
        return sum(_output_width(encoder, ("hidden_size",)) for _, encoder in self.clip)

    @property
    def pooled_dim(self) -> int:
        """The width of the pooled vector (the sum of the CLIP projection widths)."""
        return sum(_output_width(encoder, ("projection_dim", "hidden_size")) for _, encoder in self.clip)

    @classmethod
    def from_pipeline(cls, pipeline, **kwargs) -> VRFMTextEncoders:
        """The text encoders of a pipeline with SD3's component names, padded to its velocity model's width."""
        components = {
            name: getattr(pipeline, name, None)
            for suffix in ("", "_2", "_3")
            for name in (f"tokenizer{suffix}", f"text_encoder{suffix}")
        }
        kwargs.setdefault("context_dim", getattr(pipeline.velocity_model, "context_dim", None))
        return cls(**components, **kwargs)

    @torch.no_grad()
    def encode(self, prompt: str | list[str], device=None) -> VRFMPromptEmbeddings:
        """Encodes a prompt or a list of prompts (an empty string is the unconditional prompt of guidance)."""
        prompts = as_prompt_list(prompt)
        contexts, pooled = zip(
            *(encode_clip(prompts, tokenizer, encoder, device, self.clip_skip) for tokenizer, encoder in self.clip)
        )
        context = torch.cat(contexts, dim=-1)
        context = torch.nn.functional.pad(context, (0, self.context_dim - context.shape[-1]))
        if self.t5 is not None:
            t5_context = encode_t5(prompts, *self.t5, self.max_sequence_length, device).to(context.device)
            context = torch.cat([context, t5_context.to(context.dtype)], dim=-2)
        return VRFMPromptEmbeddings(prompt_embeds=context, pooled_prompt_embeds=torch.cat(pooled, dim=-1))


def word_level_tokenizer(words: list[str], model_max_length: int = 16):
    """A fast tokenizer over a fixed vocabulary of whole words (`<pad>`, `<unk>`, `<bos>`, `<eos>` first), which
    adds `<bos>` and `<eos>` like CLIP's: for small text-to-image models trained from scratch, and for tests.

    Example:

    ```py
    >>> from diffusers_vrfm import word_level_tokenizer
    >>> tokenizer = word_level_tokenizer(["a", "handwritten", "seven"], model_max_length=8)
    >>> tokenizer("a handwritten seven", padding="max_length", max_length=8).input_ids
    [2, 4, 5, 6, 3, 0, 0, 0]
    ```
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocabulary = {}
    for word in [*specials, *words]:
        if not isinstance(word, str) or not word or any(character.isspace() for character in word):
            raise ValueError(f"`words` must be non-empty strings without spaces, but got {word!r}.")
        vocabulary.setdefault(word, len(vocabulary))
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocabulary["<bos>"]), ("<eos>", vocabulary["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=model_max_length,
    )
