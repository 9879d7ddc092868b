"""Job rows: compare-and-set claims, fenced writes, atomic registration (SQLite or PostgreSQL)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tuneq.schemas.errors import JobNotFound, ModelNotFound
from tuneq.schemas.specs import FinetuneSpec
from tuneq.schemas.statuses import JobStatus
from tuneq.worker import store
from tuneq.worker.store.db import current_revision, get_engine, head_revision


@pytest.fixture
def engine(database_url: str) -> Engine:
    return get_engine(database_url)


def staged(tmp_path: Path, name: str = "staged") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


MODEL = {
    "name": "reviews",
    "base_model": "minilm",
    "labels": ["neg", "pos"],
    "data_fingerprint": "f" * 64,
}


def test_the_database_is_migrated_on_first_use(engine: Engine) -> None:
    assert current_revision(engine) == head_revision() == "0008"


def test_a_job_can_be_claimed_once(engine: Engine) -> None:
    job = store.create_job(engine, spec=FinetuneSpec(data="x.csv", queue="cpu"))
    assert store.claim_job(engine, job_id=job.id, worker="w1") == (1, "queued")
    assert store.claim_job(engine, job_id=job.id, worker="w2") is None
    claimed = store.get_job(engine, job.id)
    assert (claimed.status, claimed.worker, claimed.attempt) == ("running", "w1", 1)


def test_writes_with_a_stale_attempt_change_nothing(engine: Engine) -> None:
    job = store.create_job(engine, spec=FinetuneSpec(data="x.csv", queue="cpu"))
    assert store.claim_job(engine, job_id=job.id, worker="w1") == (1, "queued")
    assert not store.record_progress(engine, job_id=job.id, attempt=2, progress={"step": 1})
    assert not store.mark_failed(engine, job_id=job.id, attempt=2, error="stale")
    assert store.mark_failed(engine, job_id=job.id, attempt=1, error="real")
    assert not store.mark_failed(engine, job_id=job.id, attempt=1, error="twice")
    failed = store.get_job(engine, job.id)
    assert (failed.status, failed.error) == ("failed", "real")
    assert [e.kind for e in store.list_events(engine, job.id)] == ["queued", "running", "failed"]


def test_registration_moves_the_folder_and_ends_the_job_in_one_step(
    engine: Engine, tmp_path: Path
) -> None:
    models_dir = tmp_path / "models"
    versions = []
    for i in range(2):
        job = store.create_job(engine, spec=FinetuneSpec(data="x.csv", queue="cpu"))
        assert store.claim_job(engine, job_id=job.id, worker="w") == (1, "queued")
        row = store.register_model(
            engine,
            job_id=job.id,
            attempt=1,
            staged_dir=staged(tmp_path, f"s{i}"),
            models_dir=models_dir,
            model=MODEL,
            metrics={"accuracy": 0.5 + i / 10},
        )
        assert row is not None
        versions.append(row.version)
        assert Path(row.path) == models_dir / "reviews" / str(row.version)
        assert (Path(row.path) / "model.safetensors").read_bytes() == b"weights"
        done = store.get_job(engine, job.id)
        assert (done.status, done.model_id) == (JobStatus.succeeded.value, row.id)
    assert versions == [1, 2]
    assert store.find_model(engine, "reviews").version == 2
    assert store.find_model(engine, "reviews:1").metrics == {"accuracy": 0.5}


def test_a_job_that_lost_its_lease_registers_nothing(engine: Engine, tmp_path: Path) -> None:
    job = store.create_job(engine, spec=FinetuneSpec(data="x.csv", queue="cpu"))
    store.claim_job(engine, job_id=job.id, worker="w")
    folder = staged(tmp_path)
    row = store.register_model(
        engine,
        job_id=job.id,
        attempt=7,
        staged_dir=folder,
        models_dir=tmp_path / "models",
        model=MODEL,
        metrics={},
    )
    assert row is None
    assert not folder.exists() and not (tmp_path / "models" / "reviews").exists()
    assert store.list_models(engine) == []


def test_lookups_explain_what_to_do(engine: Engine) -> None:
    job = store.create_job(engine, spec=FinetuneSpec(data="x.csv", queue="cpu"))
    assert store.get_job(engine, job.id[:6]).id == job.id
    with pytest.raises(JobNotFound, match="no job 'nope'; `tuneq jobs` lists them"):
        store.get_job(engine, "nope")
    with pytest.raises(ModelNotFound, match="`tuneq models` lists them"):
        store.find_model(engine, "reviews")
    with pytest.raises(ModelNotFound, match="a version is a number"):
        store.find_model(engine, "reviews:latest")


def test_parity_evidence_adds_up_per_model_and_hardware(engine: Engine) -> None:
    """Each job's sample adds to its model's evidence on its kind of hardware, jobs adding at
    the same moment included; another kind of hardware starts from nothing."""
    key = {"model_digest": "d" * 64, "hardware": "cpu amx"}
    assert store.parity_evidence(engine, **key) == (0, 0)
    assert store.add_parity_evidence(engine, **key, agreed=255, sampled=256) == (255, 256)

    errors: list[BaseException] = []

    def add(key: dict[str, str], agreed: int, sampled: int, times: int) -> None:
        try:
            for _ in range(times):
                store.add_parity_evidence(engine, **key, agreed=agreed, sampled=sampled)
        except BaseException as exc:  # reaches the test below
            errors.append(exc)

    fresh = {"model_digest": "e" * 64, "hardware": "cpu amx"}
    adders = [threading.Thread(target=add, args=(key, 1, 2, 5)) for _ in range(4)]
    adders += [threading.Thread(target=add, args=(fresh, 3, 3, 1)) for _ in range(4)]
    for thread in adders:
        thread.start()
    for thread in adders:
        thread.join()
    assert errors == []
    assert store.parity_evidence(engine, **key) == (255 + 20, 256 + 40)
    assert store.parity_evidence(engine, **fresh) == (12, 12)  # four first rows, one kept
    assert store.parity_evidence(engine, model_digest="d" * 64, hardware="cpu avx512_bf16") == (
        0,
        0,
    )
