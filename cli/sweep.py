"""``tuneq sweep`` and ``tuneq compare``: many fine-tunes from one file, and the winner."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tuneq.cli.context import engine, settings
from tuneq.cli.render import table
from tuneq.cli.spec_options import absolute_paths, build_spec, read_job_file
from tuneq.schemas.specs import FinetuneSpec
from tuneq.schemas.statuses import FINISHED, JobStatus

if TYPE_CHECKING:
    from tuneq.schemas.tables import Job


@click.command()
@click.argument("sweep_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait", is_flag=True, help="Wait until every job has ended, then compare.")
@click.option(
    "--notify",
    metavar="URL",
    help="POST the group's summary (counts, best run, every run) here once all jobs have ended; "
    "overrides the file's notify.",
)
def sweep(sweep_file: Path, wait: bool, notify: str | None) -> None:
    """Queue one fine-tune per combination of a grid (and of data sets), as one group.

    SWEEP_FILE (YAML or JSON) has a `base` spec, a `grid` of lists, an optional `data` list,
    an optional `name` and an optional `notify` URL for the whole group (a `notify` in `base`
    posts once per job instead). Prints the group id, then one job id per line.

    \b
    Example sweep.yaml:
      name: imdb-lr
      base: {data: reviews.csv, model: minilm, epochs: 1}
      grid: {learning_rate: [1.0e-4, 5.0e-5], batch_size: [8, 16]}
    \b
      tuneq sweep sweep.yaml --wait
      tuneq sweep sweep.yaml --notify https://hooks.example.com/tuneq
      tuneq compare imdb-lr-1a2b3c
    """
    from tuneq.worker.jobs.submit import submit_jobs
    from tuneq.worker.store import new_group
    from tuneq.worker.views.sweep import expand

    document = read_job_file(sweep_file)
    if notify is not None:
        document["notify"] = notify
    plan = expand(document, sweep_file.stem)
    specs = []
    for run in plan.runs:
        absolute_paths(run, ("data", "eval_data", "model"))
        specs.append(build_spec(FinetuneSpec, run))  # every spec is valid before any is queued
    group = new_group(group_id=plan.group_id, size=len(specs), notify=plan.notify)
    jobs = submit_jobs(settings(), specs, group=group)  # every row first, then the messages
    click.echo(plan.group_id)
    for job in jobs:
        click.echo(job.id)
    if wait:
        wait_for_group(plan.group_id)
        click.echo(compare_table(plan.group_id), err=True)


def wait_for_group(group_id: str, poll_s: float = 1.0) -> list[Job]:
    from tuneq.worker.store import list_jobs

    while True:
        jobs = list_jobs(engine(), group_id=group_id, limit=10_000)
        if all(JobStatus(job.status) in FINISHED for job in jobs):
            return jobs
        time.sleep(poll_s)


def compare_table(group_id: str) -> str:
    from tuneq.worker.views.sweep import compare_rows

    rows = compare_rows(engine(), group_id)
    headers = list(rows[0])

    def cell(value: Any) -> Any:
        return f"{value:.4g}" if isinstance(value, float) else value

    return table(headers, [[cell(row[h]) for h in headers] for row in rows])


@click.command()
@click.argument("group_id")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def compare(group_id: str, as_json: bool) -> None:
    """Compare the jobs of a group: the fields that vary, then metrics, best first.

    Best means by the metric that picked each run's best checkpoint (--metric, or the task's
    default: macro-F1, micro-F1 for multi-label, MAE for regression, lowest first); runs that
    did not succeed come last.

    \b
    Examples:
      tuneq compare imdb-lr-1a2b3c
      tuneq compare imdb-lr-1a2b3c --json
    """
    if as_json:
        from tuneq.worker.views.sweep import compare_rows

        click.echo(json.dumps(compare_rows(engine(), group_id), indent=2))
    else:
        click.echo(compare_table(group_id))
