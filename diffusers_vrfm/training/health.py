"""Honest end states for `train_vrfm.py`: a diverged run fails loudly instead of saving a pipeline that looks fine.

Two guards:
- [`SkippedUpdates`] counts the updates skipped under `--nonfinite_policy skip` (non-finite loss or gradient) and stops
  the run when more than `--max_skipped_updates` are skipped in a row: the model is no longer learning.
- [`check_trained_pipeline`] runs before the pipeline is written: every weight of every component must be finite, and
  a few samples drawn with it must be finite. Otherwise nothing is saved and the run exits with an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class TrainingFailedError(RuntimeError):
    """The run diverged or produced a model that cannot sample; nothing that looks like a result was written."""


@dataclass
class SkippedUpdates:
    """The count of skipped updates, in all and in a row, with the limit on the latter.

    Args:
        limit (`int`): the most updates that may be skipped in a row (`--max_skipped_updates`).

    Example:

    ```py
    >>> from diffusers_vrfm.training.health import SkippedUpdates, TrainingFailedError
    >>> skips = SkippedUpdates(limit=1)
    >>> skips.record(True, step=1); skips.record(False, step=2); skips.record(True, step=3)
    >>> skips.total, skips.in_a_row
    (2, 1)
    >>> try:
    ...     skips.record(True, step=4)
    ... except TrainingFailedError:
    ...     print("diverged")
    diverged
    ```
    """

    limit: int
    total: int = 0
    in_a_row: int = 0

    def record(self, skipped: bool, step: int, describe_checkpoint=None) -> None:
        """Counts the update of `step`; raises [`TrainingFailedError`] once more than `limit` were skipped in a row.

        `describe_checkpoint` (*optional*, e.g. `lambda: describe_last_checkpoint(output_dir)`) is called only then,
        and its sentence added to the message.
        """
        if not skipped:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row > self.limit:
            checkpoint_note = describe_checkpoint() if describe_checkpoint is not None else ""
            raise TrainingFailedError(
                f"Training diverged: the last {self.in_a_row} updates (to step {step}) were all skipped for a "
                f"non-finite loss or gradient, more than --max_skipped_updates {self.limit} ({self.total} skipped "
                f"in all). No pipeline was written{'; ' + checkpoint_note if checkpoint_note else ''}. Lower "
                "--learning_rate or check the data."
            )


def nonfinite_tensors(module: torch.nn.Module) -> list[str]:
    """The names of the parameters and buffers of `module` that hold a NaN or an inf."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return [name for name, tensor in named if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


@torch.no_grad()
def check_trained_pipeline(pipeline, num_inference_steps: int, skipped_updates: int = 0, seed: int = 0) -> None:
    """Refuses a trained pipeline that is not usable: non-finite weights in any component, or non-finite samples.

    Draws 4 samples with `num_inference_steps` steps (the pipeline refuses non-finite results). Raises
    [`TrainingFailedError`] naming the component and tensors, or the sampling error; returns `None` when all is well.
    """
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            bad = nonfinite_tensors(component)
            if bad:
                shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                raise TrainingFailedError(
                    f"Training ended with non-finite weights in `{name}` ({shown}; {skipped_updates} updates were "
                    "skipped): no pipeline was written. Lower --learning_rate or check the data."
                )
    from ..pipelines.pipeline_vrfm_text2img import VRFMTextToImagePipeline

    generator = torch.Generator().manual_seed(seed)
    if isinstance(pipeline, VRFMTextToImagePipeline):  # four images of the empty prompt
        batch = {"prompt": "", "num_images_per_prompt": 4, "guidance_scale": 1.0}
    else:
        batch = {"batch_size": 4}
    try:
        pipeline(**batch, num_inference_steps=num_inference_steps, generator=generator, output_type="latent")
    except ValueError as error:
        raise TrainingFailedError(
            f"The trained pipeline cannot sample ({error}); {skipped_updates} updates were skipped. No pipeline was "
            "written. Lower --learning_rate or check the data."
        ) from error
