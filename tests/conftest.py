"""Shared fixtures: a tiny packed data set (real synth -> real pack) and helpers to run `mtl` as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtl.engine.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
DRIVER = REPO / "tests" / "drivers" / "train_driver.py"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic Aff-Wild2 release packed into shards (enough shards for 2 ranks x 2 workers)."""
    from mtl.data.pack import pack
    from mtl.data.synth import make_synth

    base = tmp_path_factory.mktemp("tiny")
    root = make_synth(base / "synth", videos=6, frames=48, seed=0)
    out = base / "shards"
    pack(root / "cropped_aligned", root / "annotations", out, segment_len=16, shard_size=3, workers=1)
    return out


@pytest.fixture(scope="session")
def trained_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny, short) training run: smoke config, one process, exported weights (`mtl predict` and
    `mtl eval --split test` run it)."""
    base = tmp_path_factory.mktemp("trained_run")
    out = base / "run"
    overrides = smoke_overrides(tiny_shards, out, base / "mlflow.db", "train.max_steps=2")
    ok(mtl("train", "--config", str(SMOKE), *overrides))
    assert (out / "export" / "best.safetensors").is_file()
    return out


def smoke_overrides(shards: Path, out: Path, db: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"train.output_dir={out}", f"tracking.uri=sqlite:///{db}", *extra]


def run(cmd: list[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=kw.pop("cwd", REPO), **kw)


def torchrun(nproc: int, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *args]  # fmt: skip
    return run(cmd, timeout=timeout)


def mtl(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "mtl.cli", *args], timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    tail = f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{tail}"
    return proc
