"""Pieces of `train_vrfm.py` that are worth testing on their own: data, determinism, the training step, checkpoints,
validation outputs, the model card and publishing. Nothing here is imported by `diffusers_vrfm` itself."""
