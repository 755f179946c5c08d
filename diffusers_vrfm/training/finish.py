"""The last stage of `train_vrfm.py`: a per-process record of the weights, then (on the main process) the prior fit,
the pipeline, the final samples, the model card, the summary and the upload. Also the Hub repository, created once
everything is checked."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import time

import numpy as np
import torch

from ..options import TOY_PREFIX
from .cli import atoms_cover_the_data
from .data import collate_examples, encode_with_vae, passes_over_examples
from .data_setup import PreparedData
from .determinism import make_generator
from .environment import RunContext
from .factory import build_pipeline
from .health import check_trained_pipeline
from .loop import LoopResult
from .model_setup import TrainingModels
from .validation import Validator


def parameter_digest(tensors) -> str:
    """A SHA-256 of the exact bytes of a list of tensors (to compare weights across processes).

    ```py
    >>> import torch
    >>> from diffusers_vrfm.training.finish import parameter_digest
    >>> parameter_digest([torch.zeros(2)]) == parameter_digest([torch.zeros(2)]) != parameter_digest([torch.ones(2)])
    True

    ```
    """
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def create_hub_repo_if_asked(args: argparse.Namespace, accelerator) -> str | None:
    """With `--push_to_hub`, creates the Hub repository (on the main process) and returns its id; else `None`."""
    if not (args.push_to_hub and accelerator.is_main_process):
        return None
    from diffusers_vrfm.hub import create_hub_repo

    return create_hub_repo(
        args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir)),
        token=args.hub_token,
        private=args.hub_private_repo or None,
    )


def write_rank_record(context: RunContext, models: TrainingModels, global_step: int) -> None:
    """Writes `logs/rank_<i>.json`: this process's step and the digests of its weights (model, posterior, EMA, prior),
    which must agree across processes and between a resumed run and an uninterrupted one."""
    accelerator = context.accelerator
    posterior = None if models.posterior_encoder is None else accelerator.unwrap_model(models.posterior_encoder)
    record = {
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "global_step": global_step,
        "velocity_model_sha256": parameter_digest(accelerator.unwrap_model(models.velocity_model).parameters()),
        "posterior_encoder_sha256": None if posterior is None else parameter_digest(posterior.parameters()),
        "ema_sha256": None if models.ema_model is None else parameter_digest(models.ema_model.shadow_params),
    }
    if models.prior_model is not None:
        record["prior_sha256"] = parameter_digest(accelerator.unwrap_model(models.prior_model).parameters())
    os.makedirs(context.logging_dir, exist_ok=True)
    path = os.path.join(context.logging_dir, f"rank_{accelerator.process_index}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)


def _aggregate_prior_pairs(args: argparse.Namespace, prepared: PreparedData, batch_size: int):
    """Endless `(x0, x1)` training pairs from their own random stream: the examples in passes over the data set, as
    training's epochs take them (`passes_over_examples`: 4096 atoms of 1437 images hold every image two or three
    times), each with its own augmentation and noise; for a conditional model `(x0, x1, condition)`, with the
    examples' labels (one-hot) or captions (the pooled text embedding, `""` where the caption was dropped) as the
    conditional prior's keys."""
    from diffusers_vrfm import label_condition

    data, vae = prepared.data, prepared.vae
    if data.kind == "vector":  # a toy task draws fresh pairs: there is no data set to pass over
        for index in itertools.count():
            yield data.toy_pairs(batch_size, make_generator(args.seed, "aggregate_prior", 1, index))
    examples = passes_over_examples(data.num_examples, make_generator(args.seed, "aggregate_prior", 2))
    for index in itertools.count():
        generator = make_generator(args.seed, "aggregate_prior", 1, index)
        rows = list(itertools.islice(examples, batch_size))
        augmentation_seeds = torch.randint(2**62, (batch_size,), generator=generator).tolist()
        batch = collate_examples([data.dataset[key] for key in zip(rows, augmentation_seeds)])
        x1 = batch["pixel_values"]
        if vae is not None:
            x1 = encode_with_vae(
                vae, x1, args.seed, index, batch_size, slice(0, batch_size), purpose="aggregate_prior"
            )
        x0 = torch.randn(x1.shape, generator=generator)
        if "pooled_projections" in batch:
            yield x0, x1, batch["pooled_projections"]
        elif "class_labels" in batch:
            yield x0, x1, label_condition(batch["class_labels"], data.num_classes)
        else:
            yield x0, x1


