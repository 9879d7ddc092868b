"""``tuneq predict``: label a few texts on the spot."""

from __future__ import annotations

import json

import click

from tuneq.cli.context import engine, settings
from tuneq.cli.render import table


@click.command()
@click.argument("model")
@click.argument("texts", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
def predict(model: str, texts: tuple[str, ...], as_json: bool) -> None:
    """Label TEXTS with MODEL: a registered name (latest version), name:version, or a folder.

    \b
    Examples:
      tuneq predict imdb-sentiment "A masterpiece." "Two hours I will never get back."
      tuneq predict imdb-sentiment:2 "Not bad at all." --json
    """
    from tuneq.worker.io.artifacts import cache_folder
    from tuneq.worker.ml.predict import predict_texts
    from tuneq.worker.store import model_folder

    folder = model_folder(engine(), model, cache=cache_folder(settings()))
    predictions = predict_texts(folder, list(texts))
    if predictions and predictions[0].value is not None:  # a regression model: numbers
        show_values(texts, [p.value or 0.0 for p in predictions], as_json)
        return
    if as_json:
        for text, p in zip(texts, predictions, strict=True):
            click.echo(json.dumps({"text": text, "label": p.label, "score": round(p.score, 4)}))
        return
    rows = [
        [p.label, f"{p.score:.3f}", shorten(t)] for t, p in zip(texts, predictions, strict=True)
    ]
    click.echo(table(["label", "score", "text"], rows))


def show_values(texts: tuple[str, ...], values: list[float], as_json: bool) -> None:
    if as_json:
        for text, value in zip(texts, values, strict=True):
            click.echo(json.dumps({"text": text, "value": round(value, 4)}))
        return
    rows = [[f"{v:.3f}", shorten(t)] for t, v in zip(texts, values, strict=True)]
    click.echo(table(["value", "text"], rows))


def shorten(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
