"""What one evaluation leaves in MLflow: scalar metrics per task, class and AU, and the three plots."""

from __future__ import annotations

import numpy as np

from mtl.constants import AU_NAMES, EXPR_NAMES
from mtl.metrics import ABAWMetrics
from mtl.tracking import plots
from mtl.tracking.mlflow_run import Tracker


def log_evaluation(tracker: Tracker, metrics: ABAWMetrics, scores: dict[str, float], step: int, split: str) -> None:
    if not tracker.active:
        return
    tracker.log_metrics({f"{split}/{k}": v for k, v in scores.items()}, step=step, flush=True)
    tuned = [scores.get(f"au_f1_tuned/{n}") for n in AU_NAMES]
    figures = {
        "expr_confusion.png": plots.confusion_matrix(metrics.confusion(), EXPR_NAMES),
        "au_f1.png": plots.au_f1_bars(
            [scores[f"au_f1/{n}"] for n in AU_NAMES], AU_NAMES, tuned if None not in tuned else None
        ),
        "va_scatter.png": plots.va_scatter(*(np.asarray(a) for a in metrics.va_sample())),
    }
    for name, fig in figures.items():
        tracker.log_figure(fig, f"plots/{split}/step_{step:08d}/{name}")
        plots.close(fig)
