"""diffusers-vrfm: Variational Rectified Flow Matching for the Hugging Face diffusers ecosystem."""

from .likelihood import VRFMLikelihoodOutput, log_likelihood
from .lora import add_lora, load_vrfm_adapter, save_vrfm_adapter
from .models.latent_prior import VRFMAggregatePosteriorPrior
from .models.mlp import VRFMMLPModel
from .models.posterior import VRFMPosteriorEncoder, VRFMPosteriorOutput
from .models.posterior_conv import VRFMConvPosteriorEncoder
from .models.transformer_2d import VRFMDiTTransformer2DModel
from .models.transformer_sd3 import VRFMSD3Transformer2DModel
from .models.unet_2d import VRFMUNet2DConditionModel, VRFMUNet2DModel
from .models.z_embedding import LatentEmbedding, VRFMVelocityOutput
from .objective import (
    VRFMLossOutput,
    adapt_beta,
    count_active_units,
    drop_labels,
    flow_match_output_to_velocity,
    gaussian_kl,
    interpolate,
    reparameterize,
    sample_timesteps,
    sigma_to_t,
    slerp,
    t_to_sigma,
    target_velocity,
    velocity_to_flow_match_output,
    vrfm_loss,
)
from .pipelines.pipeline_vrfm import VRFMPipeline, VRFMPipelineOutput
from .pipelines.pipeline_vrfm_text2img import VRFMTextToImagePipeline
from .schedulers.scheduling_vrfm import VRFMAdaptiveOutput, VRFMScheduler, VRFMSchedulerOutput
from .text_encoding import VRFMPromptEmbeddings, VRFMTextEncoders, word_level_tokenizer

__version__ = "0.1.0"

__all__ = [
    "LatentEmbedding",
    "VRFMAdaptiveOutput",
    "VRFMAggregatePosteriorPrior",
    "VRFMConvPosteriorEncoder",
    "VRFMDiTTransformer2DModel",
    "VRFMLikelihoodOutput",
    "VRFMLossOutput",
    "VRFMMLPModel",
    "VRFMPipeline",
    "VRFMPipelineOutput",
    "VRFMPosteriorEncoder",
    "VRFMPosteriorOutput",
    "VRFMPromptEmbeddings",
    "VRFMSD3Transformer2DModel",
    "VRFMScheduler",
    "VRFMSchedulerOutput",
    "VRFMTextEncoders",
    "VRFMTextToImagePipeline",
    "VRFMUNet2DConditionModel",
    "VRFMUNet2DModel",
    "VRFMVelocityOutput",
    "adapt_beta",
    "add_lora",
    "count_active_units",
    "drop_labels",
    "flow_match_output_to_velocity",
    "gaussian_kl",
    "interpolate",
    "load_vrfm_adapter",
    "log_likelihood",
    "reparameterize",
    "sample_timesteps",
    "save_vrfm_adapter",
    "sigma_to_t",
    "slerp",
    "t_to_sigma",
    "target_velocity",
    "velocity_to_flow_match_output",
    "vrfm_loss",
    "word_level_tokenizer",
]
