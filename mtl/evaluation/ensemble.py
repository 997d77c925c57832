"""Ensembles: several trained runs' per-frame predictions, aligned by frame and averaged (weighted).

Each run is evaluated on its own (its backbone, its input: pixels or cached features, its clip length), so only
what it predicts per frame meets the others': VA values, EXPR and AU probabilities, which are averaged with the
weights normalised to sum 1. A directory of cross-validation folds (``folds.json`` beside ``fold_<k>/`` run
directories, as `mtl cv` leaves them) stands for its folds: on a split each fold predicted in full (a test split)
their mean, on its validation split (each fold's held-out videos) their union, the out-of-fold predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtl.data.folds import FOLDS_FILE, fold_dirs, read_folds
from mtl.errors import MtlError
from mtl.evaluation.evaluate import FramePredictions


@dataclass(frozen=True)
class Member:
    """One path given: a run, or a folds directory standing for its fold runs; its weight in the ensemble."""

    path: Path
    runs: tuple[Path, ...]
    weight: float


def cv_parent_run(path: Path) -> str | None:
    """The MLflow parent run of the cross-validation directory ``path`` (None: not one, or made untracked)."""
    return read_folds(Path(path) / FOLDS_FILE).parent_run_id if fold_dirs(path) is not None else None


def expand_runs(paths: Sequence[Path], weights: Sequence[float] | None = None) -> list[Member]:
    """The runs each path stands for (a folds directory: its folds), with the weights normalised to sum 1."""
    if weights is not None and len(weights) != len(paths):
        raise MtlError(f"--weights: {len(weights)} weights for {len(paths)} --checkpoint paths; give one per path")
    given = np.ones(len(paths)) if weights is None else np.asarray(weights, dtype=float)
    if not np.all(np.isfinite(given)) or (given < 0).any() or given.sum() <= 0:
        raise MtlError(f"--weights {' '.join(f'{w:g}' for w in given)}: expected non-negative numbers, not all 0")
    given = given / given.sum()
    return [Member(Path(p), tuple(fold_dirs(Path(p)) or [Path(p)]), float(w)) for p, w in zip(paths, given)]


def combine_folds(folds: Sequence[FramePredictions], path: Path) -> tuple[FramePredictions, str]:
    """One prediction per frame from the fold runs of ``path``: where each predicted its own held-out videos (a
    fold run's validation split is what it held out), their union (out-of-fold predictions); where all predicted
    the same frames (a test split), their mean. Returns it and which of the two it was."""
    keys = [set(zip(f.video, f.frame)) for f in folds]
    if len(folds) == 1 or all(k == keys[0] for k in keys):
        return average(folds, np.full(len(folds), 1 / len(folds)), [path] * len(folds)), "mean"
    if sum(len(k) for k in keys) != len(set().union(*keys)):
        raise MtlError(f"{path}: its folds predicted overlapping but different frames of the split; neither "
                       "out-of-fold (disjoint) nor the same frames (to average)")  # fmt: skip
    arrays = [f.arrays() for f in folds]
    labels = [f.label_arrays() for f in folds]
    names = list(arrays[0])
    have = [n for n in labels[0][0] if all(n in lab[0] for lab in labels)]
    return FramePredictions.from_arrays(
        [v for f in folds for v in f.video], [x for f in folds for x in f.frame],
        {n: np.concatenate([a[n] for a in arrays]) for n in names},
        {n: np.concatenate([lab[0][n] for lab in labels]) for n in have},
        {n: np.concatenate([lab[1][n] for lab in labels]) for n in have},
    ), "out-of-fold"  # fmt: skip


def check_same_tasks(members: Sequence[tuple[Path, tuple[str, ...]]]) -> None:
    """Runs averaged together must predict the same tasks; the first that does not is named with both lists."""
    first, want = members[0]
    for path, have in members[1:]:
        if set(have) != set(want):
            raise MtlError(f"{first} predicts tasks {', '.join(want)} but {path} predicts {', '.join(have)}: "
                           "an ensemble needs runs that predict the same tasks")  # fmt: skip


def average(members: Sequence[FramePredictions], weights: np.ndarray, names: Sequence[Path]) -> FramePredictions:
    """The weighted mean of each frame's predictions, in the first member's frame order. Every member must have
    predicted exactly the same frames (each run's evaluation covers every frame of the split once)."""
    base = members[0]
    keys = list(zip(base.video, base.frame))
    if len(set(keys)) != len(keys):
        raise MtlError(f"{names[0]}: a frame was predicted twice; its predictions cannot be aligned by frame")
    base_arrays = base.arrays()
    total = {k: weights[0] * v.astype(np.float64) for k, v in base_arrays.items()}
    for member, w, name in zip(members[1:], weights[1:], names[1:]):
        index = {vf: i for i, vf in enumerate(zip(member.video, member.frame))}
        order = np.fromiter((index.get(vf, -1) for vf in keys), dtype=np.int64, count=len(keys))
        missing = int((order < 0).sum())
        if missing or len(index) != len(keys):
            extra = len(index) - (len(keys) - missing)
            raise MtlError(f"{name} predicted other frames than {names[0]} ({missing} of its frames missing, "
                           f"{extra} others): were both evaluated on the same split of the same pack?")  # fmt: skip
        for k, v in member.arrays().items():
            total[k] += w * v[order].astype(np.float64)
    labels, valid = base.label_arrays()
    outputs = {k: v.astype(np.float32) for k, v in total.items()}
    return FramePredictions.from_arrays(base.video, base.frame, outputs, labels, valid)
