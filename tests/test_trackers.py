"""``--report-to``: a fine-tune also reports to TensorBoard and MLflow through the Trainer's
own integrations; the tiny BERT on synthetic reviews, the real packages, files on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import LEARNS, invoke_cli
from tuneq.schemas.errors import ConfigError
from tuneq.schemas.specs import FinetuneSpec
from tuneq.worker.ml import finetune as finetune_module
from tuneq.worker.ml.finetune import TENSORBOARD_DIR, finetune


def test_tensorboard_gets_the_runs_losses_in_the_model_folder(
    tiny_model: Path, reviews_csv: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = FinetuneSpec(data=str(reviews_csv), model=str(tiny_model), name="tb-run",
                        report_to=["tensorboard"], **LEARNS)  # fmt: skip
    result = finetune(spec, tmp_path / "model")
    events = EventAccumulator(str(tmp_path / "model" / TENSORBOARD_DIR))
    events.Reload()
    train = events.Scalars("train/loss")  # float32 on disk
    curve = result.metrics["loss_curve"]
    assert [e.step for e in train] == [p["step"] for p in curve] and len(train) >= 5
    assert [e.value for e in train] == pytest.approx([p["loss"] for p in curve], abs=1e-4)
    evaluated = [e.step for e in events.Scalars("eval/loss")]
    assert evaluated == [p["step"] for p in result.metrics["eval_curve"]]


def test_mlflow_gets_a_run_with_its_parameters_and_metrics(
    tiny_model: Path, reviews_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tuneq-test")
    spec = FinetuneSpec(data=str(reviews_csv), model=str(tiny_model), name="mlflow-run",
                        report_to=["mlflow"], **LEARNS)  # fmt: skip
    result = finetune(spec, tmp_path / "model")
    runs = mlflow.search_runs(experiment_names=["tuneq-test"], output_format="list")
    assert [run.info.run_name for run in runs] == ["mlflow-run"]
    run = runs[0]
    assert float(run.data.params["learning_rate"]) == LEARNS["learning_rate"]
    assert run.data.metrics["eval_loss"] == pytest.approx(
        result.metrics["eval_curve"][-1]["loss"], abs=1e-4
    )
    assert not (tmp_path / "model" / TENSORBOARD_DIR).exists()


def test_a_tracker_the_worker_lacks_fails_before_any_work(
    tiny_model: Path, reviews_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(finetune_module.TRACKER_PACKAGES, "mlflow", "no_such_mlflow_package")
    spec = FinetuneSpec(data=str(reviews_csv), model=str(tiny_model), report_to=["mlflow"])
    with pytest.raises(ConfigError, match="pip install no_such_mlflow_package"):
        finetune(spec, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_report_to_is_a_comma_separated_option(env: dict[str, str], reviews_csv: Path) -> None:
    bad = invoke_cli(env, "finetune", "--data", str(reviews_csv), "--report-to", "wandb")
    assert bad.exit_code == 2 and "--report-to" in bad.output
    help_text = invoke_cli(env, "finetune", "--help").output
    assert "--report-to" in help_text and "tensorboard" in help_text
