"""Training-side LoRA helpers: which parameters a LoRA run optimises, in which precision."""

from __future__ import annotations

import torch

from ..lora import LORA_TARGET_MODULES, add_lora


def prepare_lora_training(
    velocity_model,
    posterior_encoder=None,
    prior=None,
    rank: int = 4,
    lora_alpha: float | None = None,
    target_modules: tuple[str, ...] | list[str] = LORA_TARGET_MODULES,
    lora_dropout: float = 0.0,
) -> list[torch.nn.Parameter]:
    """Adds LoRA to the velocity model's backbone (its own weights frozen), keeps the ``z`` path, the posterior
    encoder and a trainable prior fully trainable, upcasts the trainable weights to float32 (as diffusers' LoRA
    scripts do for mixed precision), and returns the parameters to optimise.

    Example:

    ```py
    >>> from diffusers_vrfm import VRFMConvPosteriorEncoder, VRFMSD3Transformer2DModel
    >>> from diffusers_vrfm.training.lora import prepare_lora_training, trainable_parameter_names
    >>> model = VRFMSD3Transformer2DModel(
    ...     sample_size=8, in_channels=4, out_channels=4, latent_dim=4, num_layers=1, attention_head_dim=8,
    ...     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
    ...     pos_embed_max_size=8,
    ... )
    >>> encoder = VRFMConvPosteriorEncoder(sample_size=8, in_channels=4, latent_dim=4, block_out_channels=(8,))
    >>> parameters = prepare_lora_training(model, encoder, rank=2)
    >>> all("lora_" in name for name in trainable_parameter_names(model.transformer))
    True
    >>> len(parameters) == len(trainable_parameter_names(model)) + len(list(encoder.parameters()))
    True
    ```
    """
    from diffusers.training_utils import cast_training_params

    add_lora(velocity_model, rank, lora_alpha, target_modules, lora_dropout)
    modules = [velocity_model]
    for module in (posterior_encoder, prior):
        if module is not None:
            module.requires_grad_(True)
            modules.append(module)
    cast_training_params(modules, dtype=torch.float32)
    return [parameter for module in modules for parameter in module.parameters() if parameter.requires_grad]


def trainable_parameter_names(module: torch.nn.Module) -> list[str]:
    """The names of `module`'s parameters that require gradients."""
    return [name for name, parameter in module.named_parameters() if parameter.requires_grad]
