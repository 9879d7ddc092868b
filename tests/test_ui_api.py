"""The dashboard's JSON API, ``/metrics`` and its guard, through Starlette's test client on a
real database (SQLite, or PostgreSQL when the suite runs on it); jobs are made with the store's
own functions, as workers would."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update
from starlette.testclient import TestClient

from tests.conftest import invoke_cli
from tuneq.schemas.settings import load_settings
from tuneq.schemas.specs import FinetuneSpec, ScoreSpec
from tuneq.schemas.statuses import JobStatus
from tuneq.schemas.tables import Job, JobEvent
from tuneq.ui.app import create_app
from tuneq.worker import store
from tuneq.worker.store.db import get_engine
from tuneq.worker.store.workers import register_worker

TOKEN = "s3cret-token"
EVIL = "<script>alert('x')</script>"


@pytest.fixture
def dashboard(env: dict[str, str]) -> Iterator[TestClient]:
    """The dashboard, reached as ``testserver`` (the test client's host name) and, behind a
    proxy, as ``tuneq.example.com``."""
    settings = load_settings({**env, "TUNEQ_UI_HOSTS": "testserver,tuneq.example.com"})
    with TestClient(create_app(settings, token=TOKEN)) as client:
        yield client


def finetune_spec(name: str = "reviews", queue: str = "cpu") -> FinetuneSpec:
    return FinetuneSpec(data="/data/reviews.csv", model="minilm", name=name, queue=queue)


def succeeded_job(env: dict[str, str], tmp_path: Path, name: str) -> Job:
    """A fine-tune that a worker claimed, trained and registered as model ``name``."""
    engine = get_engine(env["TUNEQ_DATABASE_URL"])
    job = store.create_job(engine, spec=finetune_spec(name))
    attempt, _ = store.claim_job(engine, job_id=job.id, worker="host:1/2") or (0, "")
    staged = tmp_path / f"staged-{job.id}"
    staged.mkdir()
    (staged / "config.json").write_text("{}")
    metrics = {"accuracy": 0.9, "macro_f1": 0.89, "loss_curve": [{"step": 1, "loss": 0.7}]}
    store.register_model(
        engine, job_id=job.id, attempt=attempt, staged_dir=staged,
        models_dir=tmp_path / "models", metrics=metrics,
        model={"name": name, "base_model": "minilm", "labels": ["negative", "positive"],
               "data_fingerprint": "abc"},
    )  # fmt: skip
    return store.get_job(engine, job.id)


def cli_json(env: dict[str, str], *args: str) -> Any:
    result = invoke_cli(env, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_api_serves_the_documents_that_json_prints(
    env: dict[str, str], dashboard: TestClient, tmp_path: Path
) -> None:
    engine = get_engine(env["TUNEQ_DATABASE_URL"])
    done = succeeded_job(env, tmp_path, "reviews")
    waiting = store.create_job(engine, spec=finetune_spec("later"))
    register_worker(engine, name="host:1", hostname="host", queues=["cpu"], device="cpu",
                    concurrency=1, threads=2)  # fmt: skip
    store.tag_model(engine, ref="reviews:1", tag="champion")

    assert dashboard.get("/api/jobs").json() == cli_json(env, "jobs")
    assert dashboard.get(f"/api/jobs/{done.id}").json() == cli_json(env, "show", done.id)
    assert dashboard.get(f"/api/jobs/{waiting.id}").json() == cli_json(env, "show", waiting.id)
    assert dashboard.get("/api/models").json() == cli_json(env, "models", "list")
    assert dashboard.get("/api/workers").json() == cli_json(env, "workers")
    assert dashboard.get("/api/queue").json() == cli_json(env, "queue")

    shown = dashboard.get(f"/api/jobs/{done.id}").json()
    assert shown["model"]["name"] == "reviews" and shown["status"] == "succeeded"
    assert [e["kind"] for e in shown["events"]] == ["queued", "running", "succeeded"]
    assert dashboard.get("/api/models").json()[0]["tags"] == ["champion"]
    assert [e["job"] for e in dashboard.get("/api/queue").json()] == [waiting.id]


def test_jobs_filter_by_status_kind_group_and_model(
    env: dict[str, str], dashboard: TestClient, tmp_path: Path
) -> None:
    engine = get_engine(env["TUNEQ_DATABASE_URL"])
    done = succeeded_job(env, tmp_path, "reviews")
    swept = store.create_jobs(
        engine, specs=[finetune_spec("a"), finetune_spec("b")],
        group=store.new_group(group_id="lr-abc123", size=2, notify=None),
    )  # fmt: skip
    scoring = store.create_job(
        engine,
        spec=ScoreSpec(
            model="reviews:1", input="/data/in.csv", output="/data/out.csv", queue="cpu"
        ),
    )

    def ids(query: str) -> set[str]:
        answer = dashboard.get(f"/api/jobs?{query}")
        assert answer.status_code == 200, answer.text
        return {job["id"] for job in answer.json()}

    assert ids("status=succeeded") == {done.id}
    assert ids("kind=score") == {scoring.id}
    assert ids("group=lr-abc123") == {job.id for job in swept}
    assert ids("model=reviews") == {scoring.id}
    assert ids("model=minilm&status=queued") == {job.id for job in swept}
    assert ids("limit=1") == {scoring.id}
    assert dashboard.get("/api/jobs?status=finished").status_code == 400
    groups = dashboard.get("/api/groups").json()
    assert groups == [
        {"group": "lr-abc123", "size": 2, "created_at": groups[0]["created_at"],
         "statuses": {"queued": 2}}
    ]  # fmt: skip
    group = dashboard.get("/api/groups/lr-abc123").json()
    assert group["compare"] == cli_json(env, "compare", "lr-abc123")
    assert group["varied"] == ["name"]
    assert dashboard.get("/api/groups/nothing").status_code == 404


def metric_samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def labels(**values: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(values.items()))


def test_metrics_follow_the_database(
    env: dict[str, str], dashboard: TestClient, tmp_path: Path
) -> None:
    engine = get_engine(env["TUNEQ_DATABASE_URL"])
    done = [succeeded_job(env, tmp_path, f"run-{i}") for i in range(3)]
    first = store.create_job(engine, spec=finetune_spec("first", queue="gpu"))
    store.create_job(engine, spec=finetune_spec("second", queue="gpu"))
    register_worker(engine, name="host:1", hostname="host", queues=["gpu", "cpu"], device="cuda",
                    concurrency=2, threads=8)  # fmt: skip
    with engine.begin() as conn:  # the fine-tunes took 5, 45 and 4,000 s; `first` waits 100 s
        for job, seconds in zip(done, (5, 45, 4000), strict=True):
            conn.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(started_at=job.finished_at - timedelta(seconds=seconds))
            )
        conn.execute(update(JobEvent).where(JobEvent.job_id == first.id)
                     .values(at=first.created_at - timedelta(seconds=100)))  # fmt: skip

    before = metric_samples(dashboard)
    depth = ("tuneq_queue_waiting_jobs", labels(queue="gpu"))
    oldest = ("tuneq_queue_oldest_waiting_seconds", labels(queue="gpu"))
    assert before[depth] == 2
    assert 100 <= before[oldest] < 200
    assert before[("tuneq_queue_waiting_jobs", labels(queue="cpu"))] == 0  # a worker listens
    jobs = {key: value for (name, key), value in before.items() if name == "tuneq_jobs"}
    in_database: dict[tuple[tuple[str, str], ...], float] = {}
    for job in store.list_jobs(engine, limit=100):
        key = labels(kind=job.kind, queue=job.queue, status=str(job.status))
        in_database[key] = in_database.get(key, 0) + 1
    assert jobs == in_database
    assert before[("tuneq_live_workers", labels(device="cuda", queue="gpu"))] == 2
    assert before[("tuneq_live_workers", labels(device="cuda", queue="cpu"))] == 2
    finished = {"kind": "finetune", "status": "succeeded"}
    buckets = {le: before[("tuneq_job_duration_seconds_bucket", labels(**finished, le=le))]
               for le in ("10.0", "30.0", "60.0", "3600.0", "7200.0", "+Inf")}  # fmt: skip
    assert buckets == {"10.0": 1, "30.0": 1, "60.0": 2, "3600.0": 2, "7200.0": 3, "+Inf": 3}
    assert before[("tuneq_job_duration_seconds_count", labels(**finished))] == 3
    assert before[("tuneq_job_duration_seconds_sum", labels(**finished))] == pytest.approx(
        4050, abs=0.1
    )

    # The longest-waiting job is claimed and trains: one fewer waits, the rest waited less.
    attempt, _ = store.claim_job(engine, job_id=first.id, worker="host:1/2") or (0, "")
    progress = {"phase": "training", "step": 3, "total": 9, "steps_per_s": 2.5}
    store.record_progress(engine, job_id=first.id, attempt=attempt, progress=progress)
    after = metric_samples(dashboard)
    assert after[depth] == 1
    assert 0 <= after[oldest] < 100
    assert after[("tuneq_training_steps_per_second", labels(job=first.id))] == 2.5
    store.claim_job(engine, job_id=store.list_jobs(engine, status="queued")[0].id, worker="w")
    emptied = metric_samples(dashboard)
    assert emptied[depth] == 0 and oldest not in emptied

    # A week-old job retried now waits since its retry, not since it was first queued.
    scoring_spec = ScoreSpec(model="run-0:1", input="/d/in.csv", output="/d/out.csv", queue="gpu")
    scoring = store.create_job(engine, spec=scoring_spec)
    with engine.begin() as conn:
        conn.execute(
            update(JobEvent)
            .where(JobEvent.job_id == scoring.id)
            .values(at=scoring.created_at - timedelta(days=7))
        )
        conn.execute(update(Job).where(Job.id == scoring.id)
                     .values(created_at=scoring.created_at - timedelta(days=7)))  # fmt: skip
    assert metric_samples(dashboard)[oldest] > 6 * 86400
    attempt, _ = store.claim_job(engine, job_id=scoring.id, worker="w") or (0, "")
    rows = {"rows": 400, "total_rows": 1000, "rows_per_s": 40.0}
    store.record_progress(engine, job_id=scoring.id, attempt=attempt, progress=rows)
    speed = ("tuneq_scoring_rows_per_second", labels(job=scoring.id))
    assert metric_samples(dashboard)[speed] == 40
    store.mark_failed(engine, job_id=scoring.id, attempt=attempt, error="lost")
    store.requeue_job(engine, job_id=scoring.id, from_statuses=["failed"],
                      to_status=JobStatus.queued, reason="retried")  # fmt: skip
    assert metric_samples(dashboard)[oldest] < 100


ACTIONS = [
    ("/api/jobs/{job}/cancel", {}),
    ("/api/jobs/{job}/retry", {}),
    ("/api/models/reviews:1/tags", {"tag": "champion"}),
    ("/api/jobs", {"kind": "finetune", "data": "/data/x.csv", "model": "minilm"}),
]


def database_state(env: dict[str, str]) -> Any:
    engine = get_engine(env["TUNEQ_DATABASE_URL"])
    jobs = [(j.id, str(j.status), j.attempt) for j in store.list_jobs(engine, limit=100)]
    return sorted(jobs), store.model_tags(engine)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-tuneq-token": "wrong"},
        {"authorization": "Bearer wrong"},
        {"x-tuneq-token": TOKEN, "origin": "http://evil.example"},
        {"x-tuneq-token": TOKEN, "origin": "null"},
        {"authorization": f"Bearer {TOKEN}", "sec-fetch-site": "cross-site"},
    ],
    ids=["no-token", "wrong-token", "wrong-bearer", "other-origin", "null-origin", "cross-site"],
)
def test_actions_without_the_token_or_from_elsewhere_change_nothing(
    env: dict[str, str], dashboard: TestClient, tmp_path: Path, headers: dict[str, str]
) -> None:
    succeeded_job(env, tmp_path, "reviews")
    engine = get_engine(env["TUNEQ_DATABASE_URL"])
    waiting = store.create_job(engine, spec=finetune_spec("later"))
    before = database_state(env)
    for path, body in ACTIONS:
        answer = dashboard.post(path.format(job=waiting.id), json=body, headers=headers)
        expected = 403 if ("origin" in headers or "sec-fetch-site" in headers) else 401
        assert answer.status_code == expected, (path, answer.text)
    assert database_state(env) == before


def test_actions_with_the_token_act(
    env: dict[str, str], dashboard: TestClient, tmp_path: Path
) -> None:
    engine = get_engine(env["TUNEQ_DATABASE_URL"])
    succeeded_job(env, tmp_path, "reviews")
    waiting = store.create_job(engine, spec=finetune_spec("later"))
    auth = {"authorization": f"Bearer {TOKEN}"}
    same_origin = {"x-tuneq-token": TOKEN, "origin": "http://testserver",
                   "sec-fetch-site": "same-origin"}  # fmt: skip

    answer = dashboard.post(f"/api/jobs/{waiting.id}/cancel", headers=same_origin)
    assert answer.json() == {"cancelled": waiting.id}
    assert store.get_job(engine, waiting.id).status == "cancelled"
    again = dashboard.post(f"/api/jobs/{waiting.id}/cancel", headers=auth)
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]

    tagged = dashboard.post("/api/models/reviews:1/tags", json={"tag": "champion"}, headers=auth)
    assert tagged.json() == {"tagged": "reviews:1", "tag": "champion"}
    assert store.model_tags(engine) == {("reviews", 1): ["champion"]}

    job_file = "kind: finetune\ndata: /data/reviews.csv\nmodel: minilm\nname: from-the-page\n"
    submitted = dashboard.post("/api/jobs", content=job_file, headers=auth)
    assert submitted.status_code == 200, submitted.text
    queued = store.get_job(engine, submitted.json()["queued"])
    assert queued.status == "queued" and queued.spec["name"] == "from-the-page"
    bad = dashboard.post("/api/jobs", content="kind: finetune\nepochs: many\n", headers=auth)
    assert bad.status_code == 400 and "not a job file" in bad.json()["error"]

    retried = dashboard.post(f"/api/jobs/{waiting.id}/retry", headers=auth)
    assert retried.json() == {"queued": waiting.id}
    assert store.get_job(engine, waiting.id).status == "queued"


def test_names_and_errors_are_text_not_markup(env: dict[str, str], dashboard: TestClient) -> None:
    engine = get_engine(env["TUNEQ_DATABASE_URL"])
    # Names are checked on submission; a data path, an error and a traceback are free text.
    spec = FinetuneSpec(data=f"/data/{EVIL}.csv", model="minilm", queue="cpu")
    job = store.create_job(engine, spec=spec)
    attempt, _ = store.claim_job(engine, job_id=job.id, worker="w") or (0, "")
    store.mark_failed(engine, job_id=job.id, attempt=attempt, error=EVIL, traceback=EVIL)
    shown = dashboard.get(f"/api/jobs/{job.id}").json()
    assert shown["error"] == shown["traceback"] == EVIL
    assert shown["spec"]["data"] == f"/data/{EVIL}.csv"

    page = dashboard.get('/jobs/"><img src=x onerror=alert(1)>')  # the id is in the title
    assert page.status_code == 200
    assert "<img src=x" not in page.text and "&lt;img src=x" in page.text
    for path in ("/", "/jobs", f"/jobs/{job.id}", "/groups", "/models", "/workers"):
        answer = dashboard.get(path)
        policy = answer.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert answer.headers["x-content-type-options"] == "nosniff"
    report = dashboard.get(f"/jobs/{job.id}/report")
    assert report.status_code == 200 and "<script>alert" not in report.text
    assert "default-src 'none'" in report.headers["content-security-policy"]


def test_requests_for_another_host_name_are_refused(
    env: dict[str, str], dashboard: TestClient
) -> None:
    """A page whose own name was made to resolve to this machine (DNS rebinding) sends its
    name as Host: it reads nothing and acts on nothing."""
    engine = get_engine(env["TUNEQ_DATABASE_URL"])
    waiting = store.create_job(engine, spec=finetune_spec("later"))
    rebound = {"host": "evil.example:8600"}
    assert dashboard.get("/api/jobs", headers=rebound).status_code == 400
    assert dashboard.get("/metrics", headers=rebound).status_code == 400
    cancel = f"/api/jobs/{waiting.id}/cancel"
    acted = dashboard.post(cancel, headers={**rebound, "origin": "http://evil.example:8600",
                                            "x-tuneq-token": TOKEN})  # fmt: skip
    assert acted.status_code == 400
    assert store.get_job(engine, waiting.id).status == "queued"
    # Behind a proxy that rewrites Host, the page's origin is the proxy's public name.
    proxied = {"host": "127.0.0.1:8600", "origin": "https://tuneq.example.com",
               "x-tuneq-token": TOKEN}  # fmt: skip
    assert dashboard.post(cancel, headers=proxied).json() == {"cancelled": waiting.id}


def test_only_loopback_and_the_named_hosts_are_allowed() -> None:
    from tuneq.ui.guard import allowed_hosts

    assert allowed_hosts("127.0.0.1", ()) == ["127.0.0.1", "::1", "localhost"]
    assert "tuneq.example.com" in allowed_hosts("127.0.0.1", ("tuneq.example.com",))
    everywhere = allowed_hosts("0.0.0.0", ())
    assert socket.gethostname().lower() in everywhere and "evil.example" not in everywhere
