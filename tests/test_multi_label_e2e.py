"""A multi-label job end to end: label sets train, register, predict and score a file through a
real worker, and beat the best constant label set on rows the model never saw."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FILLER, finetune_and_show, invoke_cli, queue_name, write_csv
from tuneq.schemas.errors import DataError
from tuneq.schemas.specs import FinetuneSpec
from tuneq.worker.ml.data import load_training_data

TOPICS = {
    "acting": ["actor", "performance", "cast", "role"],
    "music": ["score", "soundtrack", "song", "melody"],
    "plot": ["story", "twist", "ending", "script"],
}
NAMES = sorted(TOPICS)


def tagged_reviews(n: int, seed: int) -> list[tuple[str, str]]:
    """Each review mentions the words of one or two topics: its labels, joined by '|'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        labels = sorted(rng.sample(NAMES, rng.choice([1, 1, 2])))
        words = [w for label in labels for w in rng.choices(TOPICS[label], k=3)]
        words += rng.choices([w for w in FILLER if w not in ("story", "ending")], k=4)
        rng.shuffle(words)
        rows.append((" ".join(words), "|".join(labels)))
    return rows


def micro_f1(predicted: list[set[str]], actual: list[set[str]]) -> float:
    hits = sum(len(p & a) for p, a in zip(predicted, actual, strict=True))
    total = sum(len(p) for p in predicted) + sum(len(a) for a in actual)
    return 2 * hits / total if total else 0.0


def test_a_multi_label_job_trains_predicts_and_scores(
    env, start_worker, tiny_model: Path, tmp_path: Path
) -> None:
    queue = queue_name()
    start_worker(env, queue)
    train = write_csv(tmp_path / "tags.csv", ["text", "topics"], tagged_reviews(300, seed=1))
    job = finetune_and_show(
        env, "--data", str(train), "--model", str(tiny_model), "--queue", queue,
        "--task", "multi_label", "--label-column", "topics", "--name", "tiny-topics",
        "--epochs", "12", "--learning-rate", "0.003", "--batch-size", "16",
    )  # fmt: skip
    metrics = job["metrics"]
    assert job["model"]["labels"] == NAMES
    assert metrics["training"]["metric"] == "micro_f1", "the multi-label default"
    assert metrics["micro_f1"] > metrics["constant_micro_f1"] + 0.2, metrics
    assert set(metrics["per_class"]) == set(NAMES)
    assert all(0 < v["threshold"] < 1 for v in metrics["per_class"].values())
    manifest = json.loads((Path(job["model"]["path"]) / "tuneq.json").read_text())
    assert len(manifest["thresholds"]) == 3 and manifest["label_separator"] == "|"
    assert "threshold" in invoke_cli(env, "show", job["id"]).stdout

    predicted = invoke_cli(env, "predict", "tiny-topics", "soundtrack song story twist", "--json")
    assert set(json.loads(predicted.stdout)["label"].split("|")) == {"music", "plot"}

    held_out = tagged_reviews(200, seed=2)
    source = write_csv(tmp_path / "new.csv", ["text", "truth"], held_out)
    output = tmp_path / "scored.csv"
    scored = invoke_cli(
        env, "score", "tiny-topics", str(source), "--output", str(output), "--queue", queue,
        "--wait",
    )  # fmt: skip
    assert scored.exit_code == 0, scored.output
    with output.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["text", "truth", "labels", *[f"prob_{n}" for n in NAMES]]
    assert [r["text"] for r in rows] == [text for text, _ in held_out]
    sets = [set(filter(None, r["labels"].split("|"))) for r in rows]
    truth = [set(r["truth"].split("|")) for r in rows]
    probabilities = np.array([[float(r[f"prob_{n}"]) for n in NAMES] for r in rows])
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    constant = max(micro_f1([{n} for _ in truth], truth) for n in NAMES)
    assert micro_f1(sets, truth) > constant + 0.2, "beats the best single constant label"


def test_lists_of_labels_need_no_separator(tmp_path: Path) -> None:
    path = tmp_path / "tags.jsonl"
    rows = [{"text": t, "topics": labels.split("|")} for t, labels in tagged_reviews(20, seed=3)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = FinetuneSpec(data=str(path), task="multi_label", label_column="topics", eval_size=5)
    data = load_training_data(spec)
    assert data.label_names == NAMES
    assert all(isinstance(ids, list) and ids for ids in data.train.labels)


def test_labels_joined_by_another_separator_are_named(tmp_path: Path) -> None:
    rows = [(t, labels.replace("|", ";")) for t, labels in tagged_reviews(20, seed=4)]
    rows.append(("a music and plot review", "music;plot"))
    path = write_csv(tmp_path / "tags.csv", ["text", "topics"], rows)
    spec = FinetuneSpec(data=str(path), task="multi_label", label_column="topics", eval_size=5)
    with pytest.raises(DataError, match=r"some hold ';'.*pass --label-separator ';'"):
        load_training_data(spec)
    fixed = spec.model_copy(update={"label_separator": ";"})
    assert load_training_data(fixed).label_names == NAMES
