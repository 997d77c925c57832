"""tools/gpu_check.py: without a GPU it says so in one line and exits 2; ``--smoke`` runs every part at toy size on
the CPU and writes the JSON a GPU run writes (not a timing test: the figures are the GPU machine's to give)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, ok, run

SCRIPT = REPO / "tools" / "gpu_check.py"
PARTS = ("step", "loader", "train", "features", "predict", "multi_gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is usable here")
def test_without_a_gpu_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "gpu.json")], timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no usable GPU"), proc.stderr
    assert f"torch {torch.__version__} built for CUDA" in lines[0]
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_smoke_runs_every_part_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = ok(run([sys.executable, str(SCRIPT), "--out", str(out), "--smoke", "--fused-adamw",
                   "--workdir", str(tmp_path / "work")], timeout=480))  # fmt: skip
    data = json.loads(out.read_text())
    assert json.loads(proc.stdout) == data
    assert data["smoke"] and data["options"]["fused_adamw"] and data["device"]
    for part in PARTS:
        assert isinstance(data[part], dict) and "error" not in data[part], (part, data[part])
    step = data["step"]
    assert set(step["stages"]) == {"zero0", "zero2", "zero3"} and step["flops_per_step"] > 0
    for entry in (step["bare"], *step["stages"].values()):
        assert entry["s_per_step"] > 0 and "mfu" in entry and "peak_mem_gb" in entry
    assert all(s["largest_batch"] >= step["batch_size"] for s in step["stages"].values())
    assert data["loader"]["frames_per_s"] > 0 and data["features"]["frames_per_s"] > 0
    assert data["train"]["frames_per_s"] > 0 and data["train"]["efficiency"] > 0
    assert data["predict"]["frames"] == 20 and data["predict"]["frames_per_s"] > 0
    assert set(data["multi_gpu"]) == {"zero3"}  # --smoke: one stage (the GPU run does 2 and 3)
    assert data["multi_gpu"]["zero3"]["ok"], data["multi_gpu"]  # killed after a checkpoint, resumed, finished
