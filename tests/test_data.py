"""Loading training data from files and folders, with the errors a person can act on."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import SHARED_DATA, synthetic_reviews, unavailable, write_csv
from tuneq.schemas.errors import DataError, DataUnavailable
from tuneq.schemas.specs import FinetuneSpec
from tuneq.worker.ml.data import load_training_data

ROWS = synthetic_reviews(50)


def spec(data: Path | str, **fields: object) -> FinetuneSpec:
    return FinetuneSpec(data=str(data), **fields)  # type: ignore[arg-type]


def write_format(folder: Path, suffix: str) -> Path:
    path = folder / f"reviews{suffix}"
    records = [{"text": t, "label": label} for t, label in ROWS]
    if suffix == ".csv":
        write_csv(path, ["text", "label"], ROWS)
    elif suffix == ".tsv":
        path.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in ROWS))
    elif suffix == ".jsonl.gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl.gz", ".parquet"])
def test_every_format_gives_the_same_examples(tmp_path: Path, suffix: str) -> None:
    data = load_training_data(spec(write_format(tmp_path, suffix), eval_size=10))
    baseline = load_training_data(spec(write_format(tmp_path, ".csv"), eval_size=10))
    assert data.train == baseline.train and data.eval == baseline.eval
    assert data.label_names == ["negative", "positive"]
    assert (len(data.train), len(data.eval)) == (40, 10)
    assert data.fingerprint == baseline.fingerprint


def test_selection_is_seeded_and_happens_before_anything_else(tmp_path: Path) -> None:
    path = write_format(tmp_path, ".csv")
    first = load_training_data(spec(path, train_size=8, eval_size=5, seed=1))
    again = load_training_data(spec(path, train_size=8, eval_size=5, seed=1))
    other = load_training_data(spec(path, train_size=8, eval_size=5, seed=2))
    assert (len(first.train), len(first.eval)) == (8, 5)
    assert first.train == again.train and first.fingerprint == again.fingerprint
    assert first.train != other.train and first.fingerprint != other.fingerprint
    assert not set(first.train.texts) & set(first.eval.texts)


def test_columns_are_mapped_and_integer_labels_named(tmp_path: Path) -> None:
    rows = [(t, 1 if lab == "positive" else 0) for t, lab in ROWS]
    path = write_csv(tmp_path / "waimai.csv", ["label", "review"], [(b, a) for a, b in rows])
    data = load_training_data(
        spec(path, text_column="review", label_names=["negative", "positive"], eval_size=10)
    )
    assert data.label_names == ["negative", "positive"]
    counts = data.summary["train_label_counts"]
    assert counts == {
        "negative": data.train.labels.count(0),
        "positive": data.train.labels.count(1),
    }
    assert sum(counts.values()) == 40


def test_a_folder_with_train_and_test_files_is_two_splits(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", ["text", "label"], ROWS[:30])
    with gzip.open(tmp_path / "test.csv.gz", "wt", encoding="utf-8") as handle:
        handle.write("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in ROWS[30:]))
    data = load_training_data(spec(tmp_path))
    assert (len(data.train), len(data.eval)) == (30, 20)
    assert set(data.eval.texts) == {t for t, _ in ROWS[30:]}


def test_rows_without_text_or_label_are_dropped_and_counted(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "gaps.csv", ["text", "label"], [*ROWS, ("", "positive")])
    path.write_text(path.read_text() + "no label here,\n")
    data = load_training_data(spec(path, eval_size=10))
    assert data.summary["dropped_rows"] == 2
    assert len(data.train) + len(data.eval) == len(ROWS)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^.*missing\.csv: no such file or folder$"):
        load_training_data(spec(tmp_path / "missing.csv"))


def test_missing_column_lists_the_columns_and_the_option(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "r.csv", ["review", "label"], ROWS)
    with pytest.raises(DataError) as caught:
        load_training_data(spec(path))
    assert str(caught.value) == (
        f"{path} has no column 'text' (its columns: review, label); "
        "name the right one with --text-column"
    )


def test_empty_and_header_only_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(DataError, match="is empty$"):
        load_training_data(spec(empty))
    with pytest.raises(DataError, match="has no rows$"):
        load_training_data(spec(header_only))


def test_malformed_csv_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nfine,positive\nbroken,negative,extra\nfine,negative\n")
    with pytest.raises(DataError) as caught:
        load_training_data(spec(path))
    assert str(caught.value) == f"{path}, line 3: expected 2 fields, found 3"


def test_eval_labels_must_occur_in_training(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", ["text", "label"], ROWS)
    evaluation = write_csv(tmp_path / "eval.csv", ["text", "label"], [("meh", "neutral")])
    with pytest.raises(
        DataError,
        match=r"labels \['neutral'\] in column 'label' are not among the labels negative, positive",
    ):
        load_training_data(spec(train, eval_data=str(evaluation)))


def test_an_unreachable_hub_data_set_says_how_to_pass_a_file() -> None:
    with pytest.raises(DataUnavailable, match="pass a local file or folder with --data PATH"):
        load_training_data(spec("no-such-dataset-xyz"))


def test_real_imdb_folder_selects_1000_and_400() -> None:
    folder = SHARED_DATA / "imdb"
    if not folder.is_dir():
        unavailable(f"{folder} is missing (real IMDB data, see ../shared/data/README.md)")
    data = load_training_data(
        spec(folder, train_size=1000, eval_size=400, label_names=["negative", "positive"])
    )
    assert (len(data.train), len(data.eval)) == (1000, 400)
    assert 400 < data.summary["train_label_counts"]["positive"] < 600


def test_selection_picks_what_the_recipes_shuffle_and_select_pick(tmp_path: Path) -> None:
    """The classic recipe selects with datasets' shuffle(seed).select(range(n)) per split."""
    import datasets

    train = write_csv(
        tmp_path / "train.csv", ["text", "label"], [(f"t{i}", i % 2) for i in range(50)]
    )
    write_csv(tmp_path / "test.csv", ["text", "label"], [(f"e{i}", i % 2) for i in range(30)])
    data = load_training_data(spec(tmp_path, train_size=12, eval_size=7, seed=42))
    splits = datasets.load_dataset(
        "csv",
        data_files={"train": str(train), "test": str(tmp_path / "test.csv")},
        cache_dir=str(tmp_path / "cache"),
    )
    assert data.train.texts == splits["train"].shuffle(seed=42).select(range(12))["text"]
    assert data.eval.texts == splits["test"].shuffle(seed=42).select(range(7))["text"]


