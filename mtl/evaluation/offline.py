"""`mtl eval`: score a trained model on one process, from its exported weights or a DeepSpeed checkpoint.

What it writes (predictions, submission files, thresholds, metrics) is also logged to the MLflow run that trained
the weights, under ``eval/<split>/<best|last|checkpoint tag>/``, when that run is reachable.

On an unlabelled split (the organisers' test set, packed from their lists) there is nothing to score: it writes
the per-frame predictions and the submission files in the organisers' order instead."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np

from mtl.data.manifest import UnlabelledSplit, read_manifest
from mtl.data.testset import load_lists
from mtl.device import autocast, pick_device
from mtl.errors import MtlError
from mtl.evaluation.evaluate import (
    TUNED_SUBMISSION,
    FramePredictions,
    evaluate,
    write_predictions,
    write_submission,
    write_test_submission,
)
from mtl.runs.layout import Checkpoint, eval_dir, resolve_trained
from mtl.runs.model_io import forward
from mtl.runs.trained import load_model

THRESHOLDS_FILE = "thresholds.json"  # per multi-label task, the per-unit thresholds tuned on the split evaluated


def tuned_thresholds(checkpoint: Path) -> tuple[dict[str, np.ndarray], Path | None]:
    """Thresholds `mtl eval --split val` tuned on this run's validation split, where it has run."""
    path = eval_dir(checkpoint, "val") / THRESHOLDS_FILE
    if not path.is_file():
        return {}, None
    try:
        return {k: np.asarray(v, dtype=float) for k, v in json.loads(path.read_text()).items()}, path
    except (ValueError, AttributeError) as exc:
        raise MtlError(f"{path}: not a thresholds file written by `mtl eval` ({exc})") from None


def run_eval(
    checkpoint: Path, split: str, out_dir: Path | None, overrides: list[str], device: str = "auto"
) -> dict[str, float]:
    """Metrics of a labelled split ({} for an unlabelled one); files under ``out_dir``. ``device``: auto | cuda |
    cpu (``mtl.device``), decided before anything is loaded; bf16 autocast on CUDA."""
    where_to = pick_device(device)
    trained = load_model(checkpoint, overrides)
    from mtl.tracking.runs import attach, check_attach  # here: `mtl predict` imports this module and needs no MLflow

    check_attach(trained.cfg.tracking)  # a broken store stops here, not after the outputs are written
    root = Path(trained.cfg.data.shards)
    entry = read_manifest(root).split(split)
    model = trained.model.to(where_to)
    loader = trained.source.eval_loader(split, rank=0, world_size=1, device=where_to)  # pinned for a GPU
    with autocast(where_to):
        metrics, preds = evaluate(
            partial(forward, model), loader, where_to, collect=True, progress=True, desc=f"eval {split}"
        )
    out_dir = out_dir or eval_dir(checkpoint, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    assert preds is not None
    write_predictions(preds, out_dir / "predictions.csv")
    if isinstance(entry, UnlabelledSplit):
        _write_test(checkpoint, root, split, entry, preds, out_dir)
        scores: dict[str, float] = {}
        tuned = [TUNED_SUBMISSION] if (out_dir / TUNED_SUBMISSION).is_dir() else []
        written = ["predictions.csv", "submission", *tuned]
    else:
        scores = metrics.compute()
        write_submission(preds, out_dir / "submission")
        thresholds = metrics.thresholds()
        write_submission(preds, out_dir / TUNED_SUBMISSION, thresholds=thresholds)
        (out_dir / THRESHOLDS_FILE).write_text(json.dumps({k: v.tolist() for k, v in thresholds.items()}, indent=2))
        (out_dir / "metrics.json").write_text(json.dumps(scores, indent=2))
        print(f"predictions, metrics and ABAW submission files written to {out_dir}")
        written = ["predictions.csv", "submission", TUNED_SUBMISSION, THRESHOLDS_FILE, "metrics.json"]
    where = f"eval/{split}/{_label(checkpoint)}"
    print(attach(trained.cfg.tracking, [out_dir / n for n in written], where), flush=True)
    return scores


def _label(checkpoint: Path) -> str:
    """What was evaluated, as MLflow artifact folders name it: ``best`` / ``last`` (exports) or a checkpoint tag."""
    source = resolve_trained(checkpoint)
    return source.tag if isinstance(source, Checkpoint) else source.stem


def _write_test(
    checkpoint: Path, root: Path, split: str, entry: UnlabelledSplit, preds: FramePredictions, out: Path
) -> None:
    """Submission files at 0.5 (``submission/``) and, where `mtl eval --split val` tuned thresholds for this run,
    with those (``submission_tuned_au/``)."""
    lists = load_lists(root, entry)
    gaps = write_test_submission(preds, lists, entry.video_frames, out / "submission")
    thresholds, source = tuned_thresholds(checkpoint)
    if thresholds:
        write_test_submission(preds, lists, entry.video_frames, out / TUNED_SUBMISSION, thresholds=thresholds)
    for gap in gaps:
        print(f"mtl eval: warning: {gap}")
    tuned = f"; with the thresholds of {source} in {out / TUNED_SUBMISSION}" if source else ""
    print(f"split {split!r} is unlabelled: no metrics. Predictions of its {entry.frames} frames "
          f"({entry.frames_without_image} without a crop) in {out / 'predictions.csv'}; submission files for "
          f"{', '.join(lst.track for lst in lists)} in {out / 'submission'}{tuned}")  # fmt: skip
    print(f"check them before upload: mtl submission check {out / 'submission'} --shards {root} --split {split}")
