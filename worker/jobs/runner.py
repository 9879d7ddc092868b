"""The job runner: a worker's side of a job, from its claim to its outcome.

``run_job`` claims a job, runs its work, and records the outcome through the transitions of
``tuneq.worker.jobs.lifecycle``. It is safe to call twice for the same job: a delivery that cannot
claim the job returns without touching anything.
"""

from __future__ import annotations

import logging
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from tuneq.schemas.errors import TuneqError
from tuneq.schemas.settings import Settings
from tuneq.schemas.specs import FinetuneSpec, ScoreSpec, parse_spec
from tuneq.schemas.tables import aware, utcnow
from tuneq.worker import store
from tuneq.worker.io import artifacts
from tuneq.worker.jobs import lifecycle
from tuneq.worker.jobs.lease import JobStopped, Lease
from tuneq.worker.jobs.paths import confine_spec
from tuneq.worker.jobs.stopping import hand_back_asked
from tuneq.worker.ml.device import release_gpu_memory
from tuneq.worker.ml.threads import REFIT_INTERVAL_S, fit_threads_to_host
from tuneq.worker.store.db import get_engine

if TYPE_CHECKING:
    from tuneq.worker.ml.score import PrecisionChoice

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0


class ProgressRecorder:
    """Writes a running job's progress to its row at most once a second (plus the last one)."""

    def __init__(self, engine: Engine, job_id: str, attempt: int, lease: Lease) -> None:
        self.engine, self.job_id, self.attempt, self.lease = engine, job_id, attempt, lease
        self.last_write = 0.0
        self.latest: dict[str, Any] = {}

    def __call__(self, progress: dict[str, Any]) -> None:
        """Record ``progress``; raises ``JobStopped`` (which ends training at this step) once
        the job is cancelled or owned by another attempt."""
        self.lease.check()
        fit_threads_to_host(every_s=REFIT_INTERVAL_S)  # another worker may have come or gone
        self.latest = progress
        now = time.monotonic()
        final_step = progress.get("step") is not None and progress.get("step") == progress.get(
            "total"
        )
        if now - self.last_write >= PROGRESS_INTERVAL_S or "step" not in progress or final_step:
            self.last_write = now
            if not store.record_progress(
                self.engine, job_id=self.job_id, attempt=self.attempt, progress=progress
            ):
                self.lease.lost = True
                self.lease.check()


# Publishes a shard of the job being run: shard index, queue, priority (the job is known).
PublishOwnShard = Callable[[int, str, str], None]


def run_job(
    settings: Settings,
    job_id: str,
    *,
    worker: str,
    publish_shard: PublishOwnShard,
    publish_job: lifecycle.PublishJob,
) -> str | None:
    """Claim job ``job_id`` and run it; returns its state afterwards, or ``None`` when another
    delivery owns the job. A scoring job stays ``running`` while its shards are scored; a
    fine-tune that its stopping worker hands back is published again with ``publish_job``."""
    engine = get_engine(settings.database_url)
    fit_threads_to_host()
    claim = lifecycle.claim(engine, job_id, worker=worker)
    if claim is None:
        log.info("job %s is not claimable (already taken, finished or unreadable)", job_id)
        return None
    attempt, spec = claim.attempt, claim.spec
    lease = Lease(
        lambda: store.renew_job_lease(engine, job_id=job_id, attempt=attempt),
        settings.heartbeat_s,
        f"job {job_id} attempt {attempt}",
    )
    files = lifecycle.job_files(settings, store.get_job(engine, job_id))
    if isinstance(spec, ScoreSpec):
        folder = lifecycle.scoring_folder(settings, job_id, attempt)
        with lease, failures_recorded(engine, job_id, attempt, files):
            spec = artifacts.local_model(settings, confine_spec(settings, spec))
            return start_scoring(engine, job_id, attempt, spec, folder, publish_shard, lease)
        return store.get_job(engine, job_id).status
    staging = lifecycle.staging_folder(settings, job_id, attempt)
    try:
        with lease, failures_recorded(engine, job_id, attempt, files):
            spec = artifacts.local_model(settings, confine_spec(settings, spec))
            return run_finetune(
                settings, engine, job_id, claim, spec, staging, lease, worker, publish_job
            )
        return store.get_job(engine, job_id).status
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        release_gpu_memory(job_id)


@contextmanager
def failures_recorded(
    engine: Engine, job_id: str, attempt: int, files: list[artifacts.Location]
) -> Iterator[None]:
    """Fail the job on any error: a ``TuneqError`` with its message, anything else as an
    internal error with its traceback; ``files`` go only if that failure landed. Work that
    stops because the job was cancelled or taken away ends quietly. The worker carries on."""
    try:
        yield
    except JobStopped:
        status = lifecycle.stopped(engine, job_id, files)
        log.info("job %s stopped: it is %s now", job_id, status)
    except TuneqError as exc:
        log.warning("job %s failed: %s", job_id, exc)
        lifecycle.fail(engine, job_id, attempt, str(exc), cleanup=files)
    except Exception as exc:
        log.exception("job %s crashed", job_id)
        lifecycle.fail(
            engine,
            job_id,
            attempt,
            f"internal error: {type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
            cleanup=files,
        )


