"""The ABAW test set as the organisers publish it: per track a list of test videos (the MTL track: a list of frames),
and how many frames each test video has.

A submission needs a row for every frame of the original video, also where no crop exists, so the frame count
comes from the raw video (``--videos DIR``, its video packets counted with PyAV, nothing decoded), from a
``video,frames`` CSV, or, with neither, from the highest cropped frame (a warning says so: frames after the last
crop then get no row). The lists are copied into the pack (``test/lists/<track>.txt``, hashed in the manifest) so
`mtl eval --split test` writes rows in the organisers' order and `mtl submission check` checks against them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mtl.data import mtl_track_file
from mtl.data.labels import read_text_lines
from mtl.data.manifest import TrackListRecord, UnlabelledSplit, file_sha256
from mtl.errors import DataError
from mtl.tasks import task_names, tasks

SPLIT = "test"
LIST_SUFFIX = "_test_set_release"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
_SIDES = ("_left", "_right")


@dataclass(frozen=True)
class TrackList:
    """One track's list: ``videos`` in the organisers' order; the MTL track also lists ``frames`` in its order."""

    track: str  # a registered task's name, or mtl_track_file.TRACK
    source: str  # the file it was read from
    videos: tuple[str, ...]  # (MTL track: in order of first appearance)
    frames: tuple[tuple[str, int], ...] = ()  # MTL track only: (video, frame) as listed

    @property
    def is_mtl(self) -> bool:
        return self.track == mtl_track_file.TRACK


# ------------------------------------------------------------------------------------------------ the lists


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


def track_names() -> dict[str, tuple[str, ...]]:
    """Track -> the organisers' list names (without ``_test_set_release.txt``), from the task descriptions."""
    out = {t.name: t.test_lists for t in tasks()}
    out[mtl_track_file.TRACK] = mtl_track_file.TEST_LISTS
    return out


def track_of(path: Path) -> str:
    """The track an organisers' list is for, from its file name."""
    stem = _norm(path.name[: -len(path.suffix)] if path.suffix.lower() == ".txt" else path.name)
    if stem.endswith(LIST_SUFFIX):
        stem = stem[: -len(LIST_SUFFIX)]
    for track, names in track_names().items():
        if stem in {_norm(n) for n in names}:
            return track
    known = ", ".join(f"{names[0]}{LIST_SUFFIX}.txt" for names in track_names().values() if names)
    raise DataError(f"{path}: cannot tell the track from the file name (known: {known}); "
                    f"name it as TRACK=FILE, TRACK one of {', '.join(track_names())}")  # fmt: skip


def parse_spec(spec: str) -> tuple[str, Path]:
    """``FILE`` (track from the organisers' file name) or ``TRACK=FILE`` -> (track, file)."""
    head, sep, tail = spec.partition("=")
    tracks = (*task_names(), mtl_track_file.TRACK)
    if sep and head in tracks:
        return head, Path(tail)
    if sep and os.sep not in head and not Path(spec).exists():
        raise DataError(f"--test-list {spec}: unknown track {head!r} (one of {', '.join(tracks)})")
    return track_of(Path(spec)), Path(spec)


def _video_name(name: str, where: str) -> str:
    if not name or name in (".", "..") or any(c in name for c in "/\\,"):
        raise DataError(f"{where}: {name!r} is not a video name (one name a line)")
    return name


def read_video_list(path: Path, track: str) -> TrackList:
    """One video name a line (blank lines ignored); a name listed twice is an error."""
    first: dict[str, int] = {}
    for i, line in enumerate(read_text_lines(path, str(path)), 1):
        name = line.strip()
        if not name:
            continue
        _video_name(name, f"{path}:{i}")
        if name in first:
            raise DataError(f"{path}:{i}: video {name} is listed twice (also line {first[name]})")
        first[name] = i
    if not first:
        raise DataError(f"{path}: no video names")
    return TrackList(track, str(path), tuple(first))


def read_frame_list(path: Path) -> TrackList:
    """The MTL track's list: one ``video/NNNNN.jpg`` a line (more comma-separated fields ignored), an optional header
    line; a frame listed twice is an error."""
    frames: list[tuple[str, int]] = []
    seen: dict[tuple[str, int], int] = {}
    for i, line in enumerate(read_text_lines(path, str(path)), 1):
        text = line.split(",")[0].strip()
        if not text:
            continue
        vf = mtl_track_file.image_frame(text)
        if vf is None:
            if i == 1:  # a header ("image", or the training files' whole header)
                continue
            raise DataError(f"{path}:{i}: {text!r} is not <video>/<NNNNN>.jpg")
        if vf in seen:
            raise DataError(f"{path}:{i}: {text} is listed twice (also line {seen[vf]})")
        seen[vf] = i
        frames.append(vf)
    if not frames:
        raise DataError(f"{path}: no frames listed")
    return TrackList(mtl_track_file.TRACK, str(path), tuple(dict.fromkeys(v for v, _ in frames)), tuple(frames))


def read_test_lists(specs: list[str]) -> list[TrackList]:
    """The lists named on the command line, in track registration order; a track given twice is an error."""
    given: dict[str, Path] = {}
    for spec in specs:
        track, path = parse_spec(spec)
        if track in given:
            raise DataError(f"two test lists for the {track} track: {given[track]} and {path}")
        if not path.is_file():
            raise DataError(f"test list not found: {path}")
        given[track] = path
    order = list(track_names())
    out = []
    for track in sorted(given, key=order.index):
        path = given[track]
        out.append(read_frame_list(path) if track == mtl_track_file.TRACK else read_video_list(path, track))
    return out


# ------------------------------------------------------------------------------------------------ frame counts


