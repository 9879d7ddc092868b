"""On a CUDA GPU: a real ``tuneq worker --gpu 0`` fine-tunes and scores, and the GPU did the work.

One worker process (embedded SQLite broker, SQLite database in pytest's temporary folder) serves
the whole module: a fine-tune with ``--device gpu``, scoring jobs in fp32 and bf16 whose labels
are compared with CPU fp32 scoring of the same rows in a process that sees no GPU, and int8
scoring, refused for the GPU and run by a CPU worker on the same machine. Evidence that CUDA did
the work: the GPU memory in use on device 0 rising while the fine-tune runs (its process starts
CUDA then), the worker log's line for each model loaded for scoring, the pool process's
``CUDA_VISIBLE_DEVICES`` line and the worker's registry row.

The module skips where torch sees no CUDA GPU (CI, developers' machines). It needs no Redis,
PostgreSQL, shared data or packaged MiniLM: the model is a tiny BERT built here, with a
vocabulary of the synthetic reviews' words. About a minute or two on one GPU.
"""

from __future__ import annotations

import json
import os
import re
import string
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import (
    FILLER,
    NEGATIVE,
    POSITIVE,
    WorkerProcess,
    invoke_cli,
    save_tiny_bert,
    scoring_input,
    synthetic_reviews,
    write_csv,
)
from tuneq.schemas.settings import load_settings

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not CUDA,
    reason="no CUDA GPU on this machine; tests/test_gpu_e2e.py checks a real `tuneq worker "
    "--gpu 0` (fine-tune and scoring on CUDA) and runs only where torch.cuda.is_available()",
)

QUEUE = "gpu"  # what --device gpu routes to; the module's broker is its own
JOB_TIMEOUT_S = 120
# A CUDA context alone takes a few hundred MiB; a job that never touched the GPU adds nothing.
CONTEXT_MIB = 100
SCORE_ROWS, SHARD_ROWS = 600, 300


class GpuMemory(threading.Thread):
    """Memory in use on CUDA device 0, whoever holds it (``cudaMemGetInfo``), sampled every
    50 ms: its value before a job and its peak while the job runs.

    Device 0 here is the worker's ``--gpu 0`` as long as CUDA_VISIBLE_DEVICES is unset for
    pytest (a machine of its own)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.before = self.used()
        self.peak = self.before
        self.done = threading.Event()

    @staticmethod
    def used() -> int:
        free, total = torch.cuda.mem_get_info(0)
        return int(total - free)

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, self.used())

    def rise_mib(self) -> float:
        return (self.peak - self.before) / 2**20


@dataclass
class GpuService:
    env: dict[str, str]
    worker: WorkerProcess
    folder: Path
    tiny_model: Path
    reviews: Path


def build_tiny_model(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT whose WordPiece vocabulary is the synthetic reviews' words and
    single letters: built offline, no packaged model needed."""
    from transformers import BertTokenizer

    letters = list(string.ascii_lowercase)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += sorted(set(POSITIVE + NEGATIVE + FILLER)) + letters + [f"##{c}" for c in letters]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)})
    return save_tiny_bert(folder, tokenizer, len(words))  # ids go up to len(words) - 1


@pytest.fixture(scope="module")
def gpu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpuService]:
    """A ``tuneq worker --gpu 0 --queues gpu`` on the embedded broker and a SQLite database."""
    folder = tmp_path_factory.mktemp("gpu")
    env = {
        "TUNEQ_DATA_DIR": str(folder / "data"),
        "TUNEQ_DATABASE_URL": f"sqlite:///{folder / 'tuneq.db'}",
        "TUNEQ_ALLOWED_ROOTS": str(tmp_path_factory.getbasetemp()),
    }  # no TUNEQ_BROKER_URL: the embedded SQLite broker, whatever the machine has
    assert load_settings(env).uses_embedded_broker
    tiny_model = build_tiny_model(folder / "tiny-bert")
    rows: list[tuple[object, ...]] = list(synthetic_reviews(200))
    reviews = write_csv(folder / "reviews.csv", ["text", "label"], rows)
    worker = WorkerProcess(env, QUEUE, folder / "worker.log", "--gpu", "0")
    try:
        worker.wait_ready(timeout_s=120)
        yield GpuService(env, worker, folder, tiny_model, reviews)
    finally:
        worker.stop()
        print(f"\n--- worker log ({worker.log}) ---\n{worker.log.read_text()[-6000:]}")


def submit(env: dict[str, str], *args: str) -> str:
    result = invoke_cli(env, *args)
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[0]


def show(env: dict[str, str], job_id: str) -> dict[str, Any]:
    return dict(json.loads(invoke_cli(env, "show", job_id, "--json").stdout))


