"""Miniature reproductions of the paper's experiments; run each from the repository root as
`python -m experiments.<name>` (see experiments/common.py)."""
