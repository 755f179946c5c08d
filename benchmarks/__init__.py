"""Benchmarks of diffusers-vrfm: one entry point per benchmark, each with a `--quick` smoke mode.

Run them as modules from the repository root (`python -m benchmarks.toy_quality`) or as scripts
(`python benchmarks/toy_quality.py`). See `benchmarks/README.md`.
"""
