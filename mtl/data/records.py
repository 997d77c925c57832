"""In-memory form of parsed labels, shared by the two annotation parsers (ABAW tree, MTL-track file) and `pack`.

Both parsers reduce their input to the same thing: per split, per video, one row per frame with the three tasks'
labels and validity. Everything downstream (segmenting, shards, manifest counts) reads only this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mtl.constants import NUM_AU
from mtl.errors import DataError

MAX_LISTED_BAD_ROWS = 50  # the manifest lists this many skipped rows verbatim and counts the rest


@dataclass
class TaskLabels:
    """One task's labels for one video, as read from its file: row i is frame i + 1."""

    values: np.ndarray  # va: float64 [n, 2]; expr: int64 [n]; au: int64 [n, 12]; 0 where invalid
    valid: np.ndarray  # bool [n]
    source: str  # file (relative to the annotation root) the labels came from, for error messages

    def __len__(self) -> int:
        return len(self.valid)


@dataclass
class VideoLabels:
    """Labels of one video for all tasks; a task absent here has no annotation file for this video."""

    tasks: dict[str, TaskLabels] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return max((len(t) for t in self.tasks.values()), default=0)

    def dense(self, n: int) -> dict[str, np.ndarray]:
        """Arrays over frames 1..n; frames past a task's file (or a task without a file) are invalid."""
        out = {
            "va": np.zeros((n, 2), np.float64),
            "va_valid": np.zeros(n, bool),
            "expr": np.zeros(n, np.int64),
            "expr_valid": np.zeros(n, bool),
            "au": np.zeros((n, NUM_AU), np.int64),
            "au_valid": np.zeros(n, bool),
        }
        for task, lab in self.tasks.items():
            m = min(n, len(lab))
            out[task][:m] = lab.values[:m]
            out[f"{task}_valid"][:m] = lab.valid[:m]
        return out


@dataclass
class ParseLog:
    """Rows skipped under ``skip_bad_rows`` (counted in the manifest) and non-fatal oddities."""

    skip_bad_rows: bool = False
    bad_rows: dict[str, int] = field(default_factory=dict)  # split -> count
    listed: dict[str, list[str]] = field(default_factory=dict)  # split -> first MAX_LISTED_BAD_ROWS messages
    skipped_files: dict[str, list[str]] = field(default_factory=dict)  # split -> files skipped as a whole
    warnings: list[str] = field(default_factory=list)

    def bad_row(self, split: str, where: str, reason: str) -> None:
        """Raise, or record the row as skipped; the row's frame then has no label for that task."""
        msg = f"{where}: {reason}"
        if not self.skip_bad_rows:
            raise DataError(msg + " (use --skip-bad-rows to skip such rows)")
        self.bad_rows[split] = self.bad_rows.get(split, 0) + 1
        listed = self.listed.setdefault(split, [])
        if len(listed) < MAX_LISTED_BAD_ROWS:
            listed.append(msg)

    def bad_file(self, split: str, where: str, reason: str) -> None:
        msg = f"{where}: {reason}"
        if not self.skip_bad_rows:
            raise DataError(msg + " (use --skip-bad-rows to skip such files)")
        self.skipped_files.setdefault(split, []).append(msg)


# split -> video -> labels
SplitLabels = dict[str, dict[str, VideoLabels]]
