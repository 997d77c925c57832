"""Figures a person would rather look at than read: logged to MLflow after each evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: jobs on compute nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def confusion_matrix(cm: np.ndarray, names: Sequence[str], title: str = "EXPR") -> Figure:
    """Row-normalised (recall per true class), with raw counts written in the cells."""
    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    fig.colorbar(im, ax=ax, label="fraction of true class")
    ax.set_title(f"{title} confusion matrix")
    fig.tight_layout()
    return fig


def f1_bars(
    f1: Sequence[float], names: Sequence[str], tuned: Sequence[float] | None = None, title: str = "AU"
) -> Figure:
    """Per-unit F1 of a multi-label task at 0.5, and with per-unit tuned thresholds when given."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(names))
    width = 0.4 if tuned is not None else 0.8
    ax.bar(x - (width / 2 if tuned is not None else 0), f1, width, label="threshold 0.5")
    if tuned is not None:
        ax.bar(x + width / 2, tuned, width, label="per-unit threshold")
        ax.legend(fontsize=8)
    ax.set_xticks(x, names, rotation=45)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title(f"{title} F1 (macro {np.mean(f1):.3f})")
    fig.tight_layout()
    return fig


def scatter(
    pred: np.ndarray,
    true: np.ndarray,
    names: Sequence[str] = ("valence", "arousal"),
    low: float = -1.0,
    high: float = 1.0,
) -> Figure:
    """Predicted against true values of a regression task (valence and arousal), one panel per column."""
    pred, true = np.asarray(pred), np.asarray(true)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    for k, (ax, name) in enumerate(zip(axes[0], names)):
        if len(pred):
            ax.scatter(true[:, k], pred[:, k], s=3, alpha=0.4)
        ax.plot([low, high], [low, high], "k--", lw=0.8)
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
        ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def to_image(fig: Figure) -> np.ndarray:
    """The figure as rendered, RGB uint8 [H, W, 3] (what MLflow's step-wise image logging takes)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def close(fig: Figure) -> None:
    plt.close(fig)


def fold_scores(per_fold: Sequence[dict[str, float]], keys: Sequence[str]) -> Figure:
    """Cross-validation (`mtl cv`): each score of each fold's held-out videos, a group of bars per score, and the
    mean over the folds as a line across its group: how much the folds disagree, at a glance."""
    k, n = len(per_fold), len(keys)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * n * max(k, 2) / 2 + 2), 4))
    width = 0.8 / max(k, 1)
    for f, scores in enumerate(per_fold):
        xs = np.arange(n) + (f - (k - 1) / 2) * width
        ax.bar(xs, [scores.get(key, np.nan) for key in keys], width, label=f"fold {f}")
    for i, key in enumerate(keys):
        mean = float(np.mean([s[key] for s in per_fold]))
        ax.hlines(mean, i - 0.45, i + 0.45, colors="black", linestyles="--")
    ax.set_xticks(range(n), list(keys), rotation=30, ha="right")
    ax.set_ylabel("held-out score")
    ax.set_title(f"{k}-fold cross-validation (dashed: mean)")
    ax.legend(fontsize=7, ncol=min(k, 5))
    fig.tight_layout()
    return fig
