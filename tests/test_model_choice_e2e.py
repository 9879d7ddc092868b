"""Which model a fine-tune registers: the best evaluation, early stopping, and a run that learned
nothing refused. Through the CLI and a real worker process."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.conftest import (
    finetune_and_show,
    invoke_cli,
    queue_name,
    synthetic_reviews,
    write_csv,
)
from tuneq.schemas.specs import FinetuneSpec
from tuneq.worker.ml.data import load_training_data


def tiny_finetune(queue: str, data: Path, model: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        *("--data", str(data), "--model", str(model), "--queue", queue),
        *("--batch-size", "16", "--name", "tiny-choice", "--checkpoint-steps", "10"),
        "--wait",
        *extra,
    ]


def eval_loss_of(folder: Path, spec: FinetuneSpec) -> float:
    """The mean cross-entropy of the model in ``folder`` on the job's evaluation rows, in fp32:
    what the weights on disk really score, whatever the job recorded."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = load_training_data(spec).eval
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = tokenizer(rows.texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(rows.labels)))


def noisy_reviews(path: Path, rows: int = 200, flipped: float = 0.3) -> Path:
    """Synthetic reviews with a share of their labels flipped: a model that memorises the
    training rows gets worse on the others, so the evaluation loss turns up."""
    rng = random.Random(7)
    other = {"positive": "negative", "negative": "positive"}
    records = [
        (text, other[label] if rng.random() < flipped else label)
        for text, label in synthetic_reviews(rows, seed=3)
    ]
    return write_csv(path, ["text", "label"], records)


def test_early_stopping_registers_the_best_evaluation(
    env, start_worker, tiny_model: Path, tmp_path: Path
) -> None:
    """On noisy labels, at a learning rate this high, the tiny model overfits: the eval loss
    turns up, training stops after the patience, and the registered weights are the best
    evaluation's."""
    queue = queue_name()
    start_worker(env, queue)
    reviews_csv = noisy_reviews(tmp_path / "noisy.csv")
    # fp32, so that the weights on disk, re-evaluated in fp32 below, score the best's loss to
    # within rounding on any CPU. Under bf16 autocast the curve is the processor's own: on the
    # AMX Xeon the last epoch ended 0.0023 above the best, which a bf16 tolerance cannot tell
    # apart from it.
    args = ("--epochs", "40", "--learning-rate", "0.004", "--metric", "loss", "--patience", "3")
    args += ("--precision", "fp32")
    result = invoke_cli(env, *tiny_finetune(queue, reviews_csv, tiny_model, *args))
    assert result.exit_code == 0, result.output
    job = json.loads(invoke_cli(env, "show", result.stdout.strip(), "--json").stdout)
    assert job["status"] == "succeeded", job["error"]
    metrics, training = job["metrics"], job["metrics"]["training"]

    steps_per_epoch = 160 // 16  # 200 rows, 20 % held out
    assert training["stopped_early"] is True, training
    assert training["max_steps"] == 40 * steps_per_epoch
    assert metrics["train_steps"] == training["final_step"] < training["max_steps"]
    curve = metrics["eval_curve"]
    assert [p["step"] for p in curve] == list(
        range(steps_per_epoch, training["final_step"] + 1, steps_per_epoch)
    ), "one evaluation per epoch, up to the stop"
    best = min(curve, key=lambda p: p["loss"])
    assert training["best_step"] == best["step"] == training["final_step"] - 3 * steps_per_epoch
    assert abs(metrics["eval_loss"] - best["loss"]) < 1e-5, "the job's metrics are the best's"
    assert abs(training["best_metric"] - best["loss"]) < 1e-5
    assert f"after step {best['step']}" in training["stop_reason"]

    spec = FinetuneSpec.model_validate(job["spec"])
    on_disk = eval_loss_of(Path(job["model"]["path"]), spec)
    last = curve[-1]["loss"]
    # Re-evaluated, the weights on disk score the best's loss to within rounding; the last
    # epoch must be more than twice that away, or the check could not tell the two apart.
    assert metrics["precision"] == "fp32"
    tolerance = 0.002
    assert last - best["loss"] > 2 * tolerance, "the last epoch must be worse than the best"
    assert abs(on_disk - best["loss"]) < tolerance, (on_disk, best["loss"], last)

    manifest = json.loads((Path(job["model"]["path"]) / "tuneq.json").read_text())
    assert manifest["training"]["best_step"] == best["step"]
    card = (Path(job["model"]["path"]) / "README.md").read_text()
    assert f"step {best['step']}" in card and "did not improve" in card


def test_a_run_that_learns_nothing_fails_and_registers_no_model(
    env, start_worker, tiny_model: Path, reviews_csv: Path
) -> None:
    queue = queue_name()
    start_worker(env, queue)
    args = ("--epochs", "1", "--learning-rate", "0.00001")
    result = invoke_cli(env, *tiny_finetune(queue, reviews_csv, tiny_model, *args))
    assert result.exit_code == 1
    job_id = result.stdout.strip().splitlines()[0]
    job = json.loads(invoke_cli(env, "show", job_id, "--json").stdout)
    assert job["status"] == "failed"
    assert "training did not learn" in job["error"]
    assert "Lower --learning-rate (this run: 1e-05)" in job["error"]
    assert job["model"] is None
    assert json.loads(invoke_cli(env, "models", "--json").stdout) == []
    models = Path(env["TUNEQ_DATA_DIR"]) / "artifacts" / "models"
    assert not models.exists() or not any(models.rglob("model.safetensors"))


def test_early_stopping_without_evaluation_data_is_refused(env) -> None:
    result = invoke_cli(env, "finetune", "--data", "x.csv", "--eval-size", "0", "--patience", "2")
    assert result.exit_code == 2
    assert "early stopping needs evaluation data: patience counts evaluations without an " in (
        result.stderr
    )
    assert "keep rows for evaluation (eval_size N, or eval_data FILE)" in result.stderr


def test_training_on_every_row_evaluates_nothing_and_keeps_the_last_weights(
    env, start_worker, trained_tiny_model: Path, tmp_path: Path
) -> None:
    rows = synthetic_reviews(150, seed=4)
    data = write_csv(tmp_path / "all.csv", ["text", "label"], rows)
    queue = queue_name()
    start_worker(env, queue)
    job = finetune_and_show(
        env,
        "--data", str(data), "--model", str(trained_tiny_model), "--queue", queue,
        "--eval-size", "0", "--epochs", "2", "--batch-size", "16", "--learning-rate", "0.001",
    )  # fmt: skip
    metrics = job["metrics"]
    assert metrics["data"]["train_rows"] == 150 and metrics["data"]["eval_rows"] == 0
    assert metrics["training"]["evaluated"] is False
    assert metrics["training"]["final_step"] == metrics["train_steps"] == 2 * -(-150 // 16)
    assert metrics["eval_curve"] == [] and "accuracy" not in metrics
    predicted = invoke_cli(env, "predict", job["model"]["name"], "a great wonderful superb film")
    assert predicted.exit_code == 0, predicted.output
    assert "positive" in predicted.stdout
