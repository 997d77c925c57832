"""`accelerate launch` as the workstation launcher: 2 CPU processes, the ZeRO stage its config asks for."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import REPO, SMOKE, ok, run, smoke_overrides
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_accelerate_cpu_config_trains_two_ranks_with_its_zero_stage(tiny_shards: Path, tmp_path: Path) -> None:
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    config = REPO / "configs" / "accelerate" / "cpu-2proc.yaml"
    # smoke.yaml asks for ZeRO-2; the accelerate config's stage 3 must win, with a note.
    args = smoke_overrides(tiny_shards, out, db, "train.zero_stage=2", "train.max_steps=4")
    proc = ok(run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "-m", "mtl.cli", "train", "--config", str(SMOKE), *args], timeout=400))  # fmt: skip
    assert "ZeRO stage 3 from accelerate launch (ACCELERATE_DEEPSPEED_ZERO_STAGE) overrides" in proc.stderr
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3

    client = MlflowClient(f"sqlite:///{db}")
    (r,) = client.search_runs([client.get_experiment_by_name("mtl-smoke").experiment_id])
    assert r.info.status == "FINISHED"
    assert r.data.tags["zero_stage"] == "3" and r.data.tags["world_size"] == "2"
    assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "train/loss")) == [1, 2, 3, 4]
    assert (out / "export" / "last.safetensors").is_file()
