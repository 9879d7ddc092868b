"""Running a worker process: migrations first, then Celery consuming the chosen queues."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from celery import signals
from celery.platforms import EX_FAILURE

from tuneq.schemas.errors import TuneqError
from tuneq.schemas.settings import Settings
from tuneq.worker.jobs.app import (
    create_app,
    send_job,
    send_shard,
    stopped_cold,
    waiting_messages,
)
from tuneq.worker.jobs.reaper import start_reaper
from tuneq.worker.jobs.stopping import ask_for_hand_back
from tuneq.worker.ml.allocator import keep_freed_memory, return_freed_memory
from tuneq.worker.ml.device import nvidia_gpus
from tuneq.worker.ml.threads import configure_torch, current_share, leave_host, share_of_cores
from tuneq.worker.store import workers
from tuneq.worker.store.db import get_engine
from tuneq.worker.store.workers import worker_name

log = logging.getLogger(__name__)

COLD_STOP_GRACE_S = 10.0
"""How long a cold shutdown may take before the worker leaves without finishing it."""
UNREGISTER_WAIT_S = 5.0
"""How long a worker leaving so waits for the database to remove its registry row."""


def visible_devices(gpu: int | None, environ: Mapping[str, str]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a worker: none for a CPU worker, so that its jobs do not
    take a GPU that the registry says it does not use; for ``--gpu N``, the Nth of the GPUs
    this process may see (a scheduler may have set CUDA_VISIBLE_DEVICES to its allocation)."""
    if gpu is None:
        return ""
    if "CUDA_VISIBLE_DEVICES" not in environ:
        return str(gpu)
    given = environ["CUDA_VISIBLE_DEVICES"]
    allowed = [d.strip() for d in given.split(",") if d.strip()]
    if gpu >= len(allowed):
        raise TuneqError(
            f"--gpu {gpu}: CUDA_VISIBLE_DEVICES={given!r} lets this process see "
            + (f"GPUs 0 to {len(allowed) - 1} only" if allowed else "no GPU")
        )
    return allowed[gpu]


def run_worker(
    settings: Settings,
    *,
    queues: list[str],
    concurrency: int = 1,
    jobs_per_child: int = 0,
    hostname: str | None = None,
    loglevel: str = "INFO",
    gpu: int | None = None,
) -> int:
    """Consume ``queues`` until stopped; blocks, then returns the worker's exit code (after a
    cold shutdown the process ends here, see :func:`leave_now`).

    Each pool process runs one job at a time. With ``gpu``, the worker sees only that GPU
    (``CUDA_VISIBLE_DEVICES``, set before any process imports torch) and runs one job at a
    time; its process stays, so that scoring shards reuse the loaded model, and each fine-tune
    gives its GPU memory back when it ends. Without, it sees no GPU."""
    logging.basicConfig(level=loglevel, format="[%(asctime)s %(levelname)s %(name)s] %(message)s")
    if "torch" in sys.modules:
        raise RuntimeError("torch was imported before the worker's GPUs were chosen")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(gpu, os.environ)
    device = "cpu"
    if gpu is not None:
        device, concurrency = f"gpu:{gpu}", 1
    elif gpus := nvidia_gpus():
        log.info(
            "this machine has %d NVIDIA GPU(s); this worker runs on the CPU only. "
            "Start `tuneq worker --queues gpu --gpu N` for each GPU to use them",
            gpus,
        )
    engine = get_engine(settings.database_url)  # create or migrate the database first
    settings.artifact_dir.mkdir(parents=True, exist_ok=True)
    # Without TUNEQ_WORKER_THREADS, each pool process takes its share of the host's cores
    # among every worker process on it (tuneq.worker.ml.threads); the row starts with the share
    # this worker would have alone, and each heartbeat records the share it has now.
    threads = settings.worker_threads or share_of_cores(concurrency)

    def init_child(**_kwargs: Any) -> None:
        # Database engines are dropped in the child by tuneq.worker.store.db's at-fork hook.
        configure_torch(settings.worker_threads or None)
        kept = keep_freed_memory()
        import torch

        log.info(
            "pool process %d ready for jobs (torch threads: %d, freed memory kept between "
            "steps: %s, CUDA_VISIBLE_DEVICES=%s)",
            os.getpid(),
            torch.get_num_threads(),
            "yes" if kept else "no",
            os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
        )

    def after_task(**_kwargs: Any) -> None:
        return_freed_memory()  # an idle pool process does not hold the last job's peak

    def exit_child(**_kwargs: Any) -> None:
        leave_host()

    signals.worker_process_init.connect(init_child, weak=False)
    signals.worker_process_shutdown.connect(exit_child, weak=False)
    signals.task_postrun.connect(after_task, weak=False)
    app = create_app(settings)
    name = worker_name()

    def on_ready(**_kwargs: Any) -> None:
        # After the pool has forked: the registry row and the reaper live in this process.
        workers.register_worker(
            engine,
            name=name,
            hostname=socket.gethostname(),
            queues=queues,
            device=device,
            concurrency=concurrency,
            threads=threads,
        )
        start_reaper(
            settings,
            publish_job=lambda job_id, queue, priority: send_job(app, job_id, queue, priority),
            publish_shard=lambda job_id, index, queue, priority: send_shard(
                app, job_id, index, queue, priority
            ),
            waiting_in=lambda queue: waiting_messages(app, queue),
            heartbeat=lambda: workers.beat(
                engine, name=name, threads=settings.worker_threads or current_share()
            ),
        )
        bound_cold_stop(lambda: workers.unregister_worker(engine, name=name))

    def on_shutting_down(how: str = "", **_kwargs: Any) -> None:
        # In celery's signal handler: one byte written, nothing that takes a lock.
        if how == "Warm" and settings.hand_back_on_stop:
            ask_for_hand_back()

    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutting_down.connect(on_shutting_down, weak=False)
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
    try:
        worker.start()
    finally:
        # Here rather than on celery's worker_shutdown, which a cold shutdown does not send.
        workers.unregister_worker(engine, name=name)
    code = int(worker.exitcode or 0)
    if stopped_cold():
        leave_now(code)
    return code


