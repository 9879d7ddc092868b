"""Reports from job rows (real SQLite or PostgreSQL): failures, escaping, missing plots, and a
model in the artifact store, without running a worker."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from sqlalchemy import Engine, update

from tuneq.schemas.errors import JobNotFound
from tuneq.schemas.specs import FinetuneSpec
from tuneq.schemas.tables import Model
from tuneq.worker import store
from tuneq.worker.io.artifacts import put_folder
from tuneq.worker.ml.plots import write_plots
from tuneq.worker.store.db import get_engine
from tuneq.worker.views.report import build_report
from tuneq.worker.views.sweep import compare_rows

LABELS = ["<neg>", "pos & more"]


@pytest.fixture
def engine(database_url: str) -> Engine:
    return get_engine(database_url)


def finished_job(
    engine: Engine, tmp_path: Path, group: str, lr: float | None, accuracy: float,
    chosen_lr: float | None = None, attention_dropout: float | None = 0.0,
) -> str:  # fmt: skip
    """A fine-tune that succeeded, with a model folder holding its plots; with ``lr`` None, the
    run chose ``chosen_lr``; it trained with ``attention_dropout`` (None: the model had none)."""
    spec = FinetuneSpec(data="/d/reviews.csv", learning_rate=lr, queue="cpu", name="m")
    job = store.create_job(engine, spec=spec, group_id=group)
    assert store.claim_job(engine, job_id=job.id, worker="host:1/2") == (1, "queued")
    attempt = 1
    metrics = {
        "accuracy": accuracy,
        "macro_f1": accuracy,
        "eval_loss": 0.5,
        "per_class": {
            name: {"precision": 1, "recall": 1, "f1": 1, "support": 3} for name in LABELS
        },
        "confusion_matrix": [[3, 0], [1, 2]],
        "loss_curve": [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}],
        "eval_curve": [{"step": 2, "loss": 0.5}],
        "data": {"train_rows": 6, "eval_rows": 6, "train_label_counts": dict.fromkeys(LABELS, 3)},
        "training": {"learning_rate": lr or chosen_lr, "attention_dropout": attention_dropout},
    }
    staged = tmp_path / f"staged-{job.id}"
    staged.mkdir()
    metrics["plots"] = write_plots(staged, metrics, LABELS)
    model = store.register_model(
        engine,
        job_id=job.id,
        attempt=attempt,
        staged_dir=staged,
        models_dir=tmp_path / "models",
        model={"name": "m", "base_model": "minilm", "labels": LABELS, "data_fingerprint": "f"},
        metrics=metrics,
    )
    assert model is not None
    return job.id


def test_a_group_report_shows_failures_escapes_text_and_embeds_plots(
    engine: Engine, tmp_path: Path
) -> None:
    best = finished_job(engine, tmp_path, "g-1", 1e-4, 0.9)
    worse = finished_job(engine, tmp_path, "g-1", 5e-5, 0.7)
    failed = store.create_job(
        engine, spec=FinetuneSpec(data="/d/x.csv", queue="cpu", learning_rate=1e-3), group_id="g-1"
    )
    assert store.claim_job(engine, job_id=failed.id, worker="host:1/2") == (1, "queued")
    store.mark_failed(engine, job_id=failed.id, attempt=1, error="<script>x</script> bad")

    page = build_report(engine, "g-1")
    order = [page.index(f"<h2 id='{job_id}'>") for job_id in (best, worse, failed.id)]
    assert order == sorted(order), "best first, the failed job last"
    assert "&lt;script&gt;x&lt;/script&gt; bad" in page and "<script>" not in page
    assert "&lt;neg&gt;" in page and "pos &amp; more" in page
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 4 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert "<tr class='best'><td><a href='#" + best in page


def test_a_missing_plot_is_said_and_a_stored_model_is_read(engine: Engine, tmp_path: Path):
    job_id = finished_job(engine, tmp_path, "g-2", 1e-4, 0.9)
    model = store.job_model(engine, store.get_job(engine, job_id))
    assert model is not None
    (Path(model.path) / "confusion.png").unlink()
    page = build_report(engine, job_id)
    assert f"confusion.png is missing from {model.path}" in page
    assert len(re.findall("data:image/png", page)) == 1

    stored = f"file://{tmp_path}/store/models/m/{job_id}-1"  # as TUNEQ_ARTIFACT_STORE keeps it
    put_folder(Path(model.path), stored)
    with engine.begin() as conn:
        conn.execute(update(Model).where(Model.id == model.id).values(path=stored))
    assert len(re.findall("data:image/png", build_report(engine, job_id))) == 1


def test_an_unknown_target_says_where_to_look(engine: Engine) -> None:
    with pytest.raises(JobNotFound, match="no job or group 'nope'; `tuneq jobs` lists jobs"):
        build_report(engine, "nope")


def test_a_default_learning_rate_shows_as_the_one_the_run_chose(engine: Engine, tmp_path: Path):
    small = finished_job(engine, tmp_path, "g-3", None, 0.9, chosen_lr=1e-4)
    large = finished_job(engine, tmp_path, "g-3", None, 0.8, chosen_lr=5e-5)
    waiting = store.create_job(
        engine, spec=FinetuneSpec(data="/d/x.csv", queue="cpu"), group_id="g-3"
    )

    rates = {row["job"]: row["learning_rate"] for row in compare_rows(engine, "g-3")}
    assert rates == {small: 1e-4, large: 5e-5, waiting.id: "auto"}, "auto: not run yet"
    settings = build_report(engine, large).split("<h3>Settings</h3>")[1].split("</table>")[0]
    assert "<tr><th>learning_rate</th><td class='num'>5e-05</td></tr>" in settings
    settings = build_report(engine, waiting.id).split("<h3>Settings</h3>")[1].split("</table>")[0]
    assert "<tr><th>learning_rate</th><td>auto</td></tr>" in settings


def test_default_attention_dropout_shows_as_what_the_run_used(engine: Engine, tmp_path: Path):
    off = finished_job(engine, tmp_path, "g-4", 1e-4, 0.9)
    own = finished_job(engine, tmp_path, "g-4", 1e-4, 0.8, attention_dropout=None)
    waiting = store.create_job(
        engine, spec=FinetuneSpec(data="/d/x.csv", queue="cpu"), group_id="g-4"
    )
    shown = {row["job"]: row["attention_dropout"] for row in compare_rows(engine, "g-4")}
    assert shown == {off: 0.0, own: "model's", waiting.id: "auto"}
    settings = build_report(engine, off).split("<h3>Settings</h3>")[1].split("</table>")[0]
    assert "<tr><th>attention_dropout</th><td class='num'>0</td></tr>" in settings
