import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuneq.worker.ml.model_card import model_card, write_model_card

VOCABULARY_WARNING = (
    "85% of tokens are unknown to minilm's vocabulary ([UNK]): the model cannot read most of "
    "this text"
)


@pytest.fixture
def manifest() -> dict[str, Any]:
    """A manifest shaped like the ``tuneq.json`` that a fine-tune writes."""
    return {
        "name": "support-tickets",
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "labels": ["billing", "bug | crash", "other"],
        "data_fingerprint": "3f9a0c1d",
        "spec": {
            "data": "tickets.csv",
            "eval_data": None,
            "max_length": None,
            "epochs": 3,
            "learning_rate": 2e-05,
            "batch_size": 16,
            "seed": 42,
            "text_column": "body",
            "label_column": "queue",
        },
        "metrics": {
            "accuracy": 0.873456,
            "macro_f1": 0.81234,
            "eval_loss": 0.41,
            "train_loss": 0.2875,
            "train_steps": 1200,
            "per_class": {
                "billing": {"precision": 0.9, "recall": 0.95, "f1": 0.924324, "support": 200},
                "bug | crash": {"precision": 0.8125, "recall": 0.7, "f1": 0.752, "support": 150},
                "other": {"precision": 0.7, "recall": 0.75, "f1": 0.724138, "support": 50},
            },
            "data": {
                "train_rows": 6400,
                "eval_rows": 400,
                "dropped_rows": 3,
                "train_label_counts": {"billing": 3200, "bug | crash": 2400, "other": 800},
                "eval_label_counts": {"billing": 200, "bug | crash": 150, "other": 50},
            },
        },
        "calibration": {
            "temperature": 1.8432,
            "ece_before": 0.0912,
            "ece_after": 0.0214,
            "rows": 400,
        },
        "training": {
            "best_step": 800,
            "best_metric": 0.81234,
            "metric": "macro_f1",
            "stopped_early": True,
            "stop_reason": "macro_f1 did not improve for 2 evaluations",
            "max_length": 128,
        },
        "warnings": [VOCABULARY_WARNING],
    }


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    _, block, _ = card.split("---\n", 2)
    loaded = yaml.safe_load(block)
    assert isinstance(loaded, dict)
    return loaded


def table_rows(card: str) -> list[list[str]]:
    """Every Markdown table row as its cells, splitting only on unescaped ``|``."""
    rows = []
    for line in card.splitlines():
        if line.startswith("| "):
            cells = line.replace("\\|", "\0").strip("|").split("|")
            rows.append([cell.strip().replace("\0", "|") for cell in cells])
    return rows


def section(card: str, title: str) -> str:
    _, _, rest = card.partition(f"## {title}\n")
    assert rest, f"no section {title!r}"
    return rest.split("\n## ", 1)[0]


def test_front_matter_is_yaml_the_hub_reads(manifest: dict[str, Any]) -> None:
    meta = front_matter(model_card(manifest))
    assert meta == {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "tags": ["tuneq", "text-classification"],
    }


def test_front_matter_survives_a_base_model_with_yaml_syntax(manifest: dict[str, Any]) -> None:
    manifest["base_model"] = "models/bert: v2 # 'quoted' \"too\""
    assert front_matter(model_card(manifest))["base_model"] == manifest["base_model"]


def test_title_names_the_model_base_and_labels(manifest: dict[str, Any]) -> None:
    card = model_card(manifest)
    assert "\n# support-tickets\n" in card
    assert "fine-tuned from `sentence-transformers/all-MiniLM-L6-v2` by tuneq" in card
    assert "Labels (3): `billing`, `bug | crash`, `other`." in card


def test_metrics_and_per_class_rows_show_their_values(manifest: dict[str, Any]) -> None:
    rows = table_rows(section(model_card(manifest), "Evaluation"))
    assert ["Accuracy", "0.8735"] in rows
    assert ["Macro F1", "0.8123"] in rows
    assert ["Eval loss", "0.4100"] in rows
    assert ["Train loss", "0.2875"] in rows
    assert ["billing", "0.9000", "0.9500", "0.9243", "200"] in rows
    assert ["other", "0.7000", "0.7500", "0.7241", "50"] in rows


def test_a_label_with_a_pipe_keeps_the_table_in_shape(manifest: dict[str, Any]) -> None:
    card = model_card(manifest)
    assert "| bug \\| crash | 0.8125 | 0.7000 | 0.7520 | 150 |" in card
    rows = table_rows(card)
    assert ["bug | crash", "0.8125", "0.7000", "0.7520", "150"] in rows
    # Every row of a table has as many cells as its header.
    for table in card.split("\n\n"):
        widths = {len(row) for row in table_rows(table)}
        assert len(widths) <= 1, table


