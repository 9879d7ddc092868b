"""How fast the dashboard answers with a big history: 10,000 jobs (sweeps, scoring jobs,
failures with tracebacks, a queue, running work), 500 models and 8 workers in the database,
then every page, API document and ``/metrics`` asked ``--requests`` times over HTTP from a real
``tuneq ui`` process; p50 and p95 per path.

    .venv/bin/python bench/ui.py
    .venv/bin/python bench/ui.py --database-url postgresql://postgres@127.0.0.1:5432/test

A PostgreSQL URL gets a fresh database of its own on that server, dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

TARGET_MS = 100


def fill(engine: Any, jobs: int, seed: int = 0) -> dict[str, str]:
    """``jobs`` jobs in the proportions a busy team's database has; returns ids to ask for."""
    from sqlalchemy.orm import Session

    from tuneq.schemas.tables import Job, JobEvent, JobGroup, Model, Worker, utcnow

    rng = random.Random(seed)
    now = utcnow()
    rows, events, models, groups = [], [], [], []
    kinds = ["succeeded"] * 85 + ["failed"] * 8 + ["cancelled"] * 3 + ["queued"] * 3 + ["running"]
    for i in range(jobs):
        status = rng.choice(kinds)
        kind = "score" if i % 5 == 4 else "finetune"
        group = f"sweep-{i // 20:04d}" if i < jobs // 5 else None
        if group and i % 20 == 0:
            groups.append(JobGroup(id=group, size=20, created_at=now - timedelta(hours=i)))
        created = now - timedelta(minutes=jobs - i)
        spec = {"kind": kind, "data": f"/data/set-{i % 40}.csv", "model": "minilm",
                "learning_rate": rng.choice([5e-5, 1e-4]), "epochs": rng.choice([1, 3]),
                "name": f"run-{i % 50}", "queue": "cpu"}  # fmt: skip
        job = Job(id=uuid.UUID(int=rng.getrandbits(128)).hex[:12], kind=kind, status=status,
                  queue=rng.choice(["cpu", "cpu", "gpu"]), spec=spec, attempt=1,
                  created_at=created, group_id=group)  # fmt: skip
        if status != "queued":
            job.started_at, job.worker = created + timedelta(seconds=5), "host:1/2"
        if status in ("succeeded", "failed", "cancelled"):
            job.finished_at = created + timedelta(seconds=rng.uniform(30, 3000))
        if status == "succeeded":
            job.metrics = finetune_metrics(rng) if kind == "finetune" else {"rows": 10_000}
        if status == "failed":
            job.error, job.traceback = "CUDA out of memory", "Traceback ...\n" * 40
        if status == "running":
            curve = [[s, 0.7 - s / 1000] for s in range(0, 200, 5)]
            job.progress = {"phase": "training", "step": 200, "total": 600, "steps_per_s": 3.1,
                            "eta_s": 130.0, "curve": curve}  # fmt: skip
        rows.append(job)
        events += [JobEvent(job_id=job.id, attempt=a, kind=k, message=f"{k} at {i}", at=created)
                   for a, k in ((0, "queued"), (1, "running"), (1, status))]  # fmt: skip
        if status == "succeeded" and kind == "finetune" and len(models) < 500:
            number = len(models)
            models.append(
                Model(name=f"model-{number % 50}", version=number // 50 + 1, base_model="minilm",
                      labels=["negative", "positive"], metrics=job.metrics,
                      data_fingerprint="f" * 16, path=f"/models/{i}", job_id=job.id,
                      created_at=created)
            )  # fmt: skip
    workers = [Worker(name=f"host{w}:{100 + w}", hostname=f"host{w}", queues=["cpu", "gpu"],
                      device="cpu", concurrency=2, threads=4, started_at=now, heartbeat_at=now)
               for w in range(8)]  # fmt: skip
    with Session(engine, expire_on_commit=False) as session, session.begin():
        session.add_all(groups)
        session.flush()
        session.add_all(rows)
        session.flush()
        session.add_all([*events, *models, *workers])
    done = next(j for j in rows if j.status == "succeeded" and j.kind == "finetune")
    running = next(j for j in rows if j.status == "running")
    return {"succeeded": done.id, "running": running.id, "group": groups[0].id}


