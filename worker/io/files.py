"""Data files: CSV, TSV, JSON lines and Parquet (optionally gzipped), read whole or in
chunks, written in chunks; errors name the file, the line and the option to change."""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any

import pyarrow as pa

from tuneq.schemas.errors import DataError

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
# Read block sizes. Arrow's CSV reader keeps several blocks in flight: reading a 1.3 GB file,
# 1 MB blocks peaked at 150 MB of RSS, 4 MB at 290 MB, 16 MB at 750 MB (and were slower). A
# record must fit in one block, so blocks are a few times the longest field.
CSV_BLOCK_BYTES = 1 << 22
JSON_BLOCK_BYTES = 1 << 24
# The longest text field read: a review is a few kB; a field of megabytes is almost always a
# stray quote that swallowed the rest of the file, and would cost minutes to tokenize.
MAX_FIELD_BYTES = 1 << 20


def data_suffix(path: PurePath) -> str:
    """The data format of ``path`` (``.csv``, ``.tsv``, …), looking through ``.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def check_data_file(path: Path) -> str:
    """The format of an existing, non-empty data file, or a ``DataError`` saying what is wrong."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass a data file")
    suffix = data_suffix(path)
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown format; use .csv, .tsv, .jsonl or .parquet (or .gz)")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    return suffix


def read_table(
    path: Path, column_names: list[str] | None = None, encoding: str = "utf-8"
) -> pa.Table:
    """Read one whole data file into a table (for training sets, which fit in memory)."""
    batches = list(
        iter_batches(path, infer_types=True, column_names=column_names, encoding=encoding)
    )
    table = pa.Table.from_batches(batches) if batches else None
    if table is None or table.num_rows == 0:
        raise DataError(f"{path} has no rows")
    if any(pa.types.is_binary(field.type) for field in table.schema):
        raise not_encoded(path, encoding)
    return table


