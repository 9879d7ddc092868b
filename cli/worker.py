"""``tuneq worker``: run jobs from the queue."""

from __future__ import annotations

import click

from tuneq.cli.context import settings


@click.command()
@click.option(
    "--queues",
    "-Q",
    default="cpu",
    show_default=True,
    help="Comma-separated queues to take jobs from.",
)
@click.option(
    "--concurrency",
    "-c",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Jobs run at once (one process each); torch threads are split between them.",
)
@click.option(
    "--jobs-per-child",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Replace a pool process after this many jobs (0: never). 1 returns all memory.",
)
@click.option(
    "--gpu",
    type=click.IntRange(0),
    default=None,
    help="Run on this GPU (the Nth that CUDA_VISIBLE_DEVICES allows), one job at a time. "
    "Without --gpu a worker runs on the CPU and sees no GPU.",
)
@click.option("--name", default=None, help="Worker name (default: celery@HOST).")
@click.option(
    "--loglevel",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
def worker(
    queues: str,
    concurrency: int,
    jobs_per_child: int,
    gpu: int | None,
    name: str | None,
    loglevel: str,
) -> None:
    """Start a worker that runs queued jobs until stopped (Ctrl-C).

    Asked to stop (SIGTERM, Ctrl-C once), it takes no new work and finishes the job it runs;
    with TUNEQ_HAND_BACK_ON_STOP=true a running fine-tune instead checkpoints at the end of
    its step and goes back to the queue, for the next worker to resume (behind an
    orchestrator that kills after a grace period). Ctrl-C twice stops at once.

    \b
    Examples:
      tuneq worker
      TUNEQ_BROKER_URL=redis://host:6379/0 tuneq worker --queues cpu --concurrency 2
      tuneq worker --queues gpu --gpu 0
      TUNEQ_HAND_BACK_ON_STOP=true tuneq worker --queues cpu
    """
    from tuneq.worker.jobs.serve import run_worker

    names = [q.strip() for q in queues.split(",") if q.strip()]
    if not names:
        raise click.BadParameter("give at least one queue", param_hint="--queues")
    code = run_worker(
        settings(),
        queues=names,
        concurrency=concurrency,
        jobs_per_child=jobs_per_child,
        hostname=name,
        loglevel=loglevel.upper(),
        gpu=gpu,
    )
    click.get_current_context().exit(code)