def fit_aggregate_prior(args: argparse.Namespace, prepared: PreparedData, posterior):
    """The prior fitted to the trained posterior over `--aggregate_prior_atoms` training pairs (from their own random
    stream, so that fitting changes nothing else): a `VRFMAggregatePosteriorPrior` of those posteriors, or with
    `--aggregate_prior_type flow` a `VRFMFlowPrior` fitted to them. For a class-conditional or text-to-image model
    either prior is conditional, on the examples' labels or captions: sampling draws z given the label or prompt
    (among its atoms, or from the flow's `p(z | c)`)."""
    from diffusers_vrfm import VRFMAggregatePosteriorPrior, VRFMFlowPrior

    posterior.eval()
    pairs = _aggregate_prior_pairs(args, prepared, batch_size=min(256, args.aggregate_prior_atoms))
    generator = make_generator(args.seed, "aggregate_prior", 0)
    if args.aggregate_prior_type == "flow":
        return VRFMFlowPrior.from_posterior(
            posterior, pairs, args.aggregate_prior_atoms, generator, num_train_steps=args.flow_prior_steps
        )
    return VRFMAggregatePosteriorPrior.from_posterior(posterior, pairs, args.aggregate_prior_atoms, generator)


def training_metrics(
    args: argparse.Namespace,
    prepared: PreparedData,
    models: TrainingModels,
    result: LoopResult,
    pipeline,
    kl_target: float | None,
    device,
) -> dict:
    """The metrics the model card and `logs/summary.json` report."""
    recent = result.recent
    metrics = {}
    for key in ("loss", "mse", "kl", "kl_nats"):
        values = [entry[key] for entry in recent if entry.get(key) is not None and math.isfinite(entry[key])]
        if values:
            metrics[f"train {key} (mean of last {len(values)} steps)"] = float(np.mean(values))
    if recent and kl_target is not None:
        metrics["beta (last step, adapted to the KL target)"] = recent[-1]["beta"]
    if recent and "active_units" in recent[-1]:
        metrics["active latent units (last step)"] = f"{recent[-1]['active_units']} / {args.latent_dim}"
    metrics["skipped updates (non-finite)"] = result.skipped_updates
    if prepared.kind == "vector":
        from .visuals import toy_metrics

        steps_list = args.validation_inference_steps
        metrics.update(toy_metrics(pipeline.to(device), prepared.data.toy_task, steps_list, seed=args.seed))
    metrics["parameters: velocity model / posterior"] = (
        f"{models.velocity_parameters:,} / {models.posterior_parameters:,}"
    )
    metrics["training wall time (s)"] = round(result.train_seconds, 1)
    metrics["steps in this invocation"] = result.global_step - result.start_step
    peak = peak_gpu_memory_mib(device)
    if peak is not None:
        metrics[PEAK_GPU_MEMORY] = peak
    return metrics


PEAK_GPU_MEMORY = "peak GPU memory allocated by torch over the run (MiB)"


def peak_gpu_memory_mib(device) -> float | None:
    """The most memory torch's CUDA allocator has held on `device` since the process started or since
    `torch.cuda.reset_peak_memory_stats` (MiB, to 0.1); `None` when `device` is not a CUDA device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def card_descriptions(args: argparse.Namespace, prepared: PreparedData, posterior, global_step: int, posterior_count):
    """The model card's sample caption, dataset description and posterior description."""
    data = prepared.data
    steps_list = ", ".join(str(s) for s in args.validation_inference_steps)
    caption = (
        f"Rows: Euler with {steps_list} steps (NFE); columns: fixed noise and fixed z, EMA weights, step "
        f"{global_step}."
        if data.kind == "image"
        else f"Samples (orange) against data (blue) with Euler at {steps_list} steps; right: trajectories."
    )
    if prepared.text is not None:
        weights = "EMA weights" if args.use_ema else "raw weights"
        caption = (
            f"Rows: Euler with {steps_list} steps (NFE); columns: the training captions in turn, without guidance, "
            f"with fixed noise and z; {weights}, step {global_step}."
        )
    dataset_description = data.name
    if data.name == "builtin:digits":
        dataset_description = (
            f"scikit-learn's handwritten digits (1797 images, 8x8, BSD licence), resized to {args.resolution}x"
            f"{args.resolution}"
        )
    elif data.kind == "vector":
        dataset_description = f"the toy task `{data.name[len(TOY_PREFIX) :]}` of `diffusers_vrfm.data.toy`"
    if prepared.vae is not None:
        dataset_description += (
            f"; trained on latents {prepared.model_shape} of the VAE `{args.vae_name_or_path}` (frozen, saved with "
            "the pipeline, which decodes samples with it)"
        )
    posterior_description = "none (plain rectified flow)"
    if posterior is not None:
        inputs = ", ".join(args.posterior_inputs)
        posterior_description = f"`{type(posterior).__name__}` reading {inputs} ({posterior_count:,} parameters)"
        grid = posterior.config.get("pooled_size")  # the conv posterior's grid; vector posteriors have none
        if grid is not None:
            posterior_description += f", its last feature map averaged to a {grid}x{grid} grid"
    return caption, dataset_description, posterior_description


