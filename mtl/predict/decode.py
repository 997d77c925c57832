"""Frames of one input, in order, as RGB uint8 arrays: a video file (PyAV / FFmpeg) or a folder of images."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from mtl.errors import DataError

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass
class Frame:
    index: int  # 0-based, in decoding order
    time_s: float
    rgb: np.ndarray | None  # uint8 [h, w, 3]; None: this frame's image does not decode (``problem`` says why)
    problem: str | None = None


class VideoFrames:
    """Decoded with FFmpeg's own frame threads; times from each frame's presentation timestamp."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise DataError(f"{path}: no video stream")
                stream = container.streams.video[0]
                self.total: int | None = int(stream.frames) or None
                rate = stream.average_rate or stream.guessed_rate
                self.fps = float(rate) if rate else 30.0
        except av.FFmpegError as exc:
            raise DataError(f"{path}: not a readable video ({exc})") from None

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                start = None
                for frame in container.decode(stream):
                    t = frame.time
                    if t is None:
                        t = index / self.fps
                    start = t if start is None else start
                    yield Frame(index, float(t - start), frame.to_ndarray(format="rgb24"))
                    index += 1
        except av.FFmpegError as exc:
            raise DataError(f"{self.path}: video does not decode after frame {index} ({exc})") from None


def _natural_key(path: Path) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


class FolderFrames:
    """Image files in natural name order (frame2 before frame10), spaced 1/fps apart."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps = path, fps
        self.files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        self.total: int | None = len(self.files)

    def __iter__(self) -> Iterator[Frame]:
        """One undecodable file is one frame without an image (a row without a face), not the end of the folder:
        its place in time is known from its name, and the frames around it still are predicted."""
        for i, f in enumerate(self.files):
            bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if bgr is None:
                yield Frame(i, i / self.fps, None, f"{f}: image does not decode")
                continue
            yield Frame(i, i / self.fps, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def open_input(path: Path, fps: float = 30.0) -> VideoFrames | FolderFrames:
    """The frame source for ``path``, or a DataError naming it (missing, unsupported, empty)."""
    path = Path(path)
    if path.is_dir():
        source = FolderFrames(path, fps)
        if not source.files:
            raise DataError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return source
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise DataError(f"{path}: not a video ({', '.join(VIDEO_SUFFIXES)}) or a folder of frames")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    return VideoFrames(path)
