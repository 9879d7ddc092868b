"""``tuneq jobs`` and ``tuneq show``: what is queued, running and done."""

from __future__ import annotations

import json

import click

from tuneq.cli.context import engine, settings
from tuneq.cli.queue import describe_estimate
from tuneq.cli.render import JOB_HEADERS, describe_job, job_row, table
from tuneq.schemas.statuses import JobStatus


@click.command()
@click.option(
    "--status", type=click.Choice([s.value for s in JobStatus]), help="Only jobs in this state."
)
@click.option("--group", "group_id", help="Only the jobs of this group (a sweep).")
@click.option("--limit", default=50, show_default=True, help="Show at most this many jobs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def jobs(status: str | None, group_id: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first.

    \b
    Examples:
      tuneq jobs
      tuneq jobs --status failed --json
      tuneq jobs --group imdb-lr-1a2b3c
    """
    from tuneq.worker.store import list_jobs
    from tuneq.worker.views.documents import job_json

    rows = list_jobs(engine(), limit=limit, status=status, group_id=group_id)
    if as_json:
        click.echo(json.dumps([job_json(job) for job in rows], indent=2))
    elif rows:
        click.echo(table(JOB_HEADERS, [job_row(job) for job in rows]))
    else:
        click.echo("no jobs yet; submit one with `tuneq finetune --data FILE`")


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def show(job_id: str, as_json: bool) -> None:
    """Show a job: spec, state, timings, metrics, error and model.

    JOB_ID may be the first characters of an id, if they are unique.

    \b
    Example:
      tuneq show 3f2a9c1d0b7e
    """
    from tuneq.worker.store import get_job, job_model, list_events

    db = engine()
    if as_json:
        from tuneq.worker.views.documents import job_detail

        detail = job_detail(db, job_id, interval_s=settings().reap_interval_s)
        click.echo(json.dumps(detail, indent=2))
        return
    from tuneq.worker.views.eta import job_estimate

    job = get_job(db, job_id)
    estimate = job_estimate(db, job, interval_s=settings().reap_interval_s)
    eta = describe_estimate(estimate) if estimate else None
    click.echo(describe_job(job, job_model(db, job), list_events(db, job.id), eta=eta))


@click.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job: a queued job never starts; a running fine-tune stops at its next step and a
    running scoring job at its next batch. A cancelled job registers no model and leaves no
    output.

    \b
    Example:
      tuneq cancel 3f2a9c
    """
    from tuneq.worker.jobs.lifecycle import cancel as cancel_job

    click.echo(f"cancelled {cancel_job(engine(), job_id)}")


@click.command()
@click.argument("job_id")
@click.option(
    "--resume",
    is_flag=True,
    help="Go on from the newest complete checkpoint (a fine-tune submitted with "
    "--keep-checkpoints, or requeued after a lost worker) instead of from the start.",
)
def retry(job_id: str, resume: bool) -> None:
    """Run a failed or cancelled job again under the same id: from the start, unless --resume.

    \b
    Examples:
      tuneq retry 3f2a9c && tuneq show 3f2a9c
      tuneq retry 3f2a9c --resume
    """
    from tuneq.worker.jobs.submit import retry as retry_job

    job = retry_job(settings(), job_id, resume=resume)
    how = "to resume from its newest checkpoint" if resume else "from the start"
    click.echo(f"queued {job.id} again, {how}")
