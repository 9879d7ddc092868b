"""Nothing lost: cancel, retry, dead workers, a broker that forgets, duplicate deliveries.

Real worker processes with short leases, so that the reaper acts within seconds.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.conftest import (
    REDIS_URL,
    invoke_cli,
    queue_name,
    redis_available,
    score_args,
    scoring_input,
    unavailable,
)
from tuneq.schemas.settings import load_settings
from tuneq.schemas.tables import Worker
from tuneq.worker.io.files import iter_batches
from tuneq.worker.jobs.app import create_app, send_job, send_shard, waiting_messages
from tuneq.worker.jobs.serve import COLD_STOP_GRACE_S, UNREGISTER_WAIT_S
from tuneq.worker.ml.finetune import COMPLETE_MARKER
from tuneq.worker.store import get_job, list_events, list_models, list_shards
from tuneq.worker.store.db import get_engine

FAST_LEASES = {
    "TUNEQ_HEARTBEAT_S": "0.5",
    "TUNEQ_LEASE_TIMEOUT_S": "4",
    "TUNEQ_REAP_INTERVAL_S": "1",
    "TUNEQ_REQUEUE_AFTER_S": "3",
}


@pytest.fixture
def fast_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, **FAST_LEASES}


def submit(env: dict[str, str], *args: str) -> str:
    result = invoke_cli(env, *args)
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[0]


def finetune_args(queue: str, data: Path, model: Path, epochs: str = "4") -> list[str]:
    return [
        "finetune",
        "--data",
        str(data),
        "--model",
        str(model),
        "--queue",
        queue,
        "--epochs",
        epochs,
        "--batch-size",
        "16",
        "--learning-rate",
        "0.002",
        "--name",
        "tiny-sentiment",
    ]


def wait_for(env: dict[str, str], job_id: str, check, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = json.loads(invoke_cli(env, "show", job_id, "--json").stdout)
        if check(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached the expected state: {job}")


def finished(job: dict) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def broker_env(env: dict[str, str], broker: str) -> dict[str, str]:
    """``env`` on the embedded broker, or on Redis (required in CI)."""
    if broker == "embedded":
        return env
    if not redis_available(REDIS_URL):
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    return {**env, "TUNEQ_BROKER_URL": REDIS_URL}


def kill_hard(worker) -> None:
    """kill -9 of the worker and its pool processes."""
    parent = psutil.Process(worker.process.pid)
    for process in [*parent.children(recursive=True), parent]:
        process.kill()
    worker.process.wait()


def test_cancel_a_queued_job_and_retry_it(fast_env, start_worker, tiny_model, reviews_csv):
    queue = queue_name()
    job_id = submit(fast_env, *finetune_args(queue, reviews_csv, tiny_model))
    assert invoke_cli(fast_env, "cancel", job_id).stdout == f"cancelled {job_id}\n"
    again = invoke_cli(fast_env, "cancel", job_id)
    assert (again.exit_code, again.stderr) == (
        1,
        f"Error: job {job_id} already cancelled; nothing to cancel\n",
    )
    start_worker(fast_env, queue)
    later = submit(fast_env, *finetune_args(queue, reviews_csv, tiny_model), "--wait")
    cancelled = json.loads(invoke_cli(fast_env, "show", job_id, "--json").stdout)
    assert (cancelled["status"], cancelled["attempt"]) == ("cancelled", 0), "never started"
    assert json.loads(invoke_cli(fast_env, "show", later, "--json").stdout)["status"] == "succeeded"

    assert (
        invoke_cli(fast_env, "retry", job_id).stdout == f"queued {job_id} again, from the start\n"
    )
    retried = wait_for(fast_env, job_id, finished)
    assert (retried["status"], retried["attempt"]) == ("succeeded", 1)
    busy = invoke_cli(fast_env, "retry", job_id)
    assert busy.stderr == (
        f"Error: job {job_id} is succeeded; only failed or cancelled jobs retry\n"
    )


def test_cancel_a_running_fine_tune(
    fast_env, start_worker, tiny_model, trained_tiny_model, reviews_csv, tmp_path
):
    queue = queue_name()
    # The worker keeps its files in a folder of its own, as on another machine than the CLI's.
    worker_files = tmp_path / "worker-artifacts"
    start_worker({**fast_env, "TUNEQ_ARTIFACT_DIR": str(worker_files)}, queue)
    args = finetune_args(queue, reviews_csv, tiny_model, epochs="100")
    job_id = submit(fast_env, *args, "--checkpoint-steps", "5")
    checkpoints = worker_files / "checkpoints" / job_id
    wait_for(fast_env, job_id, lambda j: (j["progress"] or {}).get("step", 0) > 5)
    assert list(checkpoints.glob("checkpoint-*/tuneq-complete")), "a checkpoint before the cancel"
    [listed] = json.loads(invoke_cli(fast_env, "workers", "--json").stdout)
    assert (listed["queues"], listed["device"], listed["running"]) == ([queue], "cpu", [job_id])
    invoke_cli(fast_env, "cancel", job_id)
    # One epoch: from the model already trained on these reviews, so that it learns in that time
    quick_args = finetune_args(queue, reviews_csv, trained_tiny_model, epochs="1")
    quick = submit(fast_env, *quick_args, "--wait")
    assert json.loads(invoke_cli(fast_env, "show", quick, "--json").stdout)["status"] == "succeeded"
    job = json.loads(invoke_cli(fast_env, "show", job_id, "--json").stdout)
    assert job["status"] == "cancelled" and job["model_id"] is None
    assert job["progress"]["step"] < job["progress"]["total"], "stopped early"
    engine = get_engine(fast_env["TUNEQ_DATABASE_URL"])
    assert [m.job_id for m in list_models(engine)] == [quick]
    assert list((worker_files / "staging").iterdir()) == []
    assert not checkpoints.exists(), "the worker removed the cancelled job's checkpoints"


def test_cancel_a_running_scoring_job(fast_env, start_worker, trained_tiny_model, tmp_path):
    queue = queue_name()
    start_worker(fast_env, queue)
    source = scoring_input(tmp_path / "in.csv", 20000)
    output = tmp_path / "out.csv"
    job_id = submit(
        fast_env,
        *score_args(trained_tiny_model, source, output, queue),
        "--shard-rows",
        "200",
    )
    wait_for(fast_env, job_id, lambda j: (j["progress"] or {}).get("rows", 0) > 0)
    invoke_cli(fast_env, "cancel", job_id)
    small = scoring_input(tmp_path / "small.csv", 50)
    after = submit(
        fast_env,
        *score_args(trained_tiny_model, small, tmp_path / "small.out.csv", queue),
        "--wait",
    )
    assert json.loads(invoke_cli(fast_env, "show", after, "--json").stdout)["status"] == "succeeded"
    job = json.loads(invoke_cli(fast_env, "show", job_id, "--json").stdout)
    assert job["status"] == "cancelled" and job["output_path"] is None
    assert not output.exists()
    shards = list_shards(get_engine(fast_env["TUNEQ_DATABASE_URL"]), job_id)
    assert sum(s.status == "done" for s in shards) < len(shards)
    scoring = Path(fast_env["TUNEQ_DATA_DIR"]) / "artifacts" / "scoring"
    assert list(scoring.iterdir()) == [], "no staged input or part is left"


def test_cancel_a_queued_scoring_job(fast_env, start_worker, trained_tiny_model, tmp_path):
    queue = queue_name()
    source = scoring_input(tmp_path / "in.csv", 100)
    output = tmp_path / "out.csv"
    job_id = submit(
        fast_env,
        *score_args(trained_tiny_model, source, output, queue),
    )
    assert invoke_cli(fast_env, "cancel", job_id).stdout == f"cancelled {job_id}\n"
    start_worker(fast_env, queue)
    after = submit(
        fast_env,
        *score_args(trained_tiny_model, source, tmp_path / "after.csv", queue),
        "--wait",
    )
    assert json.loads(invoke_cli(fast_env, "show", after, "--json").stdout)["status"] == "succeeded"
    job = json.loads(invoke_cli(fast_env, "show", job_id, "--json").stdout)
    assert (job["status"], job["attempt"]) == ("cancelled", 0), "never started"
    assert not output.exists()
    assert list_shards(get_engine(fast_env["TUNEQ_DATABASE_URL"]), job_id) == []


def test_a_duplicate_delivery_runs_once(fast_env, start_worker, trained_tiny_model, reviews_csv):
    queue = queue_name()
    job_id = submit(fast_env, *finetune_args(queue, reviews_csv, trained_tiny_model))
    app = create_app(load_settings(fast_env))
    send_job(app, job_id, queue, "normal")  # the same job id, delivered a second time
    app.close()
    worker = start_worker(fast_env, queue)
    job = wait_for(fast_env, job_id, finished)
    later = submit(fast_env, *finetune_args(queue, reviews_csv, trained_tiny_model, "1"), "--wait")
    assert later
    engine = get_engine(fast_env["TUNEQ_DATABASE_URL"])
    assert (job["status"], job["attempt"]) == ("succeeded", 1)
    assert [e.kind for e in list_events(engine, job_id)].count("running") == 1
    assert sorted(m.job_id for m in list_models(engine)) == sorted([job_id, later])
    log = worker.log.read_text()
    assert log.count(f"job {job_id} is not claimable") == 1, "the second delivery came, refused"


def scoring_under_way(
    env, start_worker, queue: str, model: Path, tmp_path: Path, rows: int, output: str, shards: str
):
    """A worker on ``queue``, and a scoring job of ``rows`` rows in shards of ``shards`` rows
    submitted to it: the worker, the input, the output, the job's id and the database."""
    worker = start_worker(env, queue)
    source = scoring_input(tmp_path / "in.csv", rows)
    job_id = submit(
        env, *score_args(model, source, tmp_path / output, queue), "--shard-rows", shards
    )
    return worker, source, tmp_path / output, job_id, get_engine(env["TUNEQ_DATABASE_URL"])


