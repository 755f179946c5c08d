"""The training loop of `train_vrfm.py`: micro-steps with gradient accumulation, the update, metrics, checkpoints and
validation figures. The loss of one micro-step is [`~diffusers_vrfm.training.step.vrfm_training_loss`].

Every random number of a micro-step comes from a generator seeded with `(seed, purpose, micro_step)` that draws the
whole global batch on the training device (this process keeps its rows), so a resumed run repeats an
uninterrupted one exactly, and a run on `N` processes repeats a 1-process run with an `N` times larger batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..objective import adapt_beta, count_active_units
from . import checkpointing
from . import step as training_step
from .data import DeviceImageBatches, collate_examples, encode_with_vae, fixed_in_memory_images
from .data_setup import BatchLayout, PreparedData
from .determinism import make_generator
from .environment import RunContext
from .health import SkippedUpdates
from .model_setup import TrainingModels, trainable_parameters
from .resume import ResumeState
from .text_to_image import TEXT_MODEL_KWARGS
from .validation import Validator

METRIC_WINDOW = 50  # the model card reports the mean of the last this many steps


@dataclass
class LoopState:
    """The counters of a run and the sums of the current accumulation window.

    Args:
        global_step (`int`): updates made so far.
        micro_step (`int`): micro-steps made so far (the key of every random draw).
        adaptive_beta (`float`): the KL weight of the next step when `--kl_target` adapts it.
        skips (`SkippedUpdates`): skipped updates (non-finite loss or gradient) and the limit on a run of them.
        recent (`deque`): the logged metrics of the last `METRIC_WINDOW` updates.
        accumulated (`torch.Tensor`, *optional*): the window's mean loss, MSE, KL, KL in nats and KL per dimension.
        window_bad (`bool`): whether a micro-step of the window had a non-finite loss.
        last_means (`torch.Tensor`, *optional*): the posterior means of the window's last micro-step.
    """

    global_step: int
    micro_step: int
    adaptive_beta: float
    skips: SkippedUpdates
    recent: deque = field(default_factory=lambda: deque(maxlen=METRIC_WINDOW))
    accumulated: torch.Tensor | None = None
    window_bad: bool = False
    last_means: torch.Tensor | None = None


@dataclass
class LoopResult:
    """What the loop leaves for the final stage.

    Args:
        global_step (`int`): the last update made.
        start_step (`int`): the step this invocation started from (after a resume).
        skipped_updates (`int`): updates skipped for non-finite values.
        recent (`list[dict]`): the logged metrics of the last updates.
        train_seconds (`float`): wall time of the loop.
        finished (`bool`): whether `--max_train_steps` was reached (else `--stop_after_steps` stopped the run).
    """

    global_step: int
    start_step: int
    skipped_updates: int
    recent: list[dict]
    train_seconds: float
    finished: bool


@dataclass
class MicroBatch:
    """This process's inputs for one micro-step, on the accelerator's device, and the micro-step's other draws."""

    x0: torch.Tensor
    x1: torch.Tensor
    t: torch.Tensor
    class_labels: torch.Tensor | None
    randomness: training_step.StepRandomness
    model_kwargs: dict | None = None  # text-to-image: the caption embeddings


def draw_micro_batch(
    args: argparse.Namespace,
    prepared: PreparedData,
    layout: BatchLayout,
    noise_scheduler,
    micro_step: int,
    data_iterator,
    device,
) -> MicroBatch:
    """Loads (images) or draws (vectors) the micro-step's data and draws its randomness on `device` (`t`, `x0`, label
    dropout and the noise of `z`), one generator per purpose for the whole global batch."""
    data, rows = prepared.data, layout.rows
    class_labels = model_kwargs = None
    if data.kind == "image":
        batch = next(data_iterator)
        x1, class_labels = batch["pixel_values"].to(device, non_blocking=True), batch.get("class_labels")
        model_kwargs = {key: batch[key].to(device) for key in TEXT_MODEL_KWARGS if key in batch} or None
    else:  # toy tasks sample a few 2-D points on the CPU
        x0_all, x1_all = data.toy_pairs(layout.global_batch_size, make_generator(args.seed, "noise", micro_step))
        x0, x1 = x0_all[rows].to(device), x1_all[rows].to(device)
    randomness = training_step.draw_step_randomness(
        noise_scheduler,
        args.seed,
        micro_step,
        layout.global_batch_size,
        rows,
        prepared.model_shape if data.kind == "image" else None,
        label_dropout=args.label_dropout,
        num_classes=data.num_classes,
        latent_dim=args.latent_dim,
        prior_mix=args.prior_mix,
        learned_prior=args.learned_prior,
        device=device,
    )
    if data.kind == "image":
        x0 = randomness.x0
        if prepared.vae is not None:
            x1 = encode_with_vae(prepared.vae, x1, args.seed, micro_step, layout.global_batch_size, rows)
    if class_labels is not None:
        class_labels = class_labels.to(device, non_blocking=True)
        if randomness.label_drop is not None:
            class_labels = torch.where(randomness.label_drop, data.num_classes, class_labels)
    return MicroBatch(x0, x1.to(device), randomness.t, class_labels, randomness, model_kwargs)


