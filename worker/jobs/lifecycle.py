"""The job lifecycle: every change of a job's or a shard's status, and what follows from it.

Each transition is a compare-and-set in the store (``tuneq.worker.store``): it lands, or it
changes nothing (another process got there first, or the attempt is stale). Only a transition
that landed has side effects: its event (written in the same transaction), the end-of-job
notification, and the removal of files, by the process that holds them:

- the attempt that ends a job removes what it made (checkpoints, the scoring folder);
- a cancel only marks the row: the worker running the job sees it at its next step or batch
  (its lease fails, :func:`stopped`) and removes its own files;
- every worker's janitor (:func:`sweep_leftovers`, run beside the reaper) removes what ended
  jobs left in its artifact folder: the files of a worker that died, or of a job cancelled
  while no worker held it.

The runner, the reaper, submission and the CLI change a status only through these functions.
"""

from __future__ import annotations

import logging
import posixpath
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Engine

from tuneq.schemas.errors import JobStateError, SpecUnreadable
from tuneq.schemas.settings import Settings
from tuneq.schemas.specs import JobSpec, ScoreSpec, parse_spec
from tuneq.schemas.statuses import FINISHED, RETRYABLE, JobStatus, values
from tuneq.schemas.tables import Job, Model, Shard
from tuneq.worker import store
from tuneq.worker.io import artifacts
from tuneq.worker.jobs.notify import notify_end

log = logging.getLogger(__name__)

PublishJob = Callable[[str, str, str], None]  # job id, queue, priority
PublishShard = Callable[[str, int, str, str], None]  # job id, shard index, queue, priority
CHECKPOINTS, SCORING, STAGING = "checkpoints", "scoring", "staging"
HANDED_BACK = "handed_back"  # the event of a job its stopping worker put back in the queue
RETRIED = "retried"  # the event of a failed or cancelled job a user put back in the queue


# Where a job's files are ------------------------------------------------------------------


def checkpoint_folder(settings: Settings, job_id: str) -> Path:
    """Where a fine-tune keeps its checkpoints, on the worker that runs it, until it ends."""
    return settings.artifact_dir / CHECKPOINTS / job_id


def scoring_folder(settings: Settings, job_id: str, attempt: int | None = None) -> str:
    """Where an attempt of a scoring job keeps its staged input and scored parts (without
    ``attempt``: every attempt's): in the artifact store (or the shared artifact folder),
    which every worker scoring its shards can reach. Per attempt, so that a stale attempt
    never touches the parts of the attempt that owns the job."""
    keys = (job_id,) if attempt is None else (job_id, str(attempt))
    return artifacts.store_location(settings, SCORING, *keys)


def staging_folder(settings: Settings, job_id: str, attempt: int) -> Path:
    """Where one attempt of a fine-tune builds its model before registering it."""
    return settings.artifact_dir / STAGING / f"{job_id}-{attempt}"


def assembly_file(settings: Settings, job_id: str, attempt: int, output: str) -> Path:
    """Where an attempt of a scoring job builds its output until it is whole: beside a local
    output (so that the last step is an atomic rename), in the attempt's staging folder for an
    output in the artifact store (uploaded from there). Named for the job and the attempt, so
    that what a killed assembly left is found when the job ends."""
    if artifacts.is_uri(output):
        return staging_folder(settings, job_id, attempt) / posixpath.basename(output)
    path = Path(output)
    return path.with_name(f".{path.name}.{job_id}-{attempt}.partial")


def job_files(settings: Settings, job: Job) -> list[artifacts.Location]:
    """What a job makes while it runs, on this machine or in the store; gone when it ends.
    For a scoring job: its scoring folder, and the output being assembled (this attempt's,
    and any that an earlier, killed attempt left)."""
    if job.kind != ScoreSpec.model_fields["kind"].default:
        return [checkpoint_folder(settings, job.id)]
    files: list[artifacts.Location] = [scoring_folder(settings, job.id)]
    output = job.spec.get("output")
    if output and not artifacts.is_uri(output):
        current = assembly_file(settings, job.id, job.attempt, output)
        files += [current, *current.parent.glob(f".{Path(output).name}.{job.id}-*.partial")]
    for attempt in range(1, job.attempt + 1):
        files.append(staging_folder(settings, job.id, attempt))
    return list(dict.fromkeys(files))


def remove(locations: Iterable[artifacts.Location]) -> None:
    for location in locations:
        artifacts.remove_path(location)


