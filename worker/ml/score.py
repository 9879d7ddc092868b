"""Scoring work: stage an input file into shards, score one shard, assemble the output.

Knows nothing of Celery or the database. Memory stays flat whatever the input's size: the
input is read in chunks, a shard is at most ``shard_rows`` rows, and the output is written one
shard at a time. The work folder (staged input and scored parts) is a location: a local folder,
or a URI in the artifact store, which workers that share nothing else can all reach.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tuneq.schemas.errors import DataError
from tuneq.schemas.specs import ScoreSpec
from tuneq.worker.io.artifacts import Location, is_uri, join, open_artifact, put_file, writing
from tuneq.worker.io.files import TableWriter, iter_batches

STAGED_INPUT = "input.parquet"
PARTS = "parts"
PRECISION = "precision.json"  # the precision a job's shards score in, chosen once per attempt
SAMPLE_OUTPUTS = "sample.npy"  # the parity sample's outputs in that precision, for its shards
PARITY_ROWS = (256, 2048)  # bounds of the parity gate's sample, 1 % of a job's rows
PARITY_AGREEMENT = 0.995  # the share of them on which bf16 must give fp32's answer


@dataclass(frozen=True)
class StagedInput:
    """The input, re-written as Parquet with one row group per shard."""

    path: str
    shard_sizes: list[int]

    @property
    def rows(self) -> int:
        return sum(self.shard_sizes)


@dataclass(frozen=True)
class ShardResult:
    rows: int
    empty_rows: int
    seconds: float


def output_columns(
    input_columns: list[str], labels: list[str], probabilities: bool, kind: str = "single"
) -> list[str]:
    """Names of the columns scoring adds: ``label``, ``score`` (``predicted_…`` if the input
    has those already) and, on request, ``prob_<label>`` per label; for a multi-label model
    ``labels`` and every ``prob_<label>``; for a regression model, ``value``."""
    if kind == "regression":
        names = ["value"]
    elif kind == "multi_label":
        names = ["labels"] + [f"prob_{k}" for k in labels]
    else:
        names = ["label", "score"] + ([f"prob_{k}" for k in labels] if probabilities else [])
    return [f"predicted_{n}" if n in input_columns else n for n in names]


def stage_input(spec: ScoreSpec, folder: Location) -> StagedInput:
    """Read ``spec.input`` in chunks into ``folder/input.parquet``, one row group per shard."""
    staged = join(folder, STAGED_INPUT)
    with writing(staged) as sink:
        sizes = write_shards(spec, sink)
    return StagedInput(staged, sizes)


def write_shards(spec: ScoreSpec, sink: object) -> list[int]:
    """Write ``spec.input`` to ``sink`` as Parquet, one row group per shard; the shard sizes."""
    source = Path(spec.input)
    writer: pq.ParquetWriter | None = None
    sizes: list[int] = []
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    try:
        for batch in iter_batches(source, encoding=spec.encoding, column_names=spec.columns):
            if writer is None:
                check_columns(batch.schema, spec, source)
                writer = pq.ParquetWriter(sink, batch.schema)
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= spec.shard_rows:
                table = pa.Table.from_batches(pending)
                writer.write_table(table.slice(0, spec.shard_rows), row_group_size=spec.shard_rows)
                sizes.append(spec.shard_rows)
                rest = table.slice(spec.shard_rows)
                pending, pending_rows = rest.to_batches(), rest.num_rows
        if writer is None or (not sizes and pending_rows == 0):
            raise DataError(f"{source} has no rows")
        if pending_rows:
            writer.write_table(pa.Table.from_batches(pending), row_group_size=spec.shard_rows)
            sizes.append(pending_rows)
    finally:
        if writer is not None:
            writer.close()
    return sizes


def check_columns(schema: pa.Schema, spec: ScoreSpec, source: Path) -> None:
    for column, option in ((spec.text_column, "--text-column"), (spec.id_column, "--id-column")):
        if column is not None and column not in schema.names:
            raise DataError(
                f"{source} has no column {column!r} (its columns: {', '.join(schema.names)}); "
                f"name the right one with {option}"
            )


def check_vocabulary(spec: ScoreSpec, folder: Location) -> str | None:
    """A warning if the model's vocabulary does not cover the first shard's texts."""
    from tuneq.worker.ml.models import load_tokenizer
    from tuneq.worker.ml.vocabulary import SAMPLE_TEXTS, unknown_share, vocabulary_warning

    assert spec.model_path is not None
    tokenizer = load_tokenizer(
        spec.model, spec.model_path, trust_remote_code=spec.trust_remote_code
    )
    first = read_shard(join(folder, STAGED_INPUT), 0).slice(0, SAMPLE_TEXTS)
    texts = pc.cast(first.column(spec.text_column), pa.string()).to_pylist()
    return vocabulary_warning(spec.model, unknown_share(tokenizer, texts))


def read_shard(staged: Location, index: int) -> pa.Table:
    """Row group ``index`` of the staged input; only it (and the footer) is read."""
    with open_artifact(staged) as handle:
        return pq.ParquetFile(handle).read_row_group(index)


def texts_of(table: pa.Table, column: str) -> tuple[list[str | None], list[int]]:
    """The column's texts, and the positions of those that are not empty (the rows to score)."""
    texts = pc.cast(table.column(column), pa.string()).to_pylist()
    return texts, [i for i, text in enumerate(texts) if text is not None and text.strip()]


