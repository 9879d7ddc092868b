"""``tuneq db``: the job database."""

from __future__ import annotations

import click

from tuneq.cli.context import settings
from tuneq.schemas.settings import redact_url


@click.group()
def db() -> None:
    """Manage the job database (migrations run by themselves on first use)."""


@db.command()
def upgrade() -> None:
    """Create the database or migrate it to the newest schema.

    \b
    Example:
      TUNEQ_DATABASE_URL=postgresql://tuneq@db/tuneq tuneq db upgrade
    """
    from tuneq.worker.store.db import create_database_engine, current_revision, upgrade_database

    url = settings().database_url
    engine = create_database_engine(url)
    before = current_revision(engine)
    upgrade_database(engine)
    after = current_revision(engine)
    state = "already at" if before == after else f"upgraded from {before or 'empty'} to"
    click.echo(f"{redact_url(url)}: {state} revision {after}")
