"""The CSV columns of `mtl predict`: the frame and face columns, then each task's prediction columns as `mtl eval`
writes them (the task descriptions own those: VA values, the expression and its probabilities, AU decisions and
probabilities, and any plugin task's)."""

from __future__ import annotations

from collections.abc import Sequence

from mtl.tasks import Task

FACE_COLUMNS: tuple[str, ...] = ("frame", "time_s", "face", "face_x", "face_y", "face_w", "face_h", "face_score")


def csv_header(tasks: Sequence[Task]) -> list[str]:
    return [*FACE_COLUMNS, *(c for t in tasks for c in t.prediction_header())]
