"""Temperature scaling for classifier scores (plain NumPy).

A fine-tuned classifier is usually over-confident: its top score says 0.99 where it is right
far less often. Dividing the logits by one temperature ``T`` fitted on held-out rows fixes most
of that without changing any prediction (the arg-max is the same for every ``T > 0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# The search runs on beta = 1/T because the mean NLL is convex in beta (a log-sum-exp of
# functions linear in beta minus a linear term), so a golden-section search finds the one
# minimum. The range allows T from 0.05 to 20, far wider than a real model needs.
BETA_RANGE = (1 / 20, 1 / 0.05)
BETA_TOLERANCE = 1e-7
GOLDEN = (math.sqrt(5) - 1) / 2
SIGNIFICANT_DIGITS = 4


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and the expected calibration error before and after applying it."""

    temperature: float
    ece_before: float
    ece_after: float
    rows: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (for ``tuneq.json``)."""
        return asdict(self)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``; each row sums to 1."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    # Subtracting the row maximum keeps exp() from overflowing; the result is unchanged.
    shifted = scaled - scaled.max(axis=-1, keepdims=True)
    exponentials = np.exp(shifted)
    return np.asarray(exponentials / exponentials.sum(axis=-1, keepdims=True))


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = 15
) -> float:
    """Top-label ECE: the row-weighted mean over equal-width confidence bins of
    ``|accuracy - mean confidence|``.

    Bins are ``(lo, hi]`` slices of ``[0, 1]``; ``labels`` are integer class ids. No rows give 0.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = check_labels(labels, probabilities)
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if len(labels) == 0:
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    gaps = np.bincount(which, weights=correct - confidence, minlength=bins)
    # The sum of (correct - confidence) over a bin is its count times (accuracy - confidence).
    return float(np.abs(gaps).sum() / counts.sum())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature ``T > 0`` that minimises the mean NLL of ``softmax(logits / T)``.

    Rounded to 4 significant digits, finer than the fit is meaningful.
    """
    logits = check_logits(logits)
    labels = check_labels(labels, logits)
    # With under two rows or one class there is nothing to fit: the NLL of a single class only
    # rewards ever sharper (or flatter) scores, so its minimum says nothing about calibration.
    if len(labels) < 2 or len(np.unique(labels)) < 2:
        return 1.0
    beta = minimise_convex(lambda b: mean_nll(logits, labels, b), *BETA_RANGE)
    return float(f"{1 / beta:.{SIGNIFICANT_DIGITS}g}")


def calibrate(logits: np.ndarray, labels: np.ndarray) -> Calibration:
    """Fit a temperature on ``logits`` and ``labels`` and measure ECE before and after it.

    Both errors are measured on the rows the temperature was fitted on, so ``ece_after`` is
    an optimistic estimate for new data.
    """
    logits = check_logits(logits)
    temperature = fit_temperature(logits, labels)
    return Calibration(
        temperature=temperature,
        ece_before=round(expected_calibration_error(softmax(logits), labels), 6),
        ece_after=round(expected_calibration_error(softmax(logits, temperature), labels), 6),
        rows=len(logits),
    )


def mean_nll(logits: np.ndarray, labels: np.ndarray, beta: float) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(beta * logits)``."""
    scaled = beta * logits
    top = scaled.max(axis=1)
    log_total = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
    return float(np.mean(log_total - scaled[np.arange(len(labels)), labels]))


def minimise_convex(function: Callable[[float], float], low: float, high: float) -> float:
    """The minimiser of a convex ``function`` on ``[low, high]`` by golden-section search."""
    left, right = high - GOLDEN * (high - low), low + GOLDEN * (high - low)
    f_left, f_right = function(left), function(right)
    while high - low > BETA_TOLERANCE:
        if f_left <= f_right:
            high, right, f_right = right, left, f_left
            left = high - GOLDEN * (high - low)
            f_left = function(left)
        else:
            low, left, f_left = left, right, f_right
            right = low + GOLDEN * (high - low)
            f_right = function(right)
    return (low + high) / 2


def check_logits(logits: np.ndarray) -> np.ndarray:
    """``logits`` as a finite float array of shape (rows, classes), or a ``ValueError``."""
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"logits must have shape (rows, classes), got shape {array.shape}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise ValueError(
            f"logits must be finite, but {bad} of {len(array)} rows hold NaN or infinity: "
            "the model's outputs are broken; check the checkpoint before calibrating"
        )
    return array


def check_labels(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``labels`` as integer class ids that index the columns of ``scores``, or a ``ValueError``."""
    array = np.asarray(labels)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (rows, classes), got shape {scores.shape}")
    if array.shape != (len(scores),):
        raise ValueError(
            f"labels must have one id per row: got shape {array.shape} for {len(scores)} rows"
        )
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= scores.shape[1]):
        raise ValueError(
            f"labels must be class ids from 0 to {scores.shape[1] - 1}, "
            f"got values from {array.min()} to {array.max()}"
        )
    return array.astype(np.int64)
