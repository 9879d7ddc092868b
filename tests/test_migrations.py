"""The Alembic migrations create exactly the tables that schemas/tables.py declares."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tuneq.schemas.tables import Base
from tuneq.worker.store.db import get_engine


def test_migrated_database_matches_the_declared_tables(database_url: str) -> None:
    engine = get_engine(database_url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
