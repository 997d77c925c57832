"""`mtl cv`: folds by video (`_left`/`_right` together, every task on both sides, deterministic), a fold run's loaders
reading only its videos, a real K=2 cross-validation here with its MLflow parent and children, a rerun that skips
a finished fold and resumes a killed one from its checkpoint, the cv folder as an out-of-fold ensemble. The folds as
a SLURM job array run on the real cluster in tests/test_slurm.py."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import SMOKE, mtl, ok, smoke_overrides
from mlflow.tracking import MlflowClient

from mtl.config import load_config
from mtl.data.folds import FOLDS_FILE, assign, group_of, make_folds, read_folds, training_task_stats
from mtl.data.loader import Piece, make_eval_loader, split_table
from mtl.data.manifest import read_manifest
from mtl.data.video_index import labelled_tasks, scan_split, task_stats
from mtl.errors import MtlError

SPLITS = ["train", "val"]


def _tasks_of(shards: Path, videos: list[str]) -> set[str]:
    have = labelled_tasks([s for sp in SPLITS for s in scan_split(shards, sp)])
    return set().union(*(have[v] for v in videos)) if videos else set()


def _rows(path: Path) -> dict[tuple[str, str], list[float]]:
    """A predictions.csv as {(video, frame): its soft outputs (probabilities and values; not the 0/1 decisions)}."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    soft = [c for c in rows[0] if c.startswith("p_") or c in ("valence", "arousal")]
    return {(r["video"], r["frame"]): [float(r[c]) for c in soft] for r in rows}


def test_folds_are_by_recording_deterministic_and_label_every_task(tiny_shards: Path) -> None:
    every = labelled_tasks([s for sp in SPLITS for s in scan_split(tiny_shards, sp)])
    assert any(v.endswith("_left") for v in every) and any(v.endswith("_right") for v in every)
    folds = make_folds(tiny_shards, SPLITS, 2, seed=0)
    assert folds == make_folds(tiny_shards, SPLITS, 2, seed=0)  # same seed, same folds
    assert sorted(v for f in folds for v in f) == sorted(every)  # each labelled video held out exactly once
    for held in folds:
        groups = {group_of(v) for v in held}
        assert all(group_of(v) not in groups for f in folds if f is not held for v in f)  # a recording in one fold
        rest = [v for v in every if v not in held]
        assert _tasks_of(tiny_shards, held) == _tasks_of(tiny_shards, rest) == {"va", "expr", "au"}


def test_assignment_refuses_what_cannot_be_done() -> None:
    videos = {"a_left": {"va"}, "a_right": {"expr"}, "b": {"va", "expr"}, "c": {"va"}}
    with pytest.raises(MtlError, match="more folds than the 3 labelled recordings"):
        assign(videos, 4, 0)
    with pytest.raises(MtlError, match="task expr is labelled in only 2 recording"):
        assign(videos, 3, 0)
    folds = assign(videos, 2, 7)
    assert folds == assign(dict(reversed(list(videos.items()))), 2, 7)  # not the input order: the seed decides
    assert any({"a_left", "a_right"} <= set(f) for f in folds)


