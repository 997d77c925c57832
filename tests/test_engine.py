"""The training engine on real DeepSpeed (gloo, 2 processes), real checkpoints and a real MLflow store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import DRIVER, SMOKE, mtl, ok, run, smoke_overrides, torchrun
from mlflow.tracking import MlflowClient

from mtl.engine import checkpoint as ckpt
from mtl.runs import layout

pytestmark = pytest.mark.slow


def _runs(db: Path, experiment: str = "mtl-smoke"):
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, "no MLflow experiment was created"
    return client, client.search_runs([exp.experiment_id])


def _lines(stdout: str, word: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.startswith(word + " ")]


@pytest.mark.parametrize(("stage", "accum"), [(2, 1), (3, 2)])
def test_two_ranks_train_agree_and_log(stage: int, accum: int, tiny_shards: Path, tmp_path: Path) -> None:
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    args = smoke_overrides(
        tiny_shards, out, db, f"train.zero_stage={stage}", f"train.grad_accum={accum}", "train.max_steps=10",
        "train.eval_every=5", "train.ckpt_every=5", "optim.lr=3e-3", "optim.warmup_steps=1",
    )  # fmt: skip
    proc = ok(torchrun(2, [str(DRIVER), "plain", str(SMOKE), *args]))

    results = _lines(proc.stdout, "RESULT")
    assert sorted(r[1] for r in results) == ["0", "1"] and {r[2] for r in results} == {"completed"}
    assert {r[3] for r in results} == {"10"}
    digests = {r[1]: r[2] for r in _lines(proc.stdout, "DIGEST")}
    assert len(digests) == 2 and digests["0"] == digests["1"], "ranks ended with different weights"

    client, runs = _runs(db)
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.data.params["train.zero_stage"] == str(stage) and r.data.params["data.clip_len"] == "4"
    assert r.data.tags["world_size"] == "2" and r.data.tags["zero_stage"] == str(stage)
    assert len(r.data.tags["git_commit"]) in (7, 40) or r.data.tags["git_commit"] == "unknown"
    losses = [m.value for m in sorted(client.get_metric_history(r.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 10
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), f"loss did not fall: {losses}"
    for key in ("train/lr", "train/grad_norm", "train/frames_per_s", "train/va", "train/expr", "train/au",
                "val/va_ccc", "val/expr_f1", "val/au_f1", "val/mtl_score", "val/expr_f1/Happiness",
                "val/au_f1/AU12", "val/best_mtl_score"):  # fmt: skip
        assert key in r.data.metrics, f"{key} not logged; have {sorted(r.data.metrics)}"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val/mtl_score")] == [5, 10]
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.yaml", "ds_config.json", "manifest.json", "plots"} <= arts
    plots = {a.path for a in client.list_artifacts(r.info.run_id, "plots/val/step_00000010")}
    assert {f"plots/val/step_00000010/{n}" for n in ("expr_confusion.png", "au_f1.png", "va_scatter.png")} <= plots
    ds_json = json.loads(Path(client.download_artifacts(r.info.run_id, "ds_config.json", str(tmp_path))).read_text())
    assert ds_json["zero_optimization"]["stage"] == stage and ds_json["gradient_clipping"] == 1.0
    assert ds_json["train_batch_size"] == 2 * accum * 2  # micro 2 x accumulation x 2 ranks
    assert ds_json["gradient_accumulation_steps"] == accum

    # Kept: the last K (2) and the best; consolidated weights exported.
    assert (out / "export" / "last.safetensors").is_file() and (out / "export" / "best.safetensors").is_file()
    tags = layout.complete_tags(out / "checkpoints")
    assert tags[-1] == "step_00000010" and len(tags) <= 3

    if stage == 2:
        # A ZeRO-2 checkpoint of two ranks evaluates on one process, the same as its exported weights.
        from_ckpt = ok(mtl("eval", "--checkpoint", str(out / "checkpoints" / "step_00000010"),
                           "--out", str(tmp_path / "e1")))  # fmt: skip
        from_export = ok(mtl("eval", "--checkpoint", str(out / "export" / "last.safetensors"),
                             "--out", str(tmp_path / "e2")))  # fmt: skip
        s1, s2 = json.loads(from_ckpt.stdout.splitlines()[-1]), json.loads(from_export.stdout.splitlines()[-1])
        assert set(s1) == {"va_ccc", "expr_f1", "au_f1", "mtl_score"}
        assert s1 == s2
        manifest = json.loads((tiny_shards / "manifest.json").read_text())
        n_frames = manifest["splits"]["val"]["frames"]
        for task, header in (("VA", "image_location,valence,arousal"), ("EXPR", "image_location,Neutral"),
                             ("AU", "image_location,AU1,AU2")):  # fmt: skip
            lines = (tmp_path / "e1" / "submission" / f"{task}.txt").read_text().splitlines()
            assert lines[0].startswith(header) and len(lines) == n_frames + 1
        assert len((tmp_path / "e1" / "predictions.csv").read_text().splitlines()) == n_frames + 1


def _wait_for(pred, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def test_sigkill_anytime_and_during_save_resumes(tiny_shards: Path, tmp_path: Path) -> None:
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    args = smoke_overrides(tiny_shards, out, db, "train.max_steps=40", "train.ckpt_every=2", "train.keep_last=2")
    ckpts = out / "checkpoints"

    # 1. killed in the middle of saving step 4: DeepSpeed's files are there, the completion marker is not.
    died = run([sys.executable, str(DRIVER), "kill_in_save=4", str(SMOKE), *args])
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert any((ckpts / "step_00000004").glob("*model_states.pt"))
    assert layout.latest_complete(ckpts) == "step_00000002"

    # 2. resumed, then killed from outside at an arbitrary moment once step 6 (or later) is complete.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "mtl.cli", "train", "--config", str(SMOKE), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        _wait_for(lambda: (layout.latest_complete(ckpts) or "") >= "step_00000006", 300, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert layout.latest_complete(ckpts) >= "step_00000006"  # passed the half-written step 4, saving it anew

    # 3. resumed to the end.
    final = ok(mtl("train", "--config", str(SMOKE), *args))
    assert "completed at step 40" in final.stdout
    client, runs = _runs(db)
    assert len(runs) == 1, "a resumed run must continue the same MLflow run"
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert {m.step for m in history} == set(range(1, 41))
    assert runs[0].data.tags["resumed_from"] >= "step_00000006"
    assert layout.complete_tags(ckpts) == ["step_00000038", "step_00000040"]  # keep_last=2, no leftovers
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == layout.complete_tags(ckpts)
    state = ckpt.read_state(ckpts / "step_00000040")
    assert state.run_id == runs[0].info.run_id and state.config["train"]["max_steps"] == 40


def test_nan_loss_is_skipped_then_stops(tiny_shards: Path, tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    args = smoke_overrides(tiny_shards, tmp_path / "a", db, "train.max_steps=4")
    proc = ok(run([sys.executable, str(DRIVER), "nan_at_micro=2", str(SMOKE), *args]))
    assert "RESULT 0 completed 4" in proc.stdout
    client, runs = _runs(db)
    bad = client.get_metric_history(runs[0].info.run_id, "train/bad_steps_total")
    assert max(m.value for m in bad) == 1

    args = smoke_overrides(tiny_shards, tmp_path / "b", db, "train.max_steps=6", "train.max_bad_steps=3")
    proc = run([sys.executable, str(DRIVER), "nan_from_micro=2", str(SMOKE), *args])
    assert proc.returncode != 0
    assert "3 consecutive non-finite losses" in proc.stderr and "train.max_bad_steps=3" in proc.stderr


def test_demo_runs_end_to_end_small(tmp_path: Path) -> None:
    """The README's first command, scaled down: synth -> pack -> train -> eval -> UI hint -> JSON last line."""
    proc = ok(mtl("demo", "--workdir", str(tmp_path / "demo"), "--videos", "4", "--frames", "40",
                  "train.max_steps=3", "train.eval_every=3", "data.num_workers=0", "data.batch_size=1"))  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    scores = json.loads(lines[-1])
    assert set(scores) == {"va_ccc", "expr_f1", "au_f1", "mtl_score"}
    assert all(-1 <= v <= 3 for v in scores.values())
    assert any("mlflow ui --backend-store-uri sqlite:///" in line for line in lines)
    client, runs = _runs(tmp_path / "demo" / "mlflow.db", "mtl-demo")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    exp, run_id = runs[0].info.experiment_id, runs[0].info.run_id  # the address printed leads to this run
    assert f"  this run: http://127.0.0.1:5000/#/experiments/{exp}/runs/{run_id}" in lines
    assert (tmp_path / "demo" / "shards" / "manifest.json").is_file()


