"""The per-input CSV, written row by row to ``<name>.csv.part`` and renamed when complete, so a failed input
never leaves a file that looks finished (and never replaces a good one)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtl.evaluation.postprocess import PostProcess
from mtl.predict.detect import Box
from mtl.predict.names import csv_header
from mtl.predict.windows import FrameOutput
from mtl.tasks import Task


class PredictionCsv:
    """With a post-processing file, rows are held until the input ends: smoothing needs the whole video."""

    def __init__(
        self,
        path: Path,
        tasks: Sequence[Task],
        thresholds: dict[str, np.ndarray],
        postprocess: PostProcess | None = None,
    ) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.part, "w", newline="")
        self._w = csv.writer(self._file)
        self._w.writerow(csv_header(tasks))
        self.tasks, self.thresholds = tuple(tasks), thresholds
        self.postprocess = postprocess
        self._held: list[tuple[float, Box | None, FrameOutput]] = []
        self.smoothed: list[FrameOutput] = []  # with a post-processing file: the rows as written, in frame order

    def row(self, time_s: float, box: Box | None, out: FrameOutput) -> None:
        if self.postprocess is not None:
            self._held.append((time_s, box, out))
        else:
            self._write(time_s, box, out)

    def _flush(self) -> None:
        """The held rows, each task's values smoothed along the input's frames as the file says."""
        if not self._held:
            return
        rows = sorted(self._held, key=lambda r: r[2].index)
        video = ["input"] * len(rows)
        frame = [r[2].index for r in rows]
        arrays = {t.name: np.stack([r[2].values[t.name] for r in rows]) for t in self.tasks}
        assert self.postprocess is not None
        smoothed = self.postprocess.smooth_arrays(arrays, video, frame)
        for i, (time_s, box, out) in enumerate(rows):
            self.smoothed.append(FrameOutput(out.index, {n: a[i] for n, a in smoothed.items()}))
            self._write(time_s, box, self.smoothed[-1])
        self._held = []

    def _write(self, time_s: float, box: Box | None, out: FrameOutput) -> None:
        face = ["0", "", "", "", "", ""] if box is None else [
            "1", f"{box.x:.1f}", f"{box.y:.1f}", f"{box.w:.1f}", f"{box.h:.1f}", f"{box.score:.4f}"
        ]  # fmt: skip
        cells = [c for t in self.tasks for c in t.prediction_cells(out.values[t.name], self.thresholds.get(t.name))]
        self._w.writerow([out.index, f"{time_s:.4f}", *face, *cells])

    def commit(self) -> Path:
        self._flush()
        self._file.close()
        os.replace(self.part, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self.part.unlink(missing_ok=True)
