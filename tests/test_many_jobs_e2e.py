"""Many jobs at once through a real worker: a sweep and its comparison, model tags, end-of-job
notifications, the vocabulary check, and three-class string labels."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import (
    REDIS_URL,
    SHARED_DATA,
    Hook,
    invoke_cli,
    queue_name,
    redis_available,
    unavailable,
)
from tuneq.cli.render import table
from tuneq.worker.store import list_events
from tuneq.worker.store.db import get_engine


def tiny_base(tiny_model: Path, reviews_csv: Path, queue: str) -> dict[str, Any]:
    return {
        "data": str(reviews_csv),
        "model": str(tiny_model),
        "name": "tiny-sweep",
        "epochs": 8,
        "queue": queue,
        "checkpoint_steps": None,
    }


def test_a_sweep_runs_every_combination_and_compare_ranks_them(
    env, start_worker, tiny_model: Path, reviews_csv: Path, tmp_path: Path, hook_url: str
) -> None:
    queue = queue_name()
    start_worker(env, queue)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "name": "tiny-lr",
                "base": tiny_base(tiny_model, reviews_csv, queue),
                "grid": {"learning_rate": [2e-3, 1e-3], "batch_size": [8, 16]},
            }
        )
    )
    result = invoke_cli(env, "sweep", str(sweep_file), "--wait", "--notify", hook_url)
    assert result.exit_code == 0, result.output
    group, *job_ids = result.stdout.split()
    assert group.startswith("tiny-lr-") and len(job_ids) == 4
    listed = json.loads(invoke_cli(env, "jobs", "--group", group, "--json").stdout)
    assert sorted(job["id"] for job in listed) == sorted(job_ids)
    assert {job["status"] for job in listed} == {"succeeded"}

    shown = [json.loads(invoke_cli(env, "show", j, "--json").stdout) for j in job_ids]
    shown.sort(key=lambda job: (-job["metrics"]["macro_f1"], job["id"]))  # what picks the best
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
    assert result.stderr.endswith(expected + "\n"), "--wait ends with the comparison"
    [summary] = Hook.wait_for(1)  # once, for the whole group, when its last job ended
    runs = json.loads(invoke_cli(env, "compare", group, "--json").stdout)
    assert {k: summary[k] for k in ("group", "jobs", "succeeded", "failed", "cancelled")} == {
        "group": group, "jobs": 4, "succeeded": 4, "failed": 0, "cancelled": 0
    }  # fmt: skip
    assert (summary["best"], summary["runs"]) == (runs[0], runs)

    for job in shown:  # each fine-tune drew its plots beside its model
        folder = Path(job["model"]["path"])
        assert job["metrics"]["plots"] == ["loss.png", "confusion.png"]
        for name in job["metrics"]["plots"]:
            assert (folder / name).read_bytes().startswith(PNG)
        assert job["metrics"]["eval_curve"][-1]["step"] == job["metrics"]["train_steps"]
        [best] = [
            point
            for point in job["metrics"]["eval_curve"]
            if point["step"] == job["metrics"]["training"]["best_step"]
        ]
        assert best["loss"] == round(job["metrics"]["eval_loss"], 5), "the best is registered"
        assert len(job["metrics"]["eval_curve"]) == 8, "after each epoch"
    check_report(env, group, tmp_path / "group.html", [job["id"] for job in shown])
    check_report(env, shown[0]["id"], tmp_path / "new" / "job.html", [shown[0]["id"]])

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


PNG = b"\x89PNG\r\n\x1a\n"


def check_report(env: dict[str, str], target: str, path: Path, job_ids: list[str]) -> None:
    """``tuneq report`` writes one self-contained file: every job in order, two plots each."""
    result = invoke_cli(env, "report", target, "--output", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{path}\n"
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    positions = [page.index(f"<h2 id='{job_id}'>") for job_id in job_ids]
    assert positions == sorted(positions), "best first"
    images = re.findall(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 2 * len(job_ids)
    assert all(base64.b64decode(image).startswith(PNG) for image in images)
    assert not re.search(r"(src|href)=['\"](https?:|//|file:)", page), "nothing fetched"
    for heading in ("Settings", "Metrics", "Per class (eval)", "Label distribution", "Plots"):
        assert page.count(f"<h3>{heading}</h3>") == len(job_ids)
    if len(job_ids) > 1:
        assert "<h2>Runs, best first</h2>" in page


def test_high_priority_jobs_start_first_and_the_queue_shows_the_order(
    env, start_worker, trained_tiny_model: Path, reviews_csv: Path
) -> None:
    """Jobs wait on Redis while no worker listens; the worker then takes them by priority."""
    if not redis_available(REDIS_URL):
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    env = {**env, "TUNEQ_BROKER_URL": REDIS_URL}
    queue = queue_name()
    # From the model trained on these reviews: a few steps are enough to learn them again.
    base = ["--data", str(reviews_csv), "--model", str(trained_tiny_model), "--queue", queue,
            "--train-size", "40", "--eval-size", "20"]  # fmt: skip
    ids = {}
    for priority in ("low", "normal", "high", "low"):
        result = invoke_cli(env, "finetune", *base, "--priority", priority)
        assert result.exit_code == 0, result.output
        ids.setdefault(priority, []).append(result.stdout.strip())
    expected = [ids["high"][0], ids["normal"][0], *ids["low"]]
    waiting = json.loads(invoke_cli(env, "queue", "--queue", queue, "--json").stdout)
    assert [(e["job"], e["position"]) for e in waiting] == [
        (j, i + 1) for i, j in enumerate(expected)
    ]
    assert {e["basis"] for e in waiting} == {f"no live worker listens on queue {queue}"}
    shown = invoke_cli(env, "show", expected[-1]).stdout
    assert (
        f"eta       #4 on queue {queue} (low priority); starts in ?, ends in ? (no live " in shown
    )

    start_worker(env, queue, "--concurrency", "1")
    started = {}
    for job_id in expected:
        job = wait_for_end(env, job_id)
        assert job["status"] == "succeeded", job["error"]
        started[job_id] = job["started_at"]
    assert sorted(expected, key=started.__getitem__) == expected, "high, normal, then low in order"
    assert invoke_cli(env, "queue", "--queue", queue).stdout == "nothing is queued or running\n"


def wait_for_end(env: dict[str, str], job_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = json.loads(invoke_cli(env, "show", job_id, "--json").stdout)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s}s")


def test_a_notification_is_posted_when_a_job_ends(
    env, start_worker, trained_tiny_model: Path, reviews_csv: Path, hook_url: str, tmp_path: Path
) -> None:
    queue = queue_name()
    start_worker(env, queue)
    args = ["--model", str(trained_tiny_model), "--queue", queue, "--notify", hook_url, "--wait"]
    done = invoke_cli(env, "finetune", "--data", str(reviews_csv), "--name", "hooked", *args)
    assert done.exit_code == 0, done.output
    missing = tmp_path / "missing.csv"
    failed = invoke_cli(env, "finetune", "--data", str(missing), *args)
    assert failed.exit_code == 1
    ok, bad = Hook.wait_for(2)
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
    """MiniLM's uncased English vocabulary on ChnSentiCorp (TSV without a header): a warning
    as the job starts, and a model that learned nothing is refused, saying why."""
    env, queue = worker_on_shared_data(env, start_worker, "chnsenticorp")
    result = invoke_cli(
        env, "finetune", "--data", str(SHARED_DATA / "chnsenticorp"), "--columns", "text,label",
        "--model", "minilm", "--train-size", "16", "--eval-size", "8", "--max-length", "64",
        "--queue", queue, "--wait",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
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
    assert shown["status"] == "failed" and shown["model"] is None
    assert shown["error"].startswith("training did not learn")
    assert "Likely why: " in shown["error"] and "unknown to the vocabulary" in shown["error"]


def test_three_string_labels_on_xlmt(env, start_worker) -> None:
    env, queue = worker_on_shared_data(env, start_worker, "xlmt")
    result = invoke_cli(
        env, "finetune", "--data", str(SHARED_DATA / "xlmt"), "--model", "minilm",
        "--train-size", "300", "--eval-size", "150", "--max-length", "64", "--queue", queue,
        "--epochs", "2", "--learning-rate", "1e-4", "--wait",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = json.loads(invoke_cli(env, "show", result.stdout.strip(), "--json").stdout)
    metrics = shown["metrics"]
    assert shown["model"]["labels"] == ["negative", "neutral", "positive"]
    assert set(metrics["per_class"]) == {"negative", "neutral", "positive"}
    assert all(set(v) >= {"precision", "recall", "f1"} for v in metrics["per_class"].values())
    assert len(metrics["confusion_matrix"]) == 3
    assert sum(map(sum, metrics["confusion_matrix"])) == 150
