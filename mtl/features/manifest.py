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
written last, once every shard it lists is complete. ``FeatureManifest`` is its typed schema: a file that does not
match is one DataError naming it and the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, StrictBool, model_validator

from mtl.data.manifest import MANIFEST
from mtl.data.schema import Count, ManifestModel, Positive, Sha256, SplitsManifest, Text, field_error, read_json_model
from mtl.features.shards import FORMAT

DTYPES = ("float16", "float32")
EXTRACTOR_KEYS = ("backbone", "weights_sha256", "checkpoint", "pool", "image_size", "mean", "std", "hflip_tta")


class FeatureSource(ManifestModel):
    """The pixel pack the features were extracted from, and the hash of its manifest at the time."""

    shards: Text
    manifest_sha256: Sha256


class Extractor(ManifestModel):
    """The frame encoder: what makes two caches' features comparable (``EXTRACTOR_KEYS``)."""

    backbone: Text
    weights_sha256: Text
    checkpoint: Text | None = None
    pool: Text
    image_size: Positive
    mean: list[float]
    std: list[float]
    hflip_tta: StrictBool
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)


class FeatureShardRecord(ManifestModel):
    path: Text
    bytes: Count
    sha256: Sha256
    samples: Count
    frames: Count | None = None
    sample_frames: list[Positive] | None = None

    @model_validator(mode="after")
    def _frames_add_up(self) -> FeatureShardRecord:
        if self.sample_frames is not None and len(self.sample_frames) != self.samples:
            raise field_error("sample_frames", f"expected one frame count per sample ({self.samples}), "
                              f"got {len(self.sample_frames)}")  # fmt: skip
        return self


class FeatureSplitRecord(ManifestModel):
    videos: Count
    frames: Count
    frames_with_image: Count
    shards: list[FeatureShardRecord]


class FeatureParams(ManifestModel):
    """How the samples were cut (absent in hand-made caches)."""

    max_frames: Positive | None = None
    shard_frames: Positive | None = None
    batch_size: Positive | None = None


class FeatureManifest(SplitsManifest):
    """A feature cache's ``manifest.json``."""

    format: Literal["mtl-features/1"] = FORMAT
    source: FeatureSource
    extractor: Extractor
    dim: Positive
    dtype: Literal["float16", "float32"]
    params: FeatureParams = Field(default_factory=FeatureParams)
    splits: dict[str, FeatureSplitRecord] = Field(min_length=1)


def write_feature_manifest(root: Path, manifest: FeatureManifest) -> Path:
    """Atomic, and safe when two writers race (SLURM tasks finishing together): each its own temporary name."""
    path = Path(root) / MANIFEST
    tmp = path.with_name(f"{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_feature_manifest(root: str | Path) -> FeatureManifest:
    """The checked manifest of a feature cache; DataError naming the file and the field when missing or bad."""
    root = Path(root)
    return read_json_model(root, FeatureManifest, FORMAT, "a folder written by `mtl features` (and did it finish)?")


def manifest_format(root: str | Path) -> str | None:
    """The ``format`` a data root's manifest declares (None if unreadable): lets `mtl shards verify` dispatch."""
    try:
        return json.loads((Path(root) / MANIFEST).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
