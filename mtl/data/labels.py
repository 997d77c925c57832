"""In-memory form of parsed labels, shared by the two annotation parsers (ABAW tree, MTL-track file) and `pack`.

Both parsers reduce their input to the same thing: per split, per video, one row per frame with each registered
task's labels and validity. Everything downstream (segmenting, shards, manifest counts) reads only this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from mtl.errors import DataError
from mtl.tasks import BadRow, tasks

T = TypeVar("T")
MAX_LISTED_BAD_ROWS = 50  # the manifest lists this many skipped rows verbatim and counts the rest


@dataclass
class TaskLabels:
    """One task's labels for one video, as read from its file: row i is frame i + 1."""

    values: np.ndarray  # [n, *task.label_shape] of task.file_dtype; 0 where invalid
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
        out: dict[str, np.ndarray] = {}
        for task in tasks():
            out[task.name], out[task.valid_key] = task.empty(n), np.zeros(n, bool)
            lab = self.tasks.get(task.name)
            if lab is not None:
                m = min(n, len(lab))
                out[task.name][:m] = lab.values[:m]
                out[task.valid_key][:m] = lab.valid[:m]
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


def read_text_lines(path: Path, rel: str) -> list[str]:
    """Lines without their LF/CRLF ends; trailing blank lines dropped (a final newline is not a row)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{rel}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{rel}: cannot read ({exc.strerror})") from None
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def read_rows(
    lines: list[str], rel: str, fields: int, split: str, log: ParseLog, parse: Callable[[list[str]], T]
) -> Iterator[tuple[int, T]]:
    """``(i, parse(values))`` for each row after the header (i: 0-based, line i + 2 of the file) that has
    ``fields`` comma-separated values and parses; the other rows go to ``log`` as ``rel:line`` (raise or skip)."""
    for i, line in enumerate(lines[1:]):
        values = line.split(",")
        try:
            if len(values) != fields:
                raise BadRow(f"expected {fields} comma-separated values, found {len(values)}")
            row = parse(values)
        except BadRow as exc:
            log.bad_row(split, f"{rel}:{i + 2}", str(exc))
            continue
        yield i, row
