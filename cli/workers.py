"""``tuneq workers``: who is listening, on which queues and device, running what."""

from __future__ import annotations

import json

import click

from tuneq.cli.context import engine, settings
from tuneq.cli.render import table


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def workers(as_json: bool) -> None:
    """List live workers: queues, device, threads, and the jobs (or job/shard) they run.

    A worker is live while its heartbeat (every TUNEQ_REAP_INTERVAL_S) is fresh.

    \b
    Examples:
      tuneq workers
      tuneq workers --json
    """
    from tuneq.worker.store.workers import live_workers
    from tuneq.worker.views.documents import worker_json

    rows = live_workers(engine(), interval_s=settings().reap_interval_s)
    if as_json:
        click.echo(json.dumps([worker_json(live) for live in rows], indent=2))
    elif rows:
        headers = ["worker", "queues", "device", "processes", "threads", "running"]
        click.echo(
            table(
                headers,
                [
                    [
                        live.worker.name,
                        ",".join(live.worker.queues),
                        live.worker.device,
                        live.worker.concurrency,
                        live.worker.threads,
                        " ".join(live.running) or "-",
                    ]
                    for live in rows
                ],
            )
        )
    else:
        click.echo("no live workers; start one with `tuneq worker`")