def holding_a_shard(engine, job_id: str, *, done: int) -> list[str]:
    """Wait until a worker holds a shard of ``job_id`` and ``done`` shards are finished; the
    shards' statuses then."""
    deadline = time.monotonic() + 120
    while True:
        statuses = [s.status for s in list_shards(engine, job_id)]
        if statuses.count("done") >= done and "running" in statuses:
            return statuses
        assert time.monotonic() < deadline, f"never {done} shards done and one running"
        time.sleep(0.02)


def test_a_duplicate_shard_delivery_scores_nothing_twice(
    fast_env, start_worker, trained_tiny_model, tmp_path
):
    if not redis_available(REDIS_URL):
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    env = {**fast_env, "TUNEQ_BROKER_URL": REDIS_URL}  # its priorities put the duplicates first
    queue = queue_name()
    worker, source, output, job_id, engine = scoring_under_way(
        env, start_worker, queue, trained_tiny_model, tmp_path, 3000, "out.csv", "200"
    )
    statuses = holding_a_shard(engine, job_id, done=2)  # 2 done, 1 held, 12 waiting
    again = [i for i, status in enumerate(statuses) if status in ("done", "running")]
    app = create_app(load_settings(env))
    for index in again:  # delivered a second time, ahead of the shards still waiting
        send_shard(app, job_id, index, queue, "high")
    app.close()
    job = wait_for(env, job_id, finished)

    assert job["status"] == "succeeded"
    log = worker.log.read_text()
    refused = [i for i in again if f"shard {job_id}/{i} is not claimable" in log]
    assert refused == again, "each duplicate was delivered, and refused"
    shards = list_shards(engine, job_id)
    assert [(s.index, s.attempt) for s in shards] == [(i, 1) for i in range(15)]
    scored = [r["id"] for b in iter_batches(output) for r in b.to_pylist()]
    assert scored == [r["id"] for b in iter_batches(source) for r in b.to_pylist()]


