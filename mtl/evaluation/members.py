"""The per-frame predictions of one trained run, or of an ensemble of several, on one split of a pack.

Each run is loaded and evaluated on its own (backbone, pixels or cached features, clip length as it was trained);
an ensemble's are then aligned by frame and averaged (`mtl.evaluation.ensemble`). `mtl eval` writes and scores
what this returns; `mtl postprocess fit` fits on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from mtl.config import Config
from mtl.data.manifest import LabelledSplit, UnlabelledSplit, read_manifest
from mtl.device import autocast, pick_device
from mtl.evaluation.ensemble import Member, average, check_same_tasks, combine_folds, expand_runs
from mtl.evaluation.evaluate import FramePredictions, evaluate
from mtl.metrics import ABAWMetrics
from mtl.runs.model_io import forward
from mtl.runs.trained import build_model, load_trained, predicted_tasks


@dataclass
class Predicted:
    members: list[Member]  # the paths given, each a run or a folds directory, with their normalised weights
    combined: list[str]  # per member: "run", "mean" or "out-of-fold" (how its folds' predictions became one)
    tasks: tuple[str, ...]  # what they predict
    cfg: Config  # the first run's (with the overrides): its pack, its MLflow run
    root: Path  # the pack (data.shards)
    entry: LabelledSplit | UnlabelledSplit
    preds: FramePredictions  # the run's, or the ensemble's weighted mean, with the split's labels
    metrics: ABAWMetrics | None  # a single run's, streamed during its evaluation (None otherwise)

    @property
    def runs(self) -> list[Path]:
        return [r for m in self.members for r in m.runs]

    @property
    def ensemble(self) -> bool:
        """More than one trained run (several paths, or a folds directory): no single run's outputs."""
        return len(self.runs) > 1

    @property
    def labelled(self) -> bool:
        return not isinstance(self.entry, UnlabelledSplit)

    def record(self) -> dict:
        """What `mtl eval` writes as ``ensemble.json``."""
        return {"members": [{"path": str(m.path), "runs": [str(r) for r in m.runs], "weight": m.weight, "combined": c}
                            for m, c in zip(self.members, self.combined)]}  # fmt: skip


def predict_split(
    paths: Sequence[Path],
    split: str,
    overrides: list[str],
    device: str = "auto",
    weights: Sequence[float] | None = None,
    before_eval: Callable[[Config], None] | None = None,
) -> Predicted:
    """Every run's per-frame predictions on ``split`` (tasks checked first, before any is evaluated), a folds
    directory's combined (``combine_folds``), then the members' weighted mean. ``before_eval(cfg)`` runs once a
    single run's config is known, before it is evaluated (to check the MLflow store its outputs go to)."""
    members = expand_runs(paths, weights)
    runs = [r for m in members for r in m.runs]
    where_to = pick_device(device)
    loaded = [(p, *load_trained(p)) for p in runs]
    named = [(p, predicted_tasks(state)) for p, state, _ in loaded]
    check_same_tasks(named)
    per_run: list[FramePredictions] = []
    metrics = cfg = root = entry = None
    for i, (path, state, config) in enumerate(loaded):
        trained = build_model(path, state, config, overrides)
        loaded[i] = (path, {}, config)  # the weights are in the model now; let them go with it
        if cfg is None:
            cfg, root = trained.cfg, Path(trained.cfg.data.shards)
            if before_eval is not None and len(runs) == 1:
                before_eval(cfg)
            entry = read_manifest(root).split(split)
        model = trained.model.to(where_to)
        loader = trained.source.eval_loader(split, rank=0, world_size=1, device=where_to)  # pinned for a GPU
        desc = f"eval {split}" if len(runs) == 1 else f"eval {split} [{i + 1}/{len(runs)}]"
        with autocast(where_to):
            metrics, preds = evaluate(partial(forward, model), loader, where_to, collect=True, progress=True, desc=desc)
        assert preds is not None
        per_run.append(preds)
        del model, trained
    assert cfg is not None and root is not None and entry is not None
    parts, combined, at = [], [], 0
    for m in members:
        mine = per_run[at : at + len(m.runs)]
        at += len(m.runs)
        one, how = combine_folds(mine, m.path) if len(mine) > 1 else (mine[0], "run")
        parts.append(one)
        combined.append(how)
    preds = (
        parts[0]
        if len(parts) == 1
        else average(parts, np.array([m.weight for m in members]), [m.path for m in members])
    )
    single = metrics if len(runs) == 1 else None
    return Predicted(members, combined, named[0][1], cfg, root, entry, preds, single)
