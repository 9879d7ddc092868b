"""Routing: the queue a job goes to, from its device and the live workers; the registry."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from tests.conftest import invoke_cli, queue_name
from tuneq.schemas.errors import TuneqError
from tuneq.schemas.settings import Settings, load_settings
from tuneq.schemas.specs import FinetuneSpec, ScoreSpec
from tuneq.schemas.tables import Worker, utcnow
from tuneq.worker import store
from tuneq.worker.jobs.serve import visible_devices
from tuneq.worker.jobs.submit import route
from tuneq.worker.ml.allocator import glibc
from tuneq.worker.store import workers
from tuneq.worker.store.db import get_engine


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return load_settings(env)


def start(settings: Settings, name: str, queues: list[str], device: str = "cpu") -> None:
    workers.register_worker(
        get_engine(settings.database_url),
        name=name,
        hostname=name.split(":")[0],
        queues=queues,
        device=device,
        concurrency=1,
        threads=2,
    )


def test_auto_goes_to_the_gpu_queue_only_while_a_gpu_worker_is_live(settings: Settings) -> None:
    engine = get_engine(settings.database_url)
    spec = FinetuneSpec(data="imdb")
    assert route(settings, engine, spec) == "cpu"
    start(settings, "cpu-host:10", ["cpu"])
    assert route(settings, engine, spec) == "cpu"
    start(settings, "gpu-host:20", ["gpu"], device="gpu:0")
    assert route(settings, engine, spec) == "gpu"
    int8 = ScoreSpec(model="m", input="/in.csv", output="/out.csv", precision="int8")
    assert route(settings, engine, int8) == "cpu", "int8 runs on CPUs only"

    long_ago = utcnow() - timedelta(seconds=10 * settings.reap_interval_s)
    with engine.begin() as conn:
        conn.execute(
            update(Worker).where(Worker.name == "gpu-host:20").values(heartbeat_at=long_ago)
        )
    assert route(settings, engine, spec) == "cpu", "a worker that stopped beating is gone"


@pytest.mark.parametrize(
    ("fields", "queue"),
    [
        ({"device": "gpu"}, "gpu"),
        ({"device": "cpu"}, "cpu"),
        ({"device": "gpu", "queue": "big-gpus"}, "big-gpus"),
        ({"queue": "nightly"}, "nightly"),
    ],
)
def test_device_and_queue_choose_without_asking(settings: Settings, fields, queue) -> None:
    engine = get_engine(settings.database_url)
    assert route(settings, engine, FinetuneSpec(data="imdb", **fields)) == queue


def test_live_workers_show_what_their_processes_run(settings: Settings) -> None:
    engine = get_engine(settings.database_url)
    start(settings, "host-a:100", ["cpu"])
    start(settings, "host-b:200", ["cpu", "gpu"], device="gpu:1")
    job = store.create_job(engine, spec=FinetuneSpec(data="imdb", queue="cpu"))
    assert store.claim_job(engine, job_id=job.id, worker="host-b:200/201") == (1, "queued")
    listed = {live.worker.name: live for live in workers.live_workers(engine, interval_s=15)}
    assert listed["host-a:100"].running == []
    assert listed["host-b:200"].running == [job.id]
    assert listed["host-b:200"].worker.device == "gpu:1"
    workers.unregister_worker(engine, name="host-a:100")
    assert [live.worker.name for live in workers.live_workers(engine, interval_s=15)] == [
        "host-b:200"
    ]


@pytest.mark.parametrize(
    ("gpu", "given", "visible"),
    [
        (None, None, ""),  # a CPU worker sees no GPU
        (None, "0,1", ""),
        (1, None, "1"),
        (1, "5,7", "7"),  # the Nth GPU of a scheduler's allocation
        (0, " 3 ", "3"),
    ],
)
def test_a_worker_sees_its_own_gpu_or_none(gpu: int | None, given: str | None, visible: str):
    environ = {} if given is None else {"CUDA_VISIBLE_DEVICES": given}
    assert visible_devices(gpu, environ) == visible


def test_a_gpu_outside_the_allocation_is_refused() -> None:
    with pytest.raises(TuneqError, match="CUDA_VISIBLE_DEVICES='5,7' lets this process see GPUs 0"):
        visible_devices(2, {"CUDA_VISIBLE_DEVICES": "5,7"})
    with pytest.raises(TuneqError, match="no GPU"):
        visible_devices(0, {"CUDA_VISIBLE_DEVICES": ""})


def wait_for_pool(worker) -> str:
    deadline = time.monotonic() + 60
    while b"ready for jobs" not in worker.log.read_bytes():
        assert time.monotonic() < deadline, worker.log.read_text()
        time.sleep(0.2)
    return str(worker.log.read_text())


def test_a_gpu_worker_sees_one_gpu_and_lists_itself(env, start_worker) -> None:
    """CUDA_VISIBLE_DEVICES is set before the pool process imports torch; the registry says
    gpu:N, one process. (On a machine without a GPU, torch then simply finds none.)"""
    queue = queue_name()
    allocated = {**env, "CUDA_VISIBLE_DEVICES": "5,7"}
    worker = start_worker(allocated, queue, "--gpu", "1", "--concurrency", "3")
    assert "CUDA_VISIBLE_DEVICES=7)" in wait_for_pool(worker)
    [listed] = json.loads(invoke_cli(env, "workers", "--json").stdout)
    assert (listed["queues"], listed["device"], listed["concurrency"]) == ([queue], "gpu:1", 1)
    worker.stop()
    assert invoke_cli(env, "workers").stdout == "no live workers; start one with `tuneq worker`\n"


def test_a_cpu_worker_hides_the_gpus(env, start_worker) -> None:
    worker = start_worker({**env, "CUDA_VISIBLE_DEVICES": "0"}, queue_name())
    log = wait_for_pool(worker)
    assert "CUDA_VISIBLE_DEVICES=)" in log
    # the pool process keeps freed memory for the next training step (tuneq.worker.ml.allocator)
    kept = "yes" if glibc() is not None else "no"
    assert f"freed memory kept between steps: {kept}," in log
    [listed] = json.loads(invoke_cli(env, "workers", "--json").stdout)
    assert listed["device"] == "cpu"
