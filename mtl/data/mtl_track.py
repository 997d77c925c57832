"""Parser for the MTL track's single-file format (s-Aff-Wild2): one file per split.

Header ``image,valence,arousal,expression,aus``; rows ``video/NNNNN.jpg,v,a,expr,au1,...,au12`` with the ABAW invalid
codes. Rows may come in any order and list only some frames; frames not listed get no label. The result has the
same form as the ABAW tree parser's, so packing does not care which one read the labels.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mtl.constants import NUM_AU
from mtl.data.abaw import BadRow, parse_au, parse_expr, parse_va, read_text_lines
from mtl.data.records import ParseLog, SplitLabels, TaskLabels, VideoLabels
from mtl.errors import DataError

HEADER = ("image", "valence", "arousal", "expression", "aus")
COLUMNS = 1 + 2 + 1 + NUM_AU
_IMAGE = re.compile(r"^(?P<video>[^/\\]+)[/\\](?P<frame>\d+)\.jpg$")


def parse_mtl_file(path: Path, split: str, log: ParseLog) -> dict[str, VideoLabels]:
    """Labels per video from one split's file."""
    path = Path(path)
    rel = str(path)
    if not path.is_file():
        raise DataError(f"MTL-track annotation file not found: {path}")
    lines = read_text_lines(path, rel)
    if len(lines) < 2:
        raise DataError(f"{rel}:{max(len(lines), 1)}: {'empty file' if not lines else 'no rows after the header'}")
    header = [f.strip().lower() for f in lines[0].split(",")]
    if tuple(header) != HEADER:
        raise DataError(f"{rel}:1: expected the header {','.join(HEADER)}, found {lines[0].strip()!r}")
    rows: dict[str, dict[int, tuple]] = {}
    for i, line in enumerate(lines[1:]):
        where = f"{rel}:{i + 2}"
        fields = line.split(",")
        try:
            if len(fields) != COLUMNS:
                raise BadRow(f"expected {COLUMNS} comma-separated values, found {len(fields)}")
            m = _IMAGE.match(fields[0].strip())
            if not m or int(m["frame"]) < 1:
                raise BadRow(f"image {fields[0].strip()!r} is not <video>/<NNNNN>.jpg")
            video, frame = m["video"], int(m["frame"])
            if frame in rows.get(video, {}):
                raise BadRow(f"{video}/{frame:05d}.jpg is listed twice")
            row = (parse_va(fields[1:3]), parse_expr(fields[3:4]), parse_au(fields[4:]))
        except BadRow as exc:
            log.bad_row(split, where, str(exc))
            continue
        rows.setdefault(video, {})[frame] = row
    out: dict[str, VideoLabels] = {}
    for video, frames in sorted(rows.items()):
        n = max(frames)
        va, va_ok = np.zeros((n, 2), np.float64), np.zeros(n, bool)
        ex, ex_ok = np.zeros(n, np.int64), np.zeros(n, bool)
        au, au_ok = np.zeros((n, NUM_AU), np.int64), np.zeros(n, bool)
        for frame, ((v, vok), (e, eok), (a, aok)) in frames.items():
            i = frame - 1
            va[i], va_ok[i], ex[i], ex_ok[i], au[i], au_ok[i] = v, vok, e, eok, a, aok
        out[video] = VideoLabels(
            tasks={
                "va": TaskLabels(va, va_ok, rel),
                "expr": TaskLabels(ex, ex_ok, rel),
                "au": TaskLabels(au, au_ok, rel),
            }
        )
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
