"""Alembic migrations of the tables in :mod:`tuneq.schemas.tables`."""
