"""Following a job until it ends: a one-line progress display, then the outcome."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from tuneq.schemas.statuses import FINISHED, JobStatus

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from tuneq.schemas.tables import Job

POLL_S = 0.5
BAR_WIDTH = 24


def progress_line(job: Job) -> str:
    """``training [#####-----] 12/63 steps  epoch 0.19  loss 0.6931  ETA 40s``"""
    progress: dict[str, Any] = job.progress or {}
    phase = progress.get("phase") or job.status
    if "total_rows" in progress:
        step, total, unit = progress.get("rows"), progress["total_rows"], "rows"
    else:
        step, total, unit = progress.get("step"), progress.get("total"), "steps"
    if step is None or not total:
        return f"{job.id} {phase}…"
    filled = int(BAR_WIDTH * step / total)
    parts = [f"{phase} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {step}/{total} {unit}"]
    if progress.get("epoch") is not None:
        parts.append(f"epoch {progress['epoch']:.2f}")
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("rows_per_s") is not None:
        parts.append(f"{progress['rows_per_s']:.1f} rows/s")
    if progress.get("eta_s") is not None:
        parts.append(f"ETA {format_seconds(progress['eta_s'])}")
    return "  ".join(parts)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def follow_job(
    engine: Engine,
    job_id: str,
    *,
    timeout_s: float | None = None,
    watch: Callable[[], str | None] | None = None,
) -> Job:
    """Print progress until job ``job_id`` ends; fail (exit 1) unless it succeeded.

    ``watch``, called at every poll, may return a reason to stop waiting (a dead worker).
    """
    from tuneq.worker.store import get_job, list_events

    interactive = sys.stderr.isatty()
    last_line = ""
    warned: set[int] = set()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        job = get_job(engine, job_id)
        for event in list_events(engine, job.id):
            if event.kind == "warning" and event.id not in warned:
                warned.add(event.id)
                click.echo(
                    ("\n" if interactive and last_line else "") + f"warning: {event.message}",
                    err=True,
                )
                last_line = ""
        line = progress_line(job)
        if line != last_line:
            if interactive:
                click.echo("\r" + line.ljust(len(last_line)), nl=False, err=True)
            elif _worth_printing(line, last_line):
                click.echo(line, err=True)
            last_line = line
        if JobStatus(job.status) in FINISHED:
            break
        problem = watch() if watch else None
        if problem:
            raise click.ClickException(f"job {job_id} is {job.status}, but {problem}")
        if deadline is not None and time.monotonic() > deadline:
            raise click.ClickException(f"job {job_id} did not finish in {timeout_s:.0f}s")
        time.sleep(POLL_S)
    if interactive:
        click.echo(err=True)
    if job.status != JobStatus.succeeded.value:
        raise click.ClickException(f"job {job.id} {job.status}: {job.error or 'no reason given'}")
    return job


def _worth_printing(line: str, last_line: str) -> bool:
    """Without a terminal, print phase changes and every tenth of the steps, not every poll."""
    if line.split(" ")[0] != last_line.split(" ")[0] or "[" not in line:
        return True
    filled = line.count("#")
    return filled != last_line.count("#") and filled % max(1, BAR_WIDTH // 10) == 0
