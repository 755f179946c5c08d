"""The first stage of `train_vrfm.py`: threads, the accelerator, logging and the global seed."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

LOGGER_NAME = "train_vrfm"
TRACKER_PROJECT = "train_vrfm"  # the trackers write under `logging_dir/train_vrfm`


@dataclass
class RunContext:
    """What every later stage of a run shares.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        log: the run's logger (`accelerate.logging.get_logger`, main-process messages by default).
        logging_dir (`str`): `--output_dir/--logging_dir`; created only when something is written to it.
        argv (`list[str]`): the command line, for the model card.
        run_start (`float`): `time.time()` when the run started.
    """

    accelerator: Accelerator
    log: logging.LoggerAdapter
    logging_dir: str
    argv: list[str] = field(default_factory=list)
    run_start: float = 0.0


def resolve_cpu(requested: bool) -> bool:
    """`--cpu`, or no CUDA and WORLD_SIZE > 1 (accelerate would otherwise silently run independent processes)."""
    return bool(requested) or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)


def tracker_config(args: argparse.Namespace) -> dict:
    """The arguments as the trackers log them: plain values only, without private entries or the Hub token.

    ```py
    >>> import argparse
    >>> from diffusers_vrfm.training.environment import tracker_config
    >>> tracker_config(argparse.Namespace(seed=0, hub_token="secret", _argv=[], validation_inference_steps=[1, 2]))
    {'seed': 0, 'validation_inference_steps': '[1, 2]'}

    ```
    """
    config = {}
    for key, value in vars(args).items():
        if key.startswith("_") or key == "hub_token":
            continue
        config[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return config


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX tiles), as torch detects it."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def mixed_precision_warning(mixed_precision: str, device_type: str, native_bf16: bool) -> str | None:
    """A warning for a precision that runs but slowly on this device: bf16 on a CPU without native bf16, where it is
    emulated.

    ```py
    >>> from diffusers_vrfm.training.environment import mixed_precision_warning
    >>> mixed_precision_warning("bf16", "cpu", native_bf16=True) is None
    True
    >>> print(mixed_precision_warning("bf16", "cpu", native_bf16=False))
    `--mixed_precision bf16` on a CPU without native bf16 (AVX512-BF16 or AMX): it runs, but emulated, ...

    ```
    """
    if mixed_precision == "bf16" and device_type == "cpu" and not native_bf16:
        return (
            "`--mixed_precision bf16` on a CPU without native bf16 (AVX512-BF16 or AMX): it runs, but emulated, and "
            "usually much slower than fp32. Pass `--mixed_precision no`."
        )
    return None


def set_up_run(args: argparse.Namespace) -> RunContext:
    """Sets the thread count (and TF32 with `--allow_tf32`), creates the accelerator and the logger, and seeds
    everything with `--seed`."""
    run_start = time.time()
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    argv = list(getattr(args, "_argv", sys.argv[1:]))
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        cpu=resolve_cpu(args.cpu),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters)],
    )
    log = get_logger(LOGGER_NAME, log_level="INFO")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    log.info(
        f"distributed_type={accelerator.distributed_type} num_processes={accelerator.num_processes} "
        f"device={accelerator.device} mixed_precision={accelerator.mixed_precision}",
        main_process_only=False,
    )
    warning = mixed_precision_warning(accelerator.mixed_precision, accelerator.device.type, cpu_has_native_bf16())
    if warning:
        log.warning(warning)
    set_seed(args.seed)
    return RunContext(accelerator=accelerator, log=log, logging_dir=logging_dir, argv=argv, run_start=run_start)