def score_table(
    table: pa.Table,
    spec: ScoreSpec,
    classifier: object,
    on_batch: Callable[[], None] | None = None,
    known: np.ndarray | None = None,
) -> tuple[pa.Table, int]:
    """``table`` with the scoring columns added; rows with empty text get nulls. Returns the
    table and the number of empty rows. ``known`` holds the outputs of the table's first
    non-empty rows, scored already (the parity sample's): only the rows after them are scored."""
    from tuneq.worker.ml.predict import Classifier, classify

    assert isinstance(classifier, Classifier)
    texts, present = texts_of(table, spec.text_column)
    done = 0 if known is None else len(known)
    probabilities = classify(
        classifier,
        [texts[i] for i in present[done:]],
        max_length=spec.max_length,
        batch_tokens=spec.batch_tokens,
        on_batch=on_batch,
    )
    if known is not None:
        probabilities = np.concatenate([known.astype(probabilities.dtype), probabilities])
    mask = np.ones(len(texts), dtype=bool)
    mask[present] = False
    if classifier.regression:
        [name] = output_columns(table.column_names, [], False, "regression")
        values = np.zeros(len(texts), dtype=np.float64)
        values[present] = probabilities[:, 0]
        table = table.append_column(name, pa.array(values, mask=mask))
        return table, len(texts) - len(present)
    if classifier.thresholds is not None:
        return add_label_sets(table, classifier, probabilities, present), len(texts) - len(present)
    labels = np.array(classifier.labels, dtype=object)
    best = probabilities.argmax(axis=1) if len(present) else np.zeros(0, dtype=int)
    label_values = np.full(len(texts), None, dtype=object)
    label_values[present] = labels[best]
    score_values = np.zeros(len(texts), dtype=np.float32)
    score_values[present] = probabilities[np.arange(len(present)), best]
    names = output_columns(table.column_names, classifier.labels, spec.probabilities)
    table = table.append_column(names[0], pa.array(label_values, type=pa.string()))
    table = table.append_column(names[1], pa.array(score_values, mask=mask))
    if spec.probabilities:
        for k, name in enumerate(names[2:]):
            column = np.zeros(len(texts), dtype=np.float32)
            column[present] = probabilities[:, k]
            table = table.append_column(name, pa.array(column, mask=mask))
    return table, len(texts) - len(present)


