"""The embedded (SQLite) broker's transport: how it waits for messages and for a stop, and
what it keeps of the messages it has delivered."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.worker import state
from kombu import Connection, Consumer, Exchange, Producer, Queue
from sqlalchemy import create_engine, text

from tests.conftest import queue_name
from tuneq.schemas.settings import load_settings
from tuneq.schemas.specs import FinetuneSpec
from tuneq.worker import store
from tuneq.worker.jobs.app import EmbeddedTransport, create_app, send_job, waiting_messages
from tuneq.worker.store.db import get_engine


@pytest.fixture
def consuming(tmp_path: Path) -> Iterator[tuple[Connection, list[Any], list[int]]]:
    """A connection to a fresh SQLite broker consuming one queue: the connection, the bodies
    delivered so far, and a one-item list counting the transport's polls."""
    queue = Queue("jobs", Exchange("jobs"), "jobs")
    received: list[Any] = []
    polls = [0]
    with Connection(f"sqla+sqlite:///{tmp_path / 'broker.db'}") as connection:
        transport = connection.transport
        assert isinstance(transport, EmbeddedTransport)
        channel = connection.channel()
        get = transport.cycle.get

        def counted_get(*args: Any, **kwargs: Any) -> Any:
            polls[0] += 1
            return get(*args, **kwargs)

        transport.cycle.get = counted_get
        consumer = Consumer(channel, queues=[queue], accept=["json"])
        consumer.register_callback(lambda body, message: (received.append(body), message.ack()))
        with consumer:
            yield connection, received, polls


@pytest.fixture
def stop_requested() -> Iterator[None]:
    """A warm shutdown asked for, as celery's SIGTERM handler records it: exit code 0."""
    state.should_stop = 0
    try:
        yield
    finally:
        state.should_stop = None


def test_an_idle_drain_waits_out_its_timeout_and_a_message_is_delivered(
    consuming: tuple[Connection, list[Any], list[int]],
) -> None:
    connection, received, polls = consuming
    with pytest.raises(TimeoutError):
        connection.drain_events(timeout=0.5)
    assert polls[0] >= 4, "an idle drain keeps polling until its timeout"

    Producer(connection.channel()).publish(
        {"job": 1}, exchange="jobs", routing_key="jobs", serializer="json"
    )
    connection.drain_events(timeout=2.0)
    assert received == [{"job": 1}]


def test_an_idle_drain_returns_at_once_when_the_worker_is_asked_to_stop(
    consuming: tuple[Connection, list[Any], list[int]], stop_requested: None
) -> None:
    """celery's blocking loop drains 2 s at a time and looks for a shutdown only between drains:
    an idle worker on the embedded broker took about 5 s to stop on SIGTERM, 1.7 s with this."""
    connection, received, polls = consuming
    with pytest.raises(TimeoutError):
        connection.drain_events(timeout=2.0)
    assert polls[0] == 1, f"{polls[0]} polls after the stop was asked for"
    assert received == []


def test_the_embedded_broker_keeps_no_row_of_a_delivered_message(env) -> None:
    """kombu's SQLAlchemy transport marks a delivered message's row invisible and keeps it for
    ever: a row for every job and shard ever run. Delivered (and acked) through the real
    transport, a message leaves no row; the one still waiting keeps its row and stays
    waiting."""
    queue = queue_name()
    settings = load_settings(env)
    app = create_app(settings)
    engine = get_engine(settings.database_url)
    jobs = [store.create_job(engine, spec=FinetuneSpec(data="imdb", queue=queue)) for _ in "ab"]
    for job in jobs:
        send_job(app, job.id, queue, "normal")
    broker = create_engine(settings.broker_url.removeprefix("sqla+"))
    try:
        with app.connection_for_write() as connection:
            delivered = connection.default_channel.basic_get(queue, no_ack=False)
            assert delivered is not None
            delivered.ack()
        with broker.connect() as conn:
            rows = conn.execute(text("SELECT visible FROM kombu_message")).scalars().all()
        assert [bool(visible) for visible in rows] == [True]
        assert waiting_messages(app, queue) == {("job", jobs[1].id)}
    finally:
        broker.dispose()
        app.close()