# Transitions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A job this process now runs: its attempt, and whether to start from scratch (claimed
    from ``queued``: a first run, or a retry without ``--resume``) rather than resume from a
    checkpoint (claimed from ``retrying``)."""

    attempt: int
    fresh: bool
    spec: JobSpec


def claim(engine: Engine, job_id: str, *, worker: str) -> Claim | None:
    """queued | retrying → running, under a new attempt; ``None`` if another delivery has it.

    A spec this worker cannot read fails the job here, with its own message, rather than
    leaving it running until the reaper blames the memory."""
    claimed = store.claim_job(engine, job_id=job_id, worker=worker)
    if claimed is None:
        return None
    attempt, previous = claimed
    job = store.get_job(engine, job_id)
    try:
        spec = parse_spec(job.spec)
    except (ValidationError, ValueError) as exc:
        error = SpecUnreadable(
            f"this worker (tuneq {version('tuneq')}) cannot read the job's spec; upgrade the "
            f"worker to the CLI's version, or submit the job again from this one: {exc}"
        )
        log.warning("job %s failed: %s", job_id, error)
        fail(engine, job_id, attempt, str(error))
        return None
    return Claim(attempt, previous == JobStatus.queued.value, spec)


def succeed_with_model(
    engine: Engine, job_id: str, attempt: int, *, cleanup: Sequence[artifacts.Location], **model
) -> Model | None:
    """running → succeeded, registering the staged model (``store.register_model``'s
    arguments); ``None`` if the attempt had lost the job."""
    registered = store.register_model(engine, job_id=job_id, attempt=attempt, **model)
    if registered is not None:
        remove(cleanup)
        notify_end(engine, job_id)
    return registered


def succeed_with_output(
    engine: Engine,
    job_id: str,
    attempt: int,
    *,
    output_path: str,
    metrics: dict[str, Any],
    cleanup: Sequence[artifacts.Location],
) -> bool:
    """running → succeeded, pointing at the scored output."""
    if not store.mark_scored(
        engine, job_id=job_id, attempt=attempt, output_path=output_path, metrics=metrics
    ):
        return False
    remove(cleanup)
    notify_end(engine, job_id)
    return True


def fail(
    engine: Engine,
    job_id: str,
    attempt: int,
    error: str,
    *,
    traceback: str | None = None,
    cleanup: Sequence[artifacts.Location] = (),
) -> bool:
    """running → failed with ``error``. A stale attempt's failure changes nothing and deletes
    nothing: the files may be the attempt's that now owns the job."""
    if not store.mark_failed(
        engine, job_id=job_id, attempt=attempt, error=error, traceback=traceback
    ):
        return False
    remove(kept_files(store.get_job(engine, job_id), cleanup))
    notify_end(engine, job_id)
    return True


def stopped(engine: Engine, job_id: str, cleanup: Sequence[artifacts.Location]) -> str:
    """An attempt whose lease failed mid-work: if the job ended (cancelled), its files go; if
    another attempt owns it, they stay (that attempt resumes from them). Returns the status."""
    job = store.get_job(engine, job_id)
    if JobStatus(job.status) in FINISHED:
        remove(kept_files(job, cleanup))
    return job.status


def kept_files(job: Job, files: Sequence[artifacts.Location]) -> list[artifacts.Location]:
    """``files`` less the checkpoints of a failed fine-tune that asked to keep them."""
    keep = job.status == JobStatus.failed.value and bool(job.spec.get("keep_checkpoints"))
    return [f for f in files if not (keep and Path(str(f)).parent.name == CHECKPOINTS)]


def cancel(engine: Engine, job_id: str) -> str:
    """queued | retrying | running → cancelled. A running job's worker stops at its next
    step or batch and removes its files; the CLI that cancels may be on another machine."""
    job = store.get_job(engine, job_id)
    if not store.cancel_job(engine, job_id=job.id):
        current = store.get_job(engine, job.id).status
        raise JobStateError(f"job {job.id} already {current}; nothing to cancel")
    notify_end(engine, job.id)
    return job.id


def retry(engine: Engine, job_id: str, *, resume: bool, publish: PublishJob) -> Job:
    """failed | cancelled → queued (from the start), or retrying with ``resume`` (from the
    newest complete checkpoint, where the worker that takes it has one)."""
    job = store.get_job(engine, job_id)
    how = "to resume from its newest checkpoint" if resume else "from the start"
    if not store.requeue_job(
        engine,
        job_id=job.id,
        from_statuses=values(RETRYABLE),
        to_status=JobStatus.retrying if resume else JobStatus.queued,
        reason=f"retried by user, {how}",
        event=RETRIED,
    ):
        current = store.get_job(engine, job.id).status
        raise JobStateError(f"job {job.id} is {current}; only failed or cancelled jobs retry")
    publish(job.id, job.queue, store.priority_of(job))
    return job


