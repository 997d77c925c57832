"""Where each sample's features lie in a feature shard, and reading just the rows a batch needs.

A feature shard is an uncompressed tar, so a sample's ``.npy`` array sits at a fixed byte range of the file. The
index is made from the tar headers, the small ``.json`` members and the ``.npy`` headers only: a cache of many GB is
indexed without reading its features, and a rank then reads (``os.pread``) the rows of the windows it trains on,
nothing else. Nothing is memory-mapped, so a rank's resident memory does not grow with the cache.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtl.data.shardio import parse_labels
from mtl.errors import DataError
from mtl.features.shards import FEATURES

OPEN_FILES = 128  # shard files a process keeps open at once (least recently read closed first)


@dataclass(frozen=True)
class Rows:
    """One sample's ``[n, dim]`` features: ``n * dim`` values of ``dtype`` from byte ``offset`` of ``path``."""

    path: Path
    offset: int
    n: int
    dim: int
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize


@dataclass
class IndexedSample:
    """A sample's frames, labels and where its features are (``rows``), not the features themselves."""

    video: str
    frames: np.ndarray  # int64 [n]
    has_image: np.ndarray  # bool [n]
    labels: dict[str, np.ndarray]
    rows: Rows

    def __len__(self) -> int:
        return len(self.frames)


def _npy_header(f, where: str) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran or dtype.hasobject:
        raise ValueError(f"{where}: a Fortran-ordered or object array")
    return shape, dtype


def _meta(data: bytes, where: str) -> tuple[str, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    meta = json.loads(data)
    frames = np.asarray(meta["frames"], np.int64)
    n = len(frames)
    has_image = np.asarray(meta["has_image"], bool)
    labels = parse_labels(meta, n)
    bad = [k for k, a in (("has_image", has_image), *labels.items()) if len(a) != n]
    if n == 0 or bad:
        raise ValueError(f"{where}: {'no frames' if n == 0 else ', '.join(bad) + ' disagree with the frame count'}")
    return str(meta["video"]), frames, has_image, labels


def index_feature_shard(path: Path) -> list[IndexedSample]:
    """Every sample of one shard, in order, with its features' byte range; DataError naming the shard (and the
    sample) when its structure is broken. Reads headers and metadata only."""
    out: list[IndexedSample] = []
    pending: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tf, open(path, "rb") as raw:
            size = os.fstat(raw.fileno()).st_size
            for info in tf:
                if not info.isreg():
                    continue
                if info.offset_data + info.size > size:  # tarfile itself would take the cut for the archive's end
                    raise ValueError(f"{info.name} runs past the end of the file: cut short")
                key, _, ext = info.name.partition(".")
                part = pending.setdefault(key, {})
                where = f"sample {key}"
                if ext == "json":
                    part["meta"] = _meta(tf.extractfile(info).read(), where)
                elif ext == FEATURES:
                    raw.seek(info.offset_data)
                    shape, dtype = _npy_header(raw, where)
                    start = raw.tell()
                    if len(shape) != 2 or start - info.offset_data + shape[0] * shape[1] * dtype.itemsize != info.size:
                        raise ValueError(f"{where}: features of shape {list(shape)} do not fill their member")
                    part["rows"] = Rows(path, start, shape[0], shape[1], dtype)
                if "meta" in part and "rows" in part:
                    video, frames, has_image, labels = part.pop("meta")
                    rows = part.pop("rows")
                    del pending[key]
                    if rows.n != len(frames):
                        raise ValueError(f"{where}: features have {rows.n} rows for {len(frames)} frames")
                    out.append(IndexedSample(video, frames, has_image, labels, rows))
    except (OSError, tarfile.TarError, ValueError, KeyError, TypeError, EOFError) as exc:
        raise DataError(f"{path}: damaged feature shard ({exc})") from None
    if pending:
        raise DataError(f"{path}: damaged feature shard (sample {next(iter(pending))} lacks its .json or .npy)")
    return out


class ShardReader:
    """Reads row ranges from shard files with ``os.pread``, keeping a few files open; counts the bytes it read
    (what a rank's loader costs in I/O, and how the tests see that a rank reads only its windows)."""

    def __init__(self) -> None:
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self.bytes_read = 0

    def _fd(self, path: Path) -> int:
        fd = self._fds.pop(path, None)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise DataError(f"{path}: {exc.strerror} (a feature shard, gone since the run started)") from None
            while len(self._fds) >= OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[path] = fd
        return fd

    def read(self, rows: Rows, a: int, b: int) -> np.ndarray:
        """Rows ``a:b`` of one sample, ``[b - a, dim]`` as stored."""
        want = (b - a) * rows.row_bytes
        data = os.pread(self._fd(rows.path), want, rows.offset + a * rows.row_bytes)
        self.bytes_read += len(data)
        if len(data) != want:
            raise DataError(f"{rows.path}: damaged feature shard (cut short since the run started)")
        return np.frombuffer(data, rows.dtype).reshape(b - a, rows.dim)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


class FrameFeatures:
    """A video's features, its extractions concatenated per frame, read on demand: ``parts[e]`` are extraction
    e's consecutive segments of the video. Indexing (a slice or an int array) gives ``[k, D]`` in ``dtype``."""

    def __init__(self, reader: ShardReader, parts: list[list[Rows]], dtype: np.dtype) -> None:
        self.reader, self.parts, self.dtype = reader, parts, np.dtype(dtype)
        self.n = sum(r.n for r in parts[0])
        self.dim = sum(segs[0].dim for segs in parts)

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.dim)

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            a, b, step = idx.indices(self.n)
            if step != 1:
                raise IndexError("FrameFeatures: only contiguous slices")
            return self.read(a, b)
        idx = np.asarray(idx, np.int64)
        if idx.size == 0:
            return np.zeros((0, self.dim), self.dtype)
        lo = int(idx.min())
        return self.read(lo, int(idx.max()) + 1)[idx - lo]

    def read(self, a: int, b: int) -> np.ndarray:
        """Frames ``a:b``: one read per extraction and segment they touch."""
        out = np.empty((max(0, b - a), self.dim), self.dtype)
        col = 0
        for segs in self.parts:
            start = 0
            for r in segs:
                lo, hi = max(a, start), min(b, start + r.n)
                if lo < hi:
                    out[lo - a : hi - a, col : col + r.dim] = self.reader.read(r, lo - start, hi - start)
                start += r.n
            col += segs[0].dim
        return out
