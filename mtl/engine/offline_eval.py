"""`mtl eval`: score a trained model on one process, from its exported weights or a DeepSpeed checkpoint."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch

from mtl.engine.evaluate import TUNED_SUBMISSION, evaluate, write_predictions, write_submission
from mtl.engine.layout import eval_dir
from mtl.engine.model_io import forward
from mtl.engine.trained import load_model

THRESHOLDS_FILE = "thresholds.json"  # per multi-label task, the per-unit thresholds tuned on the split evaluated


def run_eval(checkpoint: Path, split: str, out_dir: Path | None, overrides: list[str]) -> dict[str, float]:
    trained = load_model(checkpoint, overrides)
    loader = trained.source.eval_loader(split, rank=0, world_size=1)
    metrics, preds = evaluate(
        partial(forward, trained.model), loader, torch.device("cpu"), collect=True, progress=True, desc=f"eval {split}"
    )
    scores = metrics.compute()
    out_dir = out_dir or eval_dir(checkpoint, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    assert preds is not None
    write_predictions(preds, out_dir / "predictions.csv")
    write_submission(preds, out_dir / "submission")
    thresholds = metrics.thresholds()
    write_submission(preds, out_dir / TUNED_SUBMISSION, thresholds=thresholds)
    (out_dir / THRESHOLDS_FILE).write_text(json.dumps({k: v.tolist() for k, v in thresholds.items()}, indent=2))
    (out_dir / "metrics.json").write_text(json.dumps(scores, indent=2))
    print(f"predictions, metrics and ABAW submission files written to {out_dir}")
    return scores
