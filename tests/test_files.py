"""Reading data files in chunks and writing them back, with errors that name file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pytest

from tuneq.schemas.errors import DataError
from tuneq.worker.io.files import TableWriter, iter_batches, read_table


def read_all(path: Path, **options: str) -> pa.Table:
    return pa.Table.from_batches(list(iter_batches(path, **options)))


def test_csv_columns_are_read_as_text_exactly(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text('id,text,rating\n007,"Say ""hi"", twice",8.50\n008,"two\nlines",10\n')
    table = read_all(path)
    assert table.to_pylist() == [
        {"id": "007", "text": 'Say "hi", twice', "rating": "8.50"},
        {"id": "008", "text": "two\nlines", "rating": "10"},
    ]


def test_read_table_infers_types_for_training(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("text,label\ngood,1\nbad,0\n")
    assert read_table(path).schema.field("label").type == pa.int64()


def test_a_malformed_csv_row_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text('text,label\nfine,1\n"two\nlines",0\nbroken,1,extra\n')
    with pytest.raises(DataError) as caught:
        read_all(path)
    assert str(caught.value) == f"{path}, line 5: expected 2 fields, found 3"


def test_a_malformed_json_line_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    with pytest.raises(DataError) as caught:
        read_all(path)
    assert str(caught.value).startswith(f"{path}, line 3: not valid JSON")


def test_bytes_that_are_not_utf8_name_the_encoding_option(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text\ncafé crème\n".encode("latin-1"))
    with pytest.raises(DataError) as caught:
        read_all(path)
    assert str(caught.value) == (
        f"{path}: bytes that are not valid utf-8; pass the file's encoding with --encoding "
        "(for example --encoding latin-1 or --encoding gb18030)"
    )
    assert read_all(path, encoding="latin-1").column("text").to_pylist() == ["café crème"]


def test_unknown_encoding(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("text\nx\n")
    with pytest.raises(DataError, match="unknown --encoding 'klingon'"):
        read_all(path, encoding="klingon")


@pytest.mark.parametrize(
    ("name", "message"),
    [("empty.csv", "is empty"), ("folder.csv", "is a folder; pass a data file")],
)
def test_empty_files_and_folders(tmp_path: Path, name: str, message: str) -> None:
    path = tmp_path / name
    if name == "folder.csv":
        path.mkdir()
    else:
        path.write_bytes(b"")
    with pytest.raises(DataError, match=message):
        read_all(path)


@pytest.mark.parametrize("name", ["out.csv", "out.tsv.gz", "out.jsonl", "out.parquet"])
def test_writer_round_trips_every_format(tmp_path: Path, name: str) -> None:
    table = pa.table({"id": ["a", "b"], "text": ['x, "y"', "z\tw"], "label": ["pos", None]})
    path = tmp_path / name
    with TableWriter(path, table.schema) as writer:
        writer.write(table.slice(0, 1))
        writer.write(table.slice(1))
    back = read_all(path)
    expected = table.to_pylist()
    if name.endswith((".csv", ".tsv.gz")):
        expected[1]["label"] = ""  # text formats have no null: an empty field
    assert back.to_pylist() == expected


def test_jsonl_output_keeps_unicode_readable(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl.gz"
    table = pa.table({"text": ["很好"]})
    with TableWriter(path, table.schema) as writer:
        writer.write(table)
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        assert json.loads(handle.read()) == {"text": "很好"}
