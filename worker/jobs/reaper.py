"""The reaper: every worker runs one, so lost work comes back without a person.

It requeues jobs and shards whose lease went stale (their worker died), up to ``max_attempts``,
and publishes again the ones queued in the database whose message never got claimed (a broker
that restarted empty, celery#6229). On Redis it first looks whether the message still waits in
its queue (behind long jobs, say), and publishes only the missing ones; one reaper wins each
republication. A duplicate message is harmless anyway: claims are compare-and-set, so a second
delivery exits without touching anything.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from tuneq.schemas.settings import Settings
from tuneq.schemas.tables import utcnow
from tuneq.worker import store
from tuneq.worker.jobs import lifecycle
from tuneq.worker.jobs.app import Waiting
from tuneq.worker.store.db import get_engine

log = logging.getLogger(__name__)

WaitingIn = Callable[[str], Waiting | None]  # queue -> messages it holds, if the broker can tell


def reap(
    settings: Settings,
    publish_job: lifecycle.PublishJob,
    publish_shard: lifecycle.PublishShard,
    waiting_in: WaitingIn = lambda _queue: None,
) -> list[str]:
    """One pass; returns what it did, one line per action. ``waiting_in(queue)`` tells which
    messages the broker still holds, so that a job waiting its turn is not published twice."""
    engine = get_engine(settings.database_url)
    now = utcnow()
    stale = now - timedelta(seconds=settings.lease_timeout_s)
    actions: list[str] = []
    for job in store.stale_jobs(engine, before=stale):
        if (times := lifecycle.lost_attempts(engine, job)) >= settings.max_attempts:
            reason = (
                f"worker lost {times} times (no heartbeat for "
                f"{settings.lease_timeout_s:.0f}s); likely out of memory"
            )
            files = lifecycle.job_files(settings, job)
            if lifecycle.fail(engine, job.id, job.attempt, reason, cleanup=files):
                actions.append(f"failed job {job.id}: {reason}")
        elif lifecycle.requeue_lost(engine, job, publish_job):
            actions.append(f"requeued job {job.id} after attempt {job.attempt}")
    for shard in store.stale_shards(engine, before=stale):
        job = store.get_job(engine, shard.job_id)
        if shard.attempt >= settings.max_attempts:
            reason = f"shard {shard.index}: worker lost {shard.attempt} times; likely out of memory"
            files = [lifecycle.scoring_folder(settings, job.id)]
            if lifecycle.fail(engine, job.id, job.attempt, reason, cleanup=files):
                actions.append(f"failed job {job.id}: {reason}")
        elif lifecycle.requeue_lost_shard(engine, shard, job, publish_shard):
            actions.append(f"requeued shard {shard.job_id}/{shard.index}")
    unclaimed = now - timedelta(seconds=settings.requeue_after_s)
    waiting: dict[str, Waiting | None] = {}

    def lost(queue: str, key: tuple[str, ...]) -> bool:
        """Whether a message is missing from the broker (or the broker cannot tell)."""
        if queue not in waiting:
            waiting[queue] = waiting_in(queue)
        known = waiting[queue]
        return known is None or key not in known

    for job in store.unclaimed_jobs(engine, before=unclaimed):
        if not lost(job.queue, ("job", job.id)):
            store.mark_published(engine, job_id=job.id)  # still waiting its turn: look later
        elif store.mark_published(engine, job_id=job.id, before=unclaimed):
            publish_job(job.id, job.queue, store.priority_of(job))
            actions.append(f"published job {job.id} again")
    for shard, owner in store.unclaimed_shards(engine, before=unclaimed):
        key = ("shard", shard.job_id, str(shard.index))
        queue = owner.queue
        if not lost(queue, key):
            store.mark_published(engine, job_id=shard.job_id, index=shard.index)
        elif store.mark_published(engine, job_id=shard.job_id, index=shard.index, before=unclaimed):
            publish_shard(shard.job_id, shard.index, queue, store.priority_of(owner))
            actions.append(f"published shard {shard.job_id}/{shard.index} again")
    for action in actions:
        log.warning("reaper: %s", action)
    return actions


def start_reaper(
    settings: Settings,
    publish_job: lifecycle.PublishJob,
    publish_shard: lifecycle.PublishShard,
    waiting_in: WaitingIn,
    heartbeat: Callable[[], None],
) -> threading.Event:
    """Run :func:`reap` every ``reap_interval_s`` in a daemon thread, after ``heartbeat`` (the
    worker's own row in the registry), then the janitor that removes what ended jobs left in
    this worker's folders; set the event to stop."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(settings.reap_interval_s):
            try:
                heartbeat()
            except Exception:
                log.exception(
                    "worker heartbeat failed; trying again in %ss", settings.reap_interval_s
                )
            try:
                reap(settings, publish_job, publish_shard, waiting_in)
                lifecycle.sweep_leftovers(settings, get_engine(settings.database_url))
            except Exception:
                log.exception("reaper pass failed; trying again in %ss", settings.reap_interval_s)

    threading.Thread(target=loop, name="tuneq reaper", daemon=True).start()
    return stop