def iter_batches(
    path: Path,
    *,
    encoding: str = "utf-8",
    infer_types: bool = False,
    column_names: list[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """The rows of ``path`` in chunks of a few MB, so memory stays flat whatever its size.

    CSV and TSV columns are read as text unless ``infer_types``: a column's type then cannot
    change from one chunk to the next, and values are written back exactly as they were read.
    ``column_names`` names the columns of a CSV or TSV file without a header row.
    """
    suffix = check_data_file(path)
    try:
        if suffix in (".csv", ".tsv"):
            batches = _csv_batches(path, suffix, encoding, infer_types, column_names)
        elif suffix in (".jsonl", ".json"):
            batches = _json_batches(path)
        else:
            batches = _parquet_batches(path)
        rows = 0
        for batch in batches:
            check_field_sizes(batch, path, rows, encoding)
            rows += batch.num_rows
            yield batch
    except pa.ArrowInvalid as exc:
        raise describe_read_error(path, suffix, encoding, exc) from None
    except UnicodeDecodeError:
        raise not_encoded(path, encoding) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read: {exc}") from None


def _csv_batches(
    path: Path, suffix: str, encoding: str, infer_types: bool, column_names: list[str] | None
) -> Iterator[pa.RecordBatch]:
    from pyarrow import csv as pa_csv

    delimiter = "\t" if suffix == ".tsv" else ","
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"unknown --encoding {encoding!r}; try utf-8, latin-1 or gb18030") from None
    header = column_names or read_header(path, delimiter, encoding)
    if not header:
        raise DataError(f"{path} is empty")
    convert = pa_csv.ConvertOptions(
        column_types=None if infer_types else {name: pa.string() for name in header},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    reader = pa_csv.open_csv(
        path,
        read_options=pa_csv.ReadOptions(
            block_size=CSV_BLOCK_BYTES, encoding=encoding, column_names=column_names
        ),
        parse_options=pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        convert_options=convert,
    )
    yield from reader


def check_field_sizes(batch: pa.RecordBatch, path: Path, rows_before: int, encoding: str) -> None:
    """Refuse a text field over ``MAX_FIELD_BYTES``, naming where it is."""
    import pyarrow.compute as pc

    for column in batch.columns:
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        lengths = pc.binary_length(column)
        longest = pc.max(lengths).as_py()
        if longest is not None and longest > MAX_FIELD_BYTES:
            raise field_too_long(
                path, encoding, rows_before + pc.index(lengths, longest).as_py() + 1
            )


def field_too_long(path: Path, encoding: str, row: int | None = None) -> DataError:
    """The message for a field over ``MAX_FIELD_BYTES``: by line in CSV and JSON lines (where
    row ``n`` is line ``n``), by row in Parquet."""
    reason = f"a field longer than {MAX_FIELD_BYTES:,} bytes, the most tuneq reads"
    suffix = data_suffix(path)
    where = f"row {row:,}" if row is not None else "a record"
    if suffix in (".csv", ".tsv"):
        found = find_bad_csv_line(path, "\t" if suffix == ".tsv" else ",", encoding)
        where = f"line {found[0]:,}" if found else where
        reason += "; a field that long is usually a stray quote that swallowed the lines after it"
    elif suffix in (".jsonl", ".json") and row is not None:
        where = f"line {row:,}"
    return DataError(f"{path}, {where}: {reason}")


def read_header(path: Path, delimiter: str, encoding: str) -> list[str]:
    with open_text(path, encoding) as handle:
        return next(csv.reader(handle, delimiter=delimiter), [])


def open_text(path: Path, encoding: str) -> io.TextIOWrapper:
    raw = gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding=encoding, newline="")


def _json_batches(path: Path) -> Iterator[pa.RecordBatch]:
    from pyarrow import json as pa_json

    reader = pa_json.open_json(path, read_options=pa_json.ReadOptions(block_size=JSON_BLOCK_BYTES))
    yield from reader


def _parquet_batches(path: Path) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(path).iter_batches(batch_size=65536)


def describe_read_error(path: Path, suffix: str, encoding: str, exc: Exception) -> DataError:
    """A message with the file, the line and the reason for a parse failure."""
    message = str(exc).replace("\n", " ")
    if "Empty CSV file" in message:
        return DataError(f"{path} is empty")
    if "UTF8" in message or "UTF-8" in message or "utf8" in message:
        return not_encoded(path, encoding)
    if "straddling object" in message:  # a record longer than a whole read block
        return field_too_long(path, encoding)
    if suffix in (".csv", ".tsv"):
        line = find_bad_csv_line(path, "\t" if suffix == ".tsv" else ",", encoding)
        if line is not None:
            number, reason = line
            return DataError(f"{path}, line {number}: {reason}")
    if suffix in (".jsonl", ".json") and " in row " in message:
        row = message.rsplit(" in row ", 1)[1].split()[0]
        if row.isdigit():
            reason = message.split(" in row ")[0].removeprefix("JSON parse error: ")
            return DataError(f"{path}, line {int(row) + 1}: not valid JSON ({reason})")
    return DataError(f"{path}: cannot be read as {suffix[1:].upper()}: {message}")


def not_encoded(path: Path, encoding: str) -> DataError:
    return DataError(
        f"{path}: bytes that are not valid {encoding}; pass the file's encoding with "
        "--encoding (for example --encoding latin-1 or --encoding gb18030)"
    )


def find_bad_csv_line(path: Path, delimiter: str, encoding: str) -> tuple[int, str] | None:
    """The first line where a record with the wrong number of fields, or a field over
    ``MAX_FIELD_BYTES``, starts (slow; only on failure)."""
    limit = csv.field_size_limit(MAX_FIELD_BYTES)
    try:
        with open_text(path, encoding) as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = next(reader, [])
            line = reader.line_num
            try:
                for row in reader:
                    if len(row) != len(header):
                        return line + 1, f"expected {len(header)} fields, found {len(row)}"
                    line = reader.line_num
            except csv.Error as exc:
                return line + 1, str(exc)
    finally:
        csv.field_size_limit(limit)
    return None


class TableWriter:
    """Writes tables, chunk by chunk, in the format that ``path``'s suffix names."""

    def __init__(
        self, path: Path, schema: pa.Schema, *, output_format: PurePath | None = None
    ) -> None:
        """Write to ``path`` in the format of ``output_format`` (default: ``path`` itself), so
        that a temporary name can carry the final name's format."""
        named = output_format or path
        self.path, self.schema = path, schema
        self.suffix = data_suffix(named)
        gzipped = named.suffix.lower() == ".gz"
        self.sink: Any = pa.output_stream(path, compression="gzip" if gzipped else None)
        self.writer: Any = None
        self.nested: list[str] = []
        if self.suffix == ".parquet":
            import pyarrow.parquet as pq

            self.writer = pq.ParquetWriter(self.sink, schema)
        elif self.suffix in (".csv", ".tsv"):
            from pyarrow import csv as pa_csv

            options = pa_csv.WriteOptions(delimiter="\t" if self.suffix == ".tsv" else ",")
            self.nested = [f.name for f in schema if pa.types.is_nested(f.type)]
            for name in self.nested:  # CSV cells hold text: nested values become JSON
                schema = schema.set(schema.get_field_index(name), pa.field(name, pa.string()))
            self.writer = pa_csv.CSVWriter(self.sink, schema, write_options=options)

    def write(self, table: pa.Table) -> None:
        if self.suffix in (".csv", ".tsv"):
            for name in self.nested:
                as_json = [
                    None if v is None else json.dumps(v, ensure_ascii=False)
                    for v in table.column(name).to_pylist()
                ]
                index = table.schema.get_field_index(name)
                table = table.set_column(index, name, pa.array(as_json, pa.string()))
        if self.writer is not None:
            self.writer.write_table(table)
            return
        for row in table.to_pylist():  # JSON lines
            self.sink.write((json.dumps(row, ensure_ascii=False, default=str) + "\n").encode())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.sink.close()

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
