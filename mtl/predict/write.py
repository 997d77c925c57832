"""The per-input CSV, written row by row to ``<name>.csv.part`` and renamed when complete, so a failed input
never leaves a file that looks finished (and never replaces a good one)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from mtl.predict.detect import Box
from mtl.predict.names import csv_header
from mtl.predict.windows import FrameOutput


class PredictionCsv:
    def __init__(self, path: Path, au_thresholds: np.ndarray) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.part, "w", newline="")
        self._w = csv.writer(self._file)
        self._w.writerow(csv_header())
        self.thresholds = np.asarray(au_thresholds)

    def row(self, time_s: float, box: Box | None, out: FrameOutput) -> None:
        face = ["0", "", "", "", "", ""] if box is None else [
            "1", f"{box.x:.1f}", f"{box.y:.1f}", f"{box.w:.1f}", f"{box.h:.1f}", f"{box.score:.4f}"
        ]  # fmt: skip
        self._w.writerow(
            [out.index, f"{time_s:.4f}", *face, f"{out.va[0]:.5f}", f"{out.va[1]:.5f}", int(out.expr_prob.argmax())]
            + [f"{p:.5f}" for p in out.expr_prob]
            + [int(p >= t) for p, t in zip(out.au_prob, self.thresholds)]
            + [f"{p:.5f}" for p in out.au_prob]
        )

    def commit(self) -> Path:
        self._file.close()
        os.replace(self.part, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self.part.unlink(missing_ok=True)