def run_finetune(
    settings: Settings,
    engine: Engine,
    job_id: str,
    claim: lifecycle.Claim,
    spec: FinetuneSpec,
    staging: Path,
    lease: Lease,
    worker: str,
    publish_job: lifecycle.PublishJob,
) -> str:
    # torch and transformers load only here
    from tuneq.worker.ml.finetune import HandedBack, finetune

    attempt = claim.attempt
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    recorder = ProgressRecorder(engine, job_id, attempt, lease)
    checkpoints = lifecycle.checkpoint_folder(settings, job_id)

    def event(kind: str, message: str) -> None:
        store.add_event(engine, job_id=job_id, attempt=attempt, kind=kind, message=message)

    if claim.fresh and (discarded := lifecycle.remove_checkpoints(checkpoints)):
        event("fresh", f"started from the start; removed {', '.join(discarded)}")
    try:
        result = finetune(
            spec,
            staging,
            on_progress=recorder,
            checkpoint_dir=checkpoints,
            on_warning=lambda message: event("warning", message),
            hand_back=hand_back_asked if settings.hand_back_on_stop else None,
        )
    except HandedBack as handed:
        reason = (
            f"handed back at step {handed.step} of {handed.total} by {worker}, which is "
            f"stopping; resumes from {handed.checkpoint}"
        )
        if not lifecycle.hand_back(engine, job_id, attempt, reason, publish_job):
            lease.lost = True
            lease.check()  # cancelled meanwhile: stop as a cancel does
        log.info("job %s %s", job_id, reason)
        return store.get_job(engine, job_id).status
    lease.check()
    if result.resumed_from:
        event("resumed", f"resumed from {result.resumed_from}")
    elif not claim.fresh:
        event("fresh", "no complete checkpoint on this worker: started from the start")
    summary = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.phases.items())
    event("phases", summary)
    metrics = dict(result.metrics, phases=result.phases)
    stored_at = upload_model(settings, spec.model_name(), f"{job_id}-{attempt}", staging)
    model = lifecycle.succeed_with_model(
        engine,
        job_id,
        attempt,
        cleanup=[checkpoints],
        staged_dir=staging,
        models_dir=settings.artifact_dir / "models",
        stored_at=stored_at,
        model={
            "name": spec.model_name(),
            "base_model": spec.model,
            "labels": result.label_names,
            "data_fingerprint": result.fingerprint,
        },
        metrics=metrics,
    )
    if model is None:
        log.warning("job %s lost its lease before registering; result discarded", job_id)
        if stored_at is not None:
            artifacts.remove_path(stored_at)
        return "lost"
    log.info("job %s succeeded: %s:%s at %s", job_id, model.name, model.version, model.path)
    return "succeeded"


def upload_model(settings: Settings, name: str, key: str, staging: Path) -> str | None:
    """With an artifact store, upload the staged model to ``models/NAME/KEY`` there and return
    its URI; without one, ``None`` (registering moves the folder into the artifact folder).

    The key is the job and attempt, not the version: the version is allocated when the model
    is registered, after the upload, so two jobs racing for one version never write to the
    same place, and a zombie attempt never overwrites the attempt that registered.
    """
    if not settings.artifact_store:
        return None
    location = artifacts.store_location(settings, "models", name, key)
    artifacts.put_folder(staging, location)
    return location


def start_scoring(
    engine: Engine,
    job_id: str,
    attempt: int,
    spec: ScoreSpec,
    folder: str,
    publish_shard: PublishOwnShard,
    lease: Lease,
) -> str:
    """Stage the input as shards, record them, and queue one message per shard."""
    from tuneq.worker.ml.score import check_vocabulary, stage_input

    store.record_progress(engine, job_id=job_id, attempt=attempt, progress={"phase": "staging"})
    artifacts.remove_path(folder)
    staged = stage_input(spec, folder)
    lease.check()
    warning = check_vocabulary(spec, folder)
    if warning:
        store.add_event(engine, job_id=job_id, attempt=attempt, kind="warning", message=warning)
    choice = gated_precision(engine, spec, folder)
    log.info("job %s: %s", job_id, choice.reason)
    store.add_event(engine, job_id=job_id, attempt=attempt, kind="precision", message=choice.reason)
    lease.check()
    if not store.create_shards(engine, job_id=job_id, attempt=attempt, sizes=staged.shard_sizes):
        artifacts.remove_path(folder)
        return "lost"
    queue = store.get_job(engine, job_id).queue
    for index in range(len(staged.shard_sizes)):
        publish_shard(index, queue, spec.priority)
    return "running"


