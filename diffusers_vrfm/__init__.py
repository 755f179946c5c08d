"""diffusers-vrfm: Variational Rectified Flow Matching for the Hugging Face diffusers ecosystem.

The public names load lazily, on first use, so that `import diffusers_vrfm` (and the torch-free command line of
`train_vrfm.py`) does not import torch and diffusers. `_import_structure` maps each submodule to the names it exports,
as in diffusers' own `__init__`; add a new export there. diffusers' `_LazyModule` itself is not used: importing
`diffusers.utils` imports torch, which is what laziness is meant to avoid.
"""

import importlib
import pkgutil

__version__ = "0.1.0"

_import_structure = {
    "likelihood": ["VRFMLikelihoodOutput", "log_likelihood"],
    "lora": ["add_lora", "load_vrfm_adapter", "save_vrfm_adapter"],
    "models.flow_prior": ["VRFMFlowPrior"],
    "models.latent_prior": ["VRFMAggregatePosteriorPrior", "collect_posterior_atoms", "label_condition"],
    "models.mlp": ["VRFMMLPModel"],
    "models.posterior": ["VRFMPosteriorEncoder", "VRFMPosteriorOutput"],
    "models.posterior_conv": ["VRFMConvPosteriorEncoder"],
    "models.transformer_2d": ["VRFMDiTTransformer2DModel"],
    "models.transformer_sd3": ["VRFMSD3Transformer2DModel"],
    "models.unet_2d": ["VRFMUNet2DConditionModel", "VRFMUNet2DModel"],
    "models.z_embedding": ["LatentEmbedding", "LatentMap", "VRFMVelocityOutput"],
    "objective": [
        "VRFMLossOutput",
        "adapt_beta",
        "count_active_units",
        "drop_labels",
        "flow_match_output_to_velocity",
        "gaussian_kl",
        "interpolate",
        "predicted_end_point",
        "reparameterize",
        "sample_timesteps",
        "sigma_to_t",
        "slerp",
        "t_to_sigma",
        "target_velocity",
        "velocity_to_flow_match_output",
        "vrfm_loss",
    ],
    "pipelines.pipeline_vrfm": ["VRFMPipeline", "VRFMPipelineOutput"],
    "pipelines.pipeline_vrfm_text2img": ["VRFMTextToImagePipeline"],
    "schedulers.scheduling_vrfm": ["VRFMAdaptiveOutput", "VRFMScheduler", "VRFMSchedulerOutput"],
    "text_encoding": ["VRFMPromptEmbeddings", "VRFMTextEncoders", "word_level_tokenizer"],
}

_module_of = {name: module for module, names in _import_structure.items() for name in names}
__all__ = sorted(_module_of)


_submodules = {info.name for info in pkgutil.iter_modules(__path__)}


def __getattr__(name: str):
    """Imports the submodule that exports `name` (or the submodule `name`) on first access (PEP 562)."""
    if name in _module_of:
        value = getattr(importlib.import_module(f".{_module_of[name]}", __name__), name)
    elif name in _submodules:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _submodules)
