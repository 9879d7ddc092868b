"""``tuneq finetune``: submit a fine-tune job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tuneq.cli.context import engine, settings
from tuneq.cli.follow import follow_job
from tuneq.cli.spec_options import absolute_paths, build_spec, read_job_file, spec_options
from tuneq.schemas.specs import FinetuneSpec


@click.command()
@click.argument(
    "job_file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@spec_options(FinetuneSpec, exclude=("kind",))
@click.option("--wait", is_flag=True, help="Follow the job with a progress bar until it ends.")
def finetune(job_file: Path | None, wait: bool, **options: Any) -> None:
    """Queue a fine-tune of a text classifier; prints the job id.

    Options override the fields of JOB_FILE (YAML or JSON), if one is given.
    A worker (`tuneq worker`) runs the job.

    \b
    Examples:
      tuneq finetune --data reviews.csv --name reviews --wait
      tuneq finetune --data ../shared/data/imdb --train-size 1000 --eval-size 400 \\
          --label-names negative,positive --name imdb-sentiment
      tuneq finetune job.yaml --epochs 5 --patience 2
      tuneq finetune --data ../shared/data/imdb --task regression --label-column rating
      tuneq finetune --data tags.jsonl --task multi_label --label-column topics
      tuneq finetune --data reviews.csv --label-error-folds 4   # also rank likely label errors
    """
    values = read_job_file(job_file) if job_file else {}
    values.update({name: value for name, value in options.items() if value is not None})
    absolute_paths(values, ("data", "eval_data", "model"))
    spec = build_spec(FinetuneSpec, values)
    from tuneq.worker.jobs.submit import submit_job

    job = submit_job(settings(), spec)
    click.echo(job.id)
    if wait:
        follow_job(engine(), job.id)