def read_frame_counts(path: Path) -> dict[str, int]:
    """``video,frames`` rows (a header line of that form optional)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"frame-counts file not found: {path}")
    out: dict[str, int] = {}
    for i, line in enumerate(read_text_lines(path, str(path)), 1):
        fields = [f.strip() for f in line.split(",")]
        if fields == [""]:
            continue
        if i == 1 and [f.lower() for f in fields] == ["video", "frames"]:
            continue
        if len(fields) != 2:
            raise DataError(f"{path}:{i}: expected video,frames; found {line.strip()!r}")
        name = _video_name(fields[0], f"{path}:{i}")
        try:
            n = int(fields[1])
        except ValueError:
            n = 0
        if n < 1:
            raise DataError(f"{path}:{i}: frames {fields[1]!r} is not a positive integer")
        if name in out:
            raise DataError(f"{path}:{i}: video {name} is listed twice")
        out[name] = n
    return out


def video_index(folder: Path) -> dict[str, Path]:
    """Raw videos under ``folder`` (any depth: the release splits them into batch folders), by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"videos folder not found: {folder}")
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file():
            if p.stem in found:
                raise DataError(f"{folder}: two videos named {p.stem} ({found[p.stem]}, {p}); keep one")
            found[p.stem] = p
    return found


def raw_video(index: dict[str, Path], video: str) -> Path | None:
    """The raw video of a test video: its own name, or the two-person video's for ``<video>_left``/``_right``."""
    if video in index:
        return index[video]
    for side in _SIDES:
        if video.endswith(side):
            return index.get(video[: -len(side)])
    return None


def count_video_frames(path: Path) -> int:
    """Frames of a video file: its video stream's packets (one per frame), demuxed with PyAV, not decoded."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: no video stream")
            stream = container.streams.video[0]
            n = sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as exc:
        raise DataError(f"{path}: not a readable video ({exc})") from None
    if n == 0:
        raise DataError(f"{path}: no video frames")
    return n


@dataclass
class FrameCounts:
    counts: dict[str, int]  # video -> frames 1..n
    sources: dict[str, str]  # video -> "videos" | "frame_counts" | "crops"


def frame_counts(
    videos: list[str],
    highest: dict[str, int],
    videos_dir: Path | None,
    counts_csv: Path | None,
    warnings: list[str],
) -> FrameCounts:
    """Frames of each test video: the CSV's count, else its raw video's, else ``highest`` (its highest cropped or
    listed frame), with a warning. A count below ``highest`` is raised to it, with a warning."""
    table = read_frame_counts(counts_csv) if counts_csv else {}
    index = video_index(videos_dir) if videos_dir else {}
    out = FrameCounts({}, {})
    fallback = []
    for v in videos:
        raw = raw_video(index, v)
        if v in table:
            n, source, where = table[v], "frame_counts", str(counts_csv)
        elif raw is not None:
            n, source, where = count_video_frames(raw), "videos", str(raw)
        else:
            n, source, where = highest[v], "crops", ""
            fallback.append(v)
        if n < highest[v]:
            warnings.append(f"test video {v}: {where} says {n} frames, but frame {highest[v]} is cropped or listed; "
                            f"counting {highest[v]}")  # fmt: skip
            n = highest[v]
        out.counts[v], out.sources[v] = n, source
    if fallback:
        given = " or ".join(str(p) for p in (videos_dir, counts_csv) if p)
        why = f"not found in {given}" if given else "no --videos DIR or --frame-counts CSV given"
        warnings.append(f"{len(fallback)} test videos ({', '.join(fallback[:5])}{', ...' if len(fallback) > 5 else ''})"
                        f": {why}; their frame count is their highest cropped frame, so frames after the last crop "
                        f"get no submission row")  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ in the pack


def write_lists(out: Path, lists: list[TrackList], video_frames: dict[str, int]) -> dict[str, TrackListRecord]:
    """Copy the lists into the pack (``test/lists/<track>.txt``, atomically) -> the manifest's ``lists`` entry."""
    folder = Path(out) / SPLIT / "lists"
    folder.mkdir(parents=True, exist_ok=True)
    entry = {}
    for lst in lists:
        if lst.is_mtl:
            lines = [f"{v}/{f:05d}.jpg" for v, f in lst.frames]
            rows = len(lst.frames)
        else:
            lines = list(lst.videos)
            rows = sum(video_frames.get(v, 0) for v in lst.videos)
        rel = f"{SPLIT}/lists/{lst.track}.txt"
        tmp = folder / f"{lst.track}.txt.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, Path(out) / rel)
        entry[lst.track] = TrackListRecord(path=rel, source=lst.source, videos=len(lst.videos), rows=rows,
                                           sha256=file_sha256(Path(out) / rel))  # fmt: skip
    return entry


def load_lists(root: Path, entry: UnlabelledSplit) -> list[TrackList]:
    """The lists a pack holds for an unlabelled split, checked against the manifest's hashes."""
    out = []
    for track, e in entry.lists.items():
        path = Path(root) / e.path
        if not path.is_file() or file_sha256(path) != e.sha256:
            raise DataError(f"{path}: missing or changed since `mtl pack` wrote it; pack the test lists again")
        lst = read_frame_list(path) if track == mtl_track_file.TRACK else read_video_list(path, track)
        out.append(TrackList(track, e.source, lst.videos, lst.frames))
    return out


def expected_rows(lst: TrackList, video_frames: dict[str, int]) -> Iterator[tuple[str, int]]:
    """(video, frame) of every submission row of a track, in the organisers' order: the MTL track's frames as
    listed; for a task, each listed video's frames 1..n. A listed video not packed (skipped) has no rows here."""
    if lst.is_mtl:
        yield from lst.frames
        return
    for v in lst.videos:
        yield from ((v, f) for f in range(1, video_frames.get(v, 0) + 1))
