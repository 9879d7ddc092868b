"""Pictures of a fine-tune, saved beside its model: the loss curves and the confusion matrix.

matplotlib draws off-screen (Agg); it loads only when a fine-tune ends, never with the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOSS_PNG = "loss.png"
CONFUSION_PNG = "confusion.png"
PLOTS = (LOSS_PNG, CONFUSION_PNG)


def write_plots(out_dir: Path, metrics: dict[str, Any], label_names: list[str]) -> list[str]:
    """Write ``loss.png`` and, for a classifier, ``confusion.png`` into ``out_dir``; returns
    the file names."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display on workers; never pick a GUI backend
    plot_losses(
        out_dir / LOSS_PNG, metrics.get("loss_curve") or [], metrics.get("eval_curve") or []
    )
    if "confusion_matrix" not in metrics:  # a regression has no classes to confuse
        return [LOSS_PNG]
    plot_confusion(out_dir / CONFUSION_PNG, metrics["confusion_matrix"], label_names)
    return list(PLOTS)


def plot_losses(
    path: Path, train: list[dict[str, float]], evaluation: list[dict[str, float]]
) -> None:
    """Training loss per logged step as a line, evaluation loss as points joined by a line."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if train:
        axes.plot(
            [p["step"] for p in train], [p["loss"] for p in train], label="train loss", lw=1.5
        )
    if evaluation:
        axes.plot(
            [p["step"] for p in evaluation],
            [p["loss"] for p in evaluation],
            "o-",
            label="eval loss",
            lw=1.5,
            color="tab:orange",
        )
    if not train and not evaluation:
        axes.text(0.5, 0.5, "no losses were logged", ha="center", va="center")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("Loss")
    axes.grid(alpha=0.3)
    if train or evaluation:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_confusion(path: Path, matrix: list[list[int]], label_names: list[str]) -> None:
    """Rows are true labels, columns predicted ones; each cell shows its count."""
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(matrix)
    size = 2.6 + 0.55 * len(label_names)
    figure, axes = plt.subplots(figsize=(size + 1.2, size), dpi=100)
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    ticks = range(len(label_names))
    axes.set_xticks(ticks, label_names, rotation=30, ha="right")
    axes.set_yticks(ticks, label_names)
    axes.set_xlabel("predicted label")
    axes.set_ylabel("true label")
    axes.set_title("Confusion matrix (eval)")
    threshold = counts.max() / 2 if counts.size else 0
    for (row, column), value in np.ndenumerate(counts):
        axes.text(
            column,
            row,
            str(value),
            ha="center",
            va="center",
            color="white" if value > threshold else "black",
        )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