def wait_until_training(engine, job_id: str) -> None:
    """Until the job's row says it is training (which it says until training ends)."""
    deadline = time.monotonic() + 120
    while (get_job(engine, job_id).progress or {}).get("phase") != "training":
        assert time.monotonic() < deadline, f"never trained: {get_job(engine, job_id).status}"
        time.sleep(0.05)  # the row, not `tuneq show`: a CLI process per poll is too slow


def kill_after_a_checkpoint(env, worker, job_id: str) -> tuple[Path, int]:
    """kill -9 of ``worker``, running ``job_id``, once it saved a complete checkpoint; the
    checkpoints' folder and the newest step saved."""
    checkpoints = Path(env["TUNEQ_DATA_DIR"]) / "artifacts" / "checkpoints" / job_id
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("checkpoint-*/tuneq-complete")):
        assert time.monotonic() < deadline, "no complete checkpoint"
        time.sleep(0.1)
    kill_hard(worker)
    return checkpoints, max(
        int(p.parent.name.split("-")[1]) for p in checkpoints.glob("*/tuneq-complete")
    )


def test_kill_9_during_fine_tune_resumes_from_the_checkpoint(
    fast_env, start_worker, tiny_model, reviews_csv
):
    queue = queue_name()
    first = start_worker(fast_env, queue)
    args = finetune_args(queue, reviews_csv, tiny_model, epochs="30")
    job_id = submit(fast_env, *args, "--checkpoint-steps", "50")
    checkpoints, saved = kill_after_a_checkpoint(fast_env, first, job_id)
    start_worker(fast_env, queue)
    job = wait_for(fast_env, job_id, finished, timeout_s=240)
    assert (job["status"], job["attempt"]) == ("succeeded", 2)
    assert job["metrics"]["train_steps"] == 30 * 10, "the planned total: 30 epochs of 10 steps"
    engine = get_engine(fast_env["TUNEQ_DATABASE_URL"])
    assert [m.job_id for m in list_models(engine)] == [job_id], "exactly one model"
    events = list_events(engine, job_id)
    assert [e.kind for e in events].count("retrying") == 1
    resumed = [e.message for e in events if e.kind == "resumed"]
    assert resumed == [f"resumed from checkpoint-{saved}"]
    assert not checkpoints.exists(), "checkpoints are removed once the model is registered"


