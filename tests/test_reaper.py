"""The reaper republishes only messages the broker lost, and only once among reapers."""

from __future__ import annotations

import time

import redis

from tests.conftest import REDIS_URL, queue_name, redis_available, unavailable
from tuneq.schemas.settings import load_settings
from tuneq.schemas.specs import FinetuneSpec
from tuneq.worker import store
from tuneq.worker.app import PRIORITY_STEPS, create_app, send_job, waiting_messages
from tuneq.worker.db import get_engine
from tuneq.worker.reaper import reap


def test_a_waiting_message_is_left_alone_and_a_lost_one_published_once(env) -> None:
    if not redis_available(REDIS_URL):
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    settings = load_settings({**env, "TUNEQ_BROKER_URL": REDIS_URL, "TUNEQ_REQUEUE_AFTER_S": "0.5"})
    engine = get_engine(settings.database_url)
    queue = queue_name()
    app = create_app(settings)
    job = store.create_job(engine, spec=FinetuneSpec(data="imdb", queue=queue, priority="low"))
    urgent = store.create_job(engine, spec=FinetuneSpec(data="imdb", queue=queue, priority="high"))
    send_job(app, job.id, queue, "low")
    send_job(app, urgent.id, queue, "high")
    lists = [queue, *(f"{queue}\x06\x16{step}" for step in PRIORITY_STEPS[1:])]  # kombu's names
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

        redis.Redis.from_url(REDIS_URL).delete(lists[-1])  # the broker forgets the low one
        time.sleep(1)
        assert one_pass() == [f"published job {job.id} again"]
        assert one_pass() == []  # a second reaper right after finds it published
        assert published == [job.id]
    finally:
        redis.Redis.from_url(REDIS_URL).delete(*lists)
        app.close()
