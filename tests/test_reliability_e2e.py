"""Nothing lost: cancel, retry, dead workers, a broker that forgets, duplicate deliveries.

Real worker processes with short leases, so that the reaper acts within seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

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
from tuneq.worker.app import create_app, send_job
from tuneq.worker.db import get_engine
from tuneq.worker.files import iter_batches
from tuneq.worker.store import get_job, list_events, list_models, list_shards

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

    assert invoke_cli(fast_env, "retry", job_id).stdout == f"queued {job_id} again\n"
    retried = wait_for(fast_env, job_id, finished)
    assert (retried["status"], retried["attempt"]) == ("succeeded", 1)
    busy = invoke_cli(fast_env, "retry", job_id)
    assert busy.stderr == (
        f"Error: job {job_id} is succeeded; only failed or cancelled jobs retry\n"
    )


def test_cancel_a_running_fine_tune(
    fast_env, start_worker, tiny_model, trained_tiny_model, reviews_csv
):
    queue = queue_name()
    start_worker(fast_env, queue)
    job_id = submit(fast_env, *finetune_args(queue, reviews_csv, tiny_model, epochs="100"))
    wait_for(fast_env, job_id, lambda j: (j["progress"] or {}).get("step", 0) > 5)
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
    staging = Path(fast_env["TUNEQ_DATA_DIR"]) / "artifacts" / "staging"
    assert list(staging.iterdir()) == []


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
    start_worker(fast_env, queue)
    job = wait_for(fast_env, job_id, finished)
    later = submit(fast_env, *finetune_args(queue, reviews_csv, trained_tiny_model, "1"), "--wait")
    assert later
    engine = get_engine(fast_env["TUNEQ_DATABASE_URL"])
    assert (job["status"], job["attempt"]) == ("succeeded", 1)
    assert [e.kind for e in list_events(engine, job_id)].count("running") == 1
    assert sorted(m.job_id for m in list_models(engine)) == sorted([job_id, later])


def test_kill_9_during_fine_tune_resumes_from_the_checkpoint(
    fast_env, start_worker, tiny_model, reviews_csv
):
    queue = queue_name()
    first = start_worker(fast_env, queue)
    args = finetune_args(queue, reviews_csv, tiny_model, epochs="30")
    job_id = submit(fast_env, *args, "--checkpoint-steps", "50")
    checkpoints = Path(fast_env["TUNEQ_DATA_DIR"]) / "artifacts" / "checkpoints" / job_id
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("checkpoint-*/tuneq-complete")):
        assert time.monotonic() < deadline, "no complete checkpoint"
        time.sleep(0.1)
    kill_hard(first)
    saved = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("*/tuneq-complete"))
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


def test_kill_9_during_scoring_loses_no_row(fast_env, start_worker, trained_tiny_model, tmp_path):
    if not redis_available(REDIS_URL):
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    env = {**fast_env, "TUNEQ_BROKER_URL": REDIS_URL}
    queue = queue_name()
    doomed = start_worker(env, queue)
    start_worker(env, queue)
    source = scoring_input(tmp_path / "in.csv", 12000)
    output = tmp_path / "out.parquet"
    job_id = submit(
        env,
        *score_args(trained_tiny_model, source, output, queue),
        "--shard-rows",
        "300",
    )
    wait_for(env, job_id, lambda j: (j["progress"] or {}).get("rows", 0) >= 900)
    kill_hard(doomed)
    job = wait_for(env, job_id, finished, timeout_s=240)
    assert job["status"] == "succeeded", job
    scored = [r["id"] for b in iter_batches(output) for r in b.to_pylist()]
    original = [r["id"] for b in iter_batches(source) for r in b.to_pylist()]
    assert scored == original, "every row exactly once, in order"


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
