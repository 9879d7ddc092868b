import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED_DATA, unavailable
from tuneq.worker.ml.calibration import (
    Calibration,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    softmax,
)


def sample_labels(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label per row drawn from that row's probabilities: calibrated by construction."""
    cumulative = probabilities.cumsum(axis=1)
    draws = rng.random((len(probabilities), 1))
    return np.minimum((draws > cumulative).sum(axis=1), probabilities.shape[1] - 1)


def calibrated_logits(rows: int = 20_000, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=2.0, size=(rows, classes))
    return logits, sample_labels(softmax(logits), rng)


def test_softmax_rows_sum_to_one_and_survive_huge_logits() -> None:
    logits = np.array([[1000.0, 999.0, -1000.0], [0.0, 0.0, 0.0]])
    probabilities = softmax(logits)
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    np.testing.assert_allclose(probabilities[1], [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(probabilities[0, :2], [1 / (1 + np.exp(-1)), 1 / (1 + np.exp(1))])


def test_softmax_with_a_temperature_is_softmax_of_scaled_logits() -> None:
    logits = np.random.default_rng(1).normal(size=(5, 3))
    np.testing.assert_allclose(softmax(logits, 2.5), softmax(logits / 2.5))
    assert not np.allclose(softmax(logits, 2.5), softmax(logits))


def test_softmax_refuses_a_temperature_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="temperature must be positive"):
        softmax(np.zeros((1, 2)), 0.0)


def test_ece_of_a_hand_computed_example() -> None:
    # Five bins of width 0.2. Every label is class 0, so a row is right when column 0 wins.
    probabilities = np.array([[0.9, 0.1], [0.25, 0.75], [0.55, 0.45], [0.15, 0.85]])
    labels = np.array([0, 0, 0, 0])
    # Bin (0.8, 1.0]: 0.9 right and 0.85 wrong: |0.5 - 0.875| = 0.375, weight 2/4.
    # Bin (0.6, 0.8]: 0.75 wrong: |0 - 0.75| = 0.75, weight 1/4.
    # Bin (0.4, 0.6]: 0.55 right: |1 - 0.55| = 0.45, weight 1/4.
    expected = 0.5 * 0.375 + 0.25 * 0.75 + 0.25 * 0.45
    assert expected_calibration_error(probabilities, labels, bins=5) == pytest.approx(expected)


def test_ece_with_one_bin_is_the_gap_between_accuracy_and_mean_confidence() -> None:
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 0, 1])
    mean_confidence = (0.9 + 0.7 + 0.6) / 3
    assert expected_calibration_error(probabilities, labels, bins=1) == pytest.approx(
        abs(1 / 3 - mean_confidence)
    )


def test_ece_is_near_zero_for_calibrated_scores_and_large_for_over_confident_ones() -> None:
    logits, labels = calibrated_logits()
    assert expected_calibration_error(softmax(logits), labels) < 0.015
    assert expected_calibration_error(softmax(logits * 4), labels) > 0.15


def test_ece_of_no_rows_is_zero() -> None:
    assert expected_calibration_error(np.zeros((0, 3)), np.array([], dtype=int)) == 0.0


def test_ece_refuses_labels_outside_the_classes() -> None:
    with pytest.raises(ValueError, match="class ids from 0 to 1"):
        expected_calibration_error(np.array([[0.5, 0.5]]), np.array([2]))


@pytest.mark.parametrize("true_temperature", [0.5, 3.0])
def test_fit_temperature_recovers_a_known_temperature(true_temperature: float) -> None:
    logits, labels = calibrated_logits()
    fitted = fit_temperature(logits * true_temperature, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.02)


def test_fit_temperature_of_calibrated_logits_is_one() -> None:
    logits, labels = calibrated_logits()
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.05)


def test_fit_temperature_minimises_the_nll() -> None:
    logits, labels = calibrated_logits(rows=2_000)
    logits = logits * 2.0

    def nll(temperature: float) -> float:
        probabilities = softmax(logits, temperature)
        return float(-np.log(probabilities[np.arange(len(labels)), labels]).mean())

    fitted = fit_temperature(logits, labels)
    for nearby in (fitted * 0.97, fitted * 1.03):
        assert nll(fitted) < nll(nearby)


