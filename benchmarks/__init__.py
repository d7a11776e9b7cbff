"""Benchmarks of the paper's efficiency claims; run each from the repository root as `python -m benchmarks.<name>`."""
