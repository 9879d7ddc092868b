"""Loading training data: Hub data sets or local files, columns mapped, labels encoded,
rows selected by a seeded shuffle before anything is tokenized."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tuneq.schemas.errors import DataError, DataUnavailable
from tuneq.schemas.specs import FinetuneSpec
from tuneq.worker.io.files import SUFFIXES, data_suffix, read_table

TRAIN_NAMES = ("train",)
EVAL_NAMES = ("test", "eval", "evaluation", "validation", "val", "dev")
DEFAULT_HOLDOUT = 0.2


@dataclass(frozen=True)
class Examples:
    """Texts and their label ids, ready to tokenize."""

    texts: list[str]
    labels: list[Any]  # class ids, or numbers for regression

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TrainingData:
    train: Examples
    eval: Examples
    label_names: list[str]
    fingerprint: str
    summary: dict[str, Any]


def is_local(source: str) -> bool:
    """Whether ``source`` names a file or folder rather than a Hub data set."""
    path = Path(source).expanduser()
    return (
        path.exists()
        or source.startswith((".", "/", "~"))
        or data_suffix(path) in SUFFIXES
        or source.endswith(".gz")
    )


def read_folder(
    folder: Path, column_names: list[str] | None = None, encoding: str = "utf-8"
) -> tuple[pa.Table, pa.Table | None]:
    """A folder's training table and, if it has one, its evaluation table.

    ``train.*`` and ``test.*`` (or eval, validation, dev) are splits; otherwise every data
    file in the folder is one data set.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and data_suffix(p) in SUFFIXES)
    if not files:
        raise DataError(f"{folder} holds no data files (.csv, .tsv, .jsonl, .parquet, or .gz)")
    by_stem = {p.name.split(".")[0].lower(): p for p in files}
    train = next((by_stem[n] for n in TRAIN_NAMES if n in by_stem), None)
    if train is None:
        tables = [read_table(p, column_names, encoding) for p in files]
        return concat_tables(tables, folder), None
    evaluation = next((by_stem[n] for n in EVAL_NAMES if n in by_stem), None)
    return (
        read_table(train, column_names, encoding),
        read_table(evaluation, column_names, encoding) if evaluation else None,
    )


def concat_tables(tables: list[pa.Table], source: Path) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as exc:
        raise DataError(f"the files in {source} do not share columns: {exc}") from None


def load_hub(name: str) -> tuple[pa.Table, pa.Table | None, list[str] | None]:
    """A Hub data set's train split, its test split if any, and its label names."""
    import datasets

    try:
        splits = datasets.load_dataset(name)
    except Exception as exc:  # the Hub raises many kinds: offline, unknown, gated
        raise DataUnavailable(
            f"cannot load data set {name!r} from the Hugging Face Hub ({type(exc).__name__}); "
            "if this machine is offline, pass a local file or folder with --data PATH "
            "(CSV, TSV, JSON lines or Parquet, e.g. --data reviews.csv)"
        ) from None
    if "train" not in splits:
        raise DataError(f"Hub data set {name!r} has no train split (it has {list(splits)})")
    evaluation = next((splits[n] for n in EVAL_NAMES if n in splits), None)
    names = None
    for feature in splits["train"].features.values():
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
    return (
        splits["train"].data.table,
        evaluation.data.table if evaluation is not None else None,
        names,
    )


def load_source(
    source: str, column_names: list[str] | None = None, encoding: str = "utf-8"
) -> tuple[pa.Table, pa.Table | None, list[str] | None]:
    """Read ``source`` (file, folder or Hub name) into train and optional eval tables."""
    if not is_local(source):
        return load_hub(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source}: no such file or folder")
    if path.is_dir():
        train, evaluation = read_folder(path, column_names, encoding)
        return train, evaluation, None
    return read_table(path, column_names, encoding), None, None


def column_values(table: pa.Table, column: str, option: str, source: str) -> list[Any]:
    if column not in table.column_names:
        columns = ", ".join(table.column_names)
        raise DataError(
            f"{source} has no column {column!r} (its columns: {columns}); "
            f"name the right one with {option}"
        )
    return table.column(column).to_pylist()


def is_integer_labels(raw: list[Any]) -> bool:
    return all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw)


def choose_label_names(
    raw: list[Any], given: list[str] | None, source: str, column: str
) -> list[str]:
    """Label names from the training labels: integers 0..K-1 take ``given`` names (or their
    digits), strings are sorted unless ``given`` fixes the order."""
    distinct = sorted(set(raw), key=lambda v: (isinstance(v, str), v))
    if len(distinct) < 2:
        shown = ", ".join(repr(v) for v in distinct) or "none"
        raise DataError(
            f"label column {column!r} in {source} has a single class ({shown}); "
            "a classifier needs examples of at least two labels"
        )
    if is_integer_labels(distinct):
        if min(distinct) < 0:
            raise DataError(f"label column {column!r} in {source} has negative labels")
        return given or [str(i) for i in range(int(max(distinct)) + 1)]
    return given or sorted(str(v) for v in distinct)


