"""tools/bench_loader.py stays runnable: a tiny run writes the JSON the README quotes (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")


def test_bench_loader_writes_both_sides(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_loader", REPO / "tools" / "bench_loader.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "loader.json"
    args = "--videos 3 --frames 40 --workers 0 --batch-size 2 --clip-len 4 --image-size 32 --segment-len 4"
    args = [*args.split(), "--seconds", "0", "--repeats", "1", "--out", str(out)]
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    assert set(result["frames_per_s_per_core"]) == {"shards", "baseline", "baseline_clip_tf"}
    for side, runs in result["runs"].items():
        assert runs[0]["frames"] > 0 and runs[0]["frames_per_cpu_s"] > 0, side
    assert set(result["jpeg_decode_only_per_core"]) == {"loader (simplejpeg)", "torchvision"}
    assert min(result["jpeg_decode_only_per_core"].values()) > 0 and result["shards_vs_decode_only"] > 0
    # both sides delivered the same kind of clips: one per segment of the training split
    assert abs(result["runs"]["shards"][0]["clips"] - result["runs"]["baseline"][0]["clips"]) <= 2
