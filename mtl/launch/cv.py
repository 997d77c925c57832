"""`mtl cv`: K-fold cross-validation by video over the labelled videos of train and val.

Layout (other commands rely on it: `mtl eval --checkpoint CVDIR` expands a cv dir through it)::

    <out>/folds.json     the folds (mtl.data.folds): seed, K, the config it was made for, each fold's held-out videos
    <out>/fold_<k>/      fold k's run dir, a normal `mtl train` run with data.folds.file/fold set in its config
    <out>/fold_<k>/eval_val/   its out-of-fold predictions (`mtl eval --split val` on the held-out videos)

Each fold is one MLflow child run of a parent run "cv <config name> K folds"; the parent gets the mean and std of
the folds' held-out scores, a plot of them and the folds file. Without SLURM options the folds train one after
another here, each in its own `mtl train` process; with them (`mtl submit`'s options) as one job array through
`mtl submit`'s machinery. Rerunning the same command skips the folds that finished (exported weights) and resumes
the others from their checkpoints (train.resume=auto), so a killed cv loses at most the killed fold's progress since
its last checkpoint; the same out dir with another K, seed or config is refused.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtl.config import Config, flatten, replace
from mtl.data.folds import (
    FOLDS_FILE,
    CvConfigRecord,
    FoldRecord,
    FoldsFile,
    fold_dir,
    make_folds,
    manifest_digest,
    read_folds,
    write_folds,
)
from mtl.errors import MtlError
from mtl.launch import prepare, slurm_request
from mtl.launch.jobs import Printer, echo
from mtl.launch.submit import Plan, describe, follow, queue_plan
from mtl.runs.layout import RunDir, eval_dir
from mtl.tracking.runs import client, end_runs, open_run
from mtl.tracking.ui import compare_address, run_address, ui_lines

# Keys that may differ between the folds, or between two launches of the same cv (where and how it runs).
_FREE = ("train.output_dir", "train.resume", "train.progress", "tracking.", "slurm.", "data.folds.")
METRICS_FILE = "metrics.json"  # what `mtl eval` writes beside the predictions


@dataclass
class Fold:
    """One fold: its index, its validated config (tracking.run_id set where MLflow is on), and its name."""

    k: int
    cfg: Config
    overrides: list[str]  # on top of the command's: what makes this config fold k's

    @property
    def dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def finished(self) -> bool:
        """Trained to the end: the engine exports the weights only then."""
        return RunDir(self.dir).export_file("last").is_file()

    @property
    def evaluated(self) -> bool:
        return (eval_dir(self.dir, self.cfg.data.val_split) / METRICS_FILE).is_file()


def config_digest(cfg: Config) -> str:
    """sha256 of the resolved config less the keys in ``_FREE``: what must match for a rerun to continue a cv."""
    kept = {k: v for k, v in flatten(cfg).items() if not k.startswith(_FREE)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _parent_name(cfg: Config, k: int) -> str:
    return f"cv {cfg.tracking.run_name or 'mtl'} {k} folds"


def _check_same(path: Path, found: FoldsFile, k: int, seed: int, digest: str, mdigest: str) -> None:
    what = [
        (found.k != k, f"--folds {k} (it has {found.k})"),
        (found.seed != seed, f"--seed {seed} (it has {found.seed})"),
        (found.config.sha256 != digest, "another config or other overrides"),
        (found.manifest_sha256 != mdigest, "another pack (data.shards' manifest.json changed)"),
    ]
    diff = [w for bad, w in what if bad]
    if diff:
        raise MtlError(f"{path}: made for another cross-validation than this one ({', '.join(diff)}); use another "
                       f"--out, or the same arguments to continue it")  # fmt: skip


def open_folds(base: Config, out: Path, k: int, seed: int, config: Path | None, overrides: list[str]) -> FoldsFile:
    """``<out>/folds.json``: the existing one (checked to be this cv's), else new folds and the MLflow parent run.
    Folds that cannot be made, and a run's inputs that are missing, stop it before anything is written or made."""
    path = out / FOLDS_FILE
    digest, mdigest = config_digest(base), manifest_digest(base.data.shards)
    if path.is_file():
        found = read_folds(path)
        _check_same(path, found, k, seed, digest, mdigest)
        return found
    splits = [base.data.train_split, base.data.val_split]
    holdouts = make_folds(base.data.shards, splits, k, seed)
    prepare.check_inputs(base)
    parent = None
    t = base.tracking
    if t.enabled:
        from mtl.tracking.mlflow_run import create_run

        tags = {"mtl.cv.folds": str(k), "mtl.cv.seed": str(seed), "mtl.cv.out": str(out)}
        parent = create_run(t, run_name=_parent_name(base, k), tags=tags)
    folds = FoldsFile(
        k=k, seed=seed, shards=str(base.data.shards), manifest_sha256=mdigest, splits=splits,
        config=CvConfigRecord(file=str(config) if config else None, overrides=list(overrides), sha256=digest),
        parent_run_id=parent, folds=[FoldRecord(fold=i, holdout=h) for i, h in enumerate(holdouts)],
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_folds(path, folds)
    return folds


def fold_configs(config: Path | None, overrides: list[str], flags: dict, out: Path, folds: FoldsFile) -> list[Fold]:
    """Each fold's validated config, its MLflow child run opened (made once; a rerun continues it)."""
    result = []
    for k in range(folds.k):
        extra = [f"train.output_dir={fold_dir(out, k)}", f"data.folds.file={out / FOLDS_FILE}",
                 f"data.folds.fold={k}", f"tracking.run_name=fold {k}"]  # fmt: skip
        if folds.parent_run_id:
            extra.append(f"tracking.parent_run_id={folds.parent_run_id}")
        cfg = slurm_request.load_for_submit(config, [*overrides, *extra], flags)
        run_id, _ = open_run(cfg.tracking, f"fold {k}", {"mtl.cv.fold": str(k)}, prepare.existing_run_id(cfg))
        if run_id:
            extra.append(f"tracking.run_id={run_id}")
            cfg = replace(cfg, tracking=replace(cfg.tracking, run_id=run_id))
        result.append(Fold(k, cfg, extra))
    return result


# ------------------------------------------------------------------------------------------------ running


def train_here(fold: Fold, config: Path | None, overrides: list[str], out: Printer = echo) -> None:
    """Fold ``k`` trained (or resumed) by `mtl train` in its own process, on this machine: one fold's failure or
    kill never takes the others' state with it."""
    cmd = [sys.executable, "-m", "mtl.cli", "train", *(["--config", str(config)] if config else []),
           *overrides, *fold.overrides, f"tracking.uri={fold.cfg.tracking.uri}"]  # fmt: skip
    out(f"cv: fold {fold.k}: training in {fold.dir}")
    proc = subprocess.Popen(cmd)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # the child got the Ctrl-C too: it saves a checkpoint and stops
        proc.wait()
        raise
    if rc != 0:
        raise MtlError(f"fold {fold.k} ({fold.dir}): `mtl train` exited with status {rc}; rerun the same `mtl cv` "
                       "to resume it")  # fmt: skip


def evaluate_fold(fold: Fold, out: Printer = echo) -> dict[str, float]:
    """The fold's held-out scores: `mtl eval --split <val>` of its run (best weights) on its held-out videos, which
    writes the out-of-fold per-frame predictions to ``<fold>/eval_val/``; read back if already there."""
    where = eval_dir(fold.dir, fold.cfg.data.val_split)
    if not fold.evaluated:
        from mtl.evaluation.offline import run_eval

        out(f"cv: fold {fold.k}: out-of-fold predictions -> {where}")
        run_eval(fold.dir, fold.cfg.data.val_split, None, [], device=fold.cfg.train.device)
    scores = json.loads((where / METRICS_FILE).read_text())
    return {k: float(v) for k, v in scores.items() if headline(k) and isinstance(v, (int, float))}


def headline(key: str) -> bool:
    """The scores a cv summarises: each task's and the MTL score (not per class or unit, not frame counts)."""
    return "/" not in key and not key.endswith("_frames")


def summarise(per_fold: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and (population) std over the folds of each score every fold has."""
    keys = [k for k in per_fold[0] if all(k in s for s in per_fold)]
    values = {k: np.array([s[k] for s in per_fold], dtype=float) for k in keys}
    return {k: float(v.mean()) for k, v in values.items()}, {k: float(v.std()) for k, v in values.items()}


def log_parent(cfg: Config, folds: FoldsFile, fold_list: list[Fold], per_fold: list[dict[str, float]],
               mean: dict[str, float], std: dict[str, float], folds_path: Path) -> None:  # fmt: skip
    """Parent: per-task mean/std (``cv/<metric>_mean``, ``_std``), each fold's score (``cv/<metric>`` at step k),
    the plot, the folds file; each child: its held-out scores as ``oof/<metric>``."""
    from mlflow.entities import Metric

    from mtl.tracking.plots import fold_scores

    c, parent = client(cfg.tracking.uri), folds.parent_run_id
    now = int(time.time() * 1000)
    metrics = [Metric(f"cv/{k}_mean", v, now, 0) for k, v in mean.items()]
    metrics += [Metric(f"cv/{k}_std", v, now, 0) for k, v in std.items()]
    metrics += [Metric(f"cv/{k}", v, now, f.k) for f, s in zip(fold_list, per_fold) for k, v in s.items()]
    c.log_batch(parent, metrics=metrics)
    for f, s in zip(fold_list, per_fold):
        if f.cfg.tracking.run_id:
            c.log_batch(f.cfg.tracking.run_id, metrics=[Metric(f"oof/{k}", v, now, 0) for k, v in s.items()])
    fig = fold_scores(per_fold, list(mean))
    c.log_figure(parent, fig, "cv/fold_scores.png")
    c.log_artifact(parent, str(folds_path), "cv")
    c.set_terminated(parent, "FINISHED")


def _end_parent(cfg: Config, folds: FoldsFile, status: str) -> None:
    """End the parent run (best effort: the error that ended the cv is the one to show)."""
    if folds.parent_run_id:
        try:
            client(cfg.tracking.uri).set_terminated(folds.parent_run_id, status)
        except Exception:
            pass


def _end_runs(cfg: Config, folds: FoldsFile, fold_list: list[Fold], status: str, reason: str) -> None:
    """A cv that stops: the parent and the child runs no fold process ended (folds not started yet) end too."""
    _end_parent(cfg, folds, status)
    if cfg.tracking.enabled:
        end_runs(cfg.tracking.uri, [f.cfg.tracking.run_id for f in fold_list], status, reason)


def where_to_look(cfg: Config, parent: str, children: list[str]) -> list[str]:
    """Where to look: the MLflow UI command and the parent run's page (its children listed under it), and the
    folds side by side."""
    uri = cfg.tracking.uri
    exp = client(uri).get_run(parent).info.experiment_id
    pages = [("parent run", run_address(uri, exp, parent)), ("folds compared", compare_address(uri, exp, children))]
    return ui_lines(uri, pages)


def _slurm_wanted(flags: dict[str, object]) -> bool:
    return any(v is not None for v in flags.values())


def run_cv(
    config: Path | None,
    overrides: list[str],
    flags: dict[str, object],
    k: int,
    seed: int = 0,
    out_dir: Path | None = None,
    wait: bool = False,
    out: Printer = echo,
) -> int:
    """`mtl cv`. Returns the exit status; the last line printed is the summary as JSON."""
    base = slurm_request.load_for_submit(config, overrides, flags)
    if base.data.folds.file is not None:
        raise MtlError("data.folds.*: `mtl cv` sets them for each fold; leave them out of its config and overrides")
    if base.data.features:
        raise MtlError("data.features: `mtl cv` selects videos of the pixel shards; cached features are not supported")
    out_path = Path(out_dir or base.train.output_dir).expanduser().resolve()
    folds = open_folds(base, out_path, k, seed, config, overrides)
    fold_list = fold_configs(config, overrides, flags, out_path, folds)
    pending = [f for f in fold_list if not f.finished]
    for f in fold_list:
        if f.finished:
            out(f"cv: fold {f.k}: finished already ({RunDir(f.dir).export_file('last')}), not trained again")
    try:
        if pending and _slurm_wanted(flags):
            if not _run_array(base, pending, wait, out):
                _end_parent(base, folds, "FINISHED")  # it groups the children; a rerun adds the summary
                return _queued_line(out_path, folds, out)
        else:
            for f in pending:
                train_here(f, config, overrides, out)
        per_fold = [evaluate_fold(f, out) for f in fold_list]
    except KeyboardInterrupt:
        _end_runs(base, folds, fold_list, "KILLED", "mtl cv interrupted")
        raise
    except Exception as exc:
        _end_runs(base, folds, fold_list, "FAILED", str(exc))  # not left RUNNING; a rerun that finishes ends them
        raise
    mean, std = summarise(per_fold)
    if folds.parent_run_id:
        log_parent(base, folds, fold_list, per_fold, mean, std, out_path / FOLDS_FILE)
        children = [f.cfg.tracking.run_id for f in fold_list if f.cfg.tracking.run_id]
        for line in where_to_look(base, folds.parent_run_id, children):
            out(line)
    summary: dict[str, Any] = {
        "cv": str(out_path), "folds": folds.k, "seed": folds.seed, "parent_run_id": folds.parent_run_id,
        "status": "finished", "mean": mean, "std": std,
        "per_fold": [{"fold": f.k, "run_id": f.cfg.tracking.run_id, "metrics": s} for f, s in zip(fold_list, per_fold)],
    }  # fmt: skip
    out(json.dumps(summary))
    return 0


def _run_array(base: Config, pending: list[Fold], wait: bool, out: Printer) -> bool:
    """The unfinished folds as one job array; True once all completed (with ``wait``), False if not waited for."""
    from mtl.launch.task import CvFoldTask

    plan = array_plan(base, pending)
    queued = queue_plan(plan, CvFoldTask())
    out(f"submitted job array {queued[0].job_id.split('_')[0]} with {len(queued)} fold(s) "
        f"({describe(plan.first, plan.partition)})")  # fmt: skip
    for q in queued:
        out(f"  {q.job_id}  run {q.run_id}  {q.name}  stdout {q.task0.paths.stdout}")
    outcomes = follow(plan, queued, wait, out)
    if outcomes is None:
        return False
    failed = [q.name for q, o in zip(queued, outcomes) if not o.ok]
    if failed:
        raise MtlError(f"{', '.join(failed)} did not complete; rerun the same `mtl cv` to resume")
    return True


def array_plan(base: Config, pending: list[Fold]) -> Plan:
    """`mtl submit`'s plan for the unfinished folds: one array, one element per fold, its child run set."""
    partition = slurm_request.check_request(base)
    for f in pending:
        prepare.check_inputs(f.cfg)
    return Plan([f.cfg for f in pending], [f"fold {f.k}" for f in pending], partition,
                f"cv-{base.tracking.run_name or 'mtl'}", array=True)  # fmt: skip


def _queued_line(out_path: Path, folds: FoldsFile, out: Printer) -> int:
    out("cv: once the array has finished, rerun this `mtl cv` without the SLURM options: it skips the finished "
        "folds, writes their out-of-fold predictions and the summary")  # fmt: skip
    out(json.dumps({"cv": str(out_path), "folds": folds.k, "seed": folds.seed, "parent_run_id": folds.parent_run_id,
                    "status": "queued"}))  # fmt: skip
    return 0
