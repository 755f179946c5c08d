"""Datasets: the toy source/target pairs of the paper and the benchmarks."""

from .toy import TOY_TASKS, ToyTask, get_toy_task

__all__ = ["TOY_TASKS", "ToyTask", "get_toy_task"]