def test_a_job_the_reaper_fails_leaves_no_checkpoint_and_retries_from_the_start(
    fast_env, start_worker, tiny_model, reviews_csv, tmp_path
):
    env = {**fast_env, "TUNEQ_MAX_ATTEMPTS": "1"}
    queue = queue_name()
    doomed = start_worker(env, queue)
    args = finetune_args(queue, reviews_csv, tiny_model, epochs="30")
    job_id = submit(env, *args, "--checkpoint-steps", "20")
    checkpoints, _ = kill_after_a_checkpoint(env, doomed, job_id)
    # A worker on another machine (its own folder) fails the job; it cannot reach the files.
    start_worker({**env, "TUNEQ_ARTIFACT_DIR": str(tmp_path / "elsewhere")}, queue)
    job = wait_for(env, job_id, finished, timeout_s=60)
    assert (job["status"], job["attempt"]) == ("failed", 1)
    assert job["error"].startswith("worker lost 1 times (no heartbeat for 4s)")
    start_worker(env, queue)  # the lost worker's machine runs a worker again: its janitor
    deadline = time.monotonic() + 10
    while checkpoints.exists():
        assert time.monotonic() < deadline, "the failed job's checkpoints are still on disk"
        time.sleep(0.2)

    assert invoke_cli(env, "retry", job_id).stdout == f"queued {job_id} again, from the start\n"
    job = wait_for(env, job_id, finished, timeout_s=120)
    assert (job["status"], job["attempt"]) == ("succeeded", 2)
    kinds = [e.kind for e in list_events(get_engine(env["TUNEQ_DATABASE_URL"]), job_id)]
    assert "resumed" not in kinds