def test_no_host_sync_between_log_steps(tiny_shards: Path, tmp_path: Path) -> None:
    """Between log lines the host never waits for the device: on the steps that do not log, code under mtl/ calls
    none of Tensor.item/__bool__/tolist/cpu/numpy or nonzero (2 ranks; counted by a TorchFunctionMode). The log
    steps do (the metrics, the skip count, the agreed stop flag), which shows the counter sees them."""
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    # 4 batches an epoch per rank: a new epoch (the loader's next pass) starts within step 4, not a log step
    args = smoke_overrides(tiny_shards, out, db, "train.max_steps=8", "train.log_every=3", "train.eval_every=6",
                           "train.ckpt_every=3", "data.num_workers=1")  # fmt: skip
    proc = ok(torchrun(2, [str(DRIVER), "host_syncs", str(SMOKE), *args]))
    counts = {(r, int(step)): (int(n), names) for _, r, step, n, names in _lines(proc.stdout, "SYNCS")}
    assert sorted(counts) == [(r, s) for r in ("0", "1") for s in range(1, 9)], sorted(counts)
    for (rank, step), (n, names) in counts.items():
        if step % 3 and step != 8:
            assert n == 0, f"rank {rank} step {step} (not a log step) waited for the device: {names}"
        else:
            assert n > 0, f"rank {rank} step {step}: the log step's reads were not counted"
