import numpy as np
import pytest

from tuneq.worker.metrics import classification_metrics


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
