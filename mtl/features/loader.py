"""Training and evaluation batches from cached frame features (`mtl features`), for the two-stage recipe.

Several extractions (directories with a ``manifest.json`` in the format of ``mtl.features.shards``) are read and
concatenated per frame. They must come from the same source shards as ``data.shards`` (the sha256 of the source
manifest, recorded at extraction) and agree on every video's frames; a missing, truncated or unreadable shard, or one
that disagrees with its manifest (size, samples, frames, width, dtype), is named at start. Shards are not hashed at
start (`mtl features` hashed them when it wrote them; `mtl shards verify` checks every byte). A split is indexed,
not read: frames and labels are held, features stay on disk and a batch reads only its windows' rows
(``mtl.features.index``), so a rank's memory does not grow with the cache: no decoding, no backbone, no workers.

Batches follow the pixel loaders' contract (``mtl.data.loader``) with ``features`` f32 [B,T,D] in place of
``frames``. Training: an epoch tiles every video into windows of ``clip_len`` frames at a random shift, shuffles
all windows with a seed every rank shares, and cuts them into equal contiguous pieces, one per rank (so all ranks
run the same number of steps; a remainder of fewer than ranks x batch windows is left out that epoch). Each window
draws its augmentation (feature dropout, temporal jitter) from a seed of (seed, epoch, window), so a resumed epoch
repeats the same batches. A run resumed mid-epoch on another world size or batch size passes the earlier set-ups'
``Leg``s: the windows they read are taken out and the rest of the epoch is cut over the new ranks, so no window is
read twice in an epoch (``mtl.data.legs``, as in the pixel loader). Evaluation: every frame exactly once, in order,
as ``plan_eval`` cuts pixel clips.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl.data.legs import Leg, share, unread
from mtl.data.loader import label_arrays, plan_eval, put_labels
from mtl.data.manifest import MANIFEST, file_sha256
from mtl.data.seeds import derive_seed
from mtl.errors import DataError
from mtl.features.index import FrameFeatures, IndexedSample, Rows, ShardReader, index_feature_shard
from mtl.features.manifest import EXTRACTOR_KEYS, FeatureManifest, FeatureShardRecord, read_feature_manifest

# ------------------------------------------------------------------------------------------------ manifests


def check_sources(roots: list[str] | list[Path], source_root: str | Path) -> list[FeatureManifest]:
    """The extractions' manifests, after checking that all were made from the shards at ``source_root``."""
    manifests = [read_feature_manifest(r) for r in roots]
    if not manifests:
        raise DataError("data.features: no feature directories given")
    first = manifests[0].source
    for root, m in zip(roots[1:], manifests[1:]):
        src = m.source
        if src.manifest_sha256 != first.manifest_sha256:
            raise DataError(
                f"{Path(root) / MANIFEST} was extracted from {src.shards} (manifest sha256 "
                f"{src.manifest_sha256[:12]}) but {Path(roots[0]) / MANIFEST} from {first.shards} "
                f"({first.manifest_sha256[:12]}): concatenated features must come from the same source shards"
            )
    source_manifest = Path(source_root) / MANIFEST
    if not source_manifest.is_file():
        raise DataError(f"data.shards={source_root}: no {MANIFEST} there (the shards the features were made from)")
    have = file_sha256(source_manifest)
    if first.manifest_sha256 != have:
        raise DataError(
            f"{Path(roots[0]) / MANIFEST}: extracted from {first.shards} (manifest sha256 "
            f"{first.manifest_sha256[:12]}), not from data.shards={source_root} (manifest sha256 {have[:12]}); "
            f"point data.shards at the source or extract again with `mtl features`"
        )
    return manifests


def extractor_params(roots: list[str] | list[Path], manifests: list[FeatureManifest]) -> dict[str, Any]:
    """The extractors' identity, as MLflow params ``features.<i>.<key>``."""
    out: dict[str, Any] = {}
    for i, (root, m) in enumerate(zip(roots, manifests)):
        out[f"features.{i}.path"] = str(root)
        out[f"features.{i}.dim"] = m.dim
        out[f"features.{i}.dtype"] = m.dtype
        out.update({f"features.{i}.{k}": getattr(m.extractor, k) for k in EXTRACTOR_KEYS})
    out["features.dim"] = sum(m.dim for m in manifests)
    return out


# ------------------------------------------------------------------------------------------------ one split


@dataclass
class Video:
    """One video's frames, labels and concatenated features (``features`` [n, D], as stored: float16 or float32;
    an array, or ``FrameFeatures`` reading them from the shards on demand)."""

    name: str
    frames: np.ndarray
    has_image: np.ndarray
    features: np.ndarray | FrameFeatures | None
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.frames)


