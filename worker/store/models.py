"""The model registry: registering a staged model as the next version, lookups, tags, and where a
model reference lives.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tuneq.schemas.errors import ModelError, ModelNotFound
from tuneq.schemas.statuses import JobStatus
from tuneq.schemas.tables import Job, JobEvent, Model, ModelTag, utcnow
from tuneq.worker.io.artifacts import exists, fetch_folder, is_uri, join
from tuneq.worker.store.jobs import _running


def register_model(
    engine: Engine,
    *,
    job_id: str,
    attempt: int,
    staged_dir: Path,
    models_dir: Path,
    model: dict[str, Any],
    metrics: dict[str, Any],
    stored_at: str | None = None,
) -> Model | None:
    """Move ``staged_dir`` into place as the next version of ``model['name']``, register it,
    and mark the job succeeded, all in one transaction. A model already uploaded to an
    artifact store is registered at ``stored_at`` instead, and nothing is moved.

    Returns ``None`` (and deletes ``staged_dir``) if the job's lease was lost.
    """
    for _ in range(5):
        try:
            return _register_once(
                engine,
                job_id=job_id,
                attempt=attempt,
                staged_dir=staged_dir,
                models_dir=models_dir,
                model=model,
                metrics=metrics,
                stored_at=stored_at,
            )
        except IntegrityError:
            continue  # another job took the same version at the same moment: take the next
    raise RuntimeError(f"could not allocate a version for model {model['name']!r}")


def _register_once(
    engine: Engine,
    *,
    job_id: str,
    attempt: int,
    staged_dir: Path,
    models_dir: Path,
    model: dict[str, Any],
    metrics: dict[str, Any],
    stored_at: str | None = None,
) -> Model | None:
    final_dir: Path | None = None
    try:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            still_ours = session.execute(
                select(Job.id).where(*_running(job_id, attempt)).with_for_update()
            ).first()
            if still_ours is None:
                shutil.rmtree(staged_dir, ignore_errors=True)
                return None
            latest = session.scalar(
                select(func.max(Model.version)).where(Model.name == model["name"])
            )
            version = (latest or 0) + 1
            if stored_at is None:
                final_dir = models_dir / model["name"] / str(version)
                final_dir.parent.mkdir(parents=True, exist_ok=True)
                staged_dir.rename(final_dir)
            row = Model(
                version=version,
                path=stored_at or str(final_dir),
                job_id=job_id,
                metrics=metrics,
                created_at=utcnow(),
                **model,
            )
            session.add(row)
            session.flush()
            now = utcnow()
            session.execute(
                update(Job)
                .where(*_running(job_id, attempt))
                .values(
                    status=JobStatus.succeeded.value,
                    finished_at=now,
                    metrics=metrics,
                    model_id=row.id,
                )
            )
            session.add(
                JobEvent(
                    job_id=job_id,
                    attempt=attempt,
                    kind="succeeded",
                    message=f"registered {row.name}:{row.version}",
                )
            )
        return row
    except BaseException:
        if final_dir is not None and final_dir.exists() and not staged_dir.exists():
            final_dir.rename(staged_dir)  # the row was not written: the folder is not a model
        raise


def list_models(
    engine: Engine, *, name: str | None = None, limit: int | None = None
) -> list[Model]:
    """Every model (or every version of ``name``) by name, newest version first."""
    query = select(Model).order_by(Model.name, Model.version.desc()).limit(limit)
    if name:
        query = query.where(Model.name == name)
    with Session(engine) as session:
        return list(session.scalars(query))


def find_model(engine: Engine, ref: str) -> Model:
    """The registered model ``name`` (its latest version), ``name:version`` or ``name@tag``."""
    if "@" in ref:
        name, _, tag = ref.partition("@")
        with Session(engine) as session:
            tagged = session.get(ModelTag, (name, tag))
        if tagged is None:
            raise ModelNotFound(
                f"model {name!r} has no tag {tag!r}; set one with "
                f"`tuneq models tag {name}:VERSION {tag}`"
            )
        ref = f"{name}:{tagged.version}"
    name, _, version = ref.partition(":")
    query = select(Model).where(Model.name == name)
    if version:
        if not version.isdigit():
            raise ModelNotFound(f"{ref!r}: a version is a number, like {name}:2")
        query = query.where(Model.version == int(version))
    with Session(engine) as session:
        row = session.scalars(query.order_by(Model.version.desc()).limit(1)).first()
    if row is None:
        raise ModelNotFound(
            f"no registered model {ref!r}; `tuneq models` lists them, or pass a model folder"
        )
    return row


def tag_model(engine: Engine, *, ref: str, tag: str) -> Model:
    """Point ``name@tag`` at the model ``ref`` (a tag moves if it pointed elsewhere)."""
    model = find_model(engine, ref)
    with Session(engine) as session, session.begin():
        session.merge(ModelTag(name=model.name, tag=tag, version=model.version, tagged_at=utcnow()))
    return model


def model_tags(engine: Engine) -> dict[tuple[str, int], list[str]]:
    """Tags by (model name, version)."""
    with Session(engine) as session:
        rows = session.scalars(select(ModelTag).order_by(ModelTag.tag)).all()
    tags: dict[tuple[str, int], list[str]] = {}
    for row in rows:
        tags.setdefault((row.name, row.version), []).append(row.tag)
    return tags


def job_model(engine: Engine, job: Job) -> Model | None:
    if job.model_id is None:
        return None
    with Session(engine) as session:
        return session.get(Model, job.model_id)


def model_location(engine: Engine, ref: str) -> str:
    """Where ``ref`` lives: a registered ``name``, ``name:version`` or ``name@tag``, a model
    folder, or a model's URI in the artifact store; checked to be there.

    A bare name is looked up in the registry first; a ref with a slash or a leading dot is a
    folder.
    """
    if is_uri(ref):
        return stored_model(ref, ref)
    path = Path(ref).expanduser()
    looks_like_path = "/" in ref or os.sep in ref or ref.startswith((".", "~"))
    if looks_like_path or (path.is_dir() and not has_model(engine, ref)):
        if not path.is_dir():
            raise ModelError(f"model folder {ref} does not exist")
        if not (path / "config.json").is_file():
            raise ModelError(f"{ref} is not a model folder: it has no config.json")
        return str(path.resolve())
    registered = find_model(engine, ref).path
    if is_uri(registered):
        return stored_model(ref, registered)
    if not Path(registered).is_dir():
        raise ModelError(f"model {ref!r} is registered at {registered}, but that folder is missing")
    return registered


def stored_model(ref: str, uri: str) -> str:
    if not exists(join(uri, "config.json")):
        raise ModelError(f"model {ref!r} is not in the artifact store at {uri}")
    return uri


def model_folder(engine: Engine, ref: str, *, cache: Path) -> Path:
    """A local folder that holds ``ref`` (see :func:`model_location`); a model in the artifact
    store is fetched into ``cache`` the first time."""
    return fetch_folder(model_location(engine, ref), cache)


def has_model(engine: Engine, ref: str) -> bool:
    try:
        find_model(engine, ref)
    except ModelError:
        return False
    return True