def z_map_description(velocity) -> str:
    """The model card's note on a velocity model's `z` map (`LatentMap`), or "" when it has none."""
    z_map = getattr(velocity, "z_map", None)
    if z_map is None:
        return ""
    channels, height, width = z_map.grid
    return f"`z` also enters as input channels (a `LatentMap`: {channels} channel(s) on a {height}x{width} grid)"


def sampling_prior(
    args: argparse.Namespace,
    context: RunContext,
    prepared: PreparedData,
    models: TrainingModels,
    posterior: torch.nn.Module | None,
):
    """The prior the saved pipeline draws `z` from: the aggregate posterior fitted now (`--aggregate_prior_atoms`),
    else the prior trained with the model (`--learned_prior`), else none (`z ~ N(0, I)`, or RF)."""
    if args.aggregate_prior_atoms == 0:
        return None if models.prior_model is None else context.accelerator.unwrap_model(models.prior_model)
    prior = fit_aggregate_prior(args, prepared, posterior)
    context.log.info(
        f"Fitted the aggregate-posterior prior ({type(prior).__name__}, {args.aggregate_prior_atoms} posteriors); "
        "sampling draws z from it."
    )
    data = prepared.data
    if args.aggregate_prior_type == "atoms" and atoms_cover_the_data(
        data.kind, data.num_examples, args.aggregate_prior_atoms
    ):
        context.log.warning(
            f"The atom prior holds the posteriors of {args.aggregate_prior_atoms} draws from {data.num_examples} "
            "training images, about every one of them: where z names the image, its samples replay training "
            "images (measured on digits in docs/benchmarks.md). Pass `--aggregate_prior_type flow` for new samples."
        )
    return prior


def save_and_publish(
    args: argparse.Namespace,
    context: RunContext,
    prepared: PreparedData,
    models: TrainingModels,
    result: LoopResult,
    validator: Validator,
    repo_id: str | None,
    kl_target: float | None,
) -> dict:
    """Main process only: fits the aggregate prior (if asked), saves the pipeline with the final samples and the model
    card, writes `logs/summary.json` and uploads (with `--push_to_hub`). Returns the metrics."""
    accelerator, data = context.accelerator, prepared.data
    velocity = accelerator.unwrap_model(models.velocity_model)
    posterior = models.posterior_encoder
    if posterior is not None:  # without accelerate's autocast wrapper: the prior's atoms are float32 means, variances
        posterior = accelerator.unwrap_model(posterior, keep_fp32_wrapper=False)
    prior = sampling_prior(args, context, prepared, models, posterior)
    if prepared.text is not None:  # the text-to-image pipeline, saved whole or as an adapter folder (LoRA)
        from .text_to_image import build_text_to_image_pipeline, save_text_to_image_run

        pipeline = build_text_to_image_pipeline(prepared, velocity, posterior, prior, models.ema_model)
    else:
        pipeline = build_pipeline(
            velocity, posterior, models.noise_scheduler, models.ema_model, vae=prepared.vae, prior=prior
        )
    if args.reencode_z_at is not None:
        pipeline.set_default_reencode_z_at(args.reencode_z_at)
    pipeline = pipeline.to(accelerator.device)
    # a diverged model is refused here: no pipeline and no card that look like a result
    # at the most steps validated: a diverged velocity that stays finite for one step can overflow over several
    check_trained_pipeline(pipeline, max(args.validation_inference_steps), result.skipped_updates, seed=args.seed)
    if prepared.text is not None:
        save_text_to_image_run(args, prepared, pipeline)
    else:
        pipeline.save_pretrained(args.output_dir)
    sample_name = "sample_grid.png" if data.kind == "image" else "samples.png"
    validator(result.global_step, os.path.join(args.output_dir, sample_name), prior=prior)
    metrics = training_metrics(args, prepared, models, result, pipeline, kl_target, accelerator.device)
    card = model_card(args, context, prepared, models, result, velocity, posterior, metrics, repo_id, sample_name)
    card.save(os.path.join(args.output_dir, "README.md"))
    with open(os.path.join(context.logging_dir, "summary.json"), "w", encoding="utf-8") as handle:
        summary = {"metrics": metrics, "total_seconds": time.time() - context.run_start}
        json.dump(summary, handle, indent=2, default=str)
    if args.push_to_hub:
        from diffusers_vrfm.hub import upload_pipeline_folder

        upload_pipeline_folder(args.output_dir, repo_id, token=args.hub_token, commit_message="End of training")
    return metrics


