"""Scoring jobs through the CLI and real worker processes: shards shared between workers."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import (
    REDIS_URL,
    invoke_cli,
    queue_name,
    redis_available,
    score_args,
    scoring_input,
    unavailable,
)
from tuneq.worker.db import get_engine
from tuneq.worker.files import iter_batches
from tuneq.worker.predict import predict_texts
from tuneq.worker.store import list_shards


def test_two_workers_on_redis_score_one_file_together(
    env, start_worker, trained_tiny_model: Path, tmp_path: Path
):
    if not redis_available(REDIS_URL):
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    env = {**env, "TUNEQ_BROKER_URL": REDIS_URL}
    queue = queue_name()
    start_worker(env, queue)
    start_worker(env, queue)
    source = scoring_input(tmp_path / "reviews.csv", 3000)
    output = tmp_path / "scored.parquet"
    result = invoke_cli(
        env,
        *score_args(trained_tiny_model, source, output, queue),
        "--shard-rows",
        "100",
        "--wait",
    )
    assert result.exit_code == 0, result.output
    job = json.loads(invoke_cli(env, "show", result.stdout.strip(), "--json").stdout)
    assert job["status"] == "succeeded" and job["output_path"] == str(output)
    assert job["metrics"]["rows"] == 3000 and job["metrics"]["shards"] == 30
    shards = list_shards(get_engine(env["TUNEQ_DATABASE_URL"]), job["id"])
    assert len({shard.worker for shard in shards}) == 2, "both workers took shards"
    assert all(shard.attempt == 1 for shard in shards)

    scored = [row for batch in iter_batches(output) for row in batch.to_pylist()]
    original = [row for batch in iter_batches(source) for row in batch.to_pylist()]
    assert [r["id"] for r in scored] == [r["id"] for r in original]  # each row once, in order
    assert [{k: r[k] for k in original[0]} for r in scored] == original
    texts = [r["text"] for r in original if r["text"]]
    alone = [p.label for p in predict_texts(trained_tiny_model, texts)]
    assert [r["label"] for r in scored if r["text"]] == alone
    assert all(r["label"] is None for r in scored if not r["text"])
    assert job["metrics"]["empty_rows"] == sum(1 for r in original if not r["text"])
    assert not (Path(env["TUNEQ_DATA_DIR"]) / "artifacts" / "scoring" / job["id"]).exists()