def bound_cold_stop(unregister: Callable[[], None], grace_s: float = COLD_STOP_GRACE_S) -> None:
    """End this process ``grace_s`` after a cold shutdown begins, if celery has not by then.

    Celery's cold shutdown runs in its signal handler: it kills the running job's pool process,
    then joins the pool. A pool process that does not die on SIGTERM (stopped, or stuck in the
    kernel) is joined for ever; one killed while it held the lock of the pool's result queue
    leaves billiard's task handler blocked on that lock, and the join with it (3 cold stops of
    about 90 under load). A thread that watches celery's state then unregisters the worker
    and ends the process; the pool processes die with it (celery sets their parent-death
    signal to SIGKILL), the job is left to its lease as after any cold stop. A database that
    does not answer (a network cut, not a refusal) would hold the unregistering for ever: the
    worker waits ``UNREGISTER_WAIT_S`` for it, then leaves registered, and its row goes stale
    as its heartbeat stops. Messages go to stderr with ``os.write``: the stuck main thread may
    hold the logging handler's lock."""

    def unregister_or_say_why() -> None:
        try:
            unregister()
        except Exception as error:
            os.write(2, f"worker: unregistering failed: {error!r}\n".encode())

    def watch() -> None:
        while not stopped_cold():
            time.sleep(0.25)
        time.sleep(grace_s)
        os.write(
            2,
            f"worker: the cold shutdown did not end in {grace_s:g} s (a pool process that "
            "does not die, or a lock a killed one held); leaving without it\n".encode(),
        )
        leaving = threading.Thread(
            target=unregister_or_say_why, name="tuneq unregister", daemon=True
        )
        leaving.start()
        leaving.join(UNREGISTER_WAIT_S)
        if leaving.is_alive():
            os.write(
                2,
                f"worker: the database did not answer in {UNREGISTER_WAIT_S:g} s; leaving "
                "still registered (the row goes stale as the heartbeat stops)\n".encode(),
            )
        os._exit(EX_FAILURE)

    threading.Thread(target=watch, name="tuneq cold-stop watch", daemon=True).start()


def leave_now(code: int) -> NoReturn:
    """End the process after a cold shutdown, without the interpreter's exit-time clean-up.

    A cold shutdown kills the running job's pool process, and the pool's exit-time finalizer
    (billiard's ``_terminate_pool``) can then wait for ever on the lock of a queue that process
    held: 2 of 5 cold stops during a fine-tune hung there. Celery has already given the job's
    message back and stopped the pool, so nothing is left for that clean-up to do."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
