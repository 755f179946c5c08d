"""The training loop of `train_vrfm.py`: micro-steps with gradient accumulation, the update, metrics, checkpoints and
validation figures. The loss of one micro-step is [`~diffusers_vrfm.training.step.vrfm_training_loss`].

Every random number of a micro-step comes from a generator seeded with `(seed, purpose, micro_step)` that draws the
whole global batch on the training device (this process keeps its rows), so a resumed run repeats an
uninterrupted one exactly, and a run on `N` processes repeats a 1-process run with an `N` times larger batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..models.z_embedding import skip_value_checks
from ..objective import adapt_beta
from . import checkpointing
from . import step as training_step
from .data import DeviceImageBatches, collate_examples, encode_with_vae, fixed_in_memory_images, host_to_device
from .data_setup import BatchLayout, PreparedData
from .determinism import make_generator
from .environment import RunContext
from .health import SkippedUpdates
from .model_setup import TrainingModels
from .resume import ResumeState
from .text_to_image import TEXT_MODEL_KWARGS, drop_captions
from .validation import Validator

METRIC_WINDOW = 50  # the model card reports the mean of the last this many steps


@dataclass
class PendingUpdate:
    """One update's metrics, left on the device until the next read (`--logging_steps`).

    Args:
        step (`int`): the update's number.
        seconds (`float`): wall time since the loop started when the host had queued the update; for the last update
            before a read, when the device had finished it (the read waits for it).
        lr (`float`): the learning rate after the update.
        beta (`float` or `torch.Tensor`): the KL weight the update used (a 0-d device tensor when adapted).
        ema_decay (`float`, *optional*): the EMA's decay after the update.
        values (`torch.Tensor`): loss, MSE, KL and KL in nats (window means over processes and micro-steps), the KL
            per dimension, the `POSTERIOR_STATISTICS` (with a posterior), the gradient norm, whether a loss was
            non-finite and whether the update was skipped.
    """

    step: int
    seconds: float
    lr: float
    beta: float | torch.Tensor
    ema_decay: float | None
    values: torch.Tensor


@dataclass
class LoopState:
    """The counters of a run, the sums of the current accumulation window and the updates not yet read.

    Args:
        global_step (`int`): updates made so far.
        micro_step (`int`): micro-steps made so far (the key of every random draw).
        adaptive_beta (`torch.Tensor`): the KL weight of the next step when `--kl_target` adapts it (0-d, on the
            training device, so that adapting it reads nothing back).
        skips (`SkippedUpdates`): skipped updates (non-finite loss or gradient) and the limit on a run of them.
        recent (`deque`): the logged metrics of the last `METRIC_WINDOW` updates.
        accumulated (`torch.Tensor`, *optional*): the window's mean loss, MSE, KL, KL in nats and KL per dimension.
        window_loss_finite (`torch.Tensor`, *optional*): whether every loss of the window was finite (bool, device).
        last_means (`torch.Tensor`, *optional*): the posterior means of the window's last micro-step.
        pending (`list[PendingUpdate]`): the updates made since the last read.
        started (`float`): when the loop started (`time.time()`).
    """

    global_step: int
    micro_step: int
    adaptive_beta: torch.Tensor
    skips: SkippedUpdates
    recent: deque = field(default_factory=lambda: deque(maxlen=METRIC_WINDOW))
    accumulated: torch.Tensor | None = None
    window_loss_finite: torch.Tensor | None = None
    last_means: torch.Tensor | None = None
    pending: list = field(default_factory=list)
    started: float = field(default_factory=time.time)


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
    and caption dropout, and the noise of `z`), one generator per purpose for the whole global batch."""
    data, rows = prepared.data, layout.rows
    class_labels = model_kwargs = None
    if data.kind == "image":
        batch = next(data_iterator)
        x1, class_labels = batch["pixel_values"].to(device, non_blocking=True), batch.get("class_labels")
        # from pinned memory on CUDA: a blocking copy to the device would wait for every kernel queued before it
        model_kwargs = {key: batch[key].to(device, non_blocking=True) for key in TEXT_MODEL_KWARGS if key in batch}
        model_kwargs = model_kwargs or None
    else:  # toy tasks sample a few 2-D points on the CPU
        x0_all, x1_all = data.toy_pairs(layout.global_batch_size, make_generator(args.seed, "noise", micro_step))
        x0, x1 = host_to_device(x0_all[rows], device), host_to_device(x1_all[rows], device)
    randomness = training_step.draw_step_randomness(
        noise_scheduler,
        args.seed,
        micro_step,
        layout.global_batch_size,
        rows,
        prepared.model_shape if data.kind == "image" else None,
        label_dropout=args.label_dropout,
        num_classes=data.num_classes,
        caption_dropout=args.caption_dropout if prepared.text is not None else 0.0,
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
    if randomness.caption_drop is not None:
        model_kwargs = drop_captions(model_kwargs, randomness.caption_drop, prepared.text.empty_caption)
    return MicroBatch(x0, x1.to(device), randomness.t, class_labels, randomness, model_kwargs)


def accumulate_micro_step(
    args: argparse.Namespace,
    context: RunContext,
    models: TrainingModels,
    batch: MicroBatch,
    beta: float | torch.Tensor,
    state: LoopState,
) -> torch.Tensor | None:
    """Computes the loss of one micro-step and backpropagates it; on the window's last micro-step clips the gradient
    and updates the weights unless a loss or the gradient of the window was not finite. Nothing is read back to the
    host: the models skip their value checks, and the skip is decided on the device. Returns, on an update, its
    values for [`PendingUpdate`] (on the device; the last one is 1 when the update was skipped), else `None`."""
    accelerator = context.accelerator
    if args.torch_compile:  # a new step: CUDA graphs (`reduce-overhead`) may now overwrite the last one's outputs
        torch.compiler.cudagraph_mark_step_begin()
        if not isinstance(beta, torch.Tensor):  # a float would be a constant of the graph: one compile per value
            beta = torch.full((), beta, device=accelerator.device)
    with accelerator.accumulate(*models.trained), skip_value_checks():
        output = models.training_loss(
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
        accelerator.backward(parts.loss)  # a non-finite loss gives non-finite gradients: the update is then skipped
        loss_finite = torch.isfinite(values[0])
        if state.window_loss_finite is not None:
            loss_finite = loss_finite & state.window_loss_finite
        state.window_loss_finite = loss_finite
        window_sum = 0 if state.accumulated is None else state.accumulated
        state.accumulated = values / args.gradient_accumulation_steps + window_sum
        if output.posterior_mean is not None:
            state.last_means = output.posterior_mean
        if not accelerator.sync_gradients:
            return None

        max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(models.clipped_parameters, max_norm)
        scaler_skips = accelerator.mixed_precision == "fp16"  # the GradScaler skips non-finite gradients itself
        if grad_norm is None:  # an engine (DeepSpeed) that clips inside its own step: only the loss is checked
            grad_norm, skip = torch.full((), float("nan"), device=accelerator.device), ~loss_finite
        else:
            skip = ~loss_finite if scaler_skips else ~(loss_finite & torch.isfinite(grad_norm))
        training_step.optimizer_step_unless(models.optimizer, skip, scaler_skips=scaler_skips)
        models.lr_scheduler.step()
        models.optimizer.zero_grad(set_to_none=True)
        flags = torch.stack([grad_norm.detach().float().reshape(()), (~loss_finite).float(), skip.float()])
        return torch.cat([state.accumulated, posterior_statistics(accelerator, state.last_means), flags])


def read_pending_updates(
    args: argparse.Namespace, context: RunContext, models: TrainingModels, state: LoopState, metrics_path: str
) -> dict | None:
    """Reads the metrics of the updates made since the last read back to the host in one transfer, applies
    `--nonfinite_policy` and `--max_skipped_updates` to them in order, and logs one record per update (to the trackers
    and `metrics.jsonl`). Returns the last record (`None` when nothing was pending)."""
    if not state.pending:
        return None
    accelerator = context.accelerator
    pending, state.pending = state.pending, []
    adapted = isinstance(pending[0].beta, torch.Tensor)  # a run adapts beta at every step or at none
    vectors = [torch.cat([u.values, u.beta.reshape(1)]) if adapted else u.values for u in pending]
    rows = torch.stack(vectors).cpu().tolist()  # the one read
    pending[-1].seconds = time.time() - state.started  # the device has finished every pending update
    betas = [row.pop() for row in rows] if adapted else [u.beta for u in pending]
    num_statistics = len(training_step.POSTERIOR_STATISTICS) if args.latent_dim > 0 else 0

    def describe_checkpoint() -> str:
        return checkpointing.describe_last_checkpoint(args.output_dir, models.checkpoint_dirs)

    if accelerator.is_main_process:
        os.makedirs(context.logging_dir, exist_ok=True)  # created by the first write, so failed runs leave none
    log_file = open(metrics_path, "a", encoding="utf-8") if accelerator.is_main_process else contextlib.nullcontext()
    with log_file as handle:
        for update, row, beta in zip(pending, rows, betas):
            *values, grad_norm, loss_nonfinite, skipped = row
            values, statistics = values[: len(values) - num_statistics], values[len(values) - num_statistics :]
            if skipped and args.nonfinite_policy == "stop":
                raise RuntimeError(
                    f"Non-finite {'loss' if loss_nonfinite else 'gradient'} at step {update.step} (loss={values[0]}, "
                    f"grad_norm={grad_norm}); that update was skipped and the run stopped at step {pending[-1].step}, "
                    f"when the metrics were read (--logging_steps {args.logging_steps}), and {describe_checkpoint()}. "
                    "Lower --learning_rate, check the data, or pass `--nonfinite_policy skip` to skip such updates."
                )
            if skipped:
                context.log.warning(
                    f"Skipped the update of step {update.step}: non-finite loss or gradient (weights and optimizer "
                    "state unchanged)."
                )
            state.skips.record(bool(skipped), update.step, describe_checkpoint)
            logs = metrics_record(values, grad_norm, beta, update, state.skips.total)
            logs.update(zip(training_step.POSTERIOR_STATISTICS, statistics))
            if statistics:
                logs["active_units"] = int(logs["active_units"])
            state.recent.append(logs)
            accelerator.log(logs, step=update.step)
            if handle is not None:
                handle.write(json.dumps({"step": update.step, "seconds": round(update.seconds, 4), **logs}) + "\n")
    return logs


def metrics_record(values: list[float], grad_norm: float, beta: float, update: PendingUpdate, skipped: int) -> dict:
    """The logged metrics of one update from its values read back to the host."""
    logs = {
        "loss": values[0],
        "mse": values[1],
        "kl": values[2],
        "kl_nats": values[3],
        "beta": beta,
        "lr": update.lr,
        "grad_norm": grad_norm,
        "skipped_updates": skipped,
    }
    kl_per_dim = values[4:]
    if kl_per_dim:
        if len(kl_per_dim) <= 16:
            logs.update({f"kl_dim/{i}": v for i, v in enumerate(kl_per_dim)})
        else:
            logs.update({"kl_dim/max": max(kl_per_dim), "kl_dim/min": min(kl_per_dim)})
    if update.ema_decay is not None:
        logs["ema_decay"] = update.ema_decay
    return logs


def posterior_statistics(accelerator, posterior_means: torch.Tensor | None) -> torch.Tensor:
    """The `POSTERIOR_STATISTICS` of the window's last posterior means over all processes, on the device: empty
    without a posterior; no active unit and NaN statistics with a global batch of one."""
    if posterior_means is None:
        return torch.zeros(0, device=accelerator.device)
    gathered_means = accelerator.gather(posterior_means.float().contiguous())
    if gathered_means.shape[0] < 2:
        return torch.tensor([0.0, float("nan"), float("nan")], device=accelerator.device)
    return training_step.posterior_mean_statistics(gathered_means)


def save_loop_checkpoint(args: argparse.Namespace, context: RunContext, layout: BatchLayout, state: LoopState) -> str:
    """Writes `checkpoint-<global_step>` with what an exact continuation needs besides the weights."""
    manifest_state = {
        "micro_step": state.micro_step,
        "seed": args.seed,
        "global_batch_size": layout.global_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": context.accelerator.num_processes,
        "adaptive_beta": float(state.adaptive_beta),
    }
    path = checkpointing.save_checkpoint(
        context.accelerator, args.output_dir, state.global_step, manifest_state, args.checkpoints_total_limit
    )
    context.log.info(f"Saved {path}")
    return path


def make_data_iterator(args: argparse.Namespace, prepared: PreparedData, layout: BatchLayout, micro_step: int, device):
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


def record_update(
    models: TrainingModels, state: LoopState, beta, update_values: torch.Tensor, kl_target: float | None
) -> None:
    """After an optimizer update: the EMA, the adapted KL weight (unchanged by a skipped update), the step count, and
    the update's metrics queued on the device until the next read."""
    skipped = update_values[-1] > 0
    if models.ema_model is not None:  # after a skipped update it averages in the unchanged weights
        models.ema_model.step(models.ema_source_parameters)
    if kl_target is not None:  # the same on every process: the KL is the mean over processes and micro-steps
        adapted = adapt_beta(state.adaptive_beta, state.accumulated[3], kl_target)
        state.adaptive_beta = torch.where(skipped, state.adaptive_beta, adapted)
    state.global_step += 1
    state.pending.append(
        PendingUpdate(
            step=state.global_step,
            seconds=time.time() - state.started,
            lr=models.lr_scheduler.get_last_lr()[0],
            beta=beta,
            ema_decay=None if models.ema_model is None else models.ema_model.cur_decay_value,
            values=update_values,
        )
    )
    state.accumulated = state.window_loss_finite = None


def run_schedules(
    args: argparse.Namespace,
    context: RunContext,
    layout: BatchLayout,
    models: TrainingModels,
    state: LoopState,
    validator: Validator,
    stop_at: int,
    metrics_path: str,
) -> dict | None:
    """What falls due after update `state.global_step`: reading the queued metrics (every `--logging_steps`, at a
    checkpoint and at the end; their last record is returned, else `None`), a checkpoint (every
    `--checkpointing_steps`, and where `--stop_after_steps` stops early), and the validation figures (every
    `--validation_steps`, on the main process)."""
    accelerator, step, logs = context.accelerator, state.global_step, None
    checkpoint_now = step % args.checkpointing_steps == 0 or (step == stop_at and stop_at < args.max_train_steps)
    if step % args.logging_steps == 0 or checkpoint_now or step == stop_at:
        logs = read_pending_updates(args, context, models, state, metrics_path)
    if checkpoint_now:
        save_loop_checkpoint(args, context, layout, state)
    if accelerator.is_main_process and step % args.validation_steps == 0 and step < args.max_train_steps:
        validator(step, prior=None if models.prior_model is None else accelerator.unwrap_model(models.prior_model))
    return logs


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
        torch.full((), resumed.adaptive_beta, dtype=torch.float32, device=accelerator.device),  # no host copy
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
    start_step = state.global_step
    while state.global_step < stop_at:
        batch = draw_micro_batch(
            args, prepared, layout, models.noise_scheduler, state.micro_step, data_iterator, accelerator.device
        )
        if kl_target is not None:
            beta = state.adaptive_beta
        else:
            beta = training_step.beta_at_step(args.beta, state.global_step, args.beta_warmup_steps)
        update_values = accumulate_micro_step(args, context, models, batch, beta, state)
        state.micro_step += 1
        if update_values is None:
            continue

        record_update(models, state, beta, update_values, kl_target)
        progress_bar.update(1)
        logs = run_schedules(args, context, layout, models, state, validator, stop_at, metrics_path)
        if logs is not None:
            progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", kl=f"{logs['kl']:.3g}", lr=f"{logs['lr']:.2e}")

    progress_bar.close()
    return LoopResult(
        global_step=state.global_step,
        start_step=start_step,
        skipped_updates=state.skips.total,
        recent=list(state.recent),
        train_seconds=time.time() - state.started,
        finished=state.global_step >= args.max_train_steps,
    )
