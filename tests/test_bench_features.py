"""tools/bench_features.py stays runnable: a tiny run writes both parts' JSON with sane values (no timing asserted)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from helpers import REPO, ok, run


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_features_tiny(tmp_path: Path) -> None:
    out = tmp_path / "features.json"
    tiny = '{"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}'
    ok(run([sys.executable, str(REPO / "tools" / "bench_features.py"), "--cases", "demo-64", "--videos", "3",
            "--frames", "40", "--clip-len", "16", "--train-batch-size", "2", "--repeats", "1",
            "--backbone", "vit_tiny_patch16_224", "--backbone-kwargs", tiny, "--image-size", "32", "--batch-size", "8",
            "--workdir", str(tmp_path / "work"), "--out", str(out)], timeout=290))  # fmt: skip
    data = json.loads(out.read_text())

    ex = data["extract"]
    assert ex["dim"] == 32 and ex["dtype"] == "float16" and ex["frames_encoded"] <= ex["frames"]
    assert ex["frames_per_s"] > 0 and ex["cache_bytes"] > 0 and ex["source_bytes"] > 0
    # fp16 avg-pooled features (64 bytes a frame) plus labels: smaller than 32x32 JPEGs
    assert ex["cache_over_source"] < 1.0, ex

    (ep,) = data["train_epoch"]
    assert ep["case"] == "demo-64" and ep["clip_len"] == 16 and ep["repeats"] == 1
    px, ft = ep["pixels_frozen_backbone"], ep["features"]
    assert px["batches"] > 0 and ft["batches"] > 0 and len(px["seconds_runs"]) == 1
    manifest = json.loads((tmp_path / "work" / "shards-T16" / "manifest.json").read_text())
    train, train_frames = manifest["splits"]["train"], manifest["splits"]["train"]["frames"]
    # both epochs cover the training frames about once: the pixel side one clip per segment, less a remainder of
    # segments; the feature windows tile each video, the last one clamped inside it (so overlapping its neighbour)
    assert 0 < px["frames"] <= train_frames
    assert train_frames / 2 < ft["frames"] <= train_frames + 16 * train["videos"]
    assert math.isfinite(ep["speedup_per_epoch"]) and ep["speedup_per_epoch"] > 0