def wait_for(gpu: GpuService, job_id: str) -> dict[str, Any]:
    """The job once it has ended; fails with the worker's log if the worker dies or the job
    takes longer than JOB_TIMEOUT_S."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (job := show(gpu.env, job_id))["status"] in ("queued", "running", "retrying"):
        if not gpu.worker.alive or time.monotonic() > deadline:
            state = "worker died" if not gpu.worker.alive else f"still {job['status']}"
            pytest.fail(f"job {job_id}: {state}\n{gpu.worker.log.read_text()[-4000:]}")
        time.sleep(0.2)
    return job


def run_on_gpu(gpu: GpuService, *args: str) -> tuple[dict[str, Any], GpuMemory]:
    """Submit ``tuneq ARGS`` and wait for the job, sampling GPU memory while it runs."""
    memory = GpuMemory()
    memory.start()
    try:
        job = wait_for(gpu, submit(gpu.env, *args))
    finally:
        memory.done.set()
        memory.join()
    print(f"job {job['id']} {job['status']}: GPU memory +{memory.rise_mib():.0f} MiB at peak")
    return job, memory


Finetuned = tuple[dict[str, Any], GpuMemory]


@pytest.fixture(scope="module")
def finetuned(gpu: GpuService) -> Finetuned:
    """The tiny BERT fine-tuned by the GPU worker (``--device gpu``), registered as gpu-tiny."""
    return run_on_gpu(
        gpu,
        "finetune",
        "--data",
        str(gpu.reviews),
        "--model",
        str(gpu.tiny_model),
        "--device",
        "gpu",
        "--name",
        "gpu-tiny",
        "--epochs",
        "8",
        "--learning-rate",
        "0.002",
        "--batch-size",
        "16",
    )


def test_fine_tune_runs_on_the_gpu(gpu: GpuService, finetuned: Finetuned) -> None:
    job, memory = finetuned
    assert job["status"] == "succeeded", job["error"]
    assert job["queue"] == QUEUE and job["spec"]["device"] == "gpu"
    metrics = job["metrics"]
    print("fine-tune metrics:", {k: metrics.get(k) for k in ("accuracy", "precision", "phases")})
    print("train_samples_per_second:", metrics["train_samples_per_second"])
    assert metrics["accuracy"] >= 0.9, metrics
    # precision auto: bf16 where the device computes it natively, as every CUDA GPU since
    # Ampere does (on the worker, native_bf16 asks torch.cuda.is_bf16_supported()).
    assert metrics["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    model = job["model"]
    assert (model["name"], model["version"], model["labels"]) == (
        "gpu-tiny",
        1,
        ["negative", "positive"],
    )
    assert (Path(model["path"]) / "model.safetensors").is_file()

    # Evidence that the job ran on CUDA: the job's process held GPU memory while it ran.
    assert memory.rise_mib() >= CONTEXT_MIB, (
        f"GPU memory rose by only {memory.rise_mib():.0f} MiB while the fine-tune ran: "
        "it did not use the GPU"
    )
    # The pool process saw only GPU 0, and the worker is registered as gpu:0.
    assert "CUDA_VISIBLE_DEVICES=0)" in gpu.worker.log.read_text()
    workers = json.loads(invoke_cli(gpu.env, "workers", "--json").stdout)
    assert [(w["device"], w["queues"], w["concurrency"]) for w in workers] == [
        ("gpu:0", [QUEUE], 1)
    ]
    # The job gave its GPU memory back when it ended: its process stays (for scoring shards),
    # so what it still holds is logged, and a fine-tune leaves nothing allocated or cached.
    # (The line comes just after the job's end is recorded.)
    pattern = rf"job {job['id']}: GPU memory held after it: (\d+) MiB allocated, (\d+) MiB"
    deadline = time.monotonic() + 30
    while not (held := re.search(pattern, gpu.worker.log.read_text())):
        assert time.monotonic() < deadline, gpu.worker.log.read_text()[-3000:]
        time.sleep(0.2)
    assert held.groups() == ("0", "0"), held.group(0)


CPU_REFERENCE = """
import json, sys
import torch
from tuneq.worker.ml.predict import classify, load_for_inference
assert not torch.cuda.is_available(), "the reference must run on the CPU"
folder, texts_path = sys.argv[1], sys.argv[2]
texts = json.load(open(texts_path, encoding="utf-8"))
classifier = load_for_inference(folder, "fp32")
assert classifier.device.type == "cpu"
probabilities = classify(classifier, texts)
print(json.dumps({
    "labels": [classifier.labels[i] for i in probabilities.argmax(axis=1)],
    "scores": probabilities.max(axis=1).tolist(),
}))
"""


def cpu_reference(folder: str, texts: list[str], work: Path) -> dict[str, list[Any]]:
    """Labels and scores of ``texts`` by tuneq's CPU fp32 scoring. ``load_for_inference`` takes
    the GPU whenever torch sees one, so this runs in a process with CUDA_VISIBLE_DEVICES empty."""
    texts_path = work / "texts.json"
    texts_path.write_text(json.dumps(texts), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-c", CPU_REFERENCE, folder, str(texts_path)],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def scored_rows(path: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return list(pq.read_table(path).to_pylist())


def input_rows(path: Path) -> list[dict[str, Any]]:
    from tuneq.worker.io.files import iter_batches

    return [row for batch in iter_batches(path) for row in batch.to_pylist()]


def test_scoring_on_the_gpu_agrees_with_cpu_fp32(gpu: GpuService, finetuned: Finetuned) -> None:
    job, _memory = finetuned
    if job["status"] != "succeeded":
        pytest.fail(f"the fine-tune this test scores with failed: {job['error']}")
    source = scoring_input(gpu.folder / "to-score.csv", SCORE_ROWS)
    present = [
        row["text"] for row in input_rows(source) if row["text"] is not None and row["text"].strip()
    ]
    reference = cpu_reference(job["model"]["path"], present, gpu.folder)

    outputs: dict[str, list[dict[str, Any]]] = {}
    for precision in ("fp32", "bf16"):
        output = gpu.folder / f"scored-{precision}.parquet"
        done, _memory = run_on_gpu(
            gpu,
            "score",
            "gpu-tiny",
            str(source),
            "--output",
            str(output),
            "--device",
            "gpu",
            "--precision",
            precision,
            "--shard-rows",
            str(SHARD_ROWS),
        )
        assert done["status"] == "succeeded", done["error"]
        metrics = done["metrics"]
        print(f"scoring {precision}:", metrics)
        assert done["queue"] == QUEUE and metrics["precision"] == precision
        assert metrics["rows"] == SCORE_ROWS and metrics["shards"] == SCORE_ROWS // SHARD_ROWS
        assert f"for {precision} scoring on cuda" in gpu.worker.log.read_text()
        rows = scored_rows(str(output))
        assert len(rows) == SCORE_ROWS
        outputs[precision] = [r for r in rows if r["text"] is not None and r["text"].strip()]
        assert all(r["label"] is None for r in rows if not (r["text"] or "").strip())

    cpu_labels, cpu_scores = reference["labels"], reference["scores"]
    for precision, tolerance, unsure in (("fp32", 1e-3, 0.501), ("bf16", 0.05, 0.6)):
        rows = outputs[precision]
        assert len(rows) == len(cpu_labels)
        differ = [i for i, r in enumerate(rows) if r["label"] != cpu_labels[i]]
        drift = max(abs(r["score"] - cpu_scores[i]) for i, r in enumerate(rows))
        print(
            f"GPU {precision} vs CPU fp32: {len(differ)} of {len(rows)} labels differ, "
            f"largest score difference {drift:.2e}"
        )
        # A label may flip only where CPU fp32 itself was nearly undecided.
        assert all(cpu_scores[i] < unsure for i in differ), [
            (i, rows[i]["score"], cpu_scores[i]) for i in differ
        ]
        assert len(differ) <= 0.02 * len(rows)
        assert drift <= tolerance
    same = sum(
        a["label"] == b["label"] for a, b in zip(outputs["fp32"], outputs["bf16"], strict=True)
    )
    assert same >= 0.98 * len(outputs["fp32"])
    # One pool process ran the fine-tune and every shard: the model loaded once per precision.
    assert gpu.worker.log.read_text().count("ready for jobs") == 1


def test_int8_runs_on_a_cpu_worker_of_the_gpu_machine(
    gpu: GpuService, finetuned: Finetuned, tmp_path: Path
) -> None:
    """int8 on a GPU is refused when submitted; a worker without --gpu on the same machine
    sees no GPU (its registry row says cpu), so int8 scoring, which fails on CUDA, works there
    and the GPU's memory does not move."""
    job, _memory = finetuned
    if job["status"] != "succeeded":
        pytest.fail(f"the fine-tune this test scores with failed: {job['error']}")
    source = scoring_input(gpu.folder / "to-score-int8.csv", 100)
    output = gpu.folder / "scored-int8.parquet"
    refused = invoke_cli(
        gpu.env, "score", "gpu-tiny", str(source), "--output", str(output),
        "--device", "gpu", "--precision", "int8",
    )  # fmt: skip
    assert refused.exit_code != 0 and "int8 scoring runs on a CPU" in refused.output

    cpu_worker = WorkerProcess(gpu.env, "cpu", tmp_path / "cpu-worker.log")
    try:
        cpu_worker.wait_ready(timeout_s=120)
        done, memory = run_on_gpu(
            gpu, "score", "gpu-tiny", str(source), "--output", str(output),
            "--device", "cpu", "--precision", "int8",
        )  # fmt: skip
    finally:
        cpu_worker.stop()
    assert done["status"] == "succeeded" and done["queue"] == "cpu", done["error"]
    assert len(scored_rows(str(output))) == 100
    assert memory.rise_mib() < CONTEXT_MIB / 2, f"GPU memory rose {memory.rise_mib():.0f} MiB"
    assert "CUDA_VISIBLE_DEVICES=)" in cpu_worker.log.read_text()
