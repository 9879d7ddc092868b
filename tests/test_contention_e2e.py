"""Many processes, one database: four workers and the CLI make over a thousand state changes
together; none is lost and no "database is locked" reaches anyone (SQLite or PostgreSQL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from click.testing import CliRunner

from tests.conftest import queue_name, score_args, scoring_input
from tuneq.cli.main import cli
from tuneq.worker.db import get_engine
from tuneq.worker.files import iter_batches
from tuneq.worker.store import list_events, list_shards


def test_four_workers_and_the_cli_share_the_database(
    env, start_worker, trained_tiny_model: Path, tmp_path: Path
):
    queue = queue_name()
    workers = [start_worker(env, queue) for _ in range(4)]
    source = scoring_input(tmp_path / "in.csv", 1200)
    output = tmp_path / "out.csv"
    stop = threading.Event()
    reads: list[int] = []

    def read_constantly() -> None:  # another CLI process polling while the workers write
        while not stop.is_set():
            result = subprocess.run(
                [sys.executable, "-m", "tuneq.cli", "jobs", "--json"],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
            )
            assert result.returncode == 0, result.stderr
            reads.append(len(json.loads(result.stdout)))

    reader = threading.Thread(target=read_constantly)
    reader.start()
    try:
        result = CliRunner().invoke(
            cli,
            [
                *score_args(trained_tiny_model, source, output, queue),
                "--shard-rows",
                "2",
                "--wait",
            ],
            env=env,
        )
    finally:
        stop.set()
        reader.join()
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    engine = get_engine(env["TUNEQ_DATABASE_URL"])
    shards = list_shards(engine, job_id)
    transitions = 2 * len(shards) + len(list_events(engine, job_id))  # claim + finish per shard
    assert len(shards) == 600 and transitions >= 1000
    assert all(s.status == "done" and s.attempt == 1 for s in shards), "each claimed once"
    assert len({s.worker for s in shards}) == 4
    rows = [r["id"] for b in iter_batches(output) for r in b.to_pylist()]
    assert rows == [f"r{i:05d}" for i in range(1200)]
    assert reads and all(n <= 1 for n in reads)
    for worker in workers:
        assert "database is locked" not in worker.log.read_text()