@pytest.mark.parametrize(
    ("logits", "labels"),
    [
        (np.array([[3.0, -1.0]]), np.array([0])),
        (np.array([[3.0, -1.0], [0.5, 0.2], [-2.0, 1.0]]), np.array([1, 1, 1])),
        (np.zeros((0, 2)), np.array([], dtype=int)),
    ],
    ids=["one row", "one class", "no rows"],
)
def test_fit_temperature_is_one_when_there_is_nothing_to_fit(
    logits: np.ndarray, labels: np.ndarray
) -> None:
    assert fit_temperature(logits, labels) == 1.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_refused(bad: float) -> None:
    logits = np.array([[1.0, 2.0], [bad, 0.0]])
    with pytest.raises(ValueError, match="1 of 2 rows hold NaN or infinity"):
        fit_temperature(logits, np.array([0, 1]))
    with pytest.raises(ValueError, match="must be finite"):
        calibrate(logits, np.array([0, 1]))


def test_calibrate_lowers_the_ece_of_over_confident_logits() -> None:
    logits, labels = calibrated_logits()
    result = calibrate(logits * 3, labels)
    assert result.temperature == pytest.approx(3.0, rel=0.02)
    assert result.rows == len(labels)
    assert result.ece_before > 0.1
    assert result.ece_after < 0.015
    # Scaling never changes which class is predicted, only how sure the scores are.
    assert (softmax(logits * 3, result.temperature).argmax(1) == logits.argmax(1)).all()


def test_calibration_to_dict_is_json_ready() -> None:
    result = Calibration(temperature=1.7, ece_before=0.12, ece_after=0.02, rows=400)
    assert result.to_dict() == {
        "temperature": 1.7,
        "ece_before": 0.12,
        "ece_after": 0.02,
        "rows": 400,
    }


@pytest.mark.slow
def test_temperature_scaling_lowers_ece_on_held_out_rows_of_sst2(tmp_path: Path) -> None:
    """MiniLM fine-tuned on 1,000 SST-2 sentences, the temperature fitted on half of the dev
    set: on the other half, which neither training nor the fit saw, predict's calibrated scores
    are better calibrated than the raw ones."""
    from dataclasses import replace

    from pyarrow import csv

    from tuneq.schemas.specs import FinetuneSpec
    from tuneq.worker.ml.finetune import finetune
    from tuneq.worker.ml.predict import classify, load_for_inference

    sst2 = SHARED_DATA / "sst2"
    if not (sst2 / "dev.tsv").is_file():
        unavailable(f"{sst2} is missing")
    dev = csv.read_csv(sst2 / "dev.tsv", parse_options=csv.ParseOptions(delimiter="\t"))
    rows = dev.to_pylist()
    fit_rows, held_out = rows[: len(rows) // 2], rows[len(rows) // 2 :]
    fit_file = tmp_path / "fit.jsonl"
    fit_file.write_text("".join(json.dumps(row) + "\n" for row in fit_rows))
    spec = FinetuneSpec(
        data=str(sst2 / "train.tsv.gz"),
        text_column="sentence",
        eval_data=str(fit_file),
        eval_text_column="content",
        train_size=1000,
        epochs=3,
        learning_rate=1e-4,
        checkpoint_steps=None,
    )
    result = finetune(spec, tmp_path / "model")
    fitted = result.metrics["calibration"]
    assert fitted["rows"] == len(fit_rows) and fitted["ece_after"] < fitted["ece_before"]

    classifier = load_for_inference(str(tmp_path / "model"))
    assert classifier.temperature == fitted["temperature"] != 1.0
    texts = [row["content"] for row in held_out]
    labels = np.array([int(row["label"]) for row in held_out])
    calibrated = classify(classifier, texts)
    raw = classify(replace(classifier, temperature=1.0), texts)
    assert (calibrated.argmax(1) == raw.argmax(1)).all(), "scaling changes no label"
    assert expected_calibration_error(calibrated, labels) < expected_calibration_error(raw, labels)