def add_label_sets(
    table: pa.Table, classifier: Any, probabilities: np.ndarray, present: list[int]
) -> pa.Table:
    """A multi-label model's columns: the label set of each row, then every label's
    probability; rows with empty text get nulls."""
    from tuneq.worker.ml.predict import label_set

    rows = table.num_rows
    mask = np.ones(rows, dtype=bool)
    mask[present] = False
    chosen = probabilities >= np.asarray(classifier.thresholds)
    sets = np.full(rows, None, dtype=object)
    sets[present] = [label_set(classifier, row) for row in chosen]
    names = output_columns(table.column_names, classifier.labels, True, "multi_label")
    table = table.append_column(names[0], pa.array(sets, type=pa.string()))
    for k, name in enumerate(names[1:]):
        column = np.zeros(rows, dtype=np.float32)
        column[present] = probabilities[:, k]
        table = table.append_column(name, pa.array(column, mask=mask))
    return table


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a scoring job's shards use, and why (recorded on the job); ``agreed`` of
    ``sampled`` rows: what this job's parity gate found, to add to the model's evidence."""

    precision: str
    reason: str
    agreed: int = 0
    sampled: int = 0


def passes(agreed: int, sampled: int) -> bool:
    """Whether bf16 gave fp32's answer often enough: on at least 99.5 % of the rows sampled
    (an input without text has none to disagree on)."""
    return sampled == 0 or agreed / sampled >= PARITY_AGREEMENT


def choose_precision(
    spec: ScoreSpec,
    folder: Location,
    native: bool | None = None,
    earlier: tuple[int, int] = (0, 0),
) -> PrecisionChoice:
    """Resolve ``spec.precision`` for the job staged in ``folder`` and save it there for the
    shards. ``auto`` is bf16 where this machine computes bf16 natively (``native``, default:
    :func:`native_bf16`) and bf16 gives fp32's answers on at least 99.5 % of the rows sampled
    (the parity gate); otherwise fp32.

    ``earlier``: ``(agreed, sampled)``, what earlier jobs' gates found for this model on this
    kind of hardware. Where they sampled at least as many rows as this job would
    (:func:`parity_sample_size`) and passed, the job takes bf16 without sampling; where they
    sampled the most a job ever does and failed, fp32. Otherwise the job samples the input's
    first rows, scores them in both precisions and decides on its rows and the earlier ones
    together. The sample's outputs in the chosen precision are saved, so that the shards they
    came from do not score those rows again."""
    from tuneq.worker.ml.device import native_bf16
    from tuneq.worker.ml.predict import agreement, classify, load_for_inference

    sample_rows: list[int] = []  # per shard, from the first: its rows in the parity sample
    staged = join(folder, STAGED_INPUT)
    known_agreed, known_sampled = earlier
    if spec.precision != "auto":
        choice = PrecisionChoice(spec.precision, f"precision {spec.precision}, as asked")
    elif not (native_bf16() if native is None else native):
        choice = PrecisionChoice(
            "fp32",
            "precision auto: fp32, this machine has no native bf16 (AVX512-BF16, AMX, "
            "or a GPU from Ampere on)",
        )
    elif known_sampled >= parity_sample_size(staged_rows(staged)) and passes(*earlier):
        choice = PrecisionChoice(
            "bf16",
            f"precision auto: bf16, which gave fp32's answer on {known_agreed} of "
            f"{known_sampled} rows that earlier jobs sampled with this model on this hardware",
        )
    elif known_sampled >= PARITY_ROWS[1] and not passes(*earlier):
        choice = PrecisionChoice(
            "fp32",
            f"precision auto: fp32, as bf16 gave fp32's answer on only {known_agreed} of "
            f"{known_sampled} rows that earlier jobs sampled with this model on this hardware "
            f"({known_agreed / known_sampled:.1%}; at least {PARITY_AGREEMENT:.1%} needed)",
        )
    else:
        assert spec.model_path is not None
        sample, sample_rows = parity_sample(staged, spec.text_column)
        outputs = {}
        for precision in ("fp32", "bf16"):
            classifier = load_for_inference(spec.model_path, precision, spec.trust_remote_code)
            outputs[precision] = classify(
                classifier, sample, max_length=spec.max_length, batch_tokens=spec.batch_tokens
            )
        agreed = round(agreement(classifier, outputs["fp32"], outputs["bf16"]) * len(sample))
        total_agreed, total = agreed + known_agreed, len(sample) + known_sampled
        found = f"{agreed} of {len(sample)} rows sampled from the start of the input"
        pooled = f"{total_agreed} of {total} with earlier jobs' samples" if known_sampled else ""
        passed = passes(total_agreed, total)
        if passed:
            reason = f"precision auto: bf16, which gave fp32's answer on {found}"
            reason += f" ({pooled})" if pooled else ""
        else:
            reason = (
                f"precision auto: fp32, as bf16 gave fp32's answer on only {found} "
                f"({pooled + ', ' if pooled else ''}{total_agreed / total:.1%}; at least "
                f"{PARITY_AGREEMENT:.1%} needed)"
            )
        choice = PrecisionChoice("bf16" if passed else "fp32", reason, agreed, len(sample))
        with writing(join(folder, SAMPLE_OUTPUTS)) as sink:
            np.save(sink, outputs[choice.precision])
    record = {"precision": choice.precision, "reason": choice.reason, "sample_rows": sample_rows}
    with writing(join(folder, PRECISION)) as sink:  # last: the shards' outputs are in place
        sink.write(json.dumps(record).encode())
    return choice


def staged_rows(staged: Location) -> int:
    """Rows of the staged input (empty ones included)."""
    with open_artifact(staged) as handle:
        return int(pq.ParquetFile(handle).metadata.num_rows)


def parity_sample_size(rows: int) -> int:
    """How many rows ``auto``'s parity gate scores in fp32 and in bf16 for a job of ``rows``:
    1 % of them, at least 256 and at most 2,048. At 256 the 99.5 % bar allows one disagreement,
    so a model whose bf16 labels differ from fp32's on 0.15 % of rows (MiniLM's on IMDB) fails
    it in 6 % of jobs, for nothing, and one that differs on 1 % passes it in 27 %; at 2,048 those
    are 0.04 % and 0.8 %. Falling back for nothing costs most on a big job, where the larger
    sample costs least in proportion."""
    low, high = PARITY_ROWS
    return min(high, max(low, rows // 100))


def parity_sample(staged: Location, column: str) -> tuple[list[str], list[int]]:
    """The gate's rows: the first non-empty texts of the staged input, shard after shard; and
    how many come from each shard, from the first."""
    with open_artifact(staged) as handle:
        parquet = pq.ParquetFile(handle)
        wanted = parity_sample_size(parquet.metadata.num_rows)
        sample: list[str] = []
        per_shard: list[int] = []
        for index in range(parquet.num_row_groups):
            texts, present = texts_of(parquet.read_row_group(index), column)
            taken = present[: wanted - len(sample)]
            sample += [str(texts[i]) for i in taken]
            per_shard.append(len(taken))
            if len(sample) == wanted:
                break
    return sample, per_shard


def precision_record(spec: ScoreSpec, folder: Location) -> dict[str, Any]:
    """What :func:`choose_precision` saved for the job staged in ``folder``: the precision its
    shards score in and, for ``auto``, its parity sample's rows per shard."""
    if spec.precision != "auto":
        return {"precision": spec.precision}
    with open_artifact(join(folder, PRECISION)) as handle:
        return dict(json.load(handle))