def test_a_fold_run_reads_only_its_videos(tiny_shards: Path, tmp_path: Path) -> None:
    folds = make_folds(tiny_shards, SPLITS, 2, seed=0)
    from mtl.data.folds import CvConfigRecord, FoldRecord, FoldsFile, manifest_digest, write_folds

    path = tmp_path / FOLDS_FILE
    write_folds(path, FoldsFile(k=2, seed=0, shards=str(tiny_shards), manifest_sha256=manifest_digest(tiny_shards),
                                splits=SPLITS, config=CvConfigRecord(sha256="0" * 64),
                                folds=[FoldRecord(fold=i, holdout=h) for i, h in enumerate(folds)]))  # fmt: skip
    cfg = load_config(SMOKE, [f"data.shards={tiny_shards}", f"data.folds.file={path}", "data.folds.fold=1"])
    train = split_table(cfg.data, "train")
    assert sum(train.counts) == sum(1 for sp in SPLITS for s in scan_split(tiny_shards, sp) if s.video in folds[0])
    pieces = [Piece(s, 0, n) for s, n in enumerate(train.counts)]
    read = [(i, json.loads(raw["json"])["video"]) for p in pieces for i, raw in train.read(p)]
    assert {v for _, v in read} == set(folds[0]) and len(read) == sum(train.counts)  # shards of both splits, in part
    assert [i for i, _ in read] == [i for n in train.counts for i in range(n)]  # numbered as the table counts them
    loader = make_eval_loader(cfg.data, "val", mean=(0.5,) * 3, std=(0.5,) * 3, rank=0, world_size=1)
    seen = {v for batch in loader for v in batch["video"] if v}
    assert seen == set(folds[1])  # from both splits: the fold's held-out videos, no others
    # the losses' label statistics (focal alpha: auto) are the fold's training part's, counted as the pack counts
    assert task_stats(scan_split(tiny_shards, "train")) == read_manifest(tiny_shards).split("train").task_stats()
    fold_stats = training_task_stats(cfg.data, {})
    assert fold_stats == task_stats([s for sp in SPLITS for s in scan_split(tiny_shards, sp) if s.video in folds[0]])
    with pytest.raises(MtlError, match=r"data.folds.file is set but data.folds.fold is not"):
        load_config(SMOKE, [f"data.folds.file={path}"])
    # the fold run pointed at another pack: refused, naming how to read that pack as packed instead
    other = tmp_path / "other"
    shutil.copytree(tiny_shards, other)
    (other / "manifest.json").write_text((other / "manifest.json").read_text() + "\n")
    moved = load_config(SMOKE, [f"data.shards={other}", f"data.folds.file={path}", "data.folds.fold=1"])
    with pytest.raises(MtlError, match=r"made for another pack .* data.folds.file=null data.folds.fold=null"):
        split_table(moved.data, "val")
    plain = load_config(SMOKE, [f"data.shards={other}", "data.folds.file=null", "data.folds.fold=null"])
    assert sum(split_table(plain.data, "val").counts) == sum(1 for _ in scan_split(other, "val"))