def test_evaluation_names_the_held_out_rows(manifest: dict[str, Any]) -> None:
    card = model_card(manifest)
    assert "Measured on rows held out of tickets.csv (400 rows)." in card


def test_evaluation_names_a_separate_eval_set(manifest: dict[str, Any]) -> None:
    manifest["spec"]["eval_data"] = "tickets-2024.csv"
    assert "Measured on tickets-2024.csv (400 rows)." in model_card(manifest)


def test_training_data_section(manifest: dict[str, Any]) -> None:
    text = section(model_card(manifest), "Training data")
    assert "- Source: tickets.csv" in text
    assert "- Training rows: 6,400" in text
    assert "- Evaluation rows: 400" in text
    assert "- Rows dropped (empty text or label): 3" in text
    assert "`3f9a0c1d`" in text
    assert ["bug | crash", "2,400", "150"] in table_rows(text)


def test_calibration_numbers_appear(manifest: dict[str, Any]) -> None:
    text = section(model_card(manifest), "Calibration")
    rows = table_rows(text)
    assert ["Temperature", "1.8432"] in rows
    assert ["ECE before", "0.0912"] in rows
    assert ["ECE after", "0.0214"] in rows
    assert ["Rows", "400"] in rows
    assert "`tuneq predict` and `tuneq score` apply it" in text


def test_a_manifest_without_calibration_says_not_calibrated(manifest: dict[str, Any]) -> None:
    del manifest["calibration"]
    card = model_card(manifest)
    assert section(card, "Calibration").startswith("\nNot calibrated")
    assert "Temperature" not in card
    assert "scores are not calibrated" in section(card, "Intended use and limitations")


def test_training_shows_hyper_parameters_and_why_it_stopped(manifest: dict[str, Any]) -> None:
    text = section(model_card(manifest), "Training")
    rows = table_rows(text)
    assert ["Learning rate", "2e-05"] in rows
    assert ["Epochs", "3"] in rows
    assert ["Max length (tokens)", "128"] in rows
    assert ["Training steps", "1,200"] in rows
    assert "Kept the checkpoint from step 800 (macro_f1 0.8123)." in text
    assert "Stopped early: macro_f1 did not improve for 2 evaluations." in text


def test_the_vocabulary_warning_appears(manifest: dict[str, Any]) -> None:
    assert f"- {VOCABULARY_WARNING}" in section(model_card(manifest), "Warnings")


def test_no_warnings_leaves_the_section_out(manifest: dict[str, Any]) -> None:
    del manifest["warnings"]
    assert "## Warnings" not in model_card(manifest)


def test_limitations_say_how_much_data_and_where_scores_were_calibrated(
    manifest: dict[str, Any],
) -> None:
    text = section(model_card(manifest), "Intended use and limitations")
    assert "trained on 6,400 rows of tickets.csv" in text
    assert "calibrated on the evaluation rows only" in text
    assert "before acting on its labels" in text


def test_a_regression_manifest_shows_its_own_metrics(manifest: dict[str, Any]) -> None:
    manifest["metrics"] = {"mae": 0.31234, "rmse": 0.5, "spearman": 0.77777}
    rows = table_rows(section(model_card(manifest), "Evaluation"))
    assert rows[2:] == [["MAE", "0.3123"], ["RMSE", "0.5000"], ["Spearman", "0.7778"]]


def test_an_empty_manifest_still_makes_a_card() -> None:
    card = model_card({})
    assert front_matter(card)["tags"] == ["tuneq", "text-classification"]
    assert "base_model" not in front_matter(card)
    assert "Metrics: not recorded." in card
    assert "- Source: not recorded" in card
    assert "Labels: not recorded." in card
    assert "- Data fingerprint: not recorded" in card


def test_write_model_card_writes_readme(tmp_path: Path, manifest: dict[str, Any]) -> None:
    original = copy.deepcopy(manifest)
    path = write_model_card(tmp_path, manifest)
    assert path == tmp_path / "README.md"
    assert path.read_text(encoding="utf-8") == model_card(manifest)
    assert manifest == original


def test_label_issues_are_counted_when_the_job_looked() -> None:
    issues = {"found": 23, "rows_checked": 400, "folds": 3, "file": "label_issues.csv"}
    manifest = {"name": "m", "metrics": {"label_issues": issues}}
    card = model_card(manifest)
    assert "## Likely label errors" in card
    assert "23 of 400 training rows look mislabelled" in card and "`label_issues.csv`" in card
    assert "## Likely label errors" not in model_card({"name": "m", "metrics": {}})
