"""Cached feature sets for tests, made as `mtl features` makes them (until it lands, this stands in for it).

Reads the real pixel shards (``mtl.data.shardio``), joins each video's segments, runs a real (random-init, tiny)
frame encoder on the decoded frames, and writes feature shards with ``write_feature_shard`` and the manifest the
extraction contract specifies. The one place tests make features: switch it to `mtl features` when that exists.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from mtl.config import from_dict
from mtl.data.manifest import MANIFEST, file_sha256, read_manifest
from mtl.data.shardio import parse_sample, read_raw
from mtl.data.transforms import ClipTransform, decode_clip
from mtl.features.shards import FORMAT, FeatureSample, write_feature_shard
from mtl.model.backbone import FrameEncoder, create_backbone

SMOKE_BACKBONE = {"backbone": "vit_tiny_patch16_224",
                  "backbone_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 16}}  # fmt: skip


def _videos(shards: Path, split: str) -> list[tuple]:
    """The split's videos, segments joined: (video, frames, has_image, labels, uint8 pixels of the frames with an
    image as a list of [n,3,h,w] tensors)."""
    entry = read_manifest(shards)["splits"][split]
    out: list[tuple] = []
    for sh in entry["shards"]:
        path = shards / sh["path"]
        for raw in read_raw(path):
            s = parse_sample(raw, str(path))
            rows = np.flatnonzero(s.has_image)
            pixels = decode_clip(s.blob, s.offsets, rows)
            if out and out[-1][0] == s.video:
                v, fr, hi, lab, px = out[-1]
                out[-1] = (v, np.concatenate([fr, s.frames]), np.concatenate([hi, s.has_image]),
                           {k: np.concatenate([lab[k], s.labels[k]]) for k in lab}, px + [pixels])  # fmt: skip
            else:
                out.append((s.video, s.frames, s.has_image, s.labels, [pixels]))
    return out


@torch.no_grad()
def make_features(
    shards: Path,
    out: Path,
    *,
    pool: str = "avg",
    image_size: int = 32,
    model: dict | None = None,
    seed: int = 0,
    videos_per_shard: int = 2,
    dtype: str = "float16",
) -> Path:
    """Features of every split of ``shards`` under ``out`` (shards and manifest.json); returns ``out``."""
    cfg = from_dict({"model": {**(model or SMOKE_BACKBONE), "pool": pool}}).model
    torch.manual_seed(seed)
    encoder = FrameEncoder(create_backbone(cfg, image_size), pool).eval()
    norm = encoder.data_config()
    tf = ClipTransform(image_size, norm["mean"], norm["std"])
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split in read_manifest(shards)["splits"]:
        samples = []
        for video, frames, has_image, labels, pixels in _videos(shards, split):
            feats = np.zeros((len(frames), encoder.num_features), dtype)
            px = torch.cat([p for p in pixels if len(p)]) if any(len(p) for p in pixels) else None
            if px is not None:
                feats[has_image] = encoder(tf.eval(px)).numpy().astype(dtype)
            samples.append(FeatureSample(video, frames, has_image, feats, labels))
        entries = []
        for i in range(0, len(samples), videos_per_shard):
            rel = f"{split}-{i // videos_per_shard:05d}.tar"
            write_feature_shard(out / rel, samples[i : i + videos_per_shard])
            entries.append({"path": rel, "bytes": (out / rel).stat().st_size, "sha256": file_sha256(out / rel),
                            "samples": len(samples[i : i + videos_per_shard])})  # fmt: skip
        splits[split] = {
            "videos": len(samples),
            "frames": sum(len(s) for s in samples),
            "frames_with_image": int(sum(s.has_image.sum() for s in samples)),
            "shards": entries,
        }
    weights = hashlib.sha256()
    for k, v in sorted(encoder.backbone.state_dict().items()):
        weights.update(k.encode() + v.numpy().tobytes())
    manifest = {
        "format": FORMAT,
        "source": {"shards": str(shards), "manifest_sha256": file_sha256(shards / MANIFEST)},
        "extractor": {
            "backbone": cfg.backbone,
            "weights_sha256": weights.hexdigest(),
            "checkpoint": None,
            "pool": pool,
            "image_size": image_size,
            "mean": list(norm["mean"]),
            "std": list(norm["std"]),
            "hflip_tta": False,
        },  # fmt: skip
        "dim": encoder.num_features,
        "dtype": dtype,
        "splits": splits,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out
