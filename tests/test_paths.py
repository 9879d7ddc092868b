"""Job paths confined to the worker's allowed roots: links followed, '..' refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tuneq.schemas.errors import PathRefused
from tuneq.schemas.settings import load_settings
from tuneq.schemas.specs import FinetuneSpec, ScoreSpec
from tuneq.worker.jobs.paths import confine_spec, confined


def test_roots_default_to_the_data_dir_and_the_working_directory(tmp_path: Path) -> None:
    settings = load_settings({"TUNEQ_DATA_DIR": str(tmp_path / "data")})
    assert settings.allowed_roots == (tmp_path / "data", Path(os.path.realpath(Path.cwd())))


def test_roots_come_from_the_environment_and_are_resolved(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    roots = f"{tmp_path / 'alias'}{os.pathsep}{tmp_path / 'other'}"
    settings = load_settings({"TUNEQ_DATA_DIR": str(tmp_path), "TUNEQ_ALLOWED_ROOTS": roots})
    assert settings.allowed_roots == (tmp_path / "real", tmp_path / "other")


def test_paths_inside_a_root_resolve_to_their_real_location(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "reviews.csv").write_text("text\nok\n")
    (tmp_path / "shortcut.csv").symlink_to(tmp_path / "data" / "reviews.csv")
    roots = [tmp_path]
    assert confined(str(tmp_path / "shortcut.csv"), roots, what="data") == str(
        tmp_path / "data" / "reviews.csv"
    )
    assert confined(str(tmp_path / "new" / "out.csv"), roots, what="output") == str(
        tmp_path / "new" / "out.csv"
    )


ADVICE = "to allow it, add its folder to TUNEQ_ALLOWED_ROOTS where the worker runs"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/etc/passwd", "data /etc/passwd is outside the folders this worker may use ({root}); "),
        (
            "{root}/../escape.csv",
            "data {root}/../escape.csv contains '..'; give the path without it",
        ),
        ("reviews.csv", "data reviews.csv is relative; the worker needs an absolute path"),
        (
            "{root}/link/passwd",
            "data {root}/link/passwd (a link to /etc/passwd) is outside the folders this worker "
            "may use ({root}); ",
        ),
    ],
)
def test_paths_that_leave_the_roots_are_refused(tmp_path: Path, path: str, message: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to("/etc")
    with pytest.raises(PathRefused) as caught:
        confined(path.format(root=root), [root], what="data")
    expected = message.format(root=root)
    assert str(caught.value) == (expected + ADVICE if expected.endswith("; ") else expected)


def test_specs_are_checked_field_by_field(tmp_path: Path) -> None:
    settings = load_settings(
        {"TUNEQ_DATA_DIR": str(tmp_path / "data"), "TUNEQ_ALLOWED_ROOTS": str(tmp_path / "jobs")}
    )
    (tmp_path / "jobs").mkdir()
    registered = settings.artifact_dir / "models" / "m" / "1"
    score = ScoreSpec(
        model="m",
        model_path=str(registered),
        input=str(tmp_path / "jobs" / "in.csv"),
        output=str(tmp_path / "jobs" / "out.csv"),
    )
    assert confine_spec(settings, score) == score  # registered models live in artifact_dir
    hub = FinetuneSpec(data="imdb", model="bert-base-uncased")
    assert confine_spec(settings, hub) == hub.model_copy(update={"name": "imdb-classifier"})
    with pytest.raises(PathRefused, match="^eval data /srv/eval.csv is outside"):
        confine_spec(settings, FinetuneSpec(data="imdb", eval_data="/srv/eval.csv"))
    with pytest.raises(PathRefused, match="^model /opt/models/bert is outside"):
        confine_spec(settings, FinetuneSpec(data="imdb", model="/opt/models/bert"))
    with pytest.raises(PathRefused, match=f"^output {tmp_path}/out.csv is outside"):
        confine_spec(settings, score.model_copy(update={"output": str(tmp_path / "out.csv")}))


def test_a_model_is_named_after_the_data_as_given_not_its_real_path(tmp_path: Path) -> None:
    (tmp_path / "2026-11-reviews.csv").write_text("text,label\n")
    (tmp_path / "reviews.csv").symlink_to(tmp_path / "2026-11-reviews.csv")
    settings = load_settings(
        {"TUNEQ_DATA_DIR": str(tmp_path), "TUNEQ_ALLOWED_ROOTS": str(tmp_path)}
    )
    spec = confine_spec(settings, FinetuneSpec(data=str(tmp_path / "reviews.csv")))
    assert spec.data == str(tmp_path / "2026-11-reviews.csv")
    assert spec.model_name() == "reviews-classifier"
