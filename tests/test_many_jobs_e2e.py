"""Many jobs at once through a real worker: a sweep and its comparison, model tags, end-of-job
notifications, the vocabulary check, and three-class string labels."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import SHARED_DATA, invoke_cli, queue_name, unavailable
from tuneq.cli.render import table
from tuneq.worker.db import get_engine
from tuneq.worker.store import list_events


def tiny_base(tiny_model: Path, reviews_csv: Path, queue: str) -> dict[str, Any]:
    return {
        "data": str(reviews_csv),
        "model": str(tiny_model),
        "name": "tiny-sweep",
        "epochs": 4,
        "queue": queue,
        "checkpoint_steps": None,
    }


def test_a_sweep_runs_every_combination_and_compare_ranks_them(
    env, start_worker, tiny_model: Path, reviews_csv: Path, tmp_path: Path
) -> None:
    queue = queue_name()
    start_worker(env, queue)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "name": "tiny-lr",
                "base": tiny_base(tiny_model, reviews_csv, queue),
                "grid": {"learning_rate": [2e-3, 1e-5], "batch_size": [8, 16]},
            }
        )
    )
    result = invoke_cli(env, "sweep", str(sweep_file), "--wait")
    assert result.exit_code == 0, result.output
    group, *job_ids = result.stdout.split()
    assert group.startswith("tiny-lr-") and len(job_ids) == 4
    listed = json.loads(invoke_cli(env, "jobs", "--group", group, "--json").stdout)
    assert sorted(job["id"] for job in listed) == sorted(job_ids)
    assert {job["status"] for job in listed} == {"succeeded"}

    shown = [json.loads(invoke_cli(env, "show", j, "--json").stdout) for j in job_ids]
    shown.sort(key=lambda job: (-job["metrics"]["accuracy"], job["id"]))
    expected = table(
        ["job", "status", "batch_size", "learning_rate", "accuracy", "macro_f1", "eval_loss",
         "train_s", "model"],
        [
            [
                job["id"], "succeeded", job["spec"]["batch_size"],
                f"{job['spec']['learning_rate']:.4g}",
                *(f"{job['metrics'][k]:.4g}" for k in ("accuracy", "macro_f1", "eval_loss")),
                f"{job['metrics']['phases']['train']:.4g}",
                f"{job['model']['name']}:{job['model']['version']}",
            ]
            for job in shown
        ],
    )  # fmt: skip
    compared = invoke_cli(env, "compare", group)
    assert compared.stdout == expected + "\n"
    assert shown[0]["spec"]["learning_rate"] == 2e-3, "the higher rate learns in 4 epochs"
    assert result.stderr.endswith(expected + "\n"), "--wait ends with the comparison"

    best = f"{shown[0]['model']['name']}:{shown[0]['model']['version']}"
    assert invoke_cli(env, "models", "tag", best, "champion").stdout == (
        f"tiny-sweep@champion -> {best}\n"
    )
    tagged = invoke_cli(env, "predict", "tiny-sweep@champion", "superb brilliant loved it")
    assert tagged.exit_code == 0 and "positive" in tagged.stdout
    models = json.loads(invoke_cli(env, "models", "--json").stdout)
    assert [m["tags"] for m in models if f"{m['name']}:{m['version']}" == best] == [["champion"]]
    unknown = invoke_cli(env, "predict", "tiny-sweep@nightly", "text")
    assert unknown.exit_code == 1
    assert "model 'tiny-sweep' has no tag 'nightly'" in unknown.stderr


class Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def hook_url() -> Iterator[str]:
    Hook.received = []
    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/tuneq"
    server.shutdown()


def test_a_notification_is_posted_when_a_job_ends(
    env, start_worker, tiny_model: Path, reviews_csv: Path, hook_url: str, tmp_path: Path
) -> None:
    queue = queue_name()
    start_worker(env, queue)
    args = ["--model", str(tiny_model), "--queue", queue, "--notify", hook_url, "--wait"]
    done = invoke_cli(env, "finetune", "--data", str(reviews_csv), "--name", "hooked", *args)
    assert done.exit_code == 0, done.output
    missing = tmp_path / "missing.csv"
    failed = invoke_cli(env, "finetune", "--data", str(missing), *args)
    assert failed.exit_code == 1
    ok, bad = Hook.received
    assert (ok["job"], ok["status"], ok["model"]) == (done.stdout.strip(), "succeeded", "hooked:1")
    assert set(ok["metrics"]) == {"accuracy", "macro_f1", "eval_loss"}
    assert (bad["job"], bad["status"]) == (failed.stdout.strip(), "failed")
    assert bad["error"] == f"{missing}: no such file or folder"
    kinds = [event.kind for event in list_events(get_engine(env["TUNEQ_DATABASE_URL"]), ok["job"])]
    assert kinds.count("notified") == 1
    bad_url = invoke_cli(env, "finetune", "--data", "x.csv", "--notify", "file:///etc/passwd")
    assert (
        bad_url.exit_code == 2 and "--notify must be an http:// or https:// URL" in bad_url.stderr
    )


def worker_on_shared_data(env: dict[str, str], start_worker, data_set: str) -> tuple[dict, str]:
    """Settings whose workers may read ``../shared/data``, and a queue with a worker on it."""
    if not (SHARED_DATA / data_set).is_dir():
        unavailable(f"{SHARED_DATA / data_set} is missing")
    env = {**env, "TUNEQ_ALLOWED_ROOTS": f"{env['TUNEQ_ALLOWED_ROOTS']}:{SHARED_DATA}"}
    queue = queue_name()
    start_worker(env, queue)
    return env, queue


def test_an_english_vocabulary_on_chinese_reviews_warns(env, start_worker) -> None:
    """MiniLM's uncased English vocabulary on ChnSentiCorp (TSV without a header)."""
    env, queue = worker_on_shared_data(env, start_worker, "chnsenticorp")
    result = invoke_cli(
        env, "finetune", "--data", str(SHARED_DATA / "chnsenticorp"), "--columns", "text,label",
        "--model", "minilm", "--train-size", "16", "--eval-size", "8", "--max-length", "64",
        "--queue", queue, "--wait",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [warning] = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    share = int(warning.split("%")[0].removeprefix("warning: "))
    assert share > 10, warning
    assert warning.endswith(
        "of the tokens in a sample of the data are unknown to the vocabulary of minilm ([UNK]): "
        "the model cannot read most of this text, and its results will be guesses. Use a model "
        "whose vocabulary covers the language, such as a multilingual one "
        "(bert-base-multilingual-cased or xlm-roberta-base)"
    )
    shown = json.loads(invoke_cli(env, "show", result.stdout.strip(), "--json").stdout)
    assert shown["metrics"]["data"]


def test_three_string_labels_on_xlmt(env, start_worker, tiny_model: Path) -> None:
    env, queue = worker_on_shared_data(env, start_worker, "xlmt")
    result = invoke_cli(
        env, "finetune", "--data", str(SHARED_DATA / "xlmt"), "--model", str(tiny_model),
        "--train-size", "300", "--eval-size", "150", "--max-length", "64", "--queue", queue,
        "--wait",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = json.loads(invoke_cli(env, "show", result.stdout.strip(), "--json").stdout)
    metrics = shown["metrics"]
    assert shown["model"]["labels"] == ["negative", "neutral", "positive"]
    assert set(metrics["per_class"]) == {"negative", "neutral", "positive"}
    assert all(set(v) >= {"precision", "recall", "f1"} for v in metrics["per_class"].values())
    assert len(metrics["confusion_matrix"]) == 3
    assert sum(map(sum, metrics["confusion_matrix"])) == 150