def encode_labels(raw: list[Any], names: list[str], source: str, column: str) -> list[int]:
    """Label ids for ``raw`` labels (integers, or strings among ``names``)."""
    if is_integer_labels(raw):
        ids = [int(v) for v in raw]
        unknown: list[Any] = sorted({i for i in ids if not 0 <= i < len(names)})
    else:
        index = {name: i for i, name in enumerate(names)}
        ids = [index.get(str(v), -1) for v in raw]
        unknown = sorted({str(v) for v in raw if str(v) not in index})
    if unknown:
        raise DataError(
            f"{source}: labels {unknown[:5]} in column {column!r} are not among the labels "
            f"{', '.join(names)}; check the data or --label-names"
        )
    return ids


def clean_rows(texts: list[Any], labels: list[Any]) -> tuple[list[str], list[Any], int]:
    """Drop rows whose text or label is missing; return how many were dropped."""
    kept_texts, kept_labels = [], []
    for text, label in zip(texts, labels, strict=True):
        if _blank(text) or _blank(label):
            continue
        kept_texts.append(str(text))
        kept_labels.append(label)
    return kept_texts, kept_labels, len(texts) - len(kept_texts)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def sample(n: int, size: int | None, seed: int) -> np.ndarray:
    """The first ``size`` of a seeded permutation of ``n`` rows: the rows that the classic
    recipe's ``dataset.shuffle(seed=seed).select(range(size))`` picks."""
    order = np.random.default_rng(seed).permutation(n)
    return order if size is None else order[: min(size, n)]


def load_training_data(spec: FinetuneSpec) -> TrainingData:
    """Load, select and encode the rows a fine-tune will use: at most train_size + eval_size."""
    train_table, eval_table, hub_names = load_source(spec.data, spec.columns, spec.encoding)
    if spec.eval_data is not None:
        eval_table, _, _ = load_source(spec.eval_data, spec.columns, spec.encoding)
    if not spec.evaluated():
        eval_table = None  # a test split too stays unused: every given row trains
    eval_source = spec.eval_data or spec.data
    texts = column_values(train_table, spec.text_column, "--text-column", spec.data)
    raw_labels = column_values(train_table, spec.label_column, "--label-column", spec.data)
    texts, raw_labels, dropped = clean_rows(texts, raw_labels)
    if not texts:
        raise DataError(f"{spec.data} has no rows with both a text and a label")
    if eval_table is None:
        order = np.random.default_rng(spec.seed).permutation(len(texts))
        eval_size = (
            max(1, int(len(texts) * DEFAULT_HOLDOUT)) if spec.eval_size is None else spec.eval_size
        )
        if eval_size and eval_size >= len(texts) - 1:
            raise DataError(
                f"{spec.data} has {len(texts)} usable rows: too few to hold out {eval_size} "
                "for evaluation; pass --eval-data or a smaller --eval-size"
            )
        eval_idx, rest = order[:eval_size], order[eval_size:]
        train_idx = rest if spec.train_size is None else rest[: spec.train_size]
        eval_texts = [texts[i] for i in eval_idx]
        eval_raw = [raw_labels[i] for i in eval_idx]
    else:
        train_idx = sample(len(texts), spec.train_size, spec.seed)
        text_column = spec.eval_text_column or spec.text_column
        label_column = spec.eval_label_column or spec.label_column
        e_texts = column_values(eval_table, text_column, "--eval-text-column", eval_source)
        e_labels = column_values(eval_table, label_column, "--eval-label-column", eval_source)
        e_texts, e_labels, e_dropped = clean_rows(e_texts, e_labels)
        dropped += e_dropped
        if not e_texts:
            raise DataError(f"{eval_source} has no rows with both a text and a label")
        eval_idx = sample(len(e_texts), spec.eval_size, spec.seed)
        eval_texts = [e_texts[i] for i in eval_idx]
        eval_raw = [e_labels[i] for i in eval_idx]

    train_texts = [texts[i] for i in train_idx]
    train_raw = [raw_labels[i] for i in train_idx]
    eval_label_column = spec.eval_label_column or spec.label_column
    summary: dict[str, Any] = {"dropped_rows": dropped}
    if spec.task == "regression":
        label_names = [spec.label_column]  # the model's one output is named after its target
        train_labels: list[Any] = numeric_targets(train_raw, spec.data, spec.label_column)
        eval_labels: list[Any] = numeric_targets(eval_raw, eval_source, eval_label_column)
        summary.update(train_target=describe_target(train_labels))
        if eval_labels:
            summary.update(eval_target=describe_target(eval_labels))
    elif spec.task == "multi_label":
        separator = spec.label_separator
        train_sets = label_sets(train_raw, separator, spec.data, spec.label_column)
        eval_sets = label_sets(eval_raw, separator, eval_source, eval_label_column)
        label_names = spec.label_names or sorted({name for names in train_sets for name in names})
        if len(label_names) < 2:
            raise DataError(
                f"label column {spec.label_column!r} in {spec.data} names fewer than two labels "
                f"({', '.join(label_names) or 'none'}); a multi-label model needs at least two"
            )
        train_labels = encode_label_sets(train_sets, label_names, spec.data, spec.label_column)
        eval_labels = encode_label_sets(eval_sets, label_names, eval_source, eval_label_column)
        summary.update(train_label_counts=set_counts(train_labels, label_names))
        summary.update(eval_label_counts=set_counts(eval_labels, label_names))
    else:
        label_names = choose_label_names(
            train_raw, spec.label_names or hub_names, spec.data, spec.label_column
        )
        train_labels = encode_labels(train_raw, label_names, spec.data, spec.label_column)
        eval_labels = encode_labels(eval_raw, label_names, eval_source, eval_label_column)
        summary.update(train_label_counts=label_counts(train_labels, label_names))
        summary.update(eval_label_counts=label_counts(eval_labels, label_names))
    train = Examples(train_texts, train_labels)
    evaluation = Examples(eval_texts, eval_labels)
    return TrainingData(
        train=train,
        eval=evaluation,
        label_names=label_names,
        fingerprint=fingerprint(train, evaluation),
        summary={"train_rows": len(train), "eval_rows": len(evaluation), **summary},
    )


