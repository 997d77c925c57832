"""tools/bench_step.py end to end on a tiny model: the JSON has its fields and sane values (not a timing test)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from helpers import REPO, ok, run

SCRIPT = REPO / "tools" / "bench_step.py"
# embed_dim 192: the ViT's big matrices exceed ZeRO-3's persistence threshold (1e5 elements), so they partition.
TINY = (
    "--depth 1 --embed-dim 192 --image-size 32 -T 4 -B 2 --temporal-dim 32 --temporal-layers 1 --temporal-heads 2 "
    "--warmup 1 --rounds 2 --iters 1"
).split()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_step_tiny(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    proc = ok(run([sys.executable, str(SCRIPT), *TINY, "--no-progress", "--out", str(out)], timeout=230))
    data = json.loads(out.read_text())
    assert json.loads(proc.stdout) == data, "stdout should be exactly the JSON written to --out"

    (speed,) = data["speed"]
    assert speed["image_size"] == 32 and speed["frames_per_step"] == 8
    assert speed["params"] > 0 and speed["flops_per_step"] > 0
    assert speed["bare"]["frames_per_s"] > 0
    assert set(speed["engine"]) == {"zero0", "zero2"}
    for name, eng in speed["engine"].items():
        assert eng["frames_per_s"] > 0 and len(eng["frames_per_s_rounds"]) == 2
        assert math.isfinite(eng["overhead_pct"])
        assert eng["ds_config"]["zero_optimization"]["stage"] == int(name[-1])
        # Same weights, batch, masks and optimizer: the engine and the bare loop compute the same losses.
        assert eng["loss_max_rel_diff_vs_bare"] < 1e-4, eng["loss_max_rel_diff_vs_bare"]

    mem = data["memory"]
    assert mem["world_size"] == 2 and set(mem["stages"]) == {"0", "1", "2", "3"}
    for stage, entry in mem["stages"].items():
        assert [r["rank"] for r in entry["ranks"]] == [0, 1], stage
    s0, s2, s3 = (mem["stages"][s]["ranks"] for s in ("0", "2", "3"))
    for r in range(2):
        full = s0[r]["model_param_bytes_fp32"]
        assert s0[r]["param_bytes"] == full and s0[r]["grad_bytes"] == full
        assert s0[r]["optimizer_state_bytes"] >= 2 * full and s0[r]["master_bytes"] == 0
        assert s3[r]["param_bytes"] < s0[r]["param_bytes"]
        assert s3[r]["grad_bytes"] < s0[r]["grad_bytes"]
        assert s2[r]["optimizer_state_bytes"] < s0[r]["optimizer_state_bytes"]
        assert s2[r]["master_bytes"] > 0  # ZeRO-1/2 keep an fp32 master partition
    ratio = mem["ratios"]["stage2_vs_stage0"]["optimizer_state_bytes"]
    assert 0.45 < ratio < 0.55, ratio
    assert set(mem["method"]) >= {"param_bytes", "grad_bytes", "optimizer_state_bytes", "master_bytes"}
