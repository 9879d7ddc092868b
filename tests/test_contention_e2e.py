"""Many processes, one database: four CLI processes submit while four workers run, over a
thousand state changes together; every job succeeds once, and no "database is locked" reaches
anyone (SQLite or PostgreSQL): a submitter, a worker, or a reader polling alongside."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import queue_name, score_args, scoring_input
from tuneq.schemas.statuses import FINISHED, JobStatus
from tuneq.worker.io.files import iter_batches
from tuneq.worker.store import get_job, list_events, list_jobs, list_shards
from tuneq.worker.store.db import get_engine

SUBMITTERS, JOBS_EACH, ROWS, SHARD_ROWS = 4, 8, 40, 2


def test_four_submitters_and_four_workers_share_the_database(
    env, start_worker, trained_tiny_model: Path, tmp_path: Path
):
    queue = queue_name()
    workers = [start_worker(env, queue) for _ in range(4)]
    source = scoring_input(tmp_path / "in.csv", ROWS)
    process_env = {**os.environ, **env}
    stop = threading.Event()
    reader_errors: list[str] = []
    reads = 0

    def read_constantly() -> None:  # another CLI process polling while the others write
        nonlocal reads
        while not stop.is_set():
            result = subprocess.run(
                [sys.executable, "-m", "tuneq.cli", "jobs", "--json", "--limit", "100"],
                env=process_env,
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                reader_errors.append(result.stderr)
            reads += 1

    def submitter(n: int) -> subprocess.Popen[str]:
        """One shell submitting its jobs one after the other, each `tuneq score` a process."""
        commands = [
            " ".join(
                [
                    sys.executable,
                    "-m",
                    "tuneq.cli",
                    *score_args(
                        trained_tiny_model,
                        source,
                        tmp_path / f"out-{n}-{i}.csv",
                        queue,
                        "--shard-rows",
                        str(SHARD_ROWS),
                    ),
                ]
            )
            + " || exit 1"
            for i in range(JOBS_EACH)
        ]
        return subprocess.Popen(
            ["bash", "-c", "; ".join(commands)],
            env=process_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    reader = threading.Thread(target=read_constantly)
    reader.start()
    try:
        submitting = [submitter(n) for n in range(SUBMITTERS)]
        outcomes = [process.communicate(timeout=600) for process in submitting]
        engine = get_engine(env["TUNEQ_DATABASE_URL"])
        job_ids = [line for stdout, _ in outcomes for line in stdout.split()]
        deadline = time.monotonic() + 600
        while any(JobStatus(job.status) not in FINISHED for job in list_jobs(engine, limit=100)):
            assert time.monotonic() < deadline, "jobs still unfinished after 10 minutes"
            time.sleep(0.2)
    finally:
        stop.set()
        reader.join()

    for process, (_, stderr) in zip(submitting, outcomes, strict=True):
        assert process.returncode == 0, stderr
        assert "database is locked" not in stderr
    assert reader_errors == [] and reads > 0
    assert len(job_ids) == SUBMITTERS * JOBS_EACH
    transitions = 0
    for job_id in job_ids:
        job = get_job(engine, job_id)
        assert (job.status, job.attempt) == ("succeeded", 1), job.error
        shards = list_shards(engine, job_id)
        assert [(s.status, s.attempt) for s in shards] == [("done", 1)] * (ROWS // SHARD_ROWS)
        kinds = [e.kind for e in list_events(engine, job_id)]
        assert (kinds.count("running"), kinds.count("succeeded")) == (1, 1), "each job ran once"
        transitions += 2 * len(shards) + 3  # each shard's claim and finish; the job's three
        rows = [r["id"] for b in iter_batches(Path(job.output_path)) for r in b.to_pylist()]
        assert rows == [f"r{i:05d}" for i in range(ROWS)]
    assert transitions >= 1000, transitions
    assert len({s.worker for j in job_ids for s in list_shards(engine, j)}) == 4
    for worker in workers:
        assert "database is locked" not in worker.log.read_text()