def _index_shard(root: Path, split: str, entry: FeatureShardRecord, dim: int, dtype: str) -> list[IndexedSample]:
    """One shard's samples (features left on disk), checked against the manifest by size and structure only: the
    sha256 is checked once when `mtl features` writes the shard and by `mtl shards verify`, not at every start."""
    path = root / entry.path
    if not path.is_file():
        raise DataError(f"{path}: missing (listed in {root / MANIFEST}, split {split!r})")
    size = path.stat().st_size
    if size != entry.bytes:
        raise DataError(f"{path}: damaged feature shard ({size} bytes, its manifest says {entry.bytes})")
    samples = index_feature_shard(path)
    if len(samples) != entry.samples:
        raise DataError(f"{path}: {len(samples)} samples, its manifest {root / MANIFEST} says {entry.samples}")
    for i, s in enumerate(samples):
        r = s.rows
        if r.dim != dim or r.dtype != np.dtype(dtype):
            raise DataError(f"{path}: video {s.video} has {r.dtype} features of dim {r.dim}, its manifest "
                            f"{root / MANIFEST} says {dtype} x {dim}")  # fmt: skip
        if entry.sample_frames is not None and len(s) != entry.sample_frames[i]:
            raise DataError(f"{path}: sample {i:06d} has {len(s)} frames, its manifest {root / MANIFEST} says "
                            f"{entry.sample_frames[i]}")  # fmt: skip
    return samples


@dataclass
class _Joined:
    """One video of one extraction: its segments' frames and labels joined, their features' places listed."""

    path: Path
    video: Video
    rows: list[Rows]


def _videos(root: Path, manifest: FeatureManifest, split: str) -> list[_Joined]:
    """Each video of one extraction's split; consecutive segments of a video joined."""
    if split not in manifest.splits:
        raise DataError(f"{root / MANIFEST}: no split {split!r} (have {', '.join(manifest.splits) or 'none'})")
    out: list[_Joined] = []
    for entry in manifest.splits[split].shards:
        for s in _index_shard(root, split, entry, manifest.dim, manifest.dtype):
            if out and out[-1].video.name == s.video:
                v = out[-1].video
                v.frames = np.concatenate([v.frames, s.frames])
                v.has_image = np.concatenate([v.has_image, s.has_image])
                v.labels = {k: np.concatenate([v.labels[k], s.labels[k]]) for k in v.labels}
                out[-1].rows.append(s.rows)
            else:
                video = Video(s.video, s.frames, s.has_image, None, s.labels)
                out.append(_Joined(root / entry.path, video, [s.rows]))
    if not out:
        raise DataError(f"{root / MANIFEST}: split {split!r} has no samples")
    return out


def _span(frames: np.ndarray) -> str:
    return f"{len(frames)} frames {int(frames[0])}..{int(frames[-1])}" if len(frames) else "no frames"


def _agree(first_root: Path, first: list[_Joined], root: Path, other: list[_Joined], split: str) -> None:
    """Two extractions of one split hold the same videos and frames, in the same order."""
    names_a, names_b = [j.video.name for j in first], [j.video.name for j in other]
    if names_a != names_b:
        i = next((i for i, (a, b) in enumerate(zip(names_a, names_b)) if a != b), min(len(names_a), len(names_b)))
        a = names_a[i] if i < len(names_a) else "(none)"
        b = names_b[i] if i < len(names_b) else "(none)"
        raise DataError(f"{root / MANIFEST}: split {split!r} video #{i + 1} is {b}, where {first_root} has {a}: "
                        f"extractions disagree on the videos")  # fmt: skip
    for ja, jb in zip(first, other):
        va, vb, path = ja.video, jb.video, jb.path
        if not np.array_equal(va.frames, vb.frames) or not np.array_equal(va.has_image, vb.has_image):
            raise DataError(
                f"{path}: video {vb.name} has {_span(vb.frames)}, where {first_root} has {_span(va.frames)} "
                f"(or other frames with an image): extractions disagree on frames"
            )


class FeatureSplit:
    """Every video of one split, with the extractions' features concatenated per frame."""

    def __init__(self, videos: list[Video], dim: int) -> None:
        self.videos, self.dim = videos, dim
        self.reader: ShardReader | None = None  # set by ``load``: its ``bytes_read`` is what the loaders read

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read if self.reader else 0

    @classmethod
    def load(cls, roots: list[str] | list[Path], manifests: list[FeatureManifest], split: str) -> FeatureSplit:
        """Indexed, not read: each video's features are read from the shards when a batch needs them."""
        roots = [Path(r) for r in roots]
        per = [_videos(r, m, split) for r, m in zip(roots, manifests)]
        for r, other in zip(roots[1:], per[1:]):
            _agree(roots[0], per[0], r, other, split)
        reader = ShardReader()
        dtype = np.result_type(*(np.dtype(m.dtype) for m in manifests))
        videos = []
        for parts in zip(*per):
            v = parts[0].video
            v.features = FrameFeatures(reader, [p.rows for p in parts], dtype)
            videos.append(v)
        split_ = cls(videos, sum(m.dim for m in manifests))
        split_.reader = reader
        return split_

    @property
    def lengths(self) -> list[int]:
        return [len(v) for v in self.videos]


