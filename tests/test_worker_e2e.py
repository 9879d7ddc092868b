"""Fine-tunes submitted through the CLI, run by real worker processes on real brokers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import (
    REDIS_URL,
    invoke_cli,
    queue_name,
    redis_available,
    synthetic_reviews,
    write_csv,
)


def submit_tiny(env: dict[str, str], queue: str, data: Path, model: Path, *extra: str) -> object:
    return invoke_cli(
        env,
        "finetune",
        "--data",
        str(data),
        "--model",
        str(model),
        "--queue",
        queue,
        "--epochs",
        "8",
        "--learning-rate",
        "0.002",
        "--batch-size",
        "16",
        "--name",
        "tiny-sentiment",
        "--wait",
        *extra,
    )


def check_fine_tune_through_worker(env: dict[str, str], start_worker, tiny_model, reviews_csv):
    queue = queue_name()
    start_worker(env, queue)
    result = submit_tiny(env, queue, reviews_csv, tiny_model)
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()

    shown = json.loads(invoke_cli(env, "show", job_id, "--json").stdout)
    assert shown["status"] == "succeeded"
    assert shown["attempt"] == 1
    metrics = shown["metrics"]
    assert metrics["accuracy"] >= 0.9, metrics
    assert set(metrics["per_class"]) == {"negative", "positive"}
    assert sum(map(sum, metrics["confusion_matrix"])) == 40  # 20% of 200 rows held out
    assert metrics["loss_curve"] and metrics["eval_loss"] < 0.69
    model = shown["model"]
    assert (model["name"], model["version"]) == ("tiny-sentiment", 1)
    assert model["labels"] == ["negative", "positive"]
    folder = Path(model["path"])
    assert (folder / "model.safetensors").is_file() and (folder / "tuneq.json").is_file()
    assert not list(folder.glob("*.bin")), "only safetensors, no pickles"
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}

    predicted = invoke_cli(
        env, "predict", "tiny-sentiment", "superb brilliant loved it", "awful dull worst", "--json"
    )
    assert predicted.exit_code == 0, predicted.output
    labels = [json.loads(line)["label"] for line in predicted.stdout.splitlines()]
    assert labels == ["positive", "negative"]

    listed = invoke_cli(env, "models", "--json")
    assert [m["name"] for m in json.loads(listed.stdout)] == ["tiny-sentiment"]


def test_fine_tune_through_embedded_sqlite_broker(env, start_worker, tiny_model, reviews_csv):
    check_fine_tune_through_worker(env, start_worker, tiny_model, reviews_csv)


def test_fine_tune_through_redis(env, start_worker, tiny_model, reviews_csv):
    if not redis_available(REDIS_URL):
        from tests.conftest import unavailable

        unavailable(f"Redis is not reachable at {REDIS_URL}")
    env = {**env, "TUNEQ_BROKER_URL": REDIS_URL}
    check_fine_tune_through_worker(env, start_worker, tiny_model, reviews_csv)


@pytest.fixture
def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    return {
        "no_text_column": write_csv(
            tmp_path / "reviews-no-text.csv", ["review", "label"], synthetic_reviews(20)
        ),
        "single_class": write_csv(
            tmp_path / "one-class.csv",
            ["text", "label"],
            [(text, "positive") for text, _ in synthetic_reviews(20)],
        ),
        "empty": _touch(tmp_path / "empty.csv"),
    }


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def test_bad_input_fails_the_job_and_the_worker_carries_on(
    env, start_worker, tiny_model, reviews_csv, bad_inputs, tmp_path
):
    queue = queue_name()
    worker = start_worker(env, queue)
    missing = tmp_path / "missing.csv"
    cases = [
        (missing, tiny_model, f"{missing}: no such file or folder"),
        (
            bad_inputs["no_text_column"],
            tiny_model,
            f"{bad_inputs['no_text_column']} has no column 'text' (its columns: review, label); "
            "name the right one with --text-column",
        ),
        (
            bad_inputs["single_class"],
            tiny_model,
            f"label column 'label' in {bad_inputs['single_class']} has a single class "
            "('positive'); a classifier needs examples of at least two labels",
        ),
        (bad_inputs["empty"], tiny_model, f"{bad_inputs['empty']} is empty"),
        (
            Path("/etc/hostname"),
            tiny_model,
            "data /etc/hostname is outside the folders this worker may use "
            f"({env['TUNEQ_ALLOWED_ROOTS']}); to allow it, add its folder to "
            "TUNEQ_ALLOWED_ROOTS where the worker runs",
        ),
        (
            reviews_csv,
            Path("no-such-org/no-such-model"),
            "cannot load model 'no-such-org/no-such-model': it is not a local model folder, and "
            "it is not in the local cache, and the Hugging Face Hub cannot be reached. Use minilm "
            "(packaged, works offline), a Hub name such as bert-base-uncased, or a folder with "
            "config.json and model.safetensors",
        ),
    ]
    for data, model, message in cases:
        result = submit_tiny(env, queue, data, model)
        job_id = result.stdout.strip()
        assert result.exit_code == 1
        assert result.stderr.splitlines()[-1] == f"Error: job {job_id} failed: {message}"
        assert worker.alive
    result = submit_tiny(env, queue, reviews_csv, tiny_model)
    assert result.exit_code == 0, result.output
    statuses = [job["status"] for job in json.loads(invoke_cli(env, "jobs", "--json").stdout)]
    assert statuses == ["succeeded"] + ["failed"] * len(cases)
