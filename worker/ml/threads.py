"""Torch start-up in a worker process: threads that fit the worker, quiet library output."""

from __future__ import annotations

import os


def share_of_cores(concurrency: int) -> int:
    """Cores per worker process when ``concurrency`` processes share this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, concurrency))


def configure_torch(threads: int | None) -> None:
    """Import torch and the Trainer in this (child) process and set torch's threads.

    Called after fork: torch threads created in a parent can hang a forked child
    (transformers#7516), and CUDA is never initialised here.
    """
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
    import torch

    from tuneq.worker.ml.models import quiet_transformers

    if threads:
        torch.set_num_threads(threads)
    quiet_transformers()
    # Paid once per worker process, not by each job: the Trainer's imports take seconds.
    from transformers import Trainer  # noqa: F401
