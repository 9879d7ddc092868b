"""Scoring jobs through the CLI and real worker processes: shards shared between workers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    POSTGRES_URL,
    REDIS_URL,
    invoke_cli,
    postgres_database,
    queue_name,
    redis_available,
    score_args,
    scoring_input,
    unavailable,
)
from tuneq.worker.io.files import iter_batches
from tuneq.worker.ml.device import native_bf16
from tuneq.worker.ml.predict import predict_texts
from tuneq.worker.store import list_events, list_shards
from tuneq.worker.store.db import get_engine


def score_together(
    client: dict[str, str], workers: list[dict[str, str]], start_worker, model: Path, tmp: Path
) -> None:
    """Workers with ``workers`` settings score one 3,000-row file submitted with ``client``
    settings: every row once, in order, labelled as one process labels it."""
    queue = queue_name()
    for env in workers:
        start_worker(env, queue)
    source = scoring_input(tmp / "reviews.csv", 3000)
    output = tmp / "scored.parquet"
    result = invoke_cli(
        client, *score_args(model, source, output, queue), "--shard-rows", "100", "--wait"
    )
    assert result.exit_code == 0, result.output
    job = json.loads(invoke_cli(client, "show", result.stdout.strip(), "--json").stdout)
    assert job["status"] == "succeeded" and job["output_path"] == str(output)
    assert job["metrics"]["rows"] == 3000 and job["metrics"]["shards"] == 30
    engine = get_engine(client["TUNEQ_DATABASE_URL"])
    shards = list_shards(engine, job["id"])
    assert len({shard.worker for shard in shards}) == len(workers), "every worker took shards"
    assert all(shard.attempt == 1 for shard in shards)

    scored = [row for batch in iter_batches(output) for row in batch.to_pylist()]
    original = [row for batch in iter_batches(source) for row in batch.to_pylist()]
    assert [r["id"] for r in scored] == [r["id"] for r in original]  # each row once, in order
    assert [{k: r[k] for k in original[0]} for r in scored] == original
    texts = [r["text"] for r in original if r["text"]]
    precision = job["metrics"]["precision"]  # precision auto: the same on every worker here
    [chosen] = [e.message for e in list_events(engine, job["id"]) if e.kind == "precision"]
    assert chosen.startswith(f"precision auto: {precision},")
    assert precision == ("bf16" if native_bf16() else "fp32"), "the tiny model agrees in bf16"
    alone = [p.label for p in predict_texts(model, texts, precision=precision)]
    assert [r["label"] for r in scored if r["text"]] == alone
    assert all(r["label"] is None for r in scored if not r["text"])
    assert job["metrics"]["empty_rows"] == sum(1 for r in original if not r["text"])
    artifacts = Path(
        client.get("TUNEQ_ARTIFACT_DIR") or Path(client["TUNEQ_DATA_DIR"]) / "artifacts"
    )
    assert not (artifacts / "scoring" / job["id"]).exists()


def test_two_workers_on_redis_score_one_file_together(
    env, start_worker, trained_tiny_model: Path, tmp_path: Path
):
    if not redis_available(REDIS_URL):
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    env = {**env, "TUNEQ_BROKER_URL": REDIS_URL}
    score_together(env, [env, env], start_worker, trained_tiny_model, tmp_path)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from postgres_database(POSTGRES_URL)


def test_workers_as_separate_hosts_over_tcp(
    env, start_worker, trained_tiny_model: Path, tmp_path: Path, postgres_url: str
):
    """As on separate machines: each worker and the client has its own data dir; they share
    only Redis and PostgreSQL over TCP and one artifact folder (what NFS would provide).
    With real network namespaces as the hosts: ``test_hosts_e2e.py``."""
    if not redis_available(REDIS_URL):
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    shared = {
        "TUNEQ_BROKER_URL": REDIS_URL,
        "TUNEQ_DATABASE_URL": postgres_url,
        "TUNEQ_ARTIFACT_DIR": str(tmp_path / "nfs" / "artifacts"),
        "TUNEQ_ALLOWED_ROOTS": env["TUNEQ_ALLOWED_ROOTS"],
    }
    hosts = [{**shared, "TUNEQ_DATA_DIR": str(tmp_path / name)} for name in ("a", "b", "client")]
    score_together(hosts[2], hosts[:2], start_worker, trained_tiny_model, tmp_path)
    for host in hosts:
        assert not (Path(host["TUNEQ_DATA_DIR"]) / "tuneq.db").exists(), "no local database"
