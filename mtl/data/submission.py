"""The organisers' submission format, and `mtl submission check`: a submission checked against the test lists of
a pack before upload.

One file per track whose list was packed: a task's file (``Task.submission``, e.g. ``VA.txt``) has the header
``image_location,<the task's columns>`` and a row ``video/NNNNN.jpg,<values>`` for every frame of every listed
video, videos in the list's order, frames in order; the MTL track's file (``MTL.txt``) has the MTL-track header
``image,valence,arousal,expression,aus`` and a row for every listed frame, in the list's order. Values: each task's
``check_submission`` (VA in [-1, 1], EXPR a class 0..7, AU 0/1).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtl.data import mtl_track_file
from mtl.data.manifest import UnlabelledSplit, read_manifest
from mtl.data.testset import TrackList, load_lists
from mtl.errors import DataError
from mtl.tasks import BadRow, Task, get_task

IMAGE_COLUMN = "image_location"
MAX_PROBLEMS = 20


@dataclass(frozen=True)
class TrackFormat:
    file: str
    header: str
    tasks: tuple[Task, ...]  # whose values follow the image, in this order


def track_format(track: str) -> TrackFormat:
    if track == mtl_track_file.TRACK:
        return TrackFormat(mtl_track_file.SUBMISSION, ",".join(mtl_track_file.header()), mtl_track_file.track_tasks())
    t = get_task(track)
    return TrackFormat(t.submission, ",".join((IMAGE_COLUMN, *t.columns)), (t,))


def image_name(video: str, frame: int) -> str:
    return f"{video}/{frame:05d}.jpg"


def unlabeled_entry(root: Path, split: str) -> UnlabelledSplit:
    """The manifest entry of an unlabelled split (one packed from test lists); DataError otherwise."""
    manifest = read_manifest(root)
    splits = manifest.splits
    if split not in splits:
        raise DataError(f"{manifest.path}: no split {split!r} (have {', '.join(splits)})")
    entry = splits[split]
    if not isinstance(entry, UnlabelledSplit):
        raise DataError(f"{manifest.path}: split {split!r} is labelled; submissions are checked against the "
                        f"test lists of an unlabelled split (`mtl pack --test-list ...`)")  # fmt: skip
    return entry


# ------------------------------------------------------------------------------------------------ check


@dataclass
class Problems:
    limit: int = MAX_PROBLEMS
    shown: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, msg: str) -> None:
        self.count += 1
        if len(self.shown) < self.limit:
            self.shown.append(msg)


class _Rows:
    """Where each (video, frame) of a track's list sits in the organisers' order, without listing every frame."""

    def __init__(self, lst: TrackList, video_frames: dict[str, int]) -> None:
        self.mtl = lst.is_mtl
        if self.mtl:
            self.frames = lst.frames
            self.pos = {vf: i for i, vf in enumerate(lst.frames)}
            self.total = len(lst.frames)
        else:
            self.videos = [v for v in lst.videos if v in video_frames]
            self.starts, self.offset, total = [], {}, 0
            for v in self.videos:
                self.starts.append(total)
                self.offset[v] = (total, video_frames[v])
                total += video_frames[v]
            self.total = total

    def index(self, video: str, frame: int) -> int | None:
        if self.mtl:
            return self.pos.get((video, frame))
        start, n = self.offset.get(video, (0, 0))
        return start + frame - 1 if 1 <= frame <= n else None

    def row(self, i: int) -> tuple[str, int]:
        if self.mtl:
            return self.frames[i]
        k = bisect.bisect_right(self.starts, i) - 1
        return self.videos[k], i - self.starts[k] + 1


def check_file(path: Path, lst: TrackList, video_frames: dict[str, int], problems: Problems) -> int:
    """Check one track's file; returns its data rows."""
    fmt = track_format(lst.track)
    if not path.is_file():
        problems.add(f"{path}: missing (the {lst.track} track's list {lst.source} has {len(lst.videos)} videos)")
        return 0
    for v in lst.videos:
        if v not in video_frames and not lst.is_mtl:
            problems.add(f"{path}: video {v} of the {lst.track} list was skipped by `mtl pack` (no frames folder): "
                         f"its rows are not there")  # fmt: skip
    rows = _Rows(lst, video_frames)
    widths = [t.row_fields for t in fmt.tasks]
    n_fields = 1 + sum(widths)
    seen = np.zeros(rows.total, bool)
    last, last_name, data_rows = -1, "", 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                problems.add(f"{where}: not UTF-8 text")
                continue
            if lineno == 1:
                if line.strip() != fmt.header:
                    problems.add(f"{where}: header {line.strip()!r}, expected {fmt.header!r}")
                continue
            data_rows += 1
            fields = line.split(",")
            if len(fields) != n_fields:
                problems.add(f"{where}: expected {n_fields} comma-separated values, found {len(fields)}")
                continue
            vf = mtl_track_file.image_frame(fields[0])
            if vf is None or fields[0] != image_name(*vf):
                problems.add(f"{where}: {fields[0]!r} is not <video>/<NNNNN>.jpg (5-digit frame number)")
                continue
            i = rows.index(*vf)
            if i is None:
                problems.add(f"{where}: {fields[0]} is not a frame of the {lst.track} test list")
            elif seen[i]:
                problems.add(f"{where}: {fields[0]} appears twice")
            else:
                if i < last:
                    problems.add(f"{where}: {fields[0]} is out of order (it comes before {last_name})")
                seen[i] = True
                if i > last:
                    last, last_name = i, fields[0]
            a = 1
            for t, w in zip(fmt.tasks, widths):
                try:
                    t.check_submission(fields[a : a + w])
                except BadRow as exc:
                    problems.add(f"{where}: {exc}")
                a += w
    missing = np.flatnonzero(~seen)
    if len(missing):
        first, k = int(missing[0]), len(missing)
        problems.add(f"{path}: {k} row{'s' * (k != 1)} missing, the first {image_name(*rows.row(first))} "
                     f"(expected at line {first + 2})")  # fmt: skip
    return data_rows


def check_submission(folder: Path, shards: Path, split: str = "test") -> tuple[Problems, dict[str, int]]:
    """Every check of a submission folder against the lists of ``split`` in the pack ``shards``:
    (problems, data rows per file)."""
    folder, shards = Path(folder), Path(shards)
    entry = unlabeled_entry(shards, split)
    if not folder.is_dir():
        raise DataError(f"submission folder not found: {folder}")
    lists = load_lists(shards, entry)
    files = {track_format(lst.track).file: lst for lst in lists}
    problems = Problems()
    for p in sorted(folder.iterdir()):
        if p.name not in files and not p.name.startswith("."):
            problems.add(f"{p}: unexpected file (the organisers expect {', '.join(files)})")
    rows = {name: check_file(folder / name, lst, entry.video_frames, problems) for name, lst in files.items()}
    return problems, rows