@pytest.mark.parametrize("resume", [False, True], ids=["retry", "retry-resume"])
def test_kept_checkpoints_are_resumed_only_when_asked(
    fast_env, start_worker, tiny_model, reviews_csv, resume
):
    env = {**fast_env, "TUNEQ_MAX_ATTEMPTS": "1"}
    queue = queue_name()
    doomed = start_worker(env, queue)
    args = finetune_args(queue, reviews_csv, tiny_model, epochs="30")
    job_id = submit(env, *args, "--checkpoint-steps", "20", "--keep-checkpoints")
    checkpoints, saved = kill_after_a_checkpoint(env, doomed, job_id)
    start_worker(env, queue)
    job = wait_for(env, job_id, finished, timeout_s=60)
    assert (job["status"], job["attempt"]) == ("failed", 1)
    time.sleep(2)  # two janitor passes
    assert (checkpoints / f"checkpoint-{saved}" / "tuneq-complete").exists(), "kept, as asked"

    retried = invoke_cli(env, "retry", job_id, *(["--resume"] if resume else []))
    how = "to resume from its newest checkpoint" if resume else "from the start"
    assert retried.stdout == f"queued {job_id} again, {how}\n"
    job = wait_for(env, job_id, finished, timeout_s=120)
    assert (job["status"], job["attempt"]) == ("succeeded", 2)
    assert job["metrics"]["train_steps"] == 30 * 10
    events = list_events(get_engine(env["TUNEQ_DATABASE_URL"]), job_id)
    said = [(e.kind, e.message) for e in events if e.kind in ("resumed", "fresh")]
    if resume:
        assert said == [("resumed", f"resumed from checkpoint-{saved}")]
    else:
        [(kind, message)] = said
        assert kind == "fresh" and f"removed checkpoint-{saved}" in message
    assert not checkpoints.exists(), "removed once the model is registered"


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_kill_9_during_scoring_scores_only_the_lost_shard_again(
    fast_env, start_worker, trained_tiny_model, tmp_path, broker
):
    env = broker_env(fast_env, broker)
    queue = queue_name()
    doomed, source, output, job_id, engine = scoring_under_way(
        env, start_worker, queue, trained_tiny_model, tmp_path, 9000, "out.parquet", "300"
    )
    holding_a_shard(engine, job_id, done=2)  # kill it while it holds one, after two
    kill_hard(doomed)
    [lost] = [s for s in list_shards(engine, job_id) if s.status == "running"]
    assert f":{doomed.process.pid}/" in lost.worker and lost.attempt == 1, "the killed one's"
    before = {s.index: s for s in list_shards(engine, job_id) if s.status == "done"}
    parts = Path(env["TUNEQ_DATA_DIR"]) / "artifacts" / "scoring" / job_id / "1" / "parts"
    stamps = {i: (parts / f"{i:06d}.parquet").stat().st_mtime_ns for i in before}

    start_worker(env, queue)
    deadline = time.monotonic() + 240
    while not finished(job := json.loads(invoke_cli(env, "show", job_id, "--json").stdout)):
        for index, stamp in stamps.items():  # a finished shard's part is never written again
            path = parts / f"{index:06d}.parquet"
            assert not path.exists() or path.stat().st_mtime_ns == stamp, f"part {index}"
        assert time.monotonic() < deadline, job
        time.sleep(0.1)

    assert job["status"] == "succeeded", job
    after = {s.index: s for s in list_shards(engine, job_id)}
    assert after[lost.index].attempt == 2, "the lost shard ran again"
    for index, shard in before.items():
        assert (after[index].attempt, after[index].finished_at) == (1, shard.finished_at)
    scored = [r for b in iter_batches(output) for r in b.to_pylist()]
    original = [r["id"] for b in iter_batches(source) for r in b.to_pylist()]
    assert [r["id"] for r in scored] == original, "every row exactly once, in order"
    alone = tmp_path / "alone.parquet"
    submit(env, *score_args(trained_tiny_model, source, alone, queue), "--wait")
    expected = [r["label"] for b in iter_batches(alone) for r in b.to_pylist()]
    assert [r["label"] for r in scored] == expected, "the same labels as scoring alone"


def test_a_shard_lost_too_often_fails_its_job_and_leaves_no_part(
    fast_env, start_worker, trained_tiny_model, tmp_path
):
    env = {**fast_env, "TUNEQ_MAX_ATTEMPTS": "1"}
    queue = queue_name()
    doomed, source, output, job_id, engine = scoring_under_way(
        env, start_worker, queue, trained_tiny_model, tmp_path, 6000, "out.csv", "300"
    )
    holding_a_shard(engine, job_id, done=1)
    kill_hard(doomed)
    [lost] = [s for s in list_shards(engine, job_id) if s.status == "running"]
    start_worker(env, queue)
    job = wait_for(env, job_id, finished, timeout_s=60)
    assert (job["status"], job["error"]) == (
        "failed",
        f"shard {lost.index}: worker lost 1 times; likely out of memory",
    )
    assert not output.exists()
    scoring = Path(env["TUNEQ_DATA_DIR"]) / "artifacts" / "scoring"
    assert list(scoring.iterdir()) == [], "no staged input or part is left"


