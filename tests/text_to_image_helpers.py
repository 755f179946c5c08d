"""Tiny random text-to-image components, built offline (no download): CLIP, T5, word-level tokenizers, SD3, VAE."""

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffusers_vrfm import VRFMScheduler, VRFMSD3Transformer2DModel, VRFMTextToImagePipeline, word_level_tokenizer

WORDS = ["a", "handwritten", "digit", "zero", "one", "two", "three", "seven", "blurry"]
CLIP_TOKENS = 8
T5_TOKENS = 6


def tiny_clip(seed: int = 0, hidden_size: int = 8, projection_dim: int = 4):
    tokenizer = word_level_tokenizer(WORDS, model_max_length=CLIP_TOKENS)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_TOKENS, projection_dim=projection_dim,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return tokenizer, CLIPTextModelWithProjection(config).eval()


def tiny_t5(seed: int = 2, d_model: int = 16):
    tokenizer = word_level_tokenizer(WORDS, model_max_length=T5_TOKENS)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=tokenizer.vocab_size, d_model=d_model, d_ff=16, d_kv=4, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return tokenizer, T5EncoderModel(config).eval()


def tiny_vae(seed: int = 3):
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8), norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        layers_per_block=1, shift_factor=0.1, scaling_factor=1.5,
    ).eval()  # fmt: skip


SD3_CONFIG = {
    "sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2, "attention_head_dim": 8,
    "num_attention_heads": 2, "joint_attention_dim": 16, "caption_projection_dim": 16, "pooled_projection_dim": 8,
    "pos_embed_max_size": 8,
}  # fmt: skip


def tiny_sd3_transformer(seed: int = 4, randomize_norms: bool = True) -> SD3Transformer2DModel:
    """A tiny SD3 transformer; its zero-initialised adaLN and output layers get random weights, as after training."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**SD3_CONFIG)
    if randomize_norms:
        with torch.no_grad():
            for parameter in model.parameters():
                if not parameter.abs().sum():
                    parameter.normal_(0, 0.2)
    return model.eval()


def tiny_stock_sd3_pipeline(with_t5: bool = True) -> StableDiffusion3Pipeline:
    """A stock SD3 pipeline: two CLIPs (widths 8 + 8, pooled 4 + 4) and a T5 of width 16."""
    tokenizer, text_encoder = tiny_clip(0)
    tokenizer_2, text_encoder_2 = tiny_clip(1)
    tokenizer_3, text_encoder_3 = tiny_t5() if with_t5 else (None, None)
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )  # fmt: skip


def tiny_text_pipeline(latent_dim: int = 4, with_vae: bool = True, **components) -> VRFMTextToImagePipeline:
    """A VRFM text-to-image pipeline with one CLIP (width 8, pooled 4), padded to the SD3 context width 16."""
    tokenizer, text_encoder = tiny_clip(0)
    torch.manual_seed(5)
    config = {**SD3_CONFIG, "pooled_projection_dim": 4}
    if not with_vae:
        config.update(in_channels=3, out_channels=3)
    velocity_model = VRFMSD3Transformer2DModel(**config, latent_dim=latent_dim)
    return VRFMTextToImagePipeline(
        velocity_model=velocity_model, scheduler=VRFMScheduler(), text_encoder=text_encoder, tokenizer=tokenizer,
        vae=tiny_vae() if with_vae else None, **components,
    )  # fmt: skip
