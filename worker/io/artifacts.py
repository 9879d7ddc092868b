"""Where artifacts live: the local artifact folder, or a store named by an fsspec URI.

With ``TUNEQ_ARTIFACT_STORE`` unset, models and scoring work live in ``TUNEQ_ARTIFACT_DIR``
(a shared folder when workers run on several machines). With it set (``s3://bucket/prefix``,
``gs://…``, ``file:///…``), they live in that store, and each machine keeps only a cache of the
models it loaded, under ``artifact_dir/cache``. Staging, checkpoints and that cache stay local.

A *location* is a string: a local path or a ``protocol://`` URI. Every function here takes
either, so the code that stages, scores and registers does not care which it has.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, TypeVar

from tuneq.schemas.errors import ModelError
from tuneq.schemas.settings import Settings
from tuneq.schemas.specs import FinetuneSpec, ScoreSpec

log = logging.getLogger(__name__)

Location = str | os.PathLike[str]
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: Location) -> bool:
    """Whether ``location`` is a ``protocol://`` URI rather than a local path."""
    return bool(URI.match(str(location)))


def join(location: Location, *keys: str) -> str:
    """``location`` with ``keys`` appended, as a path or with ``/`` for a URI."""
    if is_uri(location):
        return "/".join((str(location).rstrip("/"), *keys))
    return os.path.join(location, *keys)


def store_location(settings: Settings, *keys: str) -> str:
    """Where ``keys`` (``models/NAME/…``, ``scoring/JOB``) live: in the artifact store when
    one is set, else in the artifact folder."""
    return join(settings.artifact_store or settings.artifact_dir, *keys)


def cache_folder(settings: Settings) -> Path:
    """This machine's copies of stored models."""
    return settings.artifact_dir / "cache"


def filesystem(location: Location) -> tuple[Any, str]:
    """The fsspec filesystem of ``location`` and the path within it."""
    from fsspec.core import url_to_fs

    return url_to_fs(str(location))


@contextmanager
def open_artifact(location: Location, mode: str = "rb") -> Iterator[IO[bytes]]:
    """The file at ``location``, a path or a URI, opened in ``mode`` (its folder made first
    when writing). A missing file raises ``FileNotFoundError``."""
    fs, path = filesystem(location)
    if "r" not in mode:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, mode) as handle:
        yield handle


@contextmanager
def writing(location: Location) -> Iterator[IO[bytes]]:
    """A file to write that appears at ``location`` whole when the block ends, or not at all:
    it is written under a temporary name beside it, then moved (a rename on a file system, a
    copy within the store on an object store)."""
    fs, path = filesystem(location)
    partial = partial_path(path)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    try:
        with fs.open(partial, "wb") as handle:
            yield handle
        fs.mv(partial, path)
    except BaseException:
        remove_quietly(fs, partial)
        raise


def partial_path(path: str) -> str:
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.partial")


def remove_quietly(fs: Any, path: str) -> None:
    with suppress(FileNotFoundError):
        fs.rm(path)


def put_file(local: Path, location: Location) -> None:
    """Upload the file ``local`` to ``location``, where it appears whole or not at all."""
    with open(local, "rb") as source, writing(location) as target:
        shutil.copyfileobj(source, target, length=8 << 20)


def put_folder(local: Path, location: Location) -> None:
    """Upload every file under ``local`` to ``location``, replacing whatever a failed attempt
    left there. Not atomic on an object store: whoever records the location does it after this
    returns, so nothing names a half-uploaded folder."""
    remove_path(location)
    fs, root = filesystem(location)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        target = posixpath.join(root, file.relative_to(local).as_posix())
        fs.makedirs(posixpath.dirname(target), exist_ok=True)
        fs.put_file(str(file), target)
    log.info("uploaded %s to %s", local, location)


def fetch_folder(location: Location, cache: Path) -> Path:
    """A local copy of the stored folder ``location``, downloaded once per machine into
    ``cache``, keyed by the URI (stored models never change). A local path is returned as is.

    The download goes to a temporary folder that is renamed into place, so a copy in the cache
    is always whole, and two processes fetching at once both end up with the same one.
    """
    if not is_uri(location):
        return Path(location)
    uri = str(location).rstrip("/")
    final = cache / hashlib.sha256(uri.encode()).hexdigest()[:20]
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
    try:
        download(uri, temp)
        try:
            temp.rename(final)
        except OSError:
            if not final.is_dir():
                raise  # not another process's copy that landed first
        log.info("fetched %s into %s", uri, final)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return final


def download(uri: str, folder: Path) -> None:
    fs, root = filesystem(uri)
    files = fs.find(root)
    if not files:
        raise FileNotFoundError(f"{uri} holds no files")
    for remote in files:
        target = folder / posixpath.relpath(remote, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(target))


def exists(location: Location) -> bool:
    fs, path = filesystem(location)
    return bool(fs.exists(path))


def list_folder(location: Location) -> list[str]:
    """The entries of the folder ``location`` (as locations), or none if it is not there."""
    if not is_uri(location):
        folder = Path(location)
        return [str(path) for path in folder.iterdir()] if folder.is_dir() else []
    fs, path = filesystem(location)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    scheme = str(location).split("://", 1)[0]
    return [f"{scheme}://{entry.lstrip('/') if scheme != 'file' else entry}" for entry in entries]


def remove_path(location: Location) -> None:
    """Delete the file or folder ``location`` (with everything in it), if it is there."""
    if not is_uri(location):
        if Path(location).is_dir():
            shutil.rmtree(location, ignore_errors=True)
        else:
            Path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    with suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


Spec = TypeVar("Spec", FinetuneSpec, ScoreSpec)


def local_model(settings: Settings, spec: Spec) -> Spec:
    """``spec`` with a model that lives in the artifact store replaced by this machine's cached
    copy of it (fetched on first use)."""
    if isinstance(spec, ScoreSpec):
        if spec.model_path and is_uri(spec.model_path):
            return spec.model_copy(update={"model_path": fetch_model(settings, spec.model_path)})
        return spec
    if is_uri(spec.model):
        return spec.model_copy(update={"model": fetch_model(settings, spec.model)})
    return spec


def fetch_model(settings: Settings, uri: str) -> str:
    try:
        folder = fetch_folder(uri, cache_folder(settings))
    except FileNotFoundError:
        raise ModelError(f"model {uri} is not in the artifact store (or it is empty)") from None
    if not (folder / "config.json").is_file():
        raise ModelError(f"{uri} is not a model folder: it has no config.json")
    return str(folder)
