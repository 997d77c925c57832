"""What one evaluation leaves in MLflow: scalar metrics per task, class and unit, and a plot per task.

Plots by kind: a confusion matrix per single-label task (``expr_confusion.png``), F1 bars per multi-label task
(``au_f1.png``), predicted against true per regression task (``va_scatter.png``). Each is logged twice: as an image
at the evaluation's step under ``<split>/<plot>`` (``val/expr_confusion``: the UI's image view over steps) and as
the file ``plots/<split>/step_NNNNNNNN/<plot>.png``.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from mtl.metrics import ABAWMetrics
from mtl.tasks.streams import ClassStream, MultiLabelStream, RegressionStream, TaskStream
from mtl.tracking import plots
from mtl.tracking.mlflow_run import Tracker


def task_figure(stream: TaskStream, scores: dict[str, float]) -> tuple[str, Figure] | None:
    """(file name, figure) for one task's stream, by the task's kind."""
    t = stream.task
    if isinstance(stream, ClassStream):
        return f"{t.name}_confusion.png", plots.confusion_matrix(stream.confusion(), t.columns, t.title)
    if isinstance(stream, MultiLabelStream):
        f1 = [scores[f"{t.name}_f1/{c}"] for c in t.columns]
        tuned = [scores.get(f"{t.name}_f1_tuned/{c}") for c in t.columns]
        return f"{t.name}_f1.png", plots.f1_bars(f1, t.columns, tuned if None not in tuned else None, t.title)
    if isinstance(stream, RegressionStream):
        return f"{t.name}_scatter.png", plots.scatter(*stream.sample(), t.columns, t.low, t.high)
    return None


def log_evaluation(tracker: Tracker, metrics: ABAWMetrics, scores: dict[str, float], step: int, split: str) -> None:
    if not tracker.active:
        return
    tracker.log_metrics({f"{split}/{k}": v for k, v in scores.items()}, step=step, flush=True)
    for stream in metrics.streams.values():
        made = task_figure(stream, scores)
        if made is None:
            continue
        name, fig = made
        tracker.log_figure(fig, f"plots/{split}/step_{step:08d}/{name}")
        tracker.log_image(plots.to_image(fig), key=image_key(split, name), step=step)
        plots.close(fig)


def image_key(split: str, file_name: str) -> str:
    """``val/expr_confusion``: one key per split and plot, whose images the MLflow UI pages through by step."""
    return f"{split}/{file_name.removesuffix('.png')}"
