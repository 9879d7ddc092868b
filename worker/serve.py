"""Running a worker process: migrations first, then Celery consuming the chosen queues."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from tuneq.schemas.settings import Settings
from tuneq.worker.app import create_app, send_job, send_shard, waiting_messages
from tuneq.worker.db import get_engine
from tuneq.worker.reaper import start_reaper
from tuneq.worker.threads import configure_torch, share_of_cores


def run_worker(
    settings: Settings,
    *,
    queues: list[str],
    concurrency: int = 1,
    jobs_per_child: int = 0,
    hostname: str | None = None,
    loglevel: str = "INFO",
) -> int:
    """Consume ``queues`` until stopped; blocks, then returns the worker's exit code.

    Each pool process runs one job at a time."""
    logging.basicConfig(level=loglevel, format="[%(asctime)s %(levelname)s %(name)s] %(message)s")
    get_engine(settings.database_url)  # create or migrate the database before any job runs
    settings.artifact_dir.mkdir(parents=True, exist_ok=True)
    threads = settings.worker_threads or share_of_cores(concurrency)

    def init_child(**_kwargs: Any) -> None:
        # Database engines are dropped in the child by tuneq.worker.db's at-fork hook.
        configure_torch(threads)

    signals.worker_process_init.connect(init_child, weak=False)
    app = create_app(settings)

    def start_reaping(**_kwargs: Any) -> None:
        # After the pool has forked: the reaper thread lives in the main process only.
        start_reaper(
            settings,
            publish_job=lambda job_id, queue: send_job(app, job_id, queue),
            publish_shard=lambda job_id, index, queue: send_shard(app, job_id, index, queue),
            waiting_in=lambda queue: waiting_messages(app, queue),
        )

    signals.worker_ready.connect(start_reaping, weak=False)
    options: dict[str, Any] = {
        "queues": queues,
        "concurrency": concurrency,
        "pool": "prefork",
        "loglevel": loglevel,
        "hostname": hostname,
        "max_tasks_per_child": jobs_per_child or None,
        "without_gossip": True,
        "without_mingle": True,
    }
    worker = app.Worker(**{k: v for k, v in options.items() if v is not None})
    worker.start()
    return int(worker.exitcode or 0)
