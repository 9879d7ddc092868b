"""What every command needs: the settings (read once, at the edge) and the database."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from tuneq.schemas.settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine


@cache
def settings() -> Settings:
    """Settings from the ``TUNEQ_*`` environment of this command."""
    return load_settings()


def engine() -> Engine:
    """The job database, created or migrated on first use."""
    from tuneq.worker.db import get_engine

    return get_engine(settings().database_url)
