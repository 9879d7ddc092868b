"""A model folder's ``README.md``: the Hugging Face model card, built from ``tuneq.json``.

The card says what the model is, what it was trained and measured on, and how far to trust its
scores, so a folder copied to the Hub (or to a colleague) explains itself. Every manifest key is
optional: a missing part is left out or marked "not recorded", never guessed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

CARD = "README.md"
NOT_RECORDED = "not recorded"
TAGS = ("tuneq", "text-classification")

# (key in metrics, row name); only the ones a manifest holds are shown, in this order.
METRICS = (
    ("accuracy", "Accuracy"),
    ("macro_f1", "Macro F1"),
    ("micro_f1", "Micro F1"),
    ("mae", "MAE"),
    ("rmse", "RMSE"),
    ("spearman", "Spearman"),
    ("eval_loss", "Eval loss"),
    ("train_loss", "Train loss"),
)
HYPER_PARAMETERS = (
    ("epochs", "Epochs"),
    ("learning_rate", "Learning rate"),
    ("attention_dropout", "Attention dropout"),
    ("batch_size", "Batch size"),
    ("max_length", "Max length (tokens)"),
    ("seed", "Seed"),
    ("text_column", "Text column"),
    ("label_column", "Label column"),
)


def write_model_card(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write the model card for ``manifest`` to ``out_dir / "README.md"`` and return its path."""
    path = out_dir / CARD
    path.write_text(model_card(manifest), encoding="utf-8")
    return path