def chosen_precision(spec: ScoreSpec, folder: Location) -> str:
    """The precision the shards of the job staged in ``folder`` score in."""
    return str(precision_record(spec, folder)["precision"])


def sample_outputs(record: dict[str, Any], folder: Location, index: int) -> np.ndarray | None:
    """The outputs the parity gate saved for shard ``index``'s first non-empty rows, in the
    precision the shards score in (``record``: :func:`precision_record`); None where the gate
    took none of its rows."""
    per_shard = record.get("sample_rows") or []
    if index >= len(per_shard) or not per_shard[index]:
        return None
    start = sum(per_shard[:index])
    with open_artifact(join(folder, SAMPLE_OUTPUTS)) as handle:
        return np.load(handle)[start : start + per_shard[index]]


def score_shard(
    spec: ScoreSpec, folder: Location, index: int, on_batch: Callable[[], None] | None = None
) -> ShardResult:
    """Score shard ``index`` of the staged input into ``folder/parts/<index>.parquet``;
    ``on_batch`` is called before each batch and may raise to stop."""
    from tuneq.worker.ml.predict import load_for_inference

    started = time.perf_counter()
    assert spec.model_path is not None
    record = precision_record(spec, folder)
    classifier = load_for_inference(spec.model_path, record["precision"], spec.trust_remote_code)
    table = read_shard(join(folder, STAGED_INPUT), index)
    known = sample_outputs(record, folder, index)
    scored, empty = score_table(table, spec, classifier, on_batch, known)
    with writing(part_path(folder, index)) as sink:  # a part exists whole or not at all
        pq.write_table(scored, sink)
    return ShardResult(table.num_rows, empty, round(time.perf_counter() - started, 3))


def part_path(folder: Location, index: int) -> str:
    return join(folder, PARTS, f"{index:06d}.parquet")


def assemble_output(
    folder: Location,
    shards: int,
    output: Location,
    partial: Path,
    on_part: Callable[[], None] | None = None,
) -> None:
    """Concatenate the parts, in shard order, into ``output``; it appears whole or not at all.
    The output is built in ``partial`` (a local file), then renamed to a local ``output`` or
    uploaded to an output URI. ``on_part`` runs before each part and may raise to stop."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    writer: TableWriter | None = None
    try:
        for index in range(shards):
            if on_part is not None:
                on_part()
            with open_artifact(part_path(folder, index)) as handle:
                part = pq.read_table(handle)
            if writer is None:
                writer = TableWriter(partial, part.schema, output_format=PurePath(str(output)))
            writer.write(part)
        assert writer is not None
        writer.close()
        if is_uri(output):
            put_file(partial, output)
            partial.unlink()
        else:
            os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
