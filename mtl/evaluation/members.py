"""The per-frame predictions of one trained run, or of an ensemble of several, on one split of a pack.

Each run is loaded and evaluated on its own (backbone, pixels or cached features, clip length as it was trained);
an ensemble's are then aligned by frame and averaged (`mtl.evaluation.ensemble`). `mtl eval` writes and scores
what this returns; `mtl postprocess fit` fits on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from mtl.config import Config
from mtl.data.manifest import LabelledSplit, UnlabelledSplit, read_manifest
from mtl.device import autocast, pick_device
from mtl.evaluation.ensemble import average, check_same_tasks, expand_runs
from mtl.evaluation.evaluate import FramePredictions, evaluate
from mtl.metrics import ABAWMetrics
from mtl.runs.model_io import forward
from mtl.runs.trained import build_model, load_trained, predicted_tasks


@dataclass
class Predicted:
    runs: list[Path]  # the runs evaluated (a folds directory expanded to its folds)
    weights: np.ndarray  # theirs, summing to 1
    tasks: tuple[str, ...]  # what they predict
    cfg: Config  # the first run's (with the overrides): its pack, its MLflow run
    root: Path  # the pack (data.shards)
    entry: LabelledSplit | UnlabelledSplit
    preds: FramePredictions  # the run's, or the ensemble's weighted mean, with the split's labels
    metrics: ABAWMetrics | None  # a single run's, streamed during its evaluation (None for an ensemble)

    @property
    def ensemble(self) -> bool:
        return len(self.runs) > 1

    @property
    def labelled(self) -> bool:
        return not isinstance(self.entry, UnlabelledSplit)


def predict_split(
    paths: Sequence[Path],
    split: str,
    overrides: list[str],
    device: str = "auto",
    weights: Sequence[float] | None = None,
    before_eval=None,
) -> Predicted:
    """Every run's per-frame predictions on ``split`` (tasks checked first, before any is evaluated), averaged.
    ``before_eval(cfg)`` runs once the first run's config is known (e.g. to check its MLflow store)."""
    runs, w = expand_runs(paths, weights)
    where_to = pick_device(device)
    loaded = [(p, *load_trained(p)) for p in runs]
    named = [(p, predicted_tasks(state)) for p, state, _ in loaded]
    check_same_tasks(named)
    members: list[FramePredictions] = []
    metrics = cfg = root = entry = None
    for i, (path, state, config) in enumerate(loaded):
        trained = build_model(path, state, config, overrides)
        loaded[i] = (path, {}, config)  # the weights are in the model now; let them go with it
        if cfg is None:
            cfg, root = trained.cfg, Path(trained.cfg.data.shards)
            if before_eval is not None:
                before_eval(cfg)
            entry = read_manifest(root).split(split)
        model = trained.model.to(where_to)
        loader = trained.source.eval_loader(split, rank=0, world_size=1, device=where_to)  # pinned for a GPU
        desc = f"eval {split}" if len(runs) == 1 else f"eval {split} [{i + 1}/{len(runs)}]"
        with autocast(where_to):
            metrics, preds = evaluate(partial(forward, model), loader, where_to, collect=True, progress=True, desc=desc)
        assert preds is not None
        members.append(preds)
        del model, trained
    assert cfg is not None and root is not None and entry is not None
    tasks = named[0][1]
    preds = members[0] if len(runs) == 1 else average(members, w, runs)
    return Predicted(runs, w, tasks, cfg, root, entry, preds, metrics if len(runs) == 1 else None)
