"""How cached frame features sit in a shard: `mtl features` writes with it, the feature loader and verify read.

A feature shard is a WebDataset tar like the pixel shards (same writer: atomic, byte-identical for the same input).
A sample is one video, or one segment of it when the video is longer than a sample may be (``max_frames``), under
the key ``NNNNNN`` (its index in the shard):

- ``NNNNNN.json``: ``video``, ``frames`` (1-based numbers), ``has_image`` (0/1), and the per-frame labels with their
  validity exactly as the source sample carried them (``shardio.label_meta``): nothing about the labels is derived
  again.
- ``NNNNNN.npy``: the features, a ``[frames, dim]`` array (float16 unless asked otherwise), zero rows where a frame
  has no image. Read with ``allow_pickle=False``: no pickle in shards.

A frame's feature is a few hundred bytes, so a sample holds a whole video's worth of any training window.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtl.data.shardio import label_meta, parse_labels, read_raw, sample_key, write_shard
from mtl.errors import DataError

FORMAT = "mtl-features/1"  # the manifest's "format"; a pixel pack's is mtl.data.manifest.FORMAT
FEATURES = "npy"


@dataclass
class FeatureSample:
    """A parsed feature sample: per-frame arrays of length S."""

    video: str
    frames: np.ndarray  # int64 [S]
    has_image: np.ndarray  # bool [S]
    features: np.ndarray  # [S, D], float16 or float32 as stored
    labels: dict[str, np.ndarray]  # per task and its *_valid, as shardio.Sample.labels

    def __len__(self) -> int:
        return len(self.frames)


def encode_feature_sample(index: int, sample: FeatureSample) -> dict:
    """A TarWriter sample for ``write_shard``."""
    meta = {
        "video": sample.video,
        "frames": sample.frames.astype(np.int64).tolist(),
        "has_image": sample.has_image.astype(int).tolist(),
        **label_meta(sample.labels),
    }
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(sample.features), allow_pickle=False)
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return {"__key__": sample_key(index), "json": text.encode("utf-8"), FEATURES: buf.getvalue()}


def write_feature_shard(path: Path, samples: list[FeatureSample]) -> None:
    """Atomic and deterministic, as pixel shards are written."""
    write_shard(path, [encode_feature_sample(i, s) for i, s in enumerate(samples)])


def parse_feature_sample(raw: dict, where: str) -> FeatureSample:
    """Check a raw sample's structure; DataError naming ``where`` and the sample if it is inconsistent."""
    key = raw.get("__key__")
    if "json" not in raw or FEATURES not in raw:
        raise DataError(f"{where}: sample {key} lacks its .json or .{FEATURES} member")
    try:
        meta = json.loads(raw["json"])
        frames = np.asarray(meta["frames"], np.int64)
        n = len(frames)
        has_image = np.asarray(meta["has_image"], bool)
        labels = parse_labels(meta, n)
        features = np.load(io.BytesIO(raw[FEATURES]), allow_pickle=False)
        video = str(meta["video"])
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise DataError(f"{where}: sample {key} has bad metadata or features ({exc})") from None
    problems = []
    if n == 0:
        problems.append("no frames")
    if features.ndim != 2 or features.shape[0] != n:
        problems.append(f"features have shape {list(features.shape)} for {n} frames")
    for name, arr in (("has_image", has_image), *labels.items()):
        if len(arr) != n:
            problems.append(f"{name} has {len(arr)} entries for {n} frames")
    if problems:
        raise DataError(f"{where}: sample {key}: {'; '.join(problems)}")
    return FeatureSample(video, frames, has_image, features, labels)


def read_feature_shard(path: Path) -> Iterator[FeatureSample]:
    """Every sample of one feature shard, in order (DataError naming the shard if it is damaged)."""
    for raw in read_raw(path):
        yield parse_feature_sample(raw, str(path))
