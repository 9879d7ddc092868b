"""``tuneq score``: submit a batch-predict job over a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tuneq.cli.context import engine, settings
from tuneq.cli.follow import follow_job
from tuneq.cli.spec_options import absolute_paths, build_spec, read_job_file, spec_options
from tuneq.schemas.specs import ScoreSpec


@click.command()
@click.argument("model", required=False)
@click.argument("input_file", metavar="INPUT", required=False)
@click.option(
    "--job-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML or JSON file of spec fields; options override it.",
)
@spec_options(ScoreSpec, exclude=("kind", "model", "input", "model_path"))
@click.option("--wait", is_flag=True, help="Follow the job with a progress bar until it ends.")
def score(
    model: str | None, input_file: str | None, job_file: Path | None, wait: bool, **options: Any
) -> None:
    """Label every row of INPUT with MODEL and write the rows, in order, with label and score.

    MODEL is a registered name (its latest version), name:version, or a model folder. The job
    is split into shards that every listening worker scores in parallel; the output appears
    whole when the last shard is done. Paths must be reachable by the workers (a shared folder
    when they run on other machines).

    \b
    Examples:
      tuneq score imdb-sentiment reviews.csv --output scored.parquet --wait
      tuneq score imdb-sentiment:2 tweets.jsonl.gz --output out.csv --probabilities
      tuneq score ./models/sentiment big.csv --output big.scored.csv --precision bf16
    """
    values = read_job_file(job_file) if job_file else {}
    values.update({k: v for k, v in options.items() if v is not None})
    if model:
        values["model"] = model
    if input_file:
        values["input"] = input_file
    if "input" in values and "output" not in values:
        values["output"] = default_output(values["input"])
    absolute_paths(values, ("input", "output"))
    values["kind"] = "score"
    spec = build_spec(ScoreSpec, values)
    from tuneq.worker.jobs.submit import submit_job
    from tuneq.worker.store import model_location

    spec = spec.model_copy(update={"model_path": model_location(engine(), spec.model)})
    job = submit_job(settings(), spec)
    click.echo(job.id)
    if wait:
        done = follow_job(engine(), job.id)
        metrics = done.metrics or {}
        click.echo(
            f"scored {metrics.get('rows')} rows ({metrics.get('empty_rows')} empty) in "
            f"{metrics.get('seconds')}s, {metrics.get('rows_per_second')} rows/s: "
            f"{done.output_path}",
            err=True,
        )


def default_output(input_file: str) -> str:
    """``reviews.csv.gz`` → ``reviews.scored.csv.gz``, beside the input."""
    path = Path(input_file)
    name = path.name
    for suffix in (".csv", ".tsv", ".jsonl", ".parquet"):
        for full in (suffix + ".gz", suffix):
            if name.lower().endswith(full):
                return str(path.with_name(name[: -len(full)] + ".scored" + name[-len(full) :]))
    return str(path.with_name(name + ".scored.csv"))
