"""Click options generated from a pydantic spec, so that field docs are the ``--help``."""

from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ValidationError


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _click_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _click_type(args[0])
    if origin is typing.Annotated:
        return _click_type(args[0])
    if origin is typing.Literal:
        return click.Choice([str(choice) for choice in typing.get_args(annotation)])
    if annotation in (int, float, str):
        return annotation
    return str  # lists arrive comma-separated; the rest as text


def spec_options(
    spec_class: type[BaseModel], *, exclude: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one ``--option`` per field of ``spec_class``; unset options stay ``None``."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        for name, field in reversed(spec_class.model_fields.items()):
            if name in exclude:
                continue
            # A None default is described in the field's own help ("default: ...").
            shown = not field.is_required() and field.default is not None
            default = f" [default: {field.default}]" if shown else ""
            help_text = (field.description or "") + default
            if field.annotation is bool:
                flag = option_name(name)
                declaration = f"{flag}/--no-{flag[2:]}"
                option = click.option(declaration, name, default=None, help=help_text)
            else:
                option = click.option(
                    option_name(name),
                    name,
                    type=_click_type(field.annotation),
                    default=None,
                    help=help_text,
                )
            function = option(function)
        return function

    return decorate


def read_job_file(path: Path) -> dict[str, Any]:
    """A job file: YAML (``.yaml``/``.yml``) or JSON, holding one mapping of spec fields."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise click.BadParameter(f"{path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of spec fields, like data: x.csv")
    return data


def absolute_paths(values: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Make the local paths among ``values[key]`` absolute (not resolved: the worker checks
    where links lead), so that a worker started in another folder finds them."""
    from tuneq.worker.io.artifacts import is_uri
    from tuneq.worker.ml.data import is_local
    from tuneq.worker.ml.models import is_model_path

    for key in keys:
        value = values.get(key)
        if not isinstance(value, str) or is_uri(value):
            continue  # a URI (in the artifact store) names the same place everywhere
        if is_local(value) or is_model_path(value):
            values[key] = os.path.abspath(os.path.expanduser(value))


def build_spec(spec_class: type[BaseModel], values: dict[str, Any]) -> Any:
    """Validate ``values`` as ``spec_class``; errors name the option to change (exit code 2)."""
    list_fields = {
        name for name, field in spec_class.model_fields.items() if "list" in str(field.annotation)
    }
    for name in list_fields:
        if isinstance(values.get(name), str):
            values[name] = [part.strip() for part in values[name].split(",") if part.strip()]
    try:
        return spec_class.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = error["loc"][0] if error["loc"] else None
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "missing":
                message = "is required"
            elif error["type"] == "extra_forbidden":
                message = "is not a spec field"
            # A field's problem names its option; one between fields says which ones itself.
            problems.append(f"{option_name(str(location))} {message}" if location else message)
        raise click.UsageError("; ".join(problems)) from None