def finetune_metrics(rng: random.Random) -> dict[str, Any]:
    accuracy = rng.uniform(0.7, 0.92)
    return {
        "accuracy": accuracy, "macro_f1": accuracy - 0.01, "eval_loss": 0.4, "train_loss": 0.5,
        "train_steps": 375, "data": {"train_rows": 1000, "eval_rows": 400},
        "per_class": {n: {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 200}
                      for n in ("negative", "positive")},
        "confusion_matrix": [[160, 40], [40, 160]],
        "loss_curve": [{"step": s, "loss": 0.7 - s / 1000} for s in range(0, 375, 8)],
        "eval_curve": [{"step": s, "loss": 0.5} for s in (125, 250, 375)],
        "phases": {"train": 100.0, "eval": 5.0},
    }  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def time_paths(url: str, paths: list[str], requests: int) -> dict[str, dict[str, float]]:
    import httpx

    timings: dict[str, dict[str, float]] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        for path in paths:
            for _ in range(3):
                client.get(path).raise_for_status()  # warm: connections, caches, imports
            samples = []
            for _ in range(requests):
                start = time.perf_counter()
                answer = client.get(path)
                samples.append((time.perf_counter() - start) * 1000)
                answer.raise_for_status()
            samples.sort()
            timings[path] = {
                "p50_ms": round(statistics.median(samples), 1),
                "p95_ms": round(samples[int(0.95 * (len(samples) - 1))], 1),
                "bytes": len(answer.content),
            }
            print(f"{path:40s} p50 {timings[path]['p50_ms']:7.1f} ms  "
                  f"p95 {timings[path]['p95_ms']:7.1f} ms", flush=True)  # fmt: skip
    return timings


def serve(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tuneq.cli", "ui", "--port", str(port)],
                               env={**os.environ, **env, "TUNEQ_UI_TOKEN": "bench"})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(100):
        try:
            httpx.get(f"{url}/api/workers", timeout=2)
            return process, url
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError("tuneq ui did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tuneq-ui-bench-"))
    base = args.database_url or f"sqlite:///{work / 'tuneq.db'}"
    database = fresh_database(base)
    try:
        from tuneq.worker.store.db import get_engine

        started = time.perf_counter()
        ids = fill(get_engine(database), args.jobs)
        if database.startswith("postgres"):
            # A database that gathered its jobs over weeks has been analyzed by autovacuum;
            # one filled a second ago has no statistics, and its planner guesses.
            from sqlalchemy import text

            with get_engine(database).begin() as conn:
                conn.execute(text("ANALYZE"))
        print(f"{args.jobs} jobs written in {time.perf_counter() - started:.1f}s", flush=True)
        process, url = serve({"TUNEQ_DATA_DIR": str(work), "TUNEQ_DATABASE_URL": database})
        try:
            paths = [
                "/", "/jobs", f"/jobs/{ids['succeeded']}", f"/groups/{ids['group']}", "/models",
                "/workers", "/static/app.js", "/api/overview", "/api/jobs",
                "/api/jobs?status=failed", f"/api/jobs/{ids['succeeded']}",
                f"/api/jobs/{ids['running']}", "/api/groups", f"/api/groups/{ids['group']}",
                "/api/models", "/api/workers", "/metrics",
            ]  # fmt: skip
            timings = time_paths(url, paths, args.requests)
        finally:
            process.terminate()
            process.wait()
    finally:
        drop_database(database)
    worst = max(t["p95_ms"] for t in timings.values())
    result = {
        "machine": machine(),
        "database": "postgresql" if database.startswith("postgres") else "sqlite",
        "jobs": args.jobs,
        "requests_per_path": args.requests,
        "target_p95_ms": TARGET_MS,
        "worst_p95_ms": worst,
        "paths": timings,
    }
    name = "ui" if result["database"] == "sqlite" else "ui_postgresql"
    print(f"worst p95 {worst} ms (target {TARGET_MS}); {write_result(name, result)}")


def fresh_database(url: str) -> str:
    if not url.startswith("postgres"):
        return url
    from sqlalchemy import create_engine, make_url, text

    name = f"tuneq_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(make_url(url).set(drivername="postgresql+psycopg"),
                          isolation_level="AUTOCOMMIT")  # fmt: skip
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return (
        make_url(url)
        .set(drivername="postgresql+psycopg", database=name)
        .render_as_string(hide_password=False)
    )


def drop_database(url: str) -> None:
    if not url.startswith("postgres"):
        return
    from sqlalchemy import create_engine, make_url, text

    from tuneq.worker.store import db

    for engine in db._engines.values():
        engine.dispose()
    name = make_url(url).database
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
