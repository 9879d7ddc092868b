"""The Celery app: JSON messages that carry only a job id, late acks, one job at a time."""

from __future__ import annotations

import base64
import json
import time
from functools import partial
from queue import Empty
from typing import Any

import kombu.transport
from celery import Celery
from kombu.transport.sqlalchemy import Channel as SQLAlchemyChannel
from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport
from sqlalchemy.exc import OperationalError

from tuneq.schemas.settings import Settings
from tuneq.schemas.specs import PRIORITY_LEVELS
from tuneq.worker.store.workers import pool_process_name

RUN_JOB = "tuneq.run_job"
RUN_SHARD = "tuneq.run_shard"
# Above the longest job: kombu redelivers unacked Redis messages older than this even while
# they run (celery#5935). The job row's lease, not this timeout, is what prevents double runs.
VISIBILITY_TIMEOUT_S = 7 * 24 * 3600
# Redis priorities: kombu keeps one list per step and pops the lists in order, 0 first. A
# message without a priority lands in the first list, so every message carries one.
PRIORITY_STEPS = [0, 3, 6]
PRIORITIES = dict(zip(PRIORITY_LEVELS, PRIORITY_STEPS, strict=True))


class EmbeddedChannel(SQLAlchemyChannel):  # type: ignore[misc]
    """kombu's SQLAlchemy channel, removing the rows of delivered messages as it delivers one.

    kombu marks a delivered message's row invisible and keeps it for ever (the message itself
    stays in the worker's memory until acked, and a warm shutdown publishes it again as a new
    row), so the embedded broker's table grew by a row for every job and shard ever run.
    Nothing reads an invisible row again; the clean-up is its own transaction after the
    delivery, and where the database is too busy for it the rows go at the next one.
    """

    def _get(self, queue: str, timeout: float | None = None) -> Any:  # kombu passes none here
        payload = super()._get(queue)  # marks the row invisible and commits; Empty where none
        message = self.message_cls
        try:  # every queue's: no invisible row is read again, and no queue lookup is needed
            self.session.query(message).filter(message.visible.is_(False)).delete(
                synchronize_session=False
            )
            self.session.commit()
        except OperationalError:
            self.session.rollback()  # the delivery stands; the rows go at the next one
        return payload


class EmbeddedTransport(SQLAlchemyTransport):  # type: ignore[misc]
    """kombu's SQLAlchemy transport, polling every 0.1 s instead of every second, on
    :class:`EmbeddedChannel`.

    With late acks and a prefetch of one, a worker fetches its next message only at the next
    poll: at 1 s that caps it at one job or shard a second. The interval cannot be passed as a
    transport option: this transport hands its options to ``create_engine``.
    """

    Channel = EmbeddedChannel
    polling_interval = 0.1

    def drain_events(self, connection: Any, timeout: float | None = None, **_: Any) -> None:
        """kombu's polling loop, which also returns (as a timeout) once the worker is asked to
        stop: celery's blocking loop drains for 2 s at a time and looks for a warm shutdown only
        between drains. An idle worker on this broker took 4.8 s to stop on SIGTERM, 1.7 s with
        this (2.0 s on Redis, whose loop is not this one)."""
        cycle: Any = self.cycle  # the channels' round robin, set once a channel is open
        started = time.monotonic()
        while True:
            try:
                cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                if stopping() or (timeout is not None and time.monotonic() - started >= timeout):
                    raise TimeoutError() from None  # socket.timeout, what celery catches
                time.sleep(self.polling_interval)


def stopping() -> bool:
    """Whether this worker process has been asked to stop (warm or cold), by celery's state."""
    from celery.worker import state

    return asked(state.should_stop) or asked(state.should_terminate)


def stopped_cold() -> bool:
    """Whether celery's state records a cold shutdown (SIGQUIT, or Ctrl-C twice)."""
    from celery.worker import state

    return asked(state.should_terminate)


def asked(flag: object) -> bool:
    """A celery shutdown flag holds an exit code, 0 included, once asked, and None (or False)
    until then: compared by identity, as celery's own check does, since 0 == False."""
    return flag is not None and flag is not False


kombu.transport.TRANSPORT_ALIASES["sqla"] = f"{__name__}:EmbeddedTransport"


def create_app(settings: Settings) -> Celery:
    """A Celery app for ``settings``; the same app sends jobs (CLI) and runs them (worker)."""
    if settings.uses_embedded_broker:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = Celery("tuneq", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue="cpu",
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options(settings),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )

    @app.task(name=RUN_JOB, ignore_result=True)
    def run_job(job_id: str) -> str | None:
        from tuneq.worker.jobs.runner import run_job as run

        def publish_shard(index: int, queue: str, priority: str) -> None:
            send_shard(app, job_id, index, queue, priority)

        return run(
            settings,
            job_id,
            worker=pool_process_name(),
            publish_shard=publish_shard,
            publish_job=partial(send_job, app),
        )

    @app.task(name=RUN_SHARD, ignore_result=True)
    def run_shard(job_id: str, index: int) -> str | None:
        from tuneq.worker.jobs.runner import run_shard as run

        return run(settings, job_id, index, worker=pool_process_name())

    return app


def transport_options(settings: Settings) -> dict[str, object]:
    """Broker options: the embedded SQLite broker passes them to ``create_engine``."""
    if settings.uses_embedded_broker:
        return {"connect_args": {"timeout": 60}}
    return {"visibility_timeout": VISIBILITY_TIMEOUT_S, "priority_steps": PRIORITY_STEPS}


def send_job(app: Celery, job_id: str, queue: str, priority: str) -> None:
    """Publish a job's id to ``queue`` with ``priority`` (high, normal or low)."""
    app.send_task(RUN_JOB, args=[job_id], queue=queue, priority=PRIORITIES[priority])


def send_shard(app: Celery, job_id: str, index: int, queue: str, priority: str) -> None:
    """Publish one shard of a scoring job to ``queue``, with its job's priority."""
    app.send_task(RUN_SHARD, args=[job_id, index], queue=queue, priority=PRIORITIES[priority])


Waiting = set[tuple[str, ...]]  # ("job", id) and ("shard", id, index) of waiting messages


def waiting_messages(app: Celery, queue: str) -> Waiting | None:
    """The jobs and shards whose messages wait in ``queue`` (not yet delivered to a worker),
    or ``None`` where the broker cannot be asked. The reaper republishes only what is missing
    from here. Redis keeps a list per priority; the embedded broker a table (its delivered rows
    invisible until :class:`EmbeddedChannel` removes them)."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        if connection.transport.driver_type == "redis":
            raws = [
                raw
                for step in PRIORITY_STEPS
                for raw in channel.client.lrange(channel._q_for_pri(queue, step), 0, -1)
            ]
        elif connection.transport.driver_type == "sql":
            message = channel.message_cls
            rows = channel.session.query(message.payload).filter(
                message.queue_id == channel._get_or_create(queue).id,
                message.visible.is_(True),
            )
            raws = [payload for (payload,) in rows]
            channel.session.commit()  # end the read, so the broker's writers are not held
        else:
            return None
    return {key for key in map(message_key, raws) if key is not None}


def message_key(raw: str | bytes) -> tuple[str, ...] | None:
    """``("job", id)`` or ``("shard", id, index)`` for a raw kombu message of ours."""
    message = json.loads(raw)
    body = message.get("body", "")
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args = json.loads(body)[0]
    task = message.get("headers", {}).get("task")
    if task == RUN_JOB:
        return ("job", str(args[0]))
    if task == RUN_SHARD:
        return ("shard", str(args[0]), str(args[1]))
    return None
