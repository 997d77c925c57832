"""Resuming: on another world size or ZeRO stage (DeepSpeed's universal checkpoint), and exactly after a kill."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
from helpers import DRIVER, SMOKE, ok, run, smoke_overrides, torchrun
from mlflow.tracking import MlflowClient

from mtl.config import load_config
from mtl.engine.checkpoint import UNIVERSAL, read_state
from mtl.engine.schedule import lr_factor
from mtl.runs import layout

pytestmark = pytest.mark.slow


def _lines(stdout: str, word: str) -> dict[str, str]:
    """What follows `word <rank> ` on each such line, by rank."""
    return {p[1]: p[2] for p in (line.split(" ", 2) for line in stdout.splitlines()) if len(p) == 3 and p[0] == word}


def _samples(stdout: str) -> dict[int, list[int]]:
    """Training sample ids consumed, by epoch, over all ranks of one launch."""
    out: dict[int, list[int]] = {}
    for line in stdout.splitlines():
        if line.startswith("SAMPLES "):
            _, _rank, epoch, *ids = line.split()
            out.setdefault(int(epoch), []).extend(map(int, ids))
    return out


def _history(db: Path, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(f"sqlite:///{db}")
    (r,) = client.search_runs([client.get_experiment_by_name("mtl-smoke").experiment_id])
    return sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, key))


def test_resume_on_fewer_more_ranks_and_another_zero_stage(tiny_shards: Path, tmp_path: Path) -> None:
    """2 ranks ZeRO-2 -> 1 rank -> 2 ranks ZeRO-3, each stopped mid-epoch: weights, AdamW state, parameter groups,
    schedule, step and MLflow run carry over, and epoch 0's samples are each trained on exactly once."""
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    args = smoke_overrides(tiny_shards, out, db, "data.batch_size=1", "train.max_steps=6", "train.ckpt_every=100")
    n_train = json.loads((tiny_shards / "manifest.json").read_text())["splits"]["train"]["samples"]
    assert n_train == 9  # 4 batches a rank on 2 ranks: legs of 1, then 3 on 1 rank, then 2 a rank

    first = torchrun(2, [str(DRIVER), "stop_at_step=1", str(SMOKE), *args])
    results = {tuple(r.split()[:2]) for r in _lines(first.stdout, "RESULT").values()}
    assert results == {("preempted", "1")}, first.stderr[-3000:]
    second = run([sys.executable, str(DRIVER), "stop_at_step=4", str(SMOKE), *args])
    assert second.returncode == 3, second.stderr[-3000:]
    assert "resuming from DeepSpeed's universal checkpoint" in second.stderr
    third = ok(torchrun(2, [str(DRIVER), "plain", str(SMOKE), *args, "train.zero_stage=3"]))
    assert {r.split()[1] for r in _lines(third.stdout, "RESULT").values()} == {"6"}

    for before, after, step in ((first, second, 1), (second, third, 4)):
        (digest,) = set(_lines(before.stdout, "DIGEST").values())
        for loaded in _lines(after.stdout, "LOADED").values():
            resumed, weights, adam_step = loaded.split()
            assert (int(resumed), weights, int(adam_step)) == (step, digest, step)
        assert set(_lines(after.stdout, "GROUPS_LOADED").values()) == set(_lines(before.stdout, "GROUPS_END").values())
    tags = out / "checkpoints"
    assert (tags / "step_00000004" / UNIVERSAL / "zero" / "optimizer_state.pt").is_file()  # converted in the tag
    assert read_state(tags / "step_00000006").world_size == 2 and read_state(tags / "step_00000006").zero_stage == 3

    epoch0 = [i for launch in (first, second, third) for i in _samples(launch.stdout).get(0, [])]
    assert sorted(epoch0) == list(range(n_train)), f"epoch 0 saw {sorted(epoch0)}: a sample twice or skipped"

    losses = _history(db, "train/loss")
    assert [s for s, _ in losses] == list(range(1, 7)), "one MLflow run, each step logged once"
    lrs, o = dict(_history(db, "train/lr")), load_config(SMOKE, []).optim
    for step, lr in lrs.items():  # the schedule continued where it was, across both conversions

        def factor(s: int) -> float:
            return lr_factor(s, o.warmup_steps, 6, o.min_lr_ratio)

        assert lr / lrs[1] == pytest.approx(factor(step) / factor(1), rel=1e-6), step


def test_killed_runs_end_as_the_uninterrupted_run(tiny_shards: Path, tmp_path: Path) -> None:
    """SIGKILL after step 3 (between checkpoints) and in the middle of saving step 6, resumed each time: the same
    weights bit for bit, and the same logged losses and validation scores, as a run never interrupted."""
    keep = ("train.max_steps=8", "train.ckpt_every=2", "train.eval_every=4")  # resumed mid-epoch (4 batches)
    whole = ok(run([sys.executable, str(DRIVER), "plain", str(SMOKE),
                    *smoke_overrides(tiny_shards, tmp_path / "a", tmp_path / "a.db", *keep)]))  # fmt: skip
    out, db = tmp_path / "b", tmp_path / "b.db"
    args = smoke_overrides(tiny_shards, out, db, *keep)
    for mode, resumed_from in (("kill_after_log=3", None), ("kill_in_save=6", "step_00000002")):
        died = run([sys.executable, str(DRIVER), mode, str(SMOKE), *args])
        assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
        if resumed_from:
            assert f"LOADED 0 {int(resumed_from[5:])} " in died.stdout
    assert layout.latest_complete(out / "checkpoints") == "step_00000004"
    final = ok(run([sys.executable, str(DRIVER), "plain", str(SMOKE), *args]))
    assert "LOADED 0 4 " in final.stdout

    assert _lines(final.stdout, "DIGEST") == _lines(whole.stdout, "DIGEST"), "weights differ from the uninterrupted run"
    for key in ("train/loss", "train/va", "train/expr", "train/au", "val/mtl_score", "val/va_ccc", "val/au_f1"):
        assert _history(db, key) == _history(tmp_path / "a.db", key), key
