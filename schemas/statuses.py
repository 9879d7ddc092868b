"""Where a job, or a shard of a scoring job, is in its life: the statuses and their sets.

No database here: the CLI's help and its arguments use these without loading SQLAlchemy.
``tuneq.schemas.tables`` stores them.
"""

from __future__ import annotations

import enum


class Status(str, enum.Enum):
    """A status is its column value everywhere: in SQL, in JSON and in f-strings."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class JobStatus(Status):
    """Where a job is in its life (the transitions: ``tuneq.worker.jobs.lifecycle``)::

    queued ───claim──▶ running ──succeed──▶ succeeded
    retrying ─claim──▶ running ──fail─────▶ failed
                       running ──requeue──▶ retrying      (its worker was lost)
    queued, retrying, running ──cancel───▶ cancelled
    failed, cancelled ──retry──▶ queued (from the start) or retrying (--resume)
    """

    queued = "queued"
    running = "running"
    retrying = "retrying"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


WAITING = frozenset({JobStatus.queued, JobStatus.retrying})  # a worker may claim it
ACTIVE = WAITING | {JobStatus.running}  # it can still be cancelled
FINISHED = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
RETRYABLE = frozenset({JobStatus.failed, JobStatus.cancelled})


def values(statuses: frozenset[JobStatus]) -> list[str]:
    """The column values of ``statuses``, in a stable order, for SQL ``IN``."""
    return sorted(status.value for status in statuses)


class ShardStatus(Status):
    """A shard of a scoring job: queued → running → done (or failed)."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
