"""``manifest.json`` of a feature cache: the contract between `mtl features` (writes it) and the feature loader.

Layout (paths relative to the cache root; the names below are fixed, readers may rely on them)::

    {"format": "mtl-features/1",                       # mtl.features.shards.FORMAT
     "source": {"shards": "/abs/path/of/the/pixel/pack",
                "manifest_sha256": "<sha256 of its manifest.json>"},
     "extractor": {"backbone": "vit_base_patch16_224",  # timm name
                   "weights_sha256": "<hex>",           # of the --weights file, or of the run's export file; of the
                                                        # encoder's state dict where there is no one file (a DeepSpeed
                                                        # checkpoint, random weights): see weights_digest
                   "checkpoint": "/abs/run" | null,     # the trained run the backbone came from (`--checkpoint`)
                   "pool": "avg" | "cls" | "flatten",
                   "image_size": 112,
                   "mean": [r, g, b], "std": [r, g, b], # the normalisation the frames were given
                   "hflip_tta": false,                  # true: each feature is the mean of the frame and its mirror
                   "backbone_kwargs": {...}},           # (extra) passed to timm.create_model
     "dim": 768,                                        # feature width D
     "dtype": "float16" | "float32",                    # of the .npy arrays
     "params": {"max_frames", "shard_frames", "batch_size"},   # (extra) how the samples were cut
     "splits": {"train": {
         "videos": int, "frames": int, "frames_with_image": int,
         "shards": [{"path": "train/000000.tar", "bytes": int, "sha256": "<hex>", "samples": int,
                     "frames": int, "sample_frames": [int, ...]}]},     # frames, sample_frames: (extra)
       "val": {...}}}

A sample is one video, or one of ``ceil(n / max_frames)`` equal consecutive parts of a longer one, in frame order;
a video's parts are consecutive samples of one shard. Videos are in name order within a split. The manifest is
written last, once every shard it lists is complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mtl.data.manifest import MANIFEST, is_count, load_manifest_json, need
from mtl.features.shards import FORMAT

DTYPES = ("float16", "float32")


def write_feature_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    """Atomic, and safe when two writers race (SLURM tasks finishing together): each its own temporary name."""
    path = Path(root) / MANIFEST
    tmp = path.with_name(f"{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


EXTRACTOR_KEYS = ("backbone", "weights_sha256", "checkpoint", "pool", "image_size", "mean", "std", "hflip_tta")


def read_feature_manifest(root: str | Path) -> dict[str, Any]:
    """The validated manifest of a feature cache; DataError naming the file and the key when missing or bad."""
    root = Path(root)
    path = root / MANIFEST
    m = load_manifest_json(root, FORMAT, "a folder written by `mtl features` (and did it finish)?")
    src = m.get("source")
    need(isinstance(src, dict) and isinstance(src.get("shards"), str), path, "source.shards", "expected a path")
    need(isinstance(src.get("manifest_sha256"), str), path, "source.manifest_sha256", "expected the source's sha256")
    ex = m.get("extractor")
    need(isinstance(ex, dict), path, "extractor", "expected a mapping")
    for k in EXTRACTOR_KEYS:
        need(k in ex, path, f"extractor.{k}", "missing")
    need(is_count(m.get("dim")) and m["dim"] > 0, path, "dim", "expected a positive integer")
    need(m.get("dtype") in DTYPES, path, "dtype", f"expected one of {DTYPES}")
    splits = m.get("splits")
    need(isinstance(splits, dict) and bool(splits), path, "splits", "expected a non-empty mapping")
    for name, s in splits.items():
        key = f"splits.{name}"
        need(isinstance(s, dict), path, key, "expected a mapping")
        for k in ("videos", "frames", "frames_with_image"):
            need(is_count(s.get(k)), path, f"{key}.{k}", "expected a non-negative integer")
        need(isinstance(s.get("shards"), list), path, f"{key}.shards", "expected a list")
        for i, sh in enumerate(s["shards"]):
            sk = f"{key}.shards[{i}]"
            need(isinstance(sh, dict) and isinstance(sh.get("path"), str), path, f"{sk}.path", "expected a string")
            need(isinstance(sh.get("sha256"), str) and len(sh["sha256"]) == 64, path, f"{sk}.sha256", "bad hash")
            for k in ("bytes", "samples"):
                need(is_count(sh.get(k)), path, f"{sk}.{k}", "expected a non-negative integer")
    return m


def manifest_format(root: str | Path) -> str | None:
    """The ``format`` a data root's manifest declares (None if unreadable): lets `mtl shards verify` dispatch."""
    try:
        return json.loads((Path(root) / MANIFEST).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
