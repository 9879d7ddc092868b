"""Security through real workers: pickle messages refused; Redis with a password over TLS;
passwords never written to logs, job rows or files."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import MetaData, select

from tests.conftest import (
    POSTGRES_URL,
    REDIS_URL,
    invoke_cli,
    postgres_database,
    queue_name,
    redis_available,
    score_args,
    scoring_input,
    unavailable,
)
from tuneq.schemas.settings import load_settings
from tuneq.schemas.specs import ScoreSpec
from tuneq.schemas.statuses import JobStatus
from tuneq.worker import store
from tuneq.worker.jobs.app import RUN_JOB, create_app, send_job
from tuneq.worker.store.db import get_engine

REDIS_PASSWORD = "redis-S3cret-9f2c"
DATABASE_PASSWORD = "db-S3cret-41aa"


def wait_for(condition, timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_pickle_message_is_refused_and_the_worker_carries_on(
    env, start_worker, trained_tiny_model: Path, tmp_path: Path
) -> None:
    if not redis_available(REDIS_URL):
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    env = {**env, "TUNEQ_BROKER_URL": REDIS_URL}
    queue = queue_name()
    worker = start_worker(env, queue)
    settings = load_settings(env)
    engine = get_engine(settings.database_url)
    spec = ScoreSpec(
        model="tiny",
        model_path=str(trained_tiny_model),
        input=str(scoring_input(tmp_path / "in.csv", 20)),
        output=str(tmp_path / "out.csv"),
        queue=queue,
    )
    job = store.create_job(engine, spec=spec)

    sender = Celery("not-tuneq", broker=REDIS_URL, set_as_current=False)
    sender.conf.update(task_serializer="pickle", accept_content=["pickle"])
    sender.send_task(RUN_JOB, args=[job.id], queue=queue, serializer="pickle")
    sender.close()
    wait_for(
        lambda: b"untrusted content of type pickle" in worker.log.read_bytes(),
        what="the worker to refuse the pickle message",
    )
    assert store.get_job(engine, job.id).status == JobStatus.queued
    assert store.get_job(engine, job.id).attempt == 0
    assert worker.alive

    app = create_app(settings)
    send_job(app, job.id, queue, "normal")  # the same job, as JSON
    app.close()
    wait_for(lambda: store.get_job(engine, job.id).status == JobStatus.succeeded, what="the job")
    assert Path(spec.output).exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis server of the test's own that wants a password and speaks only TLS, with a
    certificate from a throwaway CA; yields the ``rediss://`` URL that reaches it."""
    for program in ("redis-server", "openssl"):
        if shutil.which(program) is None:
            unavailable(f"{program} is not installed")
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, key, csr, cert = (certs / n for n in ("ca.pem", "server.key", "server.csr", "server.pem"))
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=tuneq-ca",
            "-keyout", str(certs / "ca.key"), "-out", str(ca))  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(key), "-out", str(csr))  # fmt: skip
    (certs / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(certs / "ca.key"),
            "-CAcreateserial", "-days", "1", "-extfile", str(certs / "san.cnf"),
            "-out", str(cert))  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
         "--requirepass", REDIS_PASSWORD, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    try:
        wait_for(lambda: redis_available(url), timeout_s=20, what="the TLS Redis")
        yield url
    finally:
        server.terminate()
        server.wait()


@pytest.fixture
def database_with_password() -> Iterator[str]:
    """A fresh PostgreSQL database reached with a password (trust auth ignores it, but tuneq
    must still keep it out of every log and row)."""
    from sqlalchemy import make_url

    yield from postgres_database(
        make_url(POSTGRES_URL).set(password=DATABASE_PASSWORD).render_as_string(False)
    )


def test_redis_with_a_password_over_tls_and_secrets_stay_secret(
    env, start_worker, trained_tiny_model: Path, tmp_path: Path, tls_redis: str,
    database_with_password: str,
) -> None:  # fmt: skip
    env = {**env, "TUNEQ_BROKER_URL": tls_redis, "TUNEQ_DATABASE_URL": database_with_password}
    queue = queue_name()
    worker = start_worker(env, queue)
    source = scoring_input(tmp_path / "in.csv", 50)
    output = tmp_path / "out.csv"
    result = invoke_cli(env, *score_args(trained_tiny_model, source, output, queue, "--wait"))
    assert result.exit_code == 0, result.output
    assert len(output.read_text().splitlines()) == 51

    wrong = tls_redis.replace(REDIS_PASSWORD, "wrong-Passw0rd")
    refused = invoke_cli({**env, "TUNEQ_BROKER_URL": wrong}, *score_args(
        trained_tiny_model, source, tmp_path / "never.csv", queue))  # fmt: skip
    assert refused.exit_code == 1
    assert "cannot send job" in refused.stderr and "rediss://:***@127.0.0.1" in refused.stderr
    assert "wrong-Passw0rd" not in refused.output

    worker.stop()
    texts = {"worker log": worker.log.read_text(), "CLI output": result.output + refused.output}
    engine = get_engine(database_with_password)
    tables = MetaData()
    tables.reflect(engine)
    with engine.connect() as conn:
        for table in tables.sorted_tables:
            rows = conn.execute(select(table)).all()
            texts[f"table {table.name}"] = json.dumps([list(r) for r in rows], default=str)
    for path in Path(env["TUNEQ_DATA_DIR"]).rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    assert "celery@" in texts["worker log"] and len(texts) > 5
    for where, text in texts.items():
        assert REDIS_PASSWORD not in text, where
        assert DATABASE_PASSWORD not in text, where
