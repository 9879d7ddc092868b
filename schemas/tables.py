"""The database tables: jobs, their events, shards, registered models, live workers, and the
bf16 parity evidence scoring jobs gather.

A job is a row: the broker carries only its id. Status changes are compare-and-set updates, each
made by one transition of ``tuneq.worker.jobs.lifecycle``; nothing else changes a job's state.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tuneq.schemas.statuses import JobStatus, ShardStatus, Status


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(moment: datetime) -> datetime:
    """SQLite hands back timestamps without a zone; they are UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def status_column(statuses: type[Status]) -> Enum:
    """The column type of a status: the enum's values, validated on write, stored as
    VARCHAR(16) (no database enum type, so adding a status needs no migration)."""
    return Enum(
        statuses,
        native_enum=False,
        create_constraint=False,
        length=16,
        validate_strings=True,
        values_callable=lambda members: [member.value for member in members],
    )


class Base(DeclarativeBase):
    type_annotation_map = {
        dict[str, Any]: JSON,
        datetime: DateTime(timezone=True),
        float: Float,
    }


class Job(Base):
    """One fine-tune (or later scoring) job and everything known about its run."""

    __tablename__ = "jobs"
    __table_args__ = (
        # The newest jobs first (lists); the newest finished in a state (estimates), and
        # durations without reading the rows (metrics); counts (metrics).
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_status_finished_at", "status", "finished_at", "kind", "started_at"),
        Index("ix_jobs_status_kind_queue", "status", "kind", "queue"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[JobStatus] = mapped_column(
        status_column(JobStatus), index=True, default=JobStatus.queued
    )
    queue: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]]
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    progress: Mapped[dict[str, Any] | None]
    metrics: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    output_path: Mapped[str | None] = mapped_column(Text)
    published_at: Mapped[datetime | None]
    group_id: Mapped[str | None] = mapped_column(String(64), index=True)


class Shard(Base):
    """A range of rows of a scoring job's input, scored by whichever worker claims it."""

    __tablename__ = "shards"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    row_start: Mapped[int] = mapped_column(Integer)
    row_count: Mapped[int] = mapped_column(Integer)
    status: Mapped[ShardStatus] = mapped_column(
        status_column(ShardStatus), default=ShardStatus.queued
    )
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    empty_rows: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float | None]
    heartbeat_at: Mapped[datetime | None]
    published_at: Mapped[datetime | None]


class JobEvent(Base):
    """Something that happened to a job: a state change, a warning, a phase with its time."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    attempt: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)


class Model(Base):
    """A registered fine-tuned model: ``name:version`` points at a folder in the artifact store."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(512))
    labels: Mapped[list[str]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]]
    data_fingerprint: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    job_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobGroup(Base):
    """Jobs submitted together (a sweep): how many, and who to tell when all have ended."""

    __tablename__ = "job_groups"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    notify: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    notified_at: Mapped[datetime | None]


class ModelTag(Base):
    """A movable name for one version of a model: ``imdb-sentiment@champion``."""

    __tablename__ = "model_tags"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    tagged_at: Mapped[datetime] = mapped_column(default=utcnow)


class Worker(Base):
    """A running ``tuneq worker``: where it is, what it listens to, on what device. Its reaper
    renews ``heartbeat_at``; a worker whose heartbeat is old is gone."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # host:pid
    hostname: Mapped[str] = mapped_column(String(255))
    queues: Mapped[list[str]] = mapped_column(JSON)
    device: Mapped[str] = mapped_column(String(32))  # cpu, or gpu:N
    concurrency: Mapped[int] = mapped_column(Integer)
    threads: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


class ParityCheck(Base):
    """What scoring jobs' parity gates found for one model on one kind of bf16 hardware: of
    ``sampled`` rows scored in both fp32 and bf16, ``agreed`` got the same answer. Pooled over
    jobs, so that the gate's verdict rests on more rows with every job and later jobs can take
    it without sampling again (``tuneq.worker.ml.score.choose_precision``)."""

    __tablename__ = "parity_checks"

    model_digest: Mapped[str] = mapped_column(String(64), primary_key=True)  # its weights' SHA-256
    hardware: Mapped[str] = mapped_column(String(128), primary_key=True)  # cpu amx, cuda <name>
    agreed: Mapped[int] = mapped_column(Integer)
    sampled: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