def requeue_lost(engine: Engine, job: Job, publish: PublishJob) -> bool:
    """running → retrying: the attempt's worker stopped renewing its lease. The next attempt
    resumes from the checkpoints, so nothing is removed."""
    if not store.requeue_job(
        engine,
        job_id=job.id,
        from_statuses=[JobStatus.running.value],
        attempt=job.attempt,
        to_status=JobStatus.retrying,
        reason=f"worker {job.worker} lost (no heartbeat); requeued",
    ):
        return False
    publish(job.id, job.queue, store.priority_of(job))
    return True


def hand_back(engine: Engine, job_id: str, attempt: int, reason: str, publish: PublishJob) -> bool:
    """running → retrying: the attempt's worker is stopping and checkpointed the job to resume
    there. Not a lost attempt: the reaper's ``max_attempts`` does not count it.

    Celery's warm shutdown also gave the running task's message back to the broker in the
    tests, on Redis and on the embedded broker (the task's late ack did not land); publishing
    here too means the job never waits for the reaper should that ack land. A second delivery
    is refused at its claim."""
    if not store.requeue_job(
        engine,
        job_id=job_id,
        from_statuses=[JobStatus.running.value],
        attempt=attempt,
        to_status=JobStatus.retrying,
        reason=reason,
        event=HANDED_BACK,
    ):
        return False
    job = store.get_job(engine, job_id)
    publish(job.id, job.queue, store.priority_of(job))
    return True


def lost_attempts(engine: Engine, job: Job) -> int:
    """How many of a job's attempts since a user last retried it (or since it was submitted)
    ended without their worker handing the job back: a retry starts the count again, as the
    attempts before it ended in a failure or a cancel, not in a lost worker."""
    events = store.list_events(engine, job.id)
    since = max((e.attempt for e in events if e.kind == RETRIED), default=0)
    handed_back = sum(1 for e in events if e.kind == HANDED_BACK and e.attempt > since)
    return job.attempt - since - handed_back


def claim_shard(engine: Engine, job_id: str, index: int, *, worker: str) -> int | None:
    """A shard queued → running under a new attempt, while its job runs; ``None`` if it is
    taken, done, or the job ended."""
    return store.claim_shard(engine, job_id=job_id, index=index, worker=worker)


def finish_shard(
    engine: Engine, job_id: str, index: int, attempt: int, *, empty_rows: int, seconds: float
) -> int | None:
    """A shard running → done: how many shards are left (0: the caller assembles the
    output), or ``None`` if the shard or its job was no longer this attempt's."""
    return store.finish_shard(
        engine, job_id=job_id, index=index, attempt=attempt, empty_rows=empty_rows, seconds=seconds
    )


def requeue_lost_shard(engine: Engine, shard: Shard, job: Job, publish: PublishShard) -> bool:
    """A shard running → queued: its worker was lost; the parts already scored stay."""
    if not store.requeue_shard(
        engine, job_id=shard.job_id, index=shard.index, attempt=shard.attempt
    ):
        return False
    publish(shard.job_id, shard.index, job.queue, store.priority_of(job))
    return True


def fail_unsent(engine: Engine, job_ids: Iterable[str], error: str) -> list[str]:
    """queued → failed for jobs whose message never reached the broker; returns those that
    were still queued (a reaper may have published one since)."""
    failed = [job_id for job_id in job_ids if store.fail_unsent(engine, job_id=job_id, error=error)]
    for job_id in failed:
        notify_end(engine, job_id)
    return failed


# The janitor -------------------------------------------------------------------------------


def sweep_leftovers(settings: Settings, engine: Engine) -> list[str]:
    """Remove what ended jobs left in this worker's artifact folder (and in the scoring
    folders of the artifact store): checkpoints, half-built models, staged input and parts.
    Folders of jobs that are still waiting or running, or that this database does not know,
    are left alone. Returns what it removed."""
    found: dict[str, list[artifacts.Location]] = {}
    for kind in (CHECKPOINTS, STAGING):
        folder = settings.artifact_dir / kind
        if folder.is_dir():
            for path in folder.iterdir():
                job_id = path.name.rsplit("-", 1)[0] if kind == STAGING else path.name
                found.setdefault(job_id, []).append(path)
    for location in artifacts.list_folder(artifacts.store_location(settings, SCORING)):
        found.setdefault(location.rstrip("/").rsplit("/", 1)[-1], []).append(location)
    removed: list[str] = []
    for job in store.jobs_with_ids(engine, list(found)):
        if JobStatus(job.status) in FINISHED:
            for location in kept_files(job, found[job.id]):
                artifacts.remove_path(location)
                removed.append(str(location))
    for location in removed:
        log.info("removed %s, left by an ended job", location)
    return removed


def remove_checkpoints(folder: Path) -> list[str]:
    """Remove the checkpoints an earlier attempt left, before a fresh start; their names."""
    names = sorted(p.name for p in folder.glob("checkpoint-*")) if folder.is_dir() else []
    shutil.rmtree(folder, ignore_errors=True)
    return names
