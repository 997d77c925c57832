"""The per-input CSV, written row by row to ``<name>.csv.part`` and renamed when complete, so a failed input
never leaves a file that looks finished (and never replaces a good one)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtl.predict.detect import Box
from mtl.predict.names import csv_header
from mtl.predict.windows import FrameOutput
from mtl.tasks import Task


class PredictionCsv:
    def __init__(self, path: Path, tasks: Sequence[Task], thresholds: dict[str, np.ndarray]) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.part, "w", newline="")
        self._w = csv.writer(self._file)
        self._w.writerow(csv_header(tasks))
        self.tasks, self.thresholds = tuple(tasks), thresholds

    def row(self, time_s: float, box: Box | None, out: FrameOutput) -> None:
        face = ["0", "", "", "", "", ""] if box is None else [
            "1", f"{box.x:.1f}", f"{box.y:.1f}", f"{box.w:.1f}", f"{box.h:.1f}", f"{box.score:.4f}"
        ]  # fmt: skip
        cells = [c for t in self.tasks for c in t.prediction_cells(out.values[t.name], self.thresholds.get(t.name))]
        self._w.writerow([out.index, f"{time_s:.4f}", *face, *cells])

    def commit(self) -> Path:
        self._file.close()
        os.replace(self.part, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self.part.unlink(missing_ok=True)
