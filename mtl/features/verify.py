"""`mtl shards verify F` on a feature cache: every shard the manifest lists read back and checked against it.

Per shard: the file exists, its size and sha256 match, it reads to the end, every sample parses
(``read_feature_shard``) with the frame count, width and dtype the manifest says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from mtl.data.manifest import file_sha256
from mtl.data.verify import MAX_REASONS, ShardReport
from mtl.errors import DataError
from mtl.features.manifest import FeatureShardRecord, read_feature_manifest
from mtl.features.shards import read_feature_shard


def check_feature_shard(root: Path, entry: FeatureShardRecord, dim: int, dtype: str) -> ShardReport:
    rep = ShardReport(entry.path)
    path = Path(root) / entry.path
    if not path.is_file():
        rep.problems.append("file missing")
        return rep
    size = path.stat().st_size
    if size != entry.bytes:
        rep.problems.append(f"size {size} bytes, manifest says {entry.bytes}")
    digest = file_sha256(path)
    if digest != entry.sha256:
        rep.problems.append(f"sha256 {digest[:12]}... does not match the manifest's {entry.sha256[:12]}...")
    expected = entry.sample_frames
    try:
        for i, s in enumerate(read_feature_shard(path)):
            rep.samples += 1
            rep.frames += len(s)
            if len(rep.problems) >= MAX_REASONS:
                continue
            if expected is not None and i < len(expected) and len(s) != expected[i]:
                rep.problems.append(f"sample {i:06d} has {len(s)} frames, manifest says {expected[i]}")
            if s.features.shape[1] != dim or s.features.dtype != np.dtype(dtype):
                rep.problems.append(f"sample {i:06d} has {s.features.dtype} features of width "
                                    f"{s.features.shape[1]}, manifest says {dtype} x {dim}")  # fmt: skip
            if not np.isfinite(s.features).all():
                rep.problems.append(f"sample {i:06d} has non-finite features")
    except DataError as exc:
        rep.problems.append(str(exc))
    if rep.samples != entry.samples:
        rep.problems.append(f"{rep.samples} samples, manifest says {entry.samples}")
    return rep


def verify_features(root: str | Path, progress: bool = True) -> list[ShardReport]:
    """One report per shard listed in the manifest, in manifest order."""
    root = Path(root)
    m = read_feature_manifest(root)
    reports = []
    for e in tqdm(m.shards(), desc="verify", unit="shard", disable=not progress):
        reports.append(check_feature_shard(root, e, m.dim, m.dtype))
    return reports
