"""What every command needs: the settings (read once per invocation, at the edge) and the
database."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from tuneq.schemas.settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine


def settings() -> Settings:
    """Settings from the ``TUNEQ_*`` environment, read once per ``tuneq`` invocation."""
    root = click.get_current_context().find_root()
    if not isinstance(root.obj, Settings):
        root.obj = load_settings()
    return root.obj


def engine() -> Engine:
    """The job database, created or migrated on first use."""
    from tuneq.worker.store.db import get_engine

    return get_engine(settings().database_url)
