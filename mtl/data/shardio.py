"""The one place that knows how a sample sits in a shard; pack writes with it, verify and the loaders read with it.

A sample is one segment of consecutive frames of one video, stored as two tar members under the key
``NNNNNN`` (its index in the shard):

- ``NNNNNN.jpgs``: the original JPEG files of the frames that have one, concatenated byte for byte (never
  re-encoded). One member per segment instead of one per frame: a 64-frame sample costs one tar header and one
  read, not 64, and the loader decodes them as a batch.
- ``NNNNNN.json``: ``video``, ``frames`` (1-based numbers), ``has_image`` and ``jpeg_sizes`` (0 where no image) per
  frame, and per-frame labels with their validity, under each registered task's name: ``va`` [[v, a]], ``expr``,
  ``au`` [[12]], ``*_valid`` (0/1); labels are 0 where invalid. A registered task missing from a sample (shards
  packed before it was registered) reads as no label on any frame.

No pickle: JSON and raw JPEG bytes only. Shards are plain, uncompressed, USTAR tars with fixed member metadata
(mtime 0, no owner) so the same input gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtl.errors import DataError, naming
from mtl.tasks import tasks

JPEG_MAGIC = b"\xff\xd8"


def sample_key(index: int) -> str:
    return f"{index:06d}"


def label_meta(labels: dict[str, np.ndarray]) -> dict[str, list]:
    """The JSON fields of a segment's labels: each task's values and its 0/1 validity, per frame."""
    out: dict[str, list] = {}
    for t in tasks():
        out[t.name] = labels[t.name].tolist()
        out[t.valid_key] = labels[t.valid_key].astype(int).tolist()
    return out


def parse_labels(meta: dict, n: int) -> dict[str, np.ndarray]:
    """The inverse of ``label_meta`` over ``n`` frames; a task the sample lacks reads as no label on any frame.
    Raises ValueError, KeyError or TypeError on malformed fields (callers name the sample)."""
    labels: dict[str, np.ndarray] = {}
    for t in tasks():
        if t.name in meta:
            labels[t.name] = np.asarray(meta[t.name], t.batch_dtype).reshape(n, *t.label_shape)
            labels[t.valid_key] = np.asarray(meta[t.valid_key], bool)
        else:
            labels[t.name], labels[t.valid_key] = t.empty(n, t.batch_dtype), np.zeros(n, bool)
    return labels


def encode_sample(index: int, meta: dict, jpegs: list[bytes | None]) -> dict:
    """A TarWriter sample; ``meta`` holds video, frames and labels; ``jpegs`` one entry per frame (None: no image)."""
    sizes = [0 if j is None else len(j) for j in jpegs]
    meta = {**meta, "has_image": [int(s > 0) for s in sizes], "jpeg_sizes": sizes}
    blob = b"".join(j for j in jpegs if j is not None)
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return {"__key__": sample_key(index), "json": text.encode("utf-8"), "jpgs": blob}


def write_shard(path: Path, samples: list[dict]) -> None:
    """Write atomically: a ``.tmp`` file, fsync, then rename, so a file named ``*.tar`` is always complete."""
    from webdataset.writer import TarWriter  # here: webdataset imports torch, which reading metadata needs not

    tmp = path.with_name(path.name + ".tmp")
    try:
        with naming(tmp), open(tmp, "wb") as f:
            with TarWriter(f, user="", group="", mode=0o644, encoder=False, mtime=0) as writer:
                for sample in samples:
                    writer.write(sample)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk gets its space back
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        with naming(path.parent):
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_size(path: Path, expected: int | None) -> None:
    """DataError naming the shard when its size is not the manifest's (a copy cut short, a rewritten file): one
    stat per open, so training stops at once with what to run instead of failing later on a garbled sample.
    (``mtl shards verify`` also checks every byte against the manifest's sha256.)"""
    if expected is None:  # a manifest from before sizes were recorded
        return
    verify = f"run `mtl shards verify {path.parent.parent}`"
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: {exc.strerror}; {verify}") from None
    if size != expected:
        raise DataError(f"{path}: {size} bytes, the manifest says {expected} (changed after `mtl pack`); {verify}")


def _member_index(name: str) -> int:
    stem = name.split("/")[-1].split(".", 1)[0]
    return int(stem) if stem.isdigit() else -1


def read_raw(
    path: Path, first: int = 0, stop: int | None = None, size: int | None = None, only: frozenset[int] | None = None
) -> Iterator[dict]:
    """Raw samples (``__key__``, ``json``, ``jpgs`` bytes) with index in [first, stop), in shard order; ``size``:
    the shard's bytes in the manifest, checked first (``check_size``); ``only``: just these indices (the others in
    the range are seeked over, not read: a fold's selection of videos, ``mtl.data.folds``).

    Opens the tar seekable ("r:"), so members before ``first`` are skipped by seeking over them, not read: a worker
    that starts in the middle of a shard pays for the headers only. Grouping of members into samples is
    webdataset's own ``group_by_keys``.
    """

    from webdataset.tariterators import group_by_keys

    def members() -> Iterator[dict]:
        check_size(path, size)
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                if not info.isreg():
                    continue
                idx = _member_index(info.name)
                if idx < first:
                    continue
                if stop is not None and idx >= stop:
                    break
                if only is not None and idx not in only:
                    continue
                yield {"fname": info.name, "data": tf.extractfile(info).read(), "__url__": str(path)}

    try:
        for raw in group_by_keys(members()):
            raw["__index__"] = _member_index(raw["__key__"])
            yield raw
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: unreadable shard ({exc}); run `mtl shards verify`") from None


def read_meta(path: Path, size: int | None = None) -> Iterator[tuple[int, dict]]:
    """(index, parsed ``.json`` member) of every sample of a shard, in shard order; the JPEG members are seeked
    over, not read. What a selection of samples by video needs (``mtl.data.folds``)."""
    check_size(path, size)
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                if info.isreg() and info.name.endswith(".json"):
                    idx = _member_index(info.name)
                    yield idx, json.loads(tf.extractfile(info).read())
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: unreadable shard ({exc}); run `mtl shards verify`") from None


class ShardReader:
    """Random access to samples by index, for the evaluation loader (whose workers take every W-th batch).

    The tar's headers are read once (seeking over the data); a sample then costs one seek and one read per member.
    Keeps one shard open at a time: workers move through shards in order.
    """

    def __init__(self) -> None:
        self._path: Path | None = None
        self._tar: tarfile.TarFile | None = None
        self._index: dict[int, dict[str, tarfile.TarInfo]] = {}

    def _open(self, path: Path, size: int | None) -> None:
        self.close()
        check_size(path, size)
        try:
            tar = tarfile.open(path, "r:")
            index: dict[int, dict[str, tarfile.TarInfo]] = {}
            for info in tar.getmembers():
                if info.isreg():
                    key, _, ext = info.name.split("/")[-1].partition(".")
                    if key.isdigit():
                        index.setdefault(int(key), {})[ext] = info
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{path}: unreadable shard ({exc}); run `mtl shards verify`") from None
        self._path, self._tar, self._index = path, tar, index

    def get(self, path: Path, index: int, size: int | None = None) -> dict:
        """Sample ``index`` of shard ``path``; ``size``: its bytes in the manifest, checked when it is opened."""
        if path != self._path:
            self._open(path, size)
        members = self._index.get(index)
        if members is None:
            raise DataError(f"{path}: no sample {sample_key(index)}; run `mtl shards verify`")
        try:
            raw = {ext: self._tar.extractfile(info).read() for ext, info in members.items()}
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{path}: unreadable sample {sample_key(index)} ({exc})") from None
        return {"__key__": sample_key(index), "__index__": index, **raw}

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._path, self._tar, self._index = None, None, {}


@dataclass
class Sample:
    """A parsed sample: per-frame arrays of length S and the JPEG bytes of the frames that have one."""

    video: str
    frames: np.ndarray  # int64 [S]
    has_image: np.ndarray  # bool [S]
    offsets: np.ndarray  # int64 [S + 1]; frame i's JPEG is blob[offsets[i]:offsets[i + 1]] (empty if none)
    blob: bytes
    labels: dict[str, np.ndarray]  # per task: <name> [S, *label_shape] of its batch_dtype, <name>_valid bool [S]

    def __len__(self) -> int:
        return len(self.frames)


def parse_sample(raw: dict, where: str) -> Sample:
    """Check a raw sample's structure and turn it into arrays; DataError naming ``where`` if it is inconsistent."""
    if "json" not in raw or "jpgs" not in raw:
        raise DataError(f"{where}: sample {raw.get('__key__')} lacks its .json or .jpgs member")
    try:
        meta = json.loads(raw["json"])
        frames = np.asarray(meta["frames"], np.int64)
        n = len(frames)
        sizes = np.asarray(meta["jpeg_sizes"], np.int64)
        has_image = np.asarray(meta["has_image"], bool)
        labels = parse_labels(meta, n)
        video = str(meta["video"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{where}: sample {raw['__key__']} has bad metadata ({exc})") from None
    blob = raw["jpgs"]
    problems = []
    if n == 0:
        problems.append("no frames")
    for name, arr in (("jpeg_sizes", sizes), ("has_image", has_image), *labels.items()):
        if len(arr) != n:
            problems.append(f"{name} has {len(arr)} entries for {n} frames")
    if not problems:
        if (sizes < 0).any() or not np.array_equal(sizes > 0, has_image):
            problems.append("jpeg_sizes disagree with has_image")
        if int(sizes.sum()) != len(blob):
            problems.append(f"JPEG sizes add up to {int(sizes.sum())} bytes, the .jpgs member has {len(blob)}")
        problems += [p for t in tasks() if (p := t.label_problem(labels[t.name])) is not None]
    if problems:
        raise DataError(f"{where}: sample {raw['__key__']}: {'; '.join(problems)}")
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return Sample(video, frames, has_image, offsets, blob, labels)
