import numpy as np
import pytest

from tuneq.worker.ml.metrics import (
    classification_metrics,
    fit_thresholds,
    multilabel_metrics,
    regression_metrics,
    spearman,
)


def test_metrics_of_a_known_confusion() -> None:
    actual = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    predicted = np.array([0, 0, 0, 1, 1, 1, 0, 1, 2, 1])
    metrics = classification_metrics(predicted, actual, ["neg", "pos", "neutral"])
    assert metrics["confusion_matrix"] == [[3, 1, 0], [1, 3, 0], [0, 1, 1]]
    assert metrics["accuracy"] == pytest.approx(0.7)
    assert metrics["per_class"]["neg"] == {
        "precision": 0.75,
        "recall": 0.75,
        "f1": 0.75,
        "support": 4,
    }
    assert metrics["per_class"]["pos"]["precision"] == pytest.approx(0.6)
    assert metrics["per_class"]["neutral"]["recall"] == pytest.approx(0.5)
    f1_pos = 2 * 0.6 * 0.75 / 1.35
    f1_neutral = 2 * 1.0 * 0.5 / 1.5
    assert metrics["macro_f1"] == pytest.approx((0.75 + f1_pos + f1_neutral) / 3, abs=1e-6)


def test_a_class_never_predicted_scores_zero_not_nan() -> None:
    metrics = classification_metrics(np.array([0, 0]), np.array([0, 1]), ["a", "b"])
    assert metrics["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_regression_metrics_of_known_values() -> None:
    actual = np.array([1.0, 2.0, 3.0, 4.0])
    predicted = np.array([1.5, 2.0, 2.0, 5.0])
    metrics = regression_metrics(predicted, actual, constant=2.5)
    assert metrics["mae"] == pytest.approx((0.5 + 0 + 1 + 1) / 4)
    assert metrics["rmse"] == pytest.approx(np.sqrt((0.25 + 0 + 1 + 1) / 4))
    assert metrics["constant_mae"] == pytest.approx(1.0)
    # ranks of predicted with the tie shared: 1, 2.5, 2.5, 4 against 1, 2, 3, 4
    assert metrics["spearman"] == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])


def test_spearman_is_one_for_any_increasing_map_and_zero_for_a_constant() -> None:
    x = np.array([3.0, -1.0, 8.0, 2.0, 5.0])
    assert spearman(np.exp(x), x) == pytest.approx(1.0)
    assert spearman(-x, x) == pytest.approx(-1.0)
    assert spearman(np.ones(5), x) == 0.0


def test_multilabel_metrics_of_a_known_case() -> None:
    actual = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    predicted = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=bool)
    metrics = multilabel_metrics(predicted, actual, ["a", "b", "c"])
    # true positives 2, 1, 1; predicted 2, 2, 1; actual 2, 2, 2
    assert metrics["micro_f1"] == pytest.approx(2 * 4 / (5 + 6))
    assert metrics["per_class"]["a"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert metrics["per_class"]["c"]["recall"] == pytest.approx(0.5)
    assert metrics["macro_f1"] == pytest.approx((1.0 + 0.5 + 2 / 3) / 3)
    assert metrics["subset_accuracy"] == pytest.approx(0.25)


def test_thresholds_are_fitted_per_label() -> None:
    rng = np.random.default_rng(0)
    actual = rng.random((400, 2)) < 0.5
    # label 0 is separable at 0.3, label 1 at 0.8; probabilities carry that and nothing else
    probabilities = np.where(actual, [0.35, 0.85], [0.25, 0.75]) + rng.normal(0, 0.01, (400, 2))
    assert fit_thresholds(probabilities, actual).tolist() == [0.3, 0.8]
