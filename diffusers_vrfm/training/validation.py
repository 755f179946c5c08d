"""Validation figures during and at the end of a `train_vrfm.py` run, always from the same source points and latents
(see [`~diffusers_vrfm.training.visuals`] for the figures themselves)."""

from __future__ import annotations

import argparse
import os

import numpy as np

from .data_setup import PreparedData
from .determinism import make_generator
from .factory import build_pipeline
from .model_setup import TrainingModels
from .visuals import fixed_validation_inputs, image_validation_grid, validation_class_labels, vector_validation_figure


class Validator:
    """Writes validation figures of the EMA velocity model: image grids (one row per step count) or, for vector data,
    scatter and trajectory plots.

    Args:
        args (`argparse.Namespace`): the run's arguments (seed, sample count, step counts, output folder).
        accelerator (`accelerate.Accelerator`): the run's accelerator (for its device and trackers).
        models ([`TrainingModels`]): the run's models; read on every call, so figures show the current weights.
        prepared ([`PreparedData`]): the data (its kind, toy task, classes) and the VAE.
    """

    def __init__(self, args: argparse.Namespace, accelerator, models: TrainingModels, prepared: PreparedData):
        self.args, self.accelerator, self.models, self.prepared = args, accelerator, models, prepared
        data = prepared.data
        self.x0, self.z = fixed_validation_inputs(
            args.seed, args.num_validation_samples, prepared.model_shape, args.latent_dim, data.toy_task
        )
        self.labels = validation_class_labels(data.num_classes, args.num_validation_samples)
        self.folder = os.path.join(args.output_dir, "validation")

    def __call__(self, step: int, path: str | None = None, prior=None) -> str:
        """Writes the figure of `step` to `path` (default `validation/step_XXXXXX.png`) and returns the path. `z` comes
        from `prior` when given (drawn the same way on every call), else from the fixed N(0, I) draws."""
        args, models = self.args, self.models
        if self.prepared.text is not None:
            return self._text_to_image(step, path, prior)
        pipeline = build_pipeline(
            self.accelerator.unwrap_model(models.velocity_model),
            None,
            models.noise_scheduler,
            models.ema_model,
            vae=self.prepared.vae,
            prior=prior,
        ).to(self.accelerator.device)
        z = self.z
        if pipeline.prior is not None:  # z as the pipeline draws it (the same draws on every call)
            model = pipeline.velocity_model
            generator = make_generator(args.seed, "validation", 1)
            z = pipeline.prepare_z(len(self.x0), generator, model.device, model.dtype, source=self.x0)
        path = path or os.path.join(self.folder, f"step_{step:06d}.png")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # validation/ only once a figure goes there
        if self.prepared.kind == "image":
            grid = image_validation_grid(pipeline, self.x0, z, args.validation_inference_steps, self.labels)
            grid.save(path)
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        else:
            toy_task = self.prepared.data.toy_task
            vector_validation_figure(pipeline, toy_task, self.x0, z, args.validation_inference_steps, path)
        return path

    def _text_to_image(self, step: int, path: str | None, prior) -> str:
        """The grid of a text-to-image run: one column per training caption (cycled), no guidance."""
        from .text_to_image import make_text_pipeline, text_validation_grid, trained_velocity_model

        args, models, text = self.args, self.models, self.prepared.text
        velocity = trained_velocity_model(self.accelerator.unwrap_model(models.velocity_model), models.ema_model)
        pipeline = make_text_pipeline(text, velocity, prior=prior, device=self.accelerator.device)
        prompts = text.validation_prompts(len(self.x0))
        grid = text_validation_grid(
            pipeline, prompts, text.cache, self.x0, self.z, args.validation_inference_steps, args.seed
        )
        path = path or os.path.join(self.folder, f"step_{step:06d}.png")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        grid.save(path)
        return path
