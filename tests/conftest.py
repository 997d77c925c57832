"""Shared fixtures: a tiny packed data set (real synth -> real pack) and a tiny trained run. Helpers that tests
import live in ``helpers.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SMOKE, mtl, ok, smoke_overrides


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` need a usable CUDA device: skipped, saying so, where torch sees none."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs a usable CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic Aff-Wild2 release packed into shards (enough shards for 2 ranks x 2 workers)."""
    from mtl.data.pack import PackOptions, pack
    from mtl.data.synth import make_synth

    base = tmp_path_factory.mktemp("tiny")
    root = make_synth(base / "synth", videos=6, frames=48, seed=0)
    out = base / "shards"
    pack(PackOptions(root / "cropped_aligned", root / "annotations", out, segment_len=16, shard_size=3, workers=1))
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
