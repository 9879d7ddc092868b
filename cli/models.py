"""``tuneq models``: registered models and their metrics; ``tuneq models tag``."""

from __future__ import annotations

import json
import re

import click

from tuneq.cli.context import engine
from tuneq.cli.render import MODEL_HEADERS, model_row, table
from tuneq.schemas.specs import MODEL_NAME_PATTERN


class ListByDefault(click.Group):
    """``tuneq models [NAME]`` lists; ``tuneq models tag …`` is a subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@click.group(cls=ListByDefault)
def models() -> None:
    """List registered models (every version), or the versions of NAME; tag a version.

    \b
    Examples:
      tuneq models
      tuneq models imdb-sentiment --json
      tuneq models tag imdb-sentiment:3 champion    # then score with imdb-sentiment@champion
    """


@models.command("list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_models_command(name: str | None, as_json: bool) -> None:
    """List registered models (every version), or the versions of NAME.

    \b
    Example:
      tuneq models list imdb-sentiment
    """
    from tuneq.worker.store import list_models, model_tags
    from tuneq.worker.views.documents import model_json

    db = engine()
    rows = list_models(db, name=name)
    tags = model_tags(db)
    if as_json:
        documents = [model_json(m, tags.get((m.name, m.version), [])) for m in rows]
        click.echo(json.dumps(documents, indent=2))
    elif rows:
        click.echo(
            table(
                [*MODEL_HEADERS, "tags"],
                [[*model_row(m), ",".join(tags.get((m.name, m.version), []))] for m in rows],
            )
        )
    else:
        click.echo("no models yet; a successful `tuneq finetune` registers one")


@models.command("tag")
@click.argument("model")
@click.argument("tag")
def tag_command(model: str, tag: str) -> None:
    """Point NAME@TAG at MODEL (NAME:VERSION, or NAME for its latest version).

    A tag moves when set again: scoring jobs that name imdb-sentiment@champion use whichever
    version holds the tag when they are submitted.

    \b
    Example:
      tuneq models tag imdb-sentiment:3 champion
    """
    from tuneq.worker.store import tag_model

    if not re.match(MODEL_NAME_PATTERN, tag):
        raise click.BadParameter(
            "lower-case letters, digits, '.', '_' or '-', like champion", param_hint="TAG"
        )
    tagged = tag_model(engine(), ref=model, tag=tag)
    click.echo(f"{tagged.name}@{tag} -> {tagged.name}:{tagged.version}")
