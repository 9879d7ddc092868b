"""Database engines: SQLite tuned for many processes, PostgreSQL by URL, migrations on start."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import Connection

import tuneq.schemas.migrations as migrations_package
from tuneq.schemas.errors import ConfigError

SQLITE_BUSY_TIMEOUT_S = 60

_engines: dict[tuple[int, str], Engine] = {}
_lock = threading.Lock()


def get_engine(database_url: str) -> Engine:
    """The engine for ``database_url`` in this process, migrated to the newest schema.

    Engines are cached per process id, so a pool never crosses a fork.
    """
    key = (os.getpid(), database_url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = create_database_engine(database_url)
            upgrade_database(engine)
            _engines[key] = engine
        return engine


def forget_engines() -> None:
    """Drop engines inherited from a parent process; runs in every forked child.

    A new lock too: a thread of the parent (the reaper) may have held the old one at fork.
    """
    global _lock
    _lock = threading.Lock()
    for (pid, _), engine in list(_engines.items()):
        if pid != os.getpid():
            engine.dispose(close=False)
    _engines.clear()


os.register_at_fork(after_in_child=forget_engines)


def create_database_engine(database_url: str) -> Engine:
    """A new engine; SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` transactions."""
    try:
        url = make_url(database_url)
    except Exception as exc:
        raise ConfigError(
            f"TUNEQ_DATABASE_URL {database_url!r} is not a database URL "
            "(examples: sqlite:////path/tuneq.db, postgresql+psycopg://user@host/db)"
        ) from exc
    if url.drivername.startswith("sqlite"):
        return _create_sqlite_engine(url.render_as_string(hide_password=False))
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return create_engine(url, pool_pre_ping=True, future=True)


def _create_sqlite_engine(url: str) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event decide how transactions start (see below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # A deferred transaction that reads and then writes fails with SQLITE_BUSY at once
        # instead of waiting; IMMEDIATE takes the write lock up front and honours the timeout.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def migrations_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations_package.__file__).parent))
    return config


def head_revision() -> str:
    """The newest migration that tuneq ships."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(migrations_config()).get_current_head()
    assert head is not None
    return head


def upgrade_database(engine: Engine) -> None:
    """Apply every Alembic migration that the database lacks (safe to run concurrently)."""
    config = migrations_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Serialise concurrent upgrades from several workers starting at once.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7461746)")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at, or ``None`` before the first migration."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