def gated_precision(
    engine: Engine, spec: ScoreSpec, folder: str, native: bool | None = None
) -> PrecisionChoice:
    """The precision of a scoring job (:func:`choose_precision`), its parity gate given what
    earlier jobs' gates found for the same weights on this kind of hardware, and what this
    job's found added to that."""
    from tuneq.worker.ml.device import bf16_hardware, native_bf16
    from tuneq.worker.ml.models import weights_digest
    from tuneq.worker.ml.score import choose_precision

    native = native_bf16() if native is None else native
    model = spec.model_path
    if spec.precision != "auto" or not native or model is None or not Path(model).is_dir():
        return choose_precision(spec, folder, native)
    key = {"model_digest": weights_digest(model), "hardware": bf16_hardware()}
    choice = choose_precision(spec, folder, native, store.parity_evidence(engine, **key))
    if choice.sampled:
        store.add_parity_evidence(engine, **key, agreed=choice.agreed, sampled=choice.sampled)
    return choice


def run_shard(settings: Settings, job_id: str, index: int, *, worker: str) -> str | None:
    """Score one shard; the worker that finishes the last shard assembles the output."""
    from tuneq.worker.ml.score import score_shard

    engine = get_engine(settings.database_url)
    fit_threads_to_host()
    shard_attempt = lifecycle.claim_shard(engine, job_id, index, worker=worker)
    if shard_attempt is None:
        log.info("shard %s/%s is not claimable; skipping", job_id, index)
        return None
    job = store.get_job(engine, job_id)
    spec = parse_spec(job.spec)  # read by the claim of its job already
    assert isinstance(spec, ScoreSpec)
    folder = lifecycle.scoring_folder(settings, job_id, job.attempt)
    files = lifecycle.job_files(settings, job)
    lease = Lease(
        lambda: store.renew_shard_lease(engine, job_id=job_id, index=index, attempt=shard_attempt),
        settings.heartbeat_s,
        f"shard {job_id}/{index} attempt {shard_attempt}",
    )
    left: int | None = None
    with lease, failures_recorded(engine, job_id, job.attempt, files):
        spec = artifacts.local_model(settings, confine_spec(settings, spec))
        result = score_shard(spec, folder, index, on_batch=lease.check)
        left = lifecycle.finish_shard(
            engine,
            job_id,
            index,
            shard_attempt,
            empty_rows=result.empty_rows,
            seconds=result.seconds,
        )
        if left is None:  # cancelled while the part was written: it may have made the folder
            lifecycle.stopped(engine, job_id, files)
    if left == 0:
        assembly = Lease(
            lambda: store.renew_job_lease(engine, job_id=job_id, attempt=job.attempt),
            settings.heartbeat_s,
            f"job {job_id} output",
        )
        with assembly, failures_recorded(engine, job_id, job.attempt, files):
            return finish_scoring(settings, engine, job_id, job.attempt, spec, folder, assembly)
    if left is not None:
        return "running"
    return store.get_job(engine, job_id).status


def finish_scoring(
    settings: Settings,
    engine: Engine,
    job_id: str,
    attempt: int,
    spec: ScoreSpec,
    folder: str,
    lease: Lease,
) -> str:
    """Assemble the parts into the output, then mark the job succeeded pointing at it."""
    from tuneq.worker.ml.score import assemble_output, chosen_precision

    shards = store.list_shards(engine, job_id)
    job = store.get_job(engine, job_id)
    store.record_progress(
        engine, job_id=job_id, attempt=attempt, progress=dict(job.progress or {}, phase="writing")
    )
    output = spec.output
    partial = lifecycle.assembly_file(settings, job_id, attempt, output)
    assemble_output(folder, len(shards), output, partial, on_part=lease.check)
    rows = sum(s.row_count for s in shards)
    wall = max(1e-6, (utcnow() - aware(job.started_at or utcnow())).total_seconds())
    metrics = {
        "rows": rows,
        "empty_rows": sum(s.empty_rows for s in shards),
        "shards": len(shards),
        "workers": len({s.worker for s in shards}),
        "precision": chosen_precision(spec, folder),
        "seconds": round(wall, 3),
        "rows_per_second": round(rows / wall, 2),
        "scoring_seconds": round(sum(s.seconds or 0 for s in shards), 3),
    }
    if not lifecycle.succeed_with_output(
        engine,
        job_id,
        attempt,
        output_path=output,
        metrics=metrics,
        cleanup=lifecycle.job_files(settings, job),
    ):
        log.warning("job %s lost its lease before finishing; output left in place", job_id)
        return "lost"
    log.info("job %s succeeded: %d rows scored into %s", job_id, rows, output)
    return "succeeded"