def model_card(manifest: dict[str, Any]) -> str:
    """The model card for ``manifest`` (the ``tuneq.json`` dict): YAML front matter, Markdown."""
    sections = [
        front_matter(manifest),
        describe_model(manifest),
        describe_data(manifest),
        describe_evaluation(manifest),
        describe_calibration(manifest),
        describe_training(manifest),
        describe_warnings(manifest),
        describe_label_issues(manifest),
        describe_limitations(manifest),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def front_matter(manifest: dict[str, Any]) -> str:
    """The YAML block the Hub reads; strings go through ``json.dumps``, which YAML accepts."""
    lines = ["---", "library_name: transformers", "pipeline_tag: text-classification"]
    if manifest.get("base_model"):
        lines.append(f"base_model: {json.dumps(str(manifest['base_model']))}")
    lines.append("tags:")
    lines.extend(f"- {json.dumps(tag)}" for tag in TAGS)
    lines.append("---")
    return "\n".join(lines)


def describe_model(manifest: dict[str, Any]) -> str:
    """The title and one paragraph on what the model is."""
    name = manifest.get("name") or "tuneq model"
    base_model = manifest.get("base_model")
    base = code_span(str(base_model)) if base_model else f"a base model ({NOT_RECORDED})"
    labels = manifest.get("labels") or []
    label_text = (
        f" ({len(labels)}): " + ", ".join(code_span(str(label)) for label in labels)
        if labels
        else f": {NOT_RECORDED}"
    )
    return f"# {name}\n\nA text classifier fine-tuned from {base} by tuneq.\n\nLabels{label_text}."


def describe_data(manifest: dict[str, Any]) -> str:
    """Where the training rows came from, how many there were and how the labels spread."""
    spec = manifest.get("spec") or {}
    data = (manifest.get("metrics") or {}).get("data") or {}
    lines = [
        "## Training data",
        "",
        f"- Source: {spec.get('data') or NOT_RECORDED}",
        f"- Training rows: {format_count(data.get('train_rows'))}",
        f"- Evaluation rows: {format_count(data.get('eval_rows'))}",
    ]
    if data.get("dropped_rows"):
        lines.append(f"- Rows dropped (empty text or label): {format_count(data['dropped_rows'])}")
    fingerprint = manifest.get("data_fingerprint")
    shown = code_span(str(fingerprint)) if fingerprint else NOT_RECORDED
    lines.append(f"- Data fingerprint: {shown}")
    train_counts = data.get("train_label_counts") or {}
    eval_counts = data.get("eval_label_counts") or {}
    if train_counts or eval_counts:
        rows = [
            [label, format_count(train_counts.get(label)), format_count(eval_counts.get(label))]
            for label in {**train_counts, **eval_counts}
        ]
        lines += ["", markdown_table(["Label", "Training rows", "Evaluation rows"], rows)]
    return "\n".join(lines)


def describe_evaluation(manifest: dict[str, Any]) -> str:
    """The headline metrics on the named evaluation set and the per-class table."""
    metrics = manifest.get("metrics") or {}
    lines = ["## Evaluation", "", f"Measured on {evaluation_set(manifest)}."]
    rows = [[title, format_number(metrics[key])] for key, title in METRICS if key in metrics]
    if not rows:
        return "\n".join([*lines, "", f"Metrics: {NOT_RECORDED}."])
    lines += ["", markdown_table(["Metric", "Value"], rows)]
    per_class = metrics.get("per_class") or {}
    if per_class:
        lines += ["", "### Per class", "", per_class_table(per_class)]
    return "\n".join(lines)


def evaluation_set(manifest: dict[str, Any]) -> str:
    """The evaluation rows in words: the ``eval_data`` source, or those held out of ``data``."""
    spec = manifest.get("spec") or {}
    eval_rows = ((manifest.get("metrics") or {}).get("data") or {}).get("eval_rows")
    if spec.get("eval_data"):
        where = str(spec["eval_data"])
    else:
        where = f"rows held out of {spec.get('data') or 'the training data'}"
    count = f"{format_count(eval_rows)} rows" if eval_rows is not None else "rows: not recorded"
    return f"{where} ({count})"


def per_class_table(per_class: dict[str, dict[str, Any]]) -> str:
    """Precision, recall, F1 and support for each label."""
    rows = [
        [
            label,
            format_number(scores.get("precision")),
            format_number(scores.get("recall")),
            format_number(scores.get("f1")),
            format_count(scores.get("support")),
        ]
        for label, scores in per_class.items()
    ]
    return markdown_table(["Label", "Precision", "Recall", "F1", "Support"], rows)


def describe_calibration(manifest: dict[str, Any]) -> str:
    """The fitted temperature and the calibration error it removed, or that there is none."""
    calibration = manifest.get("calibration")
    if not calibration:
        return (
            "## Calibration\n\n"
            "Not calibrated: the scores are the model's raw softmax outputs, which fine-tuned "
            "classifiers tend to make over-confident."
        )
    rows = [
        ["Temperature", format_number(calibration.get("temperature"))],
        ["ECE before", format_number(calibration.get("ece_before"))],
        ["ECE after", format_number(calibration.get("ece_after"))],
        ["Rows", format_count(calibration.get("rows"))],
    ]
    return (
        "## Calibration\n\n"
        "Scores are temperature-scaled: the logits are divided by the temperature below before "
        "the softmax. `tuneq predict` and `tuneq score` apply it. The expected calibration "
        "error (ECE, top label, 15 equal-width bins) is measured on the same evaluation rows "
        "the temperature was fitted on.\n\n" + markdown_table(["Measure", "Value"], rows)
    )


def describe_training(manifest: dict[str, Any]) -> str:
    """The hyper-parameters, the best checkpoint and why training stopped."""
    spec = manifest.get("spec") or {}
    training = manifest.get("training") or {}
    metrics = manifest.get("metrics") or {}
    # The effective max length (after a default was chosen) beats the requested one.
    values = {**spec, "max_length": training.get("max_length") or spec.get("max_length")}
    if "attention_dropout" in spec and spec["attention_dropout"] is None:
        values["attention_dropout"] = "the model's own"  # it has no such setting to change
    rows = [[title, format_setting(values.get(key))] for key, title in HYPER_PARAMETERS]
    if metrics.get("train_steps") is not None:
        rows.append(["Training steps", format_count(metrics["train_steps"])])
    lines = ["## Training", "", markdown_table(["Setting", "Value"], rows)]
    outcome = describe_outcome(training)
    if outcome:
        lines += ["", outcome]
    return "\n".join(lines)


def describe_outcome(training: dict[str, Any]) -> str:
    """One line on the kept checkpoint and one on how training ended, if recorded."""
    lines = []
    if training.get("best_step") is not None:
        metric = training.get("metric") or "the evaluation metric"
        score = training.get("best_metric")
        at = f" ({metric} {format_number(score)})" if score is not None else f" (by {metric})"
        lines.append(f"Kept the checkpoint from step {format_count(training['best_step'])}{at}.")
    if training.get("stopped_early"):
        reason = training.get("stop_reason") or "reason not recorded"
        lines.append(f"Stopped early: {reason}.")
    elif "stopped_early" in training:
        lines.append("Ran for all the planned epochs.")
    return " ".join(lines)


def describe_warnings(manifest: dict[str, Any]) -> str:
    """The warnings tuneq raised while training, or nothing when there were none."""
    warnings = manifest.get("warnings") or []
    if not warnings:
        return ""
    items = [f"- {one_line(str(warning))}" for warning in warnings]
    return "\n".join(["## Warnings", "", *items])


def describe_label_issues(manifest: dict[str, Any]) -> str:
    """How many training labels look wrong, when the job looked (``label_error_folds``)."""
    issues = (manifest.get("metrics") or {}).get("label_issues")
    if not issues:
        return ""
    return "\n".join(
        [
            "## Likely label errors",
            "",
            f"{format_count(issues.get('found'))} of {format_count(issues.get('rows_checked'))} "
            f"training rows look mislabelled: scored by models trained on the other "
            f"{format_count(issues.get('folds'))} folds' rows, their given label was unlikely "
            f"(confident learning). They are ranked in `{issues.get('file')}` beside the model; "
            "the model was trained on them as given.",
        ]
    )


def describe_limitations(manifest: dict[str, Any]) -> str:
    """A short, honest note on what the numbers above do and do not promise."""
    spec = manifest.get("spec") or {}
    train_rows = ((manifest.get("metrics") or {}).get("data") or {}).get("train_rows")
    rows = f"{format_count(train_rows)} rows" if train_rows is not None else "rows"
    source = spec.get("data") or "one data source"
    scores = (
        "Its scores are calibrated on the evaluation rows only, so they are only as "
        "trustworthy as those rows are like yours."
        if manifest.get("calibration")
        else "Its scores are not calibrated: read them as a ranking, not as probabilities."
    )
    return (
        "## Intended use and limitations\n\n"
        f"This model was trained on {rows} of {source} and measured on "
        f"{evaluation_set(manifest)}; the numbers above say how it does on text like that, "
        f"not on text from elsewhere. {scores} Check it on a sample of your own data before "
        "acting on its labels."
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table whose cells cannot break it (``|`` escaped, newlines flattened)."""
    lines = [table_row(header), table_row(["---"] * len(header))]
    lines += [table_row(row) for row in rows]
    return "\n".join(lines)


def table_row(cells: list[str]) -> str:
    """One table row; a ``|`` in a cell would otherwise start a new column."""
    return "| " + " | ".join(one_line(str(cell)).replace("|", "\\|") for cell in cells) + " |"


def one_line(text: str) -> str:
    """``text`` on one line, since a newline ends a table row or a list item."""
    return " ".join(text.split())


def code_span(text: str) -> str:
    """``text`` as inline code, fenced by more backticks than it holds so a label cannot end it."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    fence = "`" * (longest + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"


def format_number(value: Any) -> str:
    """A metric to 4 decimals; a missing one as "not recorded"."""
    if value is None:
        return NOT_RECORDED
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.4f}"


def format_count(value: Any) -> str:
    """A row or step count with thousands separators; a missing one as "not recorded"."""
    if value is None:
        return NOT_RECORDED
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def format_setting(value: Any) -> str:
    """A hyper-parameter as written (4 decimals would turn a 2e-05 learning rate into 0)."""
    if value is None:
        return NOT_RECORDED
    return f"{value:g}" if isinstance(value, float) else str(value)