def test_a_latin_1_training_file_reads_with_its_encoding(tmp_path: Path) -> None:
    path = tmp_path / "avis.csv"
    rows = [(f"très bon film café {i}", "positive" if i % 2 else "négative") for i in range(20)]
    body = "".join(f"{text},{label}\n" for text, label in rows)
    path.write_bytes(("text,label\n" + body).encode("latin-1"))
    with pytest.raises(DataError, match="--encoding"):
        load_training_data(spec(path))
    data = load_training_data(spec(path, encoding="latin-1"))
    assert data.label_names == ["négative", "positive"]
    assert sorted(data.train.texts + data.eval.texts) == sorted(t for t, _ in rows)


def test_evaluation_data_may_name_its_columns_differently(tmp_path: Path) -> None:
    """As SST-2's dev file does: ``content`` where the training file has ``sentence``."""
    train = write_csv(tmp_path / "train.csv", ["sentence", "label"], ROWS)
    dev = write_csv(tmp_path / "dev.csv", ["content", "polarity"], ROWS[:10])
    with pytest.raises(DataError, match="no column 'sentence'.*--eval-text-column"):
        load_training_data(spec(train, eval_data=str(dev), text_column="sentence"))
    data = load_training_data(
        spec(
            train,
            eval_data=str(dev),
            text_column="sentence",
            eval_text_column="content",
            eval_label_column="polarity",
        )
    )
    assert sorted(data.eval.texts) == sorted(text for text, _ in ROWS[:10])
    assert len(data.train) == 50 and len(data.eval) == 10


def test_sst2_trains_against_its_dev_file() -> None:
    sst2 = SHARED_DATA / "sst2"
    if not (sst2 / "dev.tsv").is_file():
        unavailable(f"{sst2} is missing")
    data = load_training_data(
        spec(
            sst2 / "train.tsv.gz",
            eval_data=str(sst2 / "dev.tsv"),
            text_column="sentence",
            eval_text_column="content",
            train_size=100,
        )
    )
    assert len(data.eval) == 872 and data.label_names == ["0", "1"]
