"""Processes: a tiny layer on accelerate's PartialState for scripts that need ranks but not an Accelerator.

Launched by torchrun or `accelerate launch`, init() joins the process group (NCCL on GPU, gloo on CPU); run as plain
`python script.py` it is one process and every call below is a no-op or the identity. PartialState is shared by
every Accelerator in the process, so these helpers agree with train.py's.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object as _gather_object

TIMEOUT = timedelta(minutes=60)  # ranks wait for each other's slow steps (e.g. rank 0 packing a 50K-image archive)


def init() -> PartialState:
    """Join the process group (once; later calls return the same state)."""
    return PartialState(cpu=not torch.cuda.is_available(), timeout=TIMEOUT)


def rank() -> int:
    """This process's index (0 on one process)."""
    return init().process_index


def world_size() -> int:
    """Number of processes."""
    return init().num_processes


def is_main() -> bool:
    """Whether this is rank 0 (the one that writes shared files and prints)."""
    return init().is_main_process


def print0(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def barrier() -> None:
    """Wait for every process."""
    init().wait_for_everyone()


def gather_object(obj: Any) -> list[Any]:
    """Every process's `obj` (any picklable value), in rank order."""
    return list(_gather_object([obj]))


def shutdown() -> None:
    """Leave the process group (a no-op on one process)."""
    init().destroy_process_group()