def test_too_many_folds_is_one_line_exit_2(tiny_shards: Path, tmp_path: Path) -> None:
    overrides = smoke_overrides(tiny_shards, tmp_path / "cv", tmp_path / "mlflow.db")
    proc = mtl("cv", "--config", str(SMOKE), "--folds", "9", *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "more folds than the 5 labelled recordings" in lines[0], proc.stderr
    assert not (tmp_path / "cv" / FOLDS_FILE).exists()


def test_cv_two_folds_here_parent_children_and_rerun_skips(tiny_shards: Path, tmp_path: Path) -> None:
    out, db = tmp_path / "cv", tmp_path / "mlflow.db"
    overrides = smoke_overrides(tiny_shards, tmp_path / "unused", db, "train.max_steps=1", "train.ckpt_every=1")
    proc = ok(mtl("cv", "--config", str(SMOKE), "--folds", "2", "--out", str(out), *overrides))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    folds = read_folds(out / FOLDS_FILE)
    assert (folds.k, folds.seed) == (2, 0) and summary["parent_run_id"] == folds.parent_run_id
    assert summary["status"] == "finished" and [f["fold"] for f in summary["per_fold"]] == [0, 1]
    assert "#/experiments/" in proc.stdout and f"/runs/{folds.parent_run_id}" in proc.stdout
    for k in range(2):  # a normal run dir each, with its out-of-fold predictions
        assert (out / f"fold_{k}" / "export" / "last.safetensors").is_file()
        predicted = {line.split(",")[0] for line in (out / f"fold_{k}" / "eval_val" / "predictions.csv").open()}
        assert set(folds.folds[k].holdout) <= predicted and not set(folds.folds[1 - k].holdout) & predicted

    c = MlflowClient(f"sqlite:///{db}")
    children = c.search_runs(
        [c.get_run(folds.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{folds.parent_run_id}'",
    )
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    parent = c.get_run(folds.parent_run_id).data.metrics
    for key in ("va_ccc", "expr_f1", "au_f1", "mtl_score"):
        oof = [r.data.metrics[f"oof/{key}"] for r in children]
        assert parent[f"cv/{key}_mean"] == pytest.approx(np.mean(oof))
        assert parent[f"cv/{key}_std"] == pytest.approx(np.std(oof))
        assert summary["mean"][key] == pytest.approx(np.mean(oof))
        # the held-out score is the run's own final validation: the same weights on the same videos
        assert sorted(oof) == pytest.approx(sorted(r.data.metrics[f"val/{key}"] for r in children), abs=1e-4)
    assert "cv/fold_scores.png" in {a.path for a in c.list_artifacts(folds.parent_run_id, "cv")}

    # the cv folder as one ensemble on val: each fold predicts only its held-out videos, joined (out-of-fold), the
    # same per-frame values as the folds' own evaluations; then post-processing fitted on those predictions
    ok(mtl("eval", "--checkpoint", str(out), *overrides))
    assert json.loads((out / "eval_val" / "ensemble.json").read_text())["members"][0]["combined"] == "out-of-fold"
    joined = _rows(out / "eval_val" / "predictions.csv")
    per_fold = {}
    for k in range(2):
        per_fold |= _rows(out / f"fold_{k}" / "eval_val" / "predictions.csv")
    assert joined.keys() == per_fold.keys() and len(joined) > 0
    np.testing.assert_allclose(np.array(list(joined.values())), np.array([per_fold[k] for k in joined]), atol=1e-4)
    ok(mtl("postprocess", "fit", "--widths", "3", "--checkpoint", str(out), *overrides))
    fitted = json.loads((out / "postprocess.json").read_text())
    assert fitted["fitted_on"]["split"] == "val" and set(fitted["tasks"]) == {"va", "expr", "au"}
    logged = c.get_run(folds.parent_run_id)  # the cv's parent run holds the file and its gains
    assert logged.data.metrics["postprocess/au_gain"] == pytest.approx(fitted["tasks"]["au"]["gain"])
    assert [a.path for a in c.list_artifacts(folds.parent_run_id, "postprocess/val/folds")] == [
        "postprocess/val/folds/postprocess.json"
    ]

    # as if the cv had been killed in fold 1 after its checkpoint: the rerun skips the finished fold 0 (not trained,
    # its checkpoints untouched) and resumes fold 1 from its checkpoint (not from scratch: no checkpoint rewritten)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("fold_*/checkpoints/*/complete.json")}
    shutil.rmtree(out / "fold_1" / "export")
    shutil.rmtree(out / "fold_1" / "eval_val")
    again = ok(mtl("cv", "--config", str(SMOKE), "--folds", "2", "--out", str(out), *overrides))
    assert "cv: fold 0: finished already" in again.stdout and "cv: fold 0: training in" not in again.stdout
    assert "cv: fold 1: training in" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("fold_*/checkpoints/*/complete.json")} == stamps
    child_1 = (out / "fold_1" / "mlflow_run_id").read_text().strip()
    assert c.get_run(child_1).data.tags["resumed_from"] == "step_00000001"
    assert json.loads(again.stdout.strip().splitlines()[-1])["mean"] == pytest.approx(summary["mean"])

    other = mtl("cv", "--config", str(SMOKE), "--folds", "2", "--seed", "1", "--out", str(out), *overrides)
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1
    assert "--seed 1 (it has 0)" in other.stderr


def test_a_failed_fold_leaves_no_run_running(tiny_shards: Path, tmp_path: Path, monkeypatch) -> None:
    from mtl.launch import cv

    def failing(fold, *a, **k):
        raise MtlError(f"fold {fold.k}: `mtl train` exited with status 1")

    monkeypatch.setattr(cv, "train_here", failing)
    db = tmp_path / "mlflow.db"
    with pytest.raises(MtlError, match="fold 0"):
        cv.run_cv(SMOKE, smoke_overrides(tiny_shards, tmp_path / "cv", db), {}, 2, out=lambda _: None)
    c = MlflowClient(f"sqlite:///{db}")
    runs = c.search_runs([c.get_experiment_by_name("mtl-smoke").experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FAILED"}  # the parent and both folds
