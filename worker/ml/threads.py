"""Torch threads in worker processes: a share of the host's cores, quiet library output.

Every pool process of every ``tuneq worker`` on a machine (without ``TUNEQ_WORKER_THREADS``)
joins a registry of files in the machine's temporary folder, one per process. Before each job
or shard, and every few seconds of a fine-tune, a process counts the live ones and sets its
torch threads to its share of the cores, so that two workers on one machine split its cores
instead of each taking all of them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

REFIT_INTERVAL_S = 10.0  # how often a running fine-tune looks at the registry again
_last_fit = {"at": float("-inf"), "threads": 0}


def host_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def share_of_cores(concurrency: int) -> int:
    """Cores per worker process when ``concurrency`` processes share this machine alone."""
    return max(1, host_cores() // max(1, concurrency))


def registry() -> Path:
    """The folder of live worker processes on this machine (per user)."""
    return Path(tempfile.gettempdir()) / f"tuneq-threads-{os.getuid()}"


def started(pid: int) -> str | None:
    """An identity for process ``pid`` that a reused pid does not share (its start time in
    clock ticks since boot, on Linux); ``None`` if no such process runs."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""  # alive; its start is unknown here


def join_host(folder: Path | None = None) -> None:
    """Count this process among the machine's worker processes until it leaves or dies."""
    folder = folder or registry()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).write_text(started(os.getpid()) or "")


def leave_host(folder: Path | None = None) -> None:
    ((folder or registry()) / str(os.getpid())).unlink(missing_ok=True)


def host_processes(folder: Path | None = None) -> list[int]:
    """The live worker processes on this machine, by pid; files of dead ones are removed."""
    folder = folder or registry()
    live = []
    for path in folder.glob("[0-9]*") if folder.is_dir() else []:
        pid = int(path.name)
        try:
            identity = path.read_text()
        except OSError:
            continue  # left just now
        if started(pid) == identity:
            live.append(pid)
        else:
            path.unlink(missing_ok=True)
    return sorted(live)


def host_share(pid: int, pids: list[int], cores: int) -> int:
    """Process ``pid``'s threads when ``pids`` share ``cores``: an equal share, the remainder
    going to the lowest pids, so the shares add up to the cores (at least one thread each)."""
    base, extra = divmod(cores, len(pids))
    return max(1, base + (1 if pids.index(pid) < extra else 0))


def current_share(folder: Path | None = None) -> int | None:
    """The threads a worker process on this machine has now (the smaller share when they
    differ by one); ``None`` when no worker process is registered."""
    pids = host_processes(folder)
    return max(1, host_cores() // len(pids)) if pids else None


def fit_threads_to_host(*, every_s: float = 0.0, folder: Path | None = None) -> int | None:
    """Set this process's torch threads to its share of the machine's cores, at most once per
    ``every_s`` seconds; its threads, or ``None`` if this process is not in the registry."""
    now = time.monotonic()
    if now - _last_fit["at"] < every_s:
        return None
    _last_fit["at"] = now
    pids = host_processes(folder)
    if os.getpid() not in pids:
        return None
    threads = host_share(os.getpid(), pids, host_cores())
    if threads != _last_fit["threads"]:
        import torch

        torch.set_num_threads(threads)
        log.info(
            "torch threads: %d (%d worker processes share %d cores on this machine)",
            threads,
            len(pids),
            host_cores(),
        )
        _last_fit["threads"] = threads
    return threads


def configure_torch(threads: int | None) -> None:
    """Import torch and the Trainer in this (child) process and set torch's threads (``None``:
    a share of the host's cores, set before each job).

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
    else:
        join_host()
        fit_threads_to_host()
    quiet_transformers()
    # Paid once per worker process, not by each job: the Trainer's imports take seconds.
    from transformers import Trainer  # noqa: F401
