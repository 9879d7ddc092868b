"""``tuneq report``: a job's or a group's results as one HTML file."""

from __future__ import annotations

import os
from pathlib import Path

import click

from tuneq.cli.context import engine


@click.command()
@click.argument("target")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Where to write the report; default: tuneq-report-TARGET.html here.",
)
def report(target: str, output: Path | None) -> None:
    """Write a self-contained HTML report of a job or a group (a sweep).

    The report holds the metrics table (a group's runs best first), each fine-tune's settings,
    per-class scores, data summary, label distribution, loss curves and confusion matrix. It
    needs nothing else to open: plots are embedded. Prints the file's path.

    \b
    Examples:
      tuneq report imdb-lr-1a2b3c
      tuneq report 3f2a --output ~/reports/imdb.html
    """
    from tuneq.worker.views.report import build_report

    page = build_report(engine(), target)
    path = (output or Path(f"tuneq-report-{target}.html")).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, path)  # a reader never sees half a report
    click.echo(str(path))
