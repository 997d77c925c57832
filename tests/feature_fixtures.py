"""Cached feature sets for tests, made by `mtl features` itself (``mtl.extraction.extract``) from real pixel shards
with a tiny random-init frame encoder: the one place tests make features."""

from __future__ import annotations

from pathlib import Path

from mtl.extraction.extract import ExtractSpec, extract

SMOKE_BACKBONE = {"backbone": "vit_tiny_patch16_224",
                  "backbone_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 16}}  # fmt: skip


def make_features(
    shards: Path,
    out: Path,
    *,
    pool: str = "avg",
    image_size: int = 32,
    model: dict | None = None,
    shard_frames: int = 100,
    dtype: str = "float16",
) -> Path:
    """Features of every split of ``shards`` under ``out`` (shards and manifest.json); returns ``out``.

    ``shard_frames`` small: a few videos per feature shard, so tests see several shards."""
    model = model or SMOKE_BACKBONE
    spec = ExtractSpec(backbone=model["backbone"], backbone_kwargs=dict(model.get("backbone_kwargs", {})), pool=pool,
                       image_size=image_size, dtype=dtype, shard_frames=shard_frames, batch_size=64,
                       device="cpu")  # fmt: skip
    extract(Path(shards), Path(out), spec, progress=False)
    return Path(out)