def model_card(
    args: argparse.Namespace,
    context: RunContext,
    prepared: PreparedData,
    models: TrainingModels,
    result: LoopResult,
    velocity: torch.nn.Module,
    posterior: torch.nn.Module | None,
    metrics: dict,
    repo_id: str | None,
    sample_name: str,
):
    """The run's model card (a `huggingface_hub.ModelCard`): what was trained on what, how, and the final metrics."""
    from .model_card import render_model_card

    data, accelerator = prepared.data, context.accelerator
    caption, dataset_description, posterior_description = card_descriptions(
        args, prepared, posterior, result.global_step, models.posterior_parameters
    )
    return render_model_card(
        repo_id=repo_id or args.hub_model_id or args.output_dir,
        args=vars(args),
        argv=context.argv,
        data_kind=data.kind,
        dataset_description=dataset_description,
        hub_dataset_id=data.hub_dataset_id,
        velocity_class=type(velocity).__name__,
        velocity_parameters=models.velocity_parameters,
        velocity_note=z_map_description(velocity),
        posterior_description=posterior_description,
        base_model=models.base_model,
        num_processes=accelerator.num_processes,
        global_batch_size=args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        metrics=metrics,
        metric_window=len(result.recent),
        skipped_updates=result.skipped_updates,
        sample_image=sample_name,
        sample_caption=caption,
        license=args.license,
        num_classes=data.num_classes,
        template_path=args.model_card_template,
        accelerate_launch=any(key.startswith("ACCELERATE_") for key in os.environ),
        **_text_to_image_card_arguments(args, prepared),
    )


def _text_to_image_card_arguments(args: argparse.Namespace, prepared: PreparedData) -> dict:
    """The model card's text-to-image arguments (none for other runs)."""
    if prepared.text is None:
        return {}
    prompt = prepared.text.validation_prompts(1)[0]
    return {"text_to_image": "adapter" if args.rank is not None else "pipeline", "example_prompt": prompt}


def finish_run(
    args: argparse.Namespace,
    context: RunContext,
    prepared: PreparedData,
    models: TrainingModels,
    result: LoopResult,
    validator: Validator,
    repo_id: str | None,
    kl_target: float | None,
) -> dict:
    """Writes the per-process record and, when training reached `--max_train_steps`, the pipeline and its card; ends
    the trackers. Returns the run's summary (`global_step`, `finished`, `output_dir`, and `metrics` when finished)."""
    accelerator, log = context.accelerator, context.log
    accelerator.wait_for_everyone()
    write_rank_record(context, models, result.global_step)
    summary = {"global_step": result.global_step, "finished": result.finished, "output_dir": args.output_dir}
    if not result.finished:
        log.info(
            f"Stopped at step {result.global_step} (--stop_after_steps); resume with --resume_from_checkpoint latest."
        )
        accelerator.end_training()
        return summary
    if accelerator.is_main_process:
        summary["metrics"] = save_and_publish(args, context, prepared, models, result, validator, repo_id, kl_target)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary["total_seconds"] = time.time() - context.run_start
    log.info(f"Done in {summary['total_seconds']:.1f} s; pipeline written to {args.output_dir}")
    return summary