def test_jobs_survive_a_flushed_broker(fast_env, start_worker, trained_tiny_model, reviews_csv):
    if not redis_available(REDIS_URL):
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    import redis

    url = REDIS_URL.rsplit("/", 1)[0] + "/13"  # a database of this test's own
    env = {**fast_env, "TUNEQ_BROKER_URL": url}
    queue = queue_name()
    args = finetune_args(queue, reviews_csv, trained_tiny_model, "1")
    jobs = [submit(env, *args) for _ in range(3)]
    redis.Redis.from_url(url).flushdb()  # the broker restarts empty
    start_worker(env, queue)
    for job_id in jobs:
        job = wait_for(env, job_id, finished, timeout_s=180)
        assert (job["status"], job["attempt"]) == ("succeeded", 1)
    engine = get_engine(env["TUNEQ_DATABASE_URL"])
    assert sorted(m.job_id for m in list_models(engine)) == sorted(jobs)
    assert get_job(engine, jobs[0]).status == "succeeded"


def test_shards_whose_messages_the_broker_lost_mid_job_are_published_again(
    fast_env, start_worker, trained_tiny_model, tmp_path
):
    if not redis_available(REDIS_URL):
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    import redis

    url = REDIS_URL.rsplit("/", 1)[0] + "/12"  # a database of this test's own
    env = {**fast_env, "TUNEQ_BROKER_URL": url}
    queue = queue_name()
    worker, source, output, job_id, engine = scoring_under_way(
        env, start_worker, queue, trained_tiny_model, tmp_path, 6000, "out.csv", "300"
    )
    holding_a_shard(engine, job_id, done=1)
    redis.Redis.from_url(url).flushdb()  # the broker restarts empty, mid-job
    waiting = [s.index for s in list_shards(engine, job_id) if s.status == "queued"]
    assert len(waiting) >= 10, "most shards' messages were in the broker when it lost them"

    job = wait_for(env, job_id, finished, timeout_s=240)

    assert job["status"] == "succeeded", job
    log = worker.log.read_text()
    again = {int(i) for i in re.findall(rf"published shard {job_id}/(\d+) again", log)}
    assert again and again <= set(waiting), "the reaper published lost shards again"
    assert [s.attempt for s in list_shards(engine, job_id)] == [1] * 20, "none ran twice"
    scored = [r["id"] for b in iter_batches(output) for r in b.to_pylist()]
    assert scored == [r["id"] for b in iter_batches(source) for r in b.to_pylist()]


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_a_worker_asked_to_stop_finishes_its_running_job_first(
    fast_env, start_worker, tiny_model, trained_tiny_model, reviews_csv, broker
):
    """SIGTERM (a warm shutdown) while a fine-tune runs: the worker stops taking work, finishes
    the job, registers its model and exits 0; the job's message is gone, so a worker started
    later does not run it again."""
    env = broker_env(fast_env, broker)
    queue = queue_name()
    worker = start_worker(env, queue)
    # 320 steps: about 4 s of training where a step is quickest (bf16 on AVX512-BF16), so that
    # the signal lands in it; 80 steps took 1 s there, between two polls of `tuneq show`
    job_id = submit(env, *finetune_args(queue, reviews_csv, tiny_model, epochs="32"))
    engine = get_engine(env["TUNEQ_DATABASE_URL"])
    wait_until_training(engine, job_id)
    worker.ask_to_stop()
    assert worker.process.wait(timeout=120) == 0, worker.log.read_text()
    job = json.loads(invoke_cli(env, "show", job_id, "--json").stdout)
    assert (job["status"], job["attempt"]) == ("succeeded", 1), job
    assert job["metrics"]["train_steps"] == 32 * 10, "every step of 32 epochs of 160 rows in 16s"
    assert [m.job_id for m in list_models(engine)] == [job_id]

    later = start_worker(env, queue)
    # One epoch, from the model already trained on these reviews, so that it learns in that time
    quick_args = finetune_args(queue, reviews_csv, trained_tiny_model, epochs="1")
    quick = submit(env, *quick_args, "--wait")
    assert later.alive
    assert json.loads(invoke_cli(env, "show", quick, "--json").stdout)["attempt"] == 1
    again = json.loads(invoke_cli(env, "show", job_id, "--json").stdout)
    assert (again["status"], again["attempt"]) == ("succeeded", 1), "not run a second time"
    assert [e.kind for e in list_events(engine, job_id)].count("running") == 1


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_a_worker_that_hands_back_on_stop_checkpoints_and_the_next_one_resumes(
    fast_env, start_worker, tiny_model, reviews_csv, broker
):
    """SIGTERM with ``TUNEQ_HAND_BACK_ON_STOP`` (a worker behind an orchestrator's grace
    period): the running fine-tune saves a checkpoint at the end of its step, the job goes back
    to the queue at once (its message published again) and the worker exits 0 without
    training to the end; the next worker resumes from that step and trains to the planned
    end, one model."""
    env = {**broker_env(fast_env, broker), "TUNEQ_HAND_BACK_ON_STOP": "true"}
    queue = queue_name()
    worker = start_worker(env, queue)
    args = finetune_args(queue, reviews_csv, tiny_model, epochs="32")
    job_id = submit(env, *args, "--checkpoint-steps", "1000")  # no checkpoint but the last
    engine = get_engine(env["TUNEQ_DATABASE_URL"])
    wait_until_training(engine, job_id)
    worker.ask_to_stop()
    assert worker.process.wait(timeout=60) == 0, worker.log.read_text()

    job = get_job(engine, job_id)
    assert (job.status, job.attempt) == ("retrying", 1), worker.log.read_text()
    handed = [e.message for e in list_events(engine, job_id) if e.kind == "handed_back"]
    assert len(handed) == 1, handed
    step = int(re.search(r"at step (\d+) of 320 ", handed[0]).group(1))
    assert 0 < step < 320
    checkpoints = Path(env["TUNEQ_DATA_DIR"]) / "artifacts" / "checkpoints" / job_id
    assert [p.name for p in checkpoints.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert (checkpoints / f"checkpoint-{step}" / COMPLETE_MARKER).is_file()
    assert list_models(engine) == []
    app = create_app(load_settings(env))
    try:
        # Celery's warm shutdown gives the running task's message back (both brokers), and
        # the hand-back publishes one too, lest an ack got through first; a second delivery
        # is refused at its claim, as the resumed attempt below shows (attempt 2, not 3).
        assert waiting_messages(app, queue) == {("job", job_id)}, "back in the queue at once"
    finally:
        app.close()

    start_worker(env, queue)
    done = wait_for(env, job_id, finished, timeout_s=240)
    assert (done["status"], done["attempt"]) == ("succeeded", 2), done
    assert done["metrics"]["train_steps"] == 320
    resumed = [e.message for e in list_events(engine, job_id) if e.kind == "resumed"]
    assert resumed == [f"resumed from checkpoint-{step}"]
    assert [m.job_id for m in list_models(engine)] == [job_id]
    assert not checkpoints.exists(), "removed once the job succeeded"


def test_a_cold_shutdown_exits_at_once_and_the_job_runs_again_later(
    fast_env, start_worker, tiny_model, reviews_csv
):
    """SIGQUIT (Ctrl-C twice) while a fine-tune runs, four times: each worker kills its job's
    pool process and exits within seconds (billiard's exit-time clean-up hung on 2 of 5 such
    stops before ``serve.leave_now``); each job is requeued once its lease expires, and a later
    worker trains it to the planned end."""
    engine = get_engine(fast_env["TUNEQ_DATABASE_URL"])
    jobs = {}
    for _ in range(4):  # the hang was intermittent
        queue = queue_name()  # one each, so that no worker takes an earlier worker's job
        worker = start_worker(fast_env, queue)
        args = finetune_args(queue, reviews_csv, tiny_model, epochs="32")
        jobs[queue] = submit(fast_env, *args, "--checkpoint-steps", "20")
        wait_until_training(engine, jobs[queue])
        worker.process.send_signal(signal.SIGQUIT)
        worker.process.wait(timeout=30)  # raises TimeoutExpired if it hangs
        assert get_job(engine, jobs[queue]).status == "running", "left to its lease"
        with Session(engine) as session:
            assert session.scalars(select(Worker.name)).all() == [], "it unregistered first"

    start_worker(fast_env, ",".join(jobs))
    for job_id in jobs.values():
        job = wait_for(fast_env, job_id, finished, timeout_s=240)
        assert (job["status"], job["attempt"]) == ("succeeded", 2), job
        assert job["metrics"]["train_steps"] == 32 * 10
    assert sorted(m.job_id for m in list_models(engine)) == sorted(jobs.values())


def test_a_cold_shutdown_that_hangs_ends_after_its_grace(
    fast_env, start_worker, tiny_model, reviews_csv
):
    """A job's pool process that does not die on celery's SIGTERM (stopped here; stuck in the
    kernel, or killed while it held the result queue's lock, as 3 cold stops of about
    90 under load were) holds celery's cold shutdown for ever: the worker leaves after
    ``serve.COLD_STOP_GRACE_S`` anyway, unregistered, its pool process dies with it, and the job
    runs again on the next worker."""
    engine = get_engine(fast_env["TUNEQ_DATABASE_URL"])
    queue = queue_name()
    worker = start_worker(fast_env, queue)
    job_id = submit(fast_env, *finetune_args(queue, reviews_csv, tiny_model, epochs="32"))
    wait_until_training(engine, job_id)
    (pool_process,) = psutil.Process(worker.process.pid).children()
    pool_process.send_signal(signal.SIGSTOP)
    began = time.monotonic()
    worker.process.send_signal(signal.SIGQUIT)
    try:
        worker.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pool_process.kill()  # lest the failed test leave it stopped
        raise
    assert time.monotonic() - began >= COLD_STOP_GRACE_S, "celery's own shutdown cannot end"
    assert worker.process.returncode == 1
    assert f"the cold shutdown did not end in {COLD_STOP_GRACE_S:g} s" in worker.log.read_text()
    _, alive = psutil.wait_procs([pool_process], timeout=10)  # killed as its parent exited
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in alive), "the pool process lives on"
    with Session(engine) as session:
        assert session.scalars(select(Worker.name)).all() == [], "it unregistered"

    start_worker(fast_env, queue)  # the job's lease has expired: requeued, it runs again
    job = wait_for(fast_env, job_id, finished, timeout_s=240)
    assert (job["status"], job["attempt"]) == ("succeeded", 2), job


