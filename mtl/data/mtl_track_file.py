"""Parser for the MTL track's single-file format (s-Aff-Wild2): one file per split.

Header ``image,<fields of each task in the track>`` (``image,valence,arousal,expression,aus``); rows
``video/NNNNN.jpg,v,a,expr,au1,...,au12`` with the ABAW invalid codes. The tasks in the file are the registered
ones with an ``mtl_track`` header, in registration order. Rows may come in any order and list only some frames;
frames not listed get no label. The result has the same form as the ABAW tree parser's, so packing does not care
which one read the labels.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mtl.data.labels import ParseLog, SplitLabels, TaskLabels, VideoLabels, read_rows, read_text_lines
from mtl.errors import DataError
from mtl.tasks import BadRow, Task, tasks

_IMAGE = re.compile(r"^(?P<video>[^/\\]+)[/\\](?P<frame>\d+)\.jpg$")
TRACK = "mtl"  # the MTL track's key where tracks are named (``--test-list mtl=FILE``, the pack's test lists)
# The organisers' test-set list of frames: ``<name>_test_set_release.txt`` for one of these names (as Task.test_lists)
TEST_LISTS = ("MTL_Challenge", "Multi_Task_Learning_Challenge", "MTL")
SUBMISSION = "MTL.txt"  # the MTL track's submission file; header ``header()``, rows ``video/NNNNN.jpg,<values>``


def track_tasks() -> tuple[Task, ...]:
    return tuple(t for t in tasks() if t.mtl_track)


def header() -> tuple[str, ...]:
    return ("image", *(h for t in track_tasks() for h in t.mtl_track))


def image_frame(text: str) -> tuple[str, int] | None:
    """``video/NNNNN.jpg`` -> (video, frame), or None when it is not one."""
    m = _IMAGE.match(text.strip())
    if not m or int(m["frame"]) < 1:
        return None
    return m["video"], int(m["frame"])


def parse_mtl_file(path: Path, split: str, log: ParseLog) -> dict[str, VideoLabels]:
    """Labels per video from one split's file."""
    path = Path(path)
    rel = str(path)
    if not path.is_file():
        raise DataError(f"MTL-track annotation file not found: {path}")
    lines = read_text_lines(path, rel)
    if len(lines) < 2:
        raise DataError(f"{rel}:{max(len(lines), 1)}: {'empty file' if not lines else 'no rows after the header'}")
    want = header()
    if tuple(f.strip().lower() for f in lines[0].split(",")) != want:
        raise DataError(f"{rel}:1: expected the header {','.join(want)}, found {lines[0].strip()!r}")
    track = track_tasks()
    spans, start = [], 1
    for t in track:
        spans.append((t, start, start + t.row_fields))
        start += t.row_fields
    seen: set[tuple[str, int]] = set()

    def parse(fields: list[str]) -> tuple[str, int, list]:
        m = _IMAGE.match(fields[0].strip())
        if not m or int(m["frame"]) < 1:
            raise BadRow(f"image {fields[0].strip()!r} is not <video>/<NNNNN>.jpg")
        video, frame = m["video"], int(m["frame"])
        if (video, frame) in seen:
            raise BadRow(f"{video}/{frame:05d}.jpg is listed twice")
        labels = [t.parse_row(fields[a:b]) for t, a, b in spans]
        seen.add((video, frame))
        return video, frame, labels

    rows: dict[str, dict[int, list]] = {}
    for _, (video, frame, labels) in read_rows(lines, rel, start, split, log, parse):
        rows.setdefault(video, {})[frame] = labels
    out: dict[str, VideoLabels] = {}
    for video, frames in sorted(rows.items()):
        n = max(frames)
        arrays = [(t.empty(n), np.zeros(n, bool)) for t in track]
        for frame, labels in frames.items():
            for (values, valid), (value, ok) in zip(arrays, labels):
                values[frame - 1], valid[frame - 1] = value, ok
        out[video] = VideoLabels(tasks={t.name: TaskLabels(v, ok, rel) for t, (v, ok) in zip(track, arrays)})
    return out


def parse_mtl(files: dict[str, Path], log: ParseLog) -> SplitLabels:
    """``{"train": file, "val": file}`` (either may be absent) -> labels per split and video."""
    unknown = set(files) - {"train", "val"}
    if unknown:
        raise DataError(f"MTL-track files given for unknown splits {sorted(unknown)}; expected train and/or val")
    out: SplitLabels = {split: parse_mtl_file(path, split, log) for split, path in sorted(files.items())}
    if "train" in out and "val" in out:
        both = sorted(set(out["train"]) & set(out["val"]))
        if both:
            raise DataError(f"{files['val']}: videos also in the train file {files['train']}: {', '.join(both[:5])}")
    return out
