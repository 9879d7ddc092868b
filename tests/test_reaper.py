"""The reaper republishes only messages the broker lost, and only once among reapers: on Redis
(a list per priority) and on the embedded broker (a table)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis
from sqlalchemy import create_engine, text

from tests.conftest import REDIS_URL, queue_name, redis_available, unavailable
from tuneq.schemas.settings import Settings, load_settings
from tuneq.schemas.specs import FinetuneSpec
from tuneq.worker import store
from tuneq.worker.jobs.app import PRIORITY_STEPS, create_app, send_job, waiting_messages
from tuneq.worker.jobs.reaper import reap
from tuneq.worker.store.db import get_engine


def redis_broker(env: dict[str, str], queue: str) -> tuple[Settings, Callable[[], None]]:
    """Settings on Redis, and how to make it lose the low-priority message (a flush)."""
    if not redis_available(REDIS_URL):
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    lists = [queue, *(f"{queue}\x06\x16{step}" for step in PRIORITY_STEPS[1:])]  # kombu's names
    settings = load_settings({**env, "TUNEQ_BROKER_URL": REDIS_URL, "TUNEQ_REQUEUE_AFTER_S": "0.5"})
    return settings, lambda: redis.Redis.from_url(REDIS_URL).delete(lists[-1])


def embedded_broker(env: dict[str, str], queue: str) -> tuple[Settings, Callable[[], None]]:
    """Settings on the embedded SQLite broker, and how to make it lose the low-priority
    message: delivered to a worker that died (its row marked invisible, as kombu leaves a
    delivered message's row until tuneq's channel removes it)."""
    settings = load_settings({**env, "TUNEQ_REQUEUE_AFTER_S": "0.5"})

    def lose() -> None:
        broker = create_engine(settings.broker_url.removeprefix("sqla+"))
        with broker.begin() as conn:
            first = conn.execute(text("SELECT min(id) FROM kombu_message")).scalar_one()
            conn.execute(text("UPDATE kombu_message SET visible = 0 WHERE id = :id"), {"id": first})
        broker.dispose()

    return settings, lose


@pytest.mark.parametrize("broker", [redis_broker, embedded_broker], ids=["redis", "embedded"])
def test_a_waiting_message_is_left_alone_and_a_lost_one_published_once(env, broker) -> None:
    queue = queue_name()
    settings, lose_the_low_one = broker(env, queue)
    engine = get_engine(settings.database_url)
    app = create_app(settings)
    job = store.create_job(engine, spec=FinetuneSpec(data="imdb", queue=queue, priority="low"))
    urgent = store.create_job(engine, spec=FinetuneSpec(data="imdb", queue=queue, priority="high"))
    send_job(app, job.id, queue, "low")
    send_job(app, urgent.id, queue, "high")
    published: list[str] = []

    def one_pass() -> list[str]:
        return reap(
            settings,
            publish_job=lambda job_id, _queue, _priority: published.append(job_id),
            publish_shard=lambda *_args: None,
            waiting_in=lambda name: waiting_messages(app, name),
        )

    try:
        assert waiting_messages(app, queue) == {("job", job.id), ("job", urgent.id)}
        time.sleep(1)
        assert one_pass() == [] and published == []  # queued behind others: still there

        lose_the_low_one()
        assert waiting_messages(app, queue) == {("job", urgent.id)}
        time.sleep(1)
        assert one_pass() == [f"published job {job.id} again"]
        assert one_pass() == []  # a second reaper right after finds it published
        assert published == [job.id]
    finally:
        with app.connection_for_write() as connection:
            connection.default_channel.queue_purge(queue)
        app.close()