def accumulate_micro_step(
    args: argparse.Namespace,
    context: RunContext,
    models: TrainingModels,
    batch: MicroBatch,
    beta: float,
    state: LoopState,
) -> float | None:
    """Computes the loss of one micro-step and backpropagates it; on the window's last micro-step clips the gradient
    and updates the weights, unless a loss or gradient of the window was not finite (`--nonfinite_policy`). Returns the
    gradient norm on an update, else `None`."""
    accelerator = context.accelerator

    def describe_checkpoint() -> str:
        return checkpointing.describe_last_checkpoint(args.output_dir, models.checkpoint_dirs)

    with accelerator.accumulate(*models.trained):
        output = training_step.vrfm_training_loss(
            models.velocity_model,
            models.posterior_encoder,
            batch.x0,
            batch.x1,
            batch.t,
            class_labels=batch.class_labels,
            posterior_noise=batch.randomness.posterior_noise,
            beta=beta,
            reduction=args.loss_reduction,
            free_bits=args.free_bits,
            prior_encoder=models.prior_model,
            prior_noise=batch.randomness.prior_noise,
            prior_mask=batch.randomness.prior_mask,
            model_kwargs=batch.model_kwargs,
        )
        parts = output.loss
        kl_nats = parts.kl_per_dim.sum() if parts.kl_per_dim.numel() else parts.kl.new_zeros(())
        scalars = torch.stack([parts.loss.detach(), parts.mse.detach(), parts.kl.detach(), kl_nats])
        values = torch.cat([scalars.float(), parts.kl_per_dim.float()])
        values = accelerator.gather(values.reshape(1, -1)).mean(dim=0)
        loss_finite = bool(torch.isfinite(values[0]))
        if loss_finite:
            accelerator.backward(parts.loss)
        else:
            state.window_bad = True
        window_sum = 0 if state.accumulated is None else state.accumulated
        state.accumulated = values / args.gradient_accumulation_steps + window_sum
        if output.posterior_mean is not None:
            state.last_means = output.posterior_mean

        grad_norm = None
        if accelerator.sync_gradients:
            max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
            grad_norm = accelerator.clip_grad_norm_(trainable_parameters(models.trained), max_norm)
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if not math.isfinite(grad_norm) and accelerator.mixed_precision != "fp16":
                state.window_bad = True
            if state.window_bad:
                if args.nonfinite_policy == "stop":
                    raise RuntimeError(
                        f"Non-finite {'loss' if not loss_finite else 'gradient'} at step {state.global_step + 1} "
                        f"(loss={values[0].item()}, grad_norm={grad_norm}); nothing was updated, and "
                        f"{describe_checkpoint()}. Lower --learning_rate, check the data, or pass "
                        "`--nonfinite_policy skip` to skip such updates."
                    )
                context.log.warning(
                    f"Skipping the update of step {state.global_step + 1}: non-finite loss or gradient."
                )
            else:
                models.optimizer.step()
            state.skips.record(state.window_bad, state.global_step + 1, describe_checkpoint)
            models.lr_scheduler.step()
            models.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def update_metrics(
    accelerator,
    models: TrainingModels,
    state: LoopState,
    beta: float,
    grad_norm: float | None,
    kl_target: float | None,
) -> dict:
    """The metrics of the update just made (the window's means over processes and micro-steps, the schedule, the
    posterior diagnostics); adapts the KL weight to `kl_target` when set."""
    active_units = aggregate = None
    if state.last_means is not None:
        gathered_means = accelerator.gather(state.last_means.float().contiguous())
        active_units = count_active_units(gathered_means)
        if gathered_means.shape[0] >= 2:
            aggregate = training_step.aggregate_posterior_stats(gathered_means)  # prior-hole diagnostics
    accumulated = state.accumulated
    logs = {
        "loss": accumulated[0].item(),
        "mse": accumulated[1].item(),
        "kl": accumulated[2].item(),
        "kl_nats": accumulated[3].item(),
        "beta": beta,
        "lr": models.lr_scheduler.get_last_lr()[0],
        "grad_norm": grad_norm,
        "skipped_updates": state.skips.total,
    }
    if kl_target is not None and not state.window_bad:
        # the same on every process: the KL is the mean gathered over processes and micro-steps
        state.adaptive_beta = adapt_beta(state.adaptive_beta, logs["kl_nats"], kl_target)
    if active_units is not None:
        logs["active_units"] = active_units
    if aggregate is not None:
        logs.update(aggregate)
    kl_per_dim = accumulated[4:].tolist()
    if kl_per_dim:
        if len(kl_per_dim) <= 16:
            logs.update({f"kl_dim/{i}": v for i, v in enumerate(kl_per_dim)})
        else:
            logs.update({"kl_dim/max": max(kl_per_dim), "kl_dim/min": min(kl_per_dim)})
    if models.ema_model is not None:
        logs["ema_decay"] = models.ema_model.cur_decay_value
    return logs


