"""What checksums cost a checkpoint: the time of one `train_vrfm.py` checkpoint of the GPU-sized UNet, before and
after SHA-256 checksums (issue 17), side by side on the same machine.

The state is what a training run checkpoints: the velocity UNet (`block_out_channels [64, 128, 128]`, 2 layers per
block, at 28x28), the default convolutional posterior, their EMA, AdamW after one update and the learning-rate
schedule, prepared by accelerate on the CPU. The rows:

- **before**: the procedure of the script before checksums: `save_pretrained` for each model inside
  `accelerator.save_state`, then a manifest of file sizes (each file fsync'ed), then the rename;
- **after**: [`save_checkpoint`] as it is now, every file hashed while it is written;
- **after + verify**: the same, plus [`verify_checkpoint`] reading every file back (what `--resume_from_checkpoint`
  pays once, at resume; shown for scale, not part of a checkpoint).

The rows are timed interleaved (see `interleaved_timings`), each round writing a fresh folder.

Run from the repository root::

    python -m benchmarks.checkpoint_speed              # 7 rounds
    python -m benchmarks.checkpoint_speed --quick      # 2 rounds
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmarks/checkpoint_speed.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import interleaved_timings, machine_description, markdown_table  # noqa: E402

GPU_SIZED_UNET = {"block_out_channels": [64, 128, 128], "layers_per_block": 2, "norm_num_groups": 32}
GPU_SIZED_UNET["attention_head_dim"] = 32
SAMPLE_SHAPE = (1, 28, 28)


def training_state():
    """An accelerator holding the models, AdamW (after one update), the schedule and the EMA of a UNet run."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from diffusers_vrfm.training.factory import DEFAULT_MODEL_CONFIGS, build_models

    config = {**DEFAULT_MODEL_CONFIGS["unet"], **GPU_SIZED_UNET}
    built = build_models("unet", SAMPLE_SHAPE, 4, ("x1",), model_config=config)
    velocity, posterior = built.velocity_model, built.posterior_encoder
    parameters = list(velocity.parameters()) + list(posterior.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    sum(p.sum() for p in parameters).backward()
    optimizer.step()
    schedule = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=10, num_training_steps=1000)
    ema = EMAModel(velocity.parameters(), model_cls=type(velocity), model_config=velocity.config)
    accelerator = Accelerator(cpu=True)
    velocity, posterior, optimizer, schedule = accelerator.prepare(velocity, posterior, optimizer, schedule)
    return accelerator, ema, sum(p.numel() for p in parameters)


def before_hook(accelerator, ema):
    """The save hook of the script before checksums: `save_pretrained` for each model and the EMA."""
    from diffusers_vrfm.training import checkpointing as ckpt

    def hook(models, weights, output_dir):
        ema.save_pretrained(os.path.join(output_dir, ckpt.EMA_DIR))
        for model, folder in zip(models, (ckpt.VELOCITY_MODEL_DIR, ckpt.POSTERIOR_ENCODER_DIR)):
            accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, folder))
        weights.clear()

    return hook


def save_before(accelerator, output_dir: str, step: int) -> None:
    """`save_state`, a manifest of sizes with every file fsync'ed, then the rename (the script before checksums)."""
    from diffusers_vrfm.training.checkpointing import MANIFEST_NAME, _fsync_directory, write_json_atomic

    temporary = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    os.makedirs(temporary)
    accelerator.save_state(temporary)
    sizes = {}
    for root, _, names in os.walk(temporary):
        _fsync_directory(root)
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            sizes[os.path.relpath(path, temporary)] = os.path.getsize(path)
    write_json_atomic(os.path.join(temporary, MANIFEST_NAME), {"global_step": step, "files": sizes})
    os.replace(temporary, os.path.join(output_dir, f"checkpoint-{step}"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="Interleaved rounds (each writes every row once).")
    parser.add_argument("--quick", action="store_true", help="2 rounds, no warm-up.")
    parser.add_argument("--threads", "--num_threads", dest="num_threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    from diffusers_vrfm.training.checkpointing import make_state_hooks, save_checkpoint, verify_checkpoint

    accelerator, ema, num_parameters = training_state()
    after_hook, _ = make_state_hooks(accelerator, ema)
    root = tempfile.mkdtemp(prefix="checkpoint-speed-")
    counter = {"step": 0}

    def run(save, hook, verify=False):
        def call():
            counter["step"] += 1
            folder = os.path.join(root, str(counter["step"]))
            os.makedirs(folder)
            handle = accelerator.register_save_state_pre_hook(hook)
            try:
                path = save(accelerator, folder, counter["step"])
                if verify:
                    verify_checkpoint(path)
            finally:
                handle.remove()
            sizes.append(sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()))
            shutil.rmtree(folder)

        return call

    sizes = []
    after = run(lambda a, folder, step: save_checkpoint(a, folder, step, {}), after_hook)
    rows = {
        "before (sizes only)": run(save_before, before_hook(accelerator, ema)),
        "after (SHA-256 while writing)": after,
        "after + verify (resume only)": run(lambda a, f, s: save_checkpoint(a, f, s, {}), after_hook, verify=True),
    }
    rounds = 2 if args.quick else args.rounds
    timings = interleaved_timings(rows, repeats=rounds, warmup=0 if args.quick else 1)
    shutil.rmtree(root, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    baseline = medians["before (sizes only)"]
    table = markdown_table(
        ["checkpoint", "median s", "vs before", "all rounds (s)"],
        [
            [name, f"{median:.3f}", f"{median / baseline:.2f}x", ", ".join(f"{v:.3f}" for v in timings[name])]
            for name, median in medians.items()
        ],
    )
    print(f"GPU-sized UNet {GPU_SIZED_UNET} at {SAMPLE_SHAPE[1]}x{SAMPLE_SHAPE[2]}: {num_parameters:,} trained "
          f"parameters (velocity + posterior), checkpoint {max(sizes) / 2**20:.1f} MiB, {rounds} rounds")  # fmt: skip
    print(machine_description())
    print(table)
    return {"medians": medians, "timings": timings, "checkpoint_bytes": max(sizes)}


if __name__ == "__main__":
    main()
