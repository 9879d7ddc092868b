"""The job runner: the one place where a job's state changes.

``run_job`` claims a job, runs its work, and records the outcome. It is safe to call twice for
the same job: a delivery that cannot claim the job returns without touching anything.
"""

from __future__ import annotations

import logging
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from tuneq.schemas.errors import TuneqError
from tuneq.schemas.settings import Settings
from tuneq.schemas.specs import FinetuneSpec, parse_spec
from tuneq.worker import store
from tuneq.worker.db import get_engine

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0


class ProgressRecorder:
    """Writes a running job's progress to its row at most once a second (plus the last one)."""

    def __init__(self, engine: Engine, job_id: str, attempt: int) -> None:
        self.engine, self.job_id, self.attempt = engine, job_id, attempt
        self.last_write = 0.0
        self.latest: dict[str, Any] = {}

    def __call__(self, progress: dict[str, Any]) -> None:
        self.latest = progress
        now = time.monotonic()
        final_step = progress.get("step") is not None and progress.get("step") == progress.get(
            "total"
        )
        if now - self.last_write >= PROGRESS_INTERVAL_S or "step" not in progress or final_step:
            self.last_write = now
            store.record_progress(
                self.engine, job_id=self.job_id, attempt=self.attempt, progress=progress
            )


def run_job(settings: Settings, job_id: str, *, worker: str) -> str | None:
    """Claim job ``job_id`` and run it to an end state; returns that state, or ``None`` when
    another delivery owns the job."""
    engine = get_engine(settings.database_url)
    attempt = store.claim_job(engine, job_id=job_id, worker=worker)
    if attempt is None:
        log.info("job %s is not claimable (already taken or finished); skipping", job_id)
        return None
    job = store.get_job(engine, job_id)
    staging = settings.artifact_dir / "staging" / f"{job_id}-{attempt}"
    try:
        spec = parse_spec(job.spec)
        assert isinstance(spec, FinetuneSpec)
        return run_finetune(settings, engine, job_id, attempt, spec, staging)
    except TuneqError as exc:
        log.warning("job %s failed: %s", job_id, exc)
        store.mark_failed(engine, job_id=job_id, attempt=attempt, error=str(exc))
        return "failed"
    except Exception as exc:
        log.exception("job %s crashed", job_id)
        store.mark_failed(
            engine,
            job_id=job_id,
            attempt=attempt,
            error=f"internal error: {type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
        )
        return "failed"
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_finetune(
    settings: Settings,
    engine: Engine,
    job_id: str,
    attempt: int,
    spec: FinetuneSpec,
    staging: Path,
) -> str:
    from tuneq.worker.finetune import finetune  # torch and transformers load only here

    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    recorder = ProgressRecorder(engine, job_id, attempt)
    result = finetune(spec, staging, on_progress=recorder)
    summary = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.phases.items())
    store.add_event(engine, job_id=job_id, attempt=attempt, kind="phases", message=summary)
    metrics = dict(result.metrics, phases=result.phases)
    model = store.register_model(
        engine,
        job_id=job_id,
        attempt=attempt,
        staged_dir=staging,
        models_dir=settings.artifact_dir / "models",
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
        return "lost"
    log.info("job %s succeeded: %s:%s at %s", job_id, model.name, model.version, model.path)
    return "succeeded"
