"""The run directory: which checkpoint or export a path (or train.resume) means, and loading a trained run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, SMOKE

from mtl.config import load_config, to_dict
from mtl.engine.checkpoint import TrainState
from mtl.errors import MtlError
from mtl.model import build_model
from mtl.runs import layout
from mtl.runs.export import save_weights
from mtl.runs.layout import Checkpoint, RunDir, resolve_trained, resume_point
from mtl.runs.trained import load_model, load_trained


def saved(run: Path, step: int, best: int | None = None, complete: bool = True) -> Path:
    """A checkpoint tag dir as `checkpoint.save` leaves it (the marker only when the save completed)."""
    tag_dir = run / layout.CHECKPOINTS / layout.tag_for(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"")
    if complete:
        best_tag = layout.tag_for(best) if best is not None else None
        layout.write_marker(tag_dir, TrainState(step=step, best_tag=best_tag, config={"step": step}).to_dict())
    return tag_dir


def test_layout_imports_without_torch() -> None:
    """launch/ reads run dirs on login nodes, where importing torch costs seconds (or is not installed)."""
    code = "import sys, mtl.runs.layout, mtl.launch.prepare; print(sorted({'torch', 'deepspeed'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip() == "[]"


def test_trained_run_dir_prefers_export_then_best_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    saved(run, 2, best=2)
    saved(run, 4, best=2)
    saved(run, 6, complete=False)  # killed mid-save: never chosen
    ckpts = run / layout.CHECKPOINTS
    assert resolve_trained(run) == Checkpoint(ckpts, "step_00000002"), "the latest checkpoint's record of the best"
    assert resolve_trained(ckpts) == Checkpoint(ckpts, "step_00000002")
    assert resolve_trained(ckpts / "step_00000004") == Checkpoint(ckpts, "step_00000004"), "a named tag is itself"
    assert resolve_trained(run).state()["step"] == 2

    # The best tag was pruned: the latest complete one.
    (ckpts / "step_00000002" / layout.COMPLETE).unlink()
    assert resolve_trained(run) == Checkpoint(ckpts, "step_00000004")

    best = RunDir(run).export_file("best")
    best.parent.mkdir()
    best.write_bytes(b"weights")
    assert best == run / "export" / "best.safetensors"
    assert resolve_trained(run) == best
    assert resolve_trained(run / "export") == best
    assert resolve_trained(run / "export" / "best.safetensors") == best


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "no such run directory, checkpoint or .safetensors file"),
        (lambda p: p.with_suffix(".safetensors"), "no such run directory, checkpoint or .safetensors file"),
        (lambda p: p.mkdir() or p, "no exported weights and no complete checkpoint found"),
        (lambda p: saved(p, 3, complete=False).parents[1], "no exported weights and no complete checkpoint found"),
        (lambda p: (p.mkdir(), (p / "w.pt").write_bytes(b""))[0] or p / "w.pt", "not a .safetensors file"),
    ],
    ids=["missing", "missing-export", "empty-dir", "only-incomplete", "other-file"],
)
def test_trained_nothing_there_names_the_path(make, message: str, tmp_path: Path) -> None:
    path = make(tmp_path / "run")
    with pytest.raises(MtlError, match=message) as err:
        resolve_trained(path)
    assert str(path) in str(err.value)


def test_resume_point(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert resume_point("auto", run) is None and resume_point("never", run) is None
    saved(run.root, 3, complete=False)
    assert resume_point("never", run) is None, "a half-written save is not a checkpoint"
    saved(run.root, 2)
    assert resume_point("auto", run) == Checkpoint(run.checkpoints, "step_00000002")
    with pytest.raises(MtlError, match=r"train.resume=never but .*run/checkpoints already holds checkpoints"):
        resume_point("never", run)
    for given in (run.root, run.checkpoints, run.checkpoints / "step_00000002"):
        assert resume_point(str(given), RunDir(tmp_path / "other")) == Checkpoint(run.checkpoints, "step_00000002")
    missing = tmp_path / "nope"
    with pytest.raises(MtlError, match=f"train.resume={missing}: no such checkpoint directory"):
        resume_point(str(missing), run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MtlError, match="train.resume=.*empty: no complete checkpoint found there"):
        resume_point(str(tmp_path / "empty"), run)


def test_recorded_run_id_and_eval_dir(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert run.recorded_run_id("auto") is None
    run.root.mkdir()
    run.write_run_id("abc123")
    assert (tmp_path / "run" / "mlflow_run_id").read_text() == "abc123\n"
    assert run.recorded_run_id("auto") == "abc123" and run.recorded_run_id("ckpts/x") == "abc123"
    assert run.recorded_run_id("never") is None, "train.resume=never starts a new MLflow run"
    run.run_id_file.write_text("\n")
    assert run.recorded_run_id("auto") is None

    assert layout.eval_dir(run.root, "val") == run.root / "eval_val"
    assert layout.eval_dir(run.root / "export" / "best.safetensors", "test") == run.root / "export" / "eval_test"


def test_load_a_trained_run_from_its_export(tmp_path: Path) -> None:
    """Weights and config round-trip through a real export; a config that does not fit them is refused."""
    cfg = load_config(SMOKE, [])
    torch.manual_seed(0)
    model = build_model(cfg.model, image_size=cfg.data.image_size)
    run = RunDir(tmp_path / "run")
    save_weights(model.state_dict(), run.export_file("best"), to_dict(cfg))

    weights, config = load_trained(run.root)
    assert config == to_dict(cfg)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    trained = load_model(run.root, ["data.mean=[0.5,0.5,0.5]"])
    assert not trained.model.training and trained.cfg.data.mean == (0.5, 0.5, 0.5)
    assert trained.norm == ((0.5, 0.5, 0.5), model.data_config()["std"])
    assert all(torch.equal(trained.model.state_dict()[k], v) for k, v in model.state_dict().items())

    with pytest.raises(MtlError, match="weights do not fit the model"):
        load_model(run.root, ["model.temporal.dim=16"])
    bare = tmp_path / "bare.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(bare))
    with pytest.raises(MtlError, match=f"{bare}: no mtl config in its metadata"):
        load_trained(bare)


def test_submit_checks_the_resume_the_job_would_take(tmp_path: Path) -> None:
    """`mtl submit` resolves train.resume as the engine will, so a bad one fails on the login node."""
    from mtl.launch import prepare
    from mtl.launch.slurm_request import load_for_submit

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    base = [f"data.shards={tmp_path / 'shards'}", f"train.output_dir={tmp_path / 'out'}"]
    tag_dir = saved(tmp_path / "old", 5)  # with the config it was trained with: a resume changes no experiment
    layout.write_marker(tag_dir, TrainState(step=5, config=to_dict(load_for_submit(SMOKE, base, {}))).to_dict())
    prepare.check_inputs(load_for_submit(SMOKE, [*base, f"train.resume={tmp_path / 'old'}"], {}))
    (tmp_path / "empty").mkdir()
    for resume, message in (("nope", "no such checkpoint directory"), ("empty", "no complete checkpoint found there")):
        cfg = load_for_submit(SMOKE, [*base, f"train.resume={tmp_path / resume}"], {})
        with pytest.raises(MtlError, match=f"train.resume={tmp_path / resume}: {message}"):
            prepare.check_inputs(cfg)


def test_an_export_of_an_older_release_loads_with_its_loss_keys_moved(tmp_path: Path) -> None:
    """An export whose config has the loss keys of an older release (``loss.expr_alpha``, ``loss.au_alpha``,
    ``loss.focal_gamma``) still loads for `mtl eval`, its values at their new places (``loss.tasks.<task>.*``)."""
    cfg = load_config(SMOKE, [])
    model = build_model(cfg.model, image_size=cfg.data.image_size)
    old = to_dict(cfg)
    old["loss"] = {"weights": {"va": 1.0, "expr": 1.0, "au": 2.0}, "focal_gamma": 1.0, "expr_alpha": "none",
                   "au_alpha": [0.25] * 12}  # fmt: skip
    run = RunDir(tmp_path / "run")
    save_weights(model.state_dict(), run.export_file("last"), old)
    trained = load_model(run.export_file("last"))
    tasks = trained.cfg.loss.tasks
    assert trained.cfg.loss.weights["au"] == 2.0
    assert (tasks["expr"].gamma, tasks["expr"].alpha) == (1.0, "none")
    assert (tasks["au"].gamma, tasks["au"].alpha) == (1.0, [0.25] * 12)