def save_loop_checkpoint(args: argparse.Namespace, context: RunContext, layout: BatchLayout, state: LoopState) -> str:
    """Writes `checkpoint-<global_step>` with what an exact continuation needs besides the weights."""
    manifest_state = {
        "micro_step": state.micro_step,
        "seed": args.seed,
        "global_batch_size": layout.global_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": context.accelerator.num_processes,
        "adaptive_beta": state.adaptive_beta,
    }
    path = checkpointing.save_checkpoint(
        context.accelerator, args.output_dir, state.global_step, manifest_state, args.checkpoints_total_limit
    )
    context.log.info(f"Saved {path}")
    return path


def make_data_iterator(
    args: argparse.Namespace, prepared: PreparedData, layout: BatchLayout, micro_step: int, device
):
    """An iterator over this process's image batches from `micro_step` on (`None` for vector data): in-memory sources
    with a fixed transform are transformed once and kept on `device`; other sources go through a `DataLoader` with
    `--dataloader_num_workers` workers (pinned memory on CUDA)."""
    if layout.plan is None:
        return None
    dataset = prepared.data.dataset
    if fixed_in_memory_images(dataset):
        return DeviceImageBatches(dataset, layout.plan, micro_step, device)
    workers = args.dataloader_num_workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=layout.plan.batch_sampler(micro_step),
        num_workers=workers,
        collate_fn=collate_examples,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return iter(loader)


def train_loop(
    args: argparse.Namespace,
    context: RunContext,
    prepared: PreparedData,
    layout: BatchLayout,
    models: TrainingModels,
    resumed: ResumeState,
    validator: Validator,
    kl_target: float | None,
) -> LoopResult:
    """Trains from `resumed.global_step` to `--max_train_steps` (or `--stop_after_steps`), logging every update to
    the trackers and `logs/metrics.jsonl`, checkpointing and writing validation figures on their schedules."""
    accelerator = context.accelerator
    state = LoopState(
        resumed.global_step,
        resumed.global_step * args.gradient_accumulation_steps,
        resumed.adaptive_beta,
        SkippedUpdates(limit=args.max_skipped_updates),
    )
    data_iterator = make_data_iterator(args, prepared, layout, state.micro_step, accelerator.device)
    stop_at = min(args.max_train_steps, args.stop_after_steps or args.max_train_steps)
    metrics_path = os.path.join(context.logging_dir, "metrics.jsonl")
    if accelerator.is_main_process and checkpointing.rewind_metrics_log(metrics_path, state.global_step):
        context.log.info(f"Dropped the records after step {state.global_step} from {metrics_path}: rewritten now.")
    progress_bar = tqdm(
        total=args.max_train_steps,
        initial=state.global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    train_start, start_step = time.time(), state.global_step
    while state.global_step < stop_at:
        batch = draw_micro_batch(
            args, prepared, layout, models.noise_scheduler, state.micro_step, data_iterator, accelerator.device
        )
        if kl_target is not None:
            beta = state.adaptive_beta
        else:
            beta = training_step.beta_at_step(args.beta, state.global_step, args.beta_warmup_steps)
        grad_norm = accumulate_micro_step(args, context, models, batch, beta, state)
        state.micro_step += 1
        if not accelerator.sync_gradients:
            continue

        if models.ema_model is not None and not state.window_bad:
            models.ema_model.step(accelerator.unwrap_model(models.velocity_model).parameters())
        state.global_step += 1
        progress_bar.update(1)
        logs = update_metrics(accelerator, models, state, beta, grad_norm, kl_target)
        state.recent.append(logs)
        accelerator.log(logs, step=state.global_step)
        progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", kl=f"{logs['kl']:.3g}", lr=f"{logs['lr']:.2e}")
        if accelerator.is_main_process:
            os.makedirs(context.logging_dir, exist_ok=True)  # created by the first write, so failed runs leave none
            with open(metrics_path, "a", encoding="utf-8") as handle:
                record = {"step": state.global_step, "seconds": round(time.time() - train_start, 4), **logs}
                handle.write(json.dumps(record) + "\n")
        state.accumulated, state.window_bad = None, False

        step = state.global_step
        if step % args.checkpointing_steps == 0 or (step == stop_at and stop_at < args.max_train_steps):
            save_loop_checkpoint(args, context, layout, state)
        if accelerator.is_main_process and step % args.validation_steps == 0 and step < args.max_train_steps:
            validator(step, prior=None if models.prior_model is None else accelerator.unwrap_model(models.prior_model))

    progress_bar.close()
    return LoopResult(
        global_step=state.global_step,
        start_step=start_step,
        skipped_updates=state.skips.total,
        recent=list(state.recent),
        train_seconds=time.time() - train_start,
        finished=state.global_step >= args.max_train_steps,
    )
