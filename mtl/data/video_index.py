"""Which video each sample of a labelled split belongs to, and what it labels: read from the shards' ``.json``
members, since the manifest counts samples per shard but does not name their videos.

Cross-validation needs it twice: to split the videos into folds with every task labelled on both sides
(`mtl.data.folds`), and to hand a fold's loaders the samples of its videos and its loss the label counts of its
training part. A scan reads every sample's small ``.json`` member and seeks over its JPEGs; it is done once per
process and split (cached), and stops with one line naming the shard if the pack changed since.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtl.data.manifest import LabelledSplit, read_manifest
from mtl.data.shardio import parse_labels, read_meta
from mtl.errors import DataError
from mtl.tasks import tasks


@dataclass(frozen=True)
class SampleInfo:
    """One sample: where it is, its video, and per task the label statistics of its frames (as the manifest's
    ``tasks`` counts them: labelled frames with and without an image, the task's count fields over the first)."""

    split: str
    shard: int
    index: int
    video: str
    frames: int
    labels: dict[str, dict[str, object]] = field(hash=False, compare=False)


def label_stats(labels: dict[str, np.ndarray], has_image: np.ndarray) -> dict[str, dict[str, object]]:
    """Per task, one sample's statistics as the manifest counts them (`mtl pack`, `mtl shards verify`): labelled
    frames with and without an image, and the task's count fields over the first."""
    out: dict[str, dict[str, object]] = {}
    for t in tasks():
        valid = labels[t.valid_key]
        counts = {k: np.asarray(c, np.int64) for k, c in t.counts(labels[t.name][valid & has_image]).items()}
        out[t.name] = {
            "labeled_frames": int((valid & has_image).sum()),
            "labeled_missing_image": int((valid & ~has_image).sum()),
            **counts,
        }
    return out


def _sample_stats(meta: dict, n: int) -> dict[str, dict[str, object]]:
    return label_stats(parse_labels(meta, n), np.asarray(meta["has_image"], bool))


@functools.lru_cache(maxsize=8)
def _scan(root: str, split: str, digest: tuple[str, ...]) -> tuple[SampleInfo, ...]:
    entry = read_manifest(root).split(split)
    out = []
    for s, shard in enumerate(entry.shards):
        path = Path(root) / shard.path
        seen = 0
        for index, meta in read_meta(path, shard.bytes):
            try:
                n = len(meta["frames"])
                out.append(SampleInfo(split, s, index, str(meta["video"]), n, _sample_stats(meta, n)))
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{path}: sample {index} has bad metadata ({exc}); run `mtl shards verify`") from None
            seen += 1
        if seen != shard.samples:
            raise DataError(f"{path}: {seen} samples, the manifest says {shard.samples}; run `mtl shards verify`")
    return tuple(out)


def scan_split(root: str | Path, split: str) -> list[SampleInfo]:
    """Every sample of a labelled split with its video and label statistics (cached per process and pack)."""
    entry = read_manifest(root).split(split)
    if not isinstance(entry, LabelledSplit):
        raise DataError(f"{root}: split {split!r} is unlabelled (the test set): it has no labels to train on")
    return list(_scan(str(Path(root).resolve()), split, tuple(sh.sha256 for sh in entry.shards)))


def task_stats(samples: list[SampleInfo]) -> dict[str, dict[str, object]]:
    """The manifest's per-task statistics (``LabelledSplit.task_stats``) over these samples only: what a fold's
    losses weigh their classes by (focal ``alpha: auto``)."""
    out: dict[str, dict[str, object]] = {}
    for t in tasks():
        videos = {s.video for s in samples if _labels(s, t.name)}
        st: dict[str, object] = {"videos": len(videos), "labeled_frames": 0, "labeled_missing_image": 0}
        totals = {k: np.zeros(n, np.int64) for k, n in t.count_fields().items()}
        for s in samples:
            lab = s.labels[t.name]
            st["labeled_frames"] += lab["labeled_frames"]  # type: ignore[operator]
            st["labeled_missing_image"] += lab["labeled_missing_image"]  # type: ignore[operator]
            for k in totals:
                totals[k] += lab[k]  # type: ignore[arg-type]
        out[t.name] = {**st, **{k: v.tolist() for k, v in totals.items()}}
    return out


def _labels(s: SampleInfo, task: str) -> bool:
    """Whether the sample has a valid label of ``task`` on any frame (with or without an image)."""
    lab = s.labels[task]
    return bool(lab["labeled_frames"] or lab["labeled_missing_image"])


def labelled_tasks(samples: list[SampleInfo]) -> dict[str, set[str]]:
    """video -> the tasks it has at least one valid label of (a frame with or without an image)."""
    out: dict[str, set[str]] = {}
    for s in samples:
        have = out.setdefault(s.video, set())
        have.update(name for name in s.labels if _labels(s, name))
    return out