LEAVING_ON_A_COLD_STOP = """
import sys, time
from celery.worker import state
from tuneq.worker.jobs import serve
from tuneq.worker.store import workers
from tuneq.worker.store.db import create_database_engine

engine = create_database_engine(sys.argv[1])  # connects on first use: here, the unregister
serve.bound_cold_stop(lambda: workers.unregister_worker(engine, name="w"), grace_s=0.5)
state.should_terminate = 1  # what SIGQUIT sets: a cold shutdown that, here, never ends
time.sleep(300)
"""


def test_a_hung_cold_shutdown_leaves_even_when_the_database_does_not_answer() -> None:
    """The watch that ends a hung cold shutdown unregisters the worker first: with the
    database's host cut off (a listener that takes the connection and never answers, as a
    network cut looks to the driver, not a refusal) that waited for ever, and the worker with
    it. It leaves ``UNREGISTER_WAIT_S`` later, saying so."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nothing reads or answers
        url = f"postgresql+psycopg://tuneq@127.0.0.1:{silent.getsockname()[1]}/tuneq"
        began = time.monotonic()
        try:
            left = subprocess.run(
                [sys.executable, "-c", LEAVING_ON_A_COLD_STOP, url],
                capture_output=True,
                text=True,
                timeout=90,
            )
        except subprocess.TimeoutExpired as hung:
            raise AssertionError(f"the worker did not leave: {hung.stderr!r}") from None
        took = time.monotonic() - began
    assert left.returncode == 1, left.stderr
    assert "the cold shutdown did not end in 0.5 s" in left.stderr
    assert f"the database did not answer in {UNREGISTER_WAIT_S:g} s" in left.stderr
    assert took >= 0.5 + UNREGISTER_WAIT_S
