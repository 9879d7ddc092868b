"""Entry point: the ``tuneq`` command group and its error handling."""

from __future__ import annotations

from typing import Any

import click

from tuneq.cli.db import db
from tuneq.cli.demo import demo
from tuneq.cli.finetune import finetune
from tuneq.cli.jobs import cancel, jobs, retry, show
from tuneq.cli.models import models
from tuneq.cli.predict import predict
from tuneq.cli.queue import queue
from tuneq.cli.report import report
from tuneq.cli.score import score
from tuneq.cli.sweep import compare, sweep
from tuneq.cli.ui import ui
from tuneq.cli.worker import worker
from tuneq.cli.workers import workers
from tuneq.schemas.errors import TuneqError


class TuneqGroup(click.Group):
    """Turns every ``TuneqError`` into ``Error: …`` and exit code 1; bugs keep tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TuneqError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=TuneqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tuneq")
def cli() -> None:
    """Queue fine-tune and batch-scoring jobs for Hugging Face text classifiers and run them
    on workers.

    \b
    Try it (fine-tunes MiniLM on IMDB reviews through a worker it starts):
      tuneq demo --data ../shared/data/imdb
    \b
    Or step by step:
      tuneq worker &
      tuneq finetune --data reviews.csv --name reviews --wait
      tuneq predict reviews "What a wonderful film."
      tuneq score reviews big.csv --output big.scored.parquet --wait

    Settings come from TUNEQ_DATA_DIR, TUNEQ_DATABASE_URL, TUNEQ_BROKER_URL and
    TUNEQ_ARTIFACT_DIR; with none set, everything lives under ~/.local/share/tuneq.
    """


for command in (
    demo,
    finetune,
    sweep,
    compare,
    report,
    score,
    jobs,
    queue,
    show,
    cancel,
    retry,
    models,
    predict,
    worker,
    workers,
    ui,
    db,
):
    cli.add_command(command)