# ------------------------------------------------------------------------------------------------ plans


def plan_windows(lengths: list[int], clip_len: int, *, epoch: int, seed: int) -> list[tuple[int, int]]:
    """(video, first frame) of every training window of one epoch, shuffled; the same on every rank.

    A video of n frames gives ceil(n / clip_len) windows that cover it, shifted at random each epoch (the last
    ones clamped inside the video), so an epoch sees each frame about once and windows start anywhere over epochs.
    """
    rng = np.random.default_rng(derive_seed(seed, epoch, 0xFEA7))
    out = []
    for v, n in enumerate(lengths):
        k = math.ceil(n / clip_len)
        shift = int(rng.integers(0, k * clip_len - n + 1)) if n > clip_len else 0
        out += [(v, min(max(0, j * clip_len - shift), max(0, n - clip_len))) for j in range(k)]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


# ------------------------------------------------------------------------------------------------ batches


def _empty(batch: int, clip_len: int, dim: int) -> dict[str, np.ndarray]:
    arrays = label_arrays(batch, clip_len)
    del arrays["gain"], arrays["bias"]
    arrays["features"] = np.zeros((batch, clip_len, dim), np.float32)
    return arrays


def _to_torch(arrays: dict) -> dict:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}


class FeatureTrainLoader:
    """One rank's training batches of one epoch (``len()`` batches; ``skip_batches`` resumes mid-epoch, ``legs``
    are the parts of the epoch read before under other set-ups)."""

    def __init__(self, split: FeatureSplit, data_cfg, *, rank: int, world_size: int, epoch: int, seed: int,
                 skip_batches: int = 0, legs: Sequence[Leg] = ()) -> None:  # fmt: skip
        self.split, self.cfg = split, data_cfg
        self.t, self.b = data_cfg.clip_len, data_cfg.batch_size
        self.epoch, self.seed, self.skip = epoch, seed, max(0, skip_batches)
        windows = plan_windows(split.lengths, self.t, epoch=epoch, seed=seed)
        left = unread(len(windows), legs, epoch=epoch, seed=seed, in_order=True)
        mine = share(left, rank=rank, world_size=world_size, batch_size=self.b)
        self.n_batches = mine.batches
        # epoch-wide indices of this rank's windows: they name each window's augmentation seed
        self.index: list[int] = mine.parts[0].tolist()
        self.windows = [windows[i] for i in self.index]

    def __len__(self) -> int:
        return self.n_batches

    @property
    def remaining(self) -> int:
        return max(0, self.n_batches - self.skip)

    def __iter__(self) -> Iterator[dict]:
        for j in range(self.skip, self.n_batches):
            yield self.batch(j)

    def batch(self, j: int) -> dict:
        aug = self.cfg.feature_augment
        arrays = _empty(self.b, self.t, self.split.dim)
        ids = np.zeros(self.b, np.int64)
        for k in range(self.b):
            w = j * self.b + k
            vi, a = self.windows[w]
            v = self.split.videos[vi]
            b = min(a + self.t, len(v))
            rng = np.random.default_rng(derive_seed(self.seed, self.epoch, self.index[w], 0xA6))
            src = np.arange(a, b)
            if aug.jitter:  # a neighbour's feature (one with an image) stands in for the frame's own
                moved = np.clip(src + rng.integers(-aug.jitter, aug.jitter + 1, len(src)), 0, len(v) - 1)
                src = np.where(v.has_image[moved] & v.has_image[src], moved, src)
            feats = v.features[src].astype(np.float32)
            if aug.dropout:
                keep = rng.random(feats.shape, dtype=np.float32) >= aug.dropout
                feats *= keep / np.float32(1 - aug.dropout)
            arrays["features"][k, : b - a] = feats
            put_labels(arrays, k, v, a, b)
            ids[k] = self.index[w]  # the window is this path's training sample
        return _to_torch({**arrays, "sample": ids})


class FeatureEvalLoader:
    """Every frame of the split once, in clips of ``clip_len``; then all-padding batches up to ``len()``, which
    every rank shares."""

    def __init__(self, split: FeatureSplit, data_cfg, *, rank: int, world_size: int) -> None:
        self.split, self.t, self.b = split, data_cfg.clip_len, data_cfg.eval_batch_size
        self.n_batches, self.batches = plan_eval([split.lengths], self.t, self.b, rank, world_size)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[dict]:
        for clips in itertools.chain(self.batches, itertools.repeat([], self.n_batches - len(self.batches))):
            yield self.batch(clips)

    def batch(self, clips: list[tuple[int, int, int]]) -> dict:
        arrays = _empty(self.b, self.t, self.split.dim)
        videos = [""] * self.b
        for k, (_, vi, a) in enumerate(clips):
            v = self.split.videos[vi]
            b = min(a + self.t, len(v))
            arrays["features"][k, : b - a] = v.features[a:b]
            put_labels(arrays, k, v, a, b)
            videos[k] = v.name
        return _to_torch({**arrays, "video": videos})
