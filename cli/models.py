"""``tuneq models``: registered models and their metrics."""

from __future__ import annotations

import json

import click

from tuneq.cli.context import engine
from tuneq.cli.render import MODEL_HEADERS, model_json, model_row, table


@click.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def models(name: str | None, as_json: bool) -> None:
    """List registered models (every version), or the versions of NAME.

    \b
    Examples:
      tuneq models
      tuneq models imdb-sentiment --json
    """
    from tuneq.worker.store import list_models

    rows = list_models(engine(), name=name)
    if as_json:
        click.echo(json.dumps([model_json(m) for m in rows], indent=2))
    elif rows:
        click.echo(table(MODEL_HEADERS, [model_row(m) for m in rows]))
    else:
        click.echo("no models yet; a successful `tuneq finetune` registers one")
