"""Confining a job's paths: data, models and outputs only inside the worker's allowed roots.

A spec arrives from whoever can reach the queue. Before a job touches a file, each path it
names is resolved (symlinks followed, ``..`` refused) and must lie inside one of
``TUNEQ_ALLOWED_ROOTS``; the job then uses the resolved path, so a link swapped in afterwards
does not move it. A URI (a model or an output in the artifact store) must lie inside
``TUNEQ_ARTIFACT_STORE``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from tuneq.schemas.errors import PathRefused
from tuneq.schemas.settings import Settings
from tuneq.schemas.specs import FinetuneSpec, ScoreSpec
from tuneq.worker.io.artifacts import is_uri
from tuneq.worker.ml.data import is_local
from tuneq.worker.ml.models import is_model_path


def confined(path: str, roots: Sequence[Path], *, what: str) -> str:
    """The real location of ``path``, if it lies inside one of ``roots``."""
    given = Path(path).expanduser()
    if ".." in given.parts:
        raise PathRefused(f"{what} {path} contains '..'; give the path without it")
    if not given.is_absolute():
        raise PathRefused(f"{what} {path} is relative; the worker needs an absolute path")
    real = Path(os.path.realpath(given))
    if any(real == root or real.is_relative_to(root) for root in roots):
        return str(real)
    via = f" (a link to {real})" if real != given else ""
    allowed = os.pathsep.join(str(root) for root in roots)
    raise PathRefused(
        f"{what} {path}{via} is outside the folders this worker may use ({allowed}); "
        "to allow it, add its folder to TUNEQ_ALLOWED_ROOTS where the worker runs"
    )


def confined_uri(uri: str, store: str, *, what: str) -> str:
    """``uri``, if it lies inside the artifact store ``store``."""
    if ".." in uri.split("/"):
        raise PathRefused(f"{what} {uri} contains '..'; give the URI without it")
    if store and uri.startswith(store + "/"):
        return uri
    where = f"the artifact store this worker uses ({store})" if store else "any artifact store"
    raise PathRefused(
        f"{what} {uri} is outside {where}; a job may name URIs only inside "
        "TUNEQ_ARTIFACT_STORE, which every worker and client should set alike"
    )


def confined_location(path: str, roots: Sequence[Path], store: str, *, what: str) -> str:
    """``path`` confined to ``roots``, or a URI confined to the artifact store."""
    if is_uri(path):
        return confined_uri(path, store, what=what)
    return confined(path, roots, what=what)


Spec = TypeVar("Spec", FinetuneSpec, ScoreSpec)


def confine_spec(settings: Settings, spec: Spec) -> Spec:
    """``spec`` with every local path resolved and checked against the allowed roots.

    Models may also come from the registry (``artifact_dir``, or the artifact store, as may an
    output); Hub names are left alone.
    """
    roots: tuple[Path, ...] = settings.allowed_roots
    model_roots = (*roots, settings.artifact_dir)
    store = settings.artifact_store
    if isinstance(spec, ScoreSpec):
        update = {
            "input": confined(spec.input, roots, what="input"),
            "output": confined_location(spec.output, roots, store, what="output"),
        }
        if spec.model_path:
            update["model_path"] = confined_location(
                spec.model_path, model_roots, store, what="model"
            )
        return spec.model_copy(update=update)
    changes = {"name": spec.model_name()}  # named after the data as given, not its real path
    if is_local(spec.data):
        changes["data"] = confined(spec.data, roots, what="data")
    if spec.eval_data and is_local(spec.eval_data):
        changes["eval_data"] = confined(spec.eval_data, roots, what="eval data")
    if is_uri(spec.model):
        changes["model"] = confined_uri(spec.model, store, what="model")
    elif is_model_path(spec.model):
        changes["model"] = confined(spec.model, model_roots, what="model")
    return spec.model_copy(update=changes)
