"""Sweeps: one file, many fine-tunes. A base spec, a grid of values and a list of data sets
expand into one job per combination, in one group."""

from __future__ import annotations

import itertools
import re
import uuid
from dataclasses import dataclass
from typing import Any

from tuneq.schemas.errors import ConfigError
from tuneq.schemas.specs import FinetuneSpec

SWEEP_KEYS = ("name", "base", "grid", "data")


@dataclass(frozen=True)
class Sweep:
    group_id: str
    runs: list[dict[str, Any]]  # spec fields, one mapping per job


def expand(document: dict[str, Any], default_name: str) -> Sweep:
    """The jobs of a sweep file: every combination of ``grid`` values (and of ``data``, when
    it lists several data sets) on top of ``base``. Raises ``ConfigError`` on a bad file."""
    unknown = sorted(set(document) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep keys {unknown}; a sweep has {', '.join(SWEEP_KEYS)}")
    base = dict(document.get("base") or {})
    grid = dict(document.get("grid") or {})
    data = document.get("data")
    fields = set(FinetuneSpec.model_fields)
    for key in [*base, *grid]:
        if key not in fields:
            raise ConfigError(f"{key!r} is not a fine-tune field (see `tuneq finetune --help`)")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key} must be a non-empty list of values")
    if data is not None:
        if isinstance(data, str):
            data = [data]
        grid["data"] = list(data)
    if not grid:
        raise ConfigError("a sweep needs a grid (lists of values) or a list of data sets")
    names = list(grid)
    runs = [
        dict(base, **dict(zip(names, values, strict=True)))
        for values in itertools.product(*grid.values())
    ]
    stem = re.sub(r"[^a-z0-9-]+", "-", str(document.get("name") or default_name).lower()).strip("-")
    return Sweep(group_id=f"{stem or 'sweep'}-{uuid.uuid4().hex[:6]}", runs=runs)


def varied_fields(specs: list[dict[str, Any]]) -> list[str]:
    """The spec fields whose values differ between ``specs``, in field order."""
    order = list(FinetuneSpec.model_fields)
    keys = {key for spec in specs for key in spec}
    return [
        key for key in order if key in keys and len({repr(spec.get(key)) for spec in specs}) > 1
    ]
