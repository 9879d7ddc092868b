"""``tuneq queue``: what is running and waiting, in the order it will run, with ETAs."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from tuneq.cli.context import engine, settings
from tuneq.cli.follow import format_seconds
from tuneq.cli.render import table

if TYPE_CHECKING:
    from tuneq.worker.views.eta import Estimate


@click.command()
@click.option("--queue", "queue_name", help="Only this queue (cpu, gpu, …).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def queue(queue_name: str | None, as_json: bool) -> None:
    """Show running and waiting jobs in the order they will run, with when each should start
    and end.

    Waiting jobs run by priority (high, normal, low), then in order of arrival, on the live
    workers listening on their queue. Durations come from finished jobs: seconds per training
    example and epoch for fine-tunes, median time per model for scoring jobs.

    \b
    Examples:
      tuneq queue
      tuneq queue --queue gpu --json
    """
    from tuneq.worker.views.documents import estimate_json
    from tuneq.worker.views.eta import queue_estimates

    estimates = queue_estimates(engine(), interval_s=settings().reap_interval_s)
    if queue_name:
        estimates = [e for e in estimates if e.queue == queue_name]
    if as_json:
        click.echo(json.dumps([estimate_json(e) for e in estimates], indent=2))
    elif estimates:
        headers = ["queue", "#", "job", "priority", "starts in", "ends in", "estimated from"]
        click.echo(table(headers, [estimate_row(e) for e in estimates]))
    else:
        click.echo("nothing is queued or running")


def estimate_row(estimate: Estimate) -> list[Any]:
    return [
        estimate.queue,
        estimate.position or "running",
        estimate.job_id,
        estimate.priority,
        about(estimate.start_in_s) if estimate.position else "-",
        about(estimate.end_in_s),
        estimate.basis,
    ]


def describe_estimate(estimate: Estimate) -> str:
    """One line for ``tuneq show``."""
    if not estimate.position:
        return f"running; ends in {about(estimate.end_in_s)} ({estimate.basis})"
    return (
        f"#{estimate.position} on queue {estimate.queue} ({estimate.priority} priority); "
        f"starts in {about(estimate.start_in_s)}, ends in {about(estimate.end_in_s)} "
        f"({estimate.basis})"
    )


def about(seconds: float | None) -> str:
    return "?" if seconds is None else f"~{format_seconds(seconds)}"