SEPARATORS = ("|", ",", ";", "/", "+", " ")  # what joined labels are commonly split by


def label_sets(raw: list[Any], separator: str, source: str, column: str) -> list[list[str]]:
    """Each row's labels: a list as it is, or a string split at ``separator``. A column of
    strings none of which holds the separator, but some of which hold another one, was joined
    with that other one: say so rather than read "a;b" as one label."""
    sets = []
    for value in raw:
        if isinstance(value, (list, tuple)):
            sets.append([str(v).strip() for v in value if str(v).strip()])
        else:
            sets.append([p.strip() for p in str(value).split(separator) if p.strip()])
    texts = [str(v) for v in raw if not isinstance(v, (list, tuple))]
    if texts and not any(separator in t for t in texts):
        others = [s for s in SEPARATORS if s != separator and any(s in t for t in texts)]
        if others and others[0] != " ":
            example = next(t for t in texts if others[0] in t)
            raise DataError(
                f"{source}: no value in label column {column!r} holds the label separator "
                f"{separator!r}, but some hold {others[0]!r} (e.g. {example!r}); pass "
                f"--label-separator {others[0]!r} if that joins the labels"
            )
    return sets


def encode_label_sets(
    sets: list[list[str]], names: list[str], source: str, column: str
) -> list[list[int]]:
    """Label ids per row; a label outside ``names`` names itself."""
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({label for labels in sets for label in labels if label not in index})
    if unknown:
        raise DataError(
            f"{source}: labels {unknown[:5]} in column {column!r} are not among the labels "
            f"{', '.join(names)}; check the data or --label-names"
        )
    return [sorted({index[label] for label in labels}) for labels in sets]


def set_counts(label_ids: list[list[int]], names: list[str]) -> dict[str, int]:
    counts = np.zeros(len(names), dtype=np.int64)
    for ids in label_ids:
        counts[ids] += 1
    return {name: int(counts[i]) for i, name in enumerate(names)}


def numeric_targets(raw: list[Any], source: str, column: str) -> list[float]:
    """Regression targets as floats; a value that is no number names its row."""
    targets = []
    for row, value in enumerate(raw, start=1):
        number = as_number(value)
        if number is None:
            raise DataError(
                f"{source}: a regression target must be a number, but column {column!r} holds "
                f"{value!r} (row {row} of the selected rows); check --label-column, or drop "
                "--task regression to treat the values as classes"
            )
        targets.append(number)
    return targets


def as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def describe_target(targets: list[float]) -> dict[str, float]:
    values = np.asarray(targets, dtype=np.float64)
    return {
        "mean": round(float(values.mean()), 4),
        "std": round(float(values.std()), 4),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def label_counts(labels: list[int], names: list[str]) -> dict[str, int]:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names))
    return {name: int(counts[i]) for i, name in enumerate(names)}


def fingerprint(train: Examples, evaluation: Examples) -> str:
    """A SHA-256 over the selected rows, in order: equal fingerprints mean equal data."""
    digest = hashlib.sha256()
    for part, examples in (("train", train), ("eval", evaluation)):
        digest.update(part.encode())
        for text, label in zip(examples.texts, examples.labels, strict=True):
            digest.update(f"{label}\x1f{text}\x1e".encode())
    return digest.hexdigest()
