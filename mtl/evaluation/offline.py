"""`mtl eval`: score trained models on one process, from their exported weights or DeepSpeed checkpoints: one
run, or an ensemble of several (their per-frame predictions averaged; `mtl.evaluation.ensemble`).

What one run's evaluation writes (predictions, submission files, thresholds, metrics) is also logged to the MLflow
run that trained the weights, under ``eval/<split>/<best|last|checkpoint tag>/``, when that run is reachable. An
ensemble is no single run's: its files stay in its output directory, with ``ensemble.json`` naming its runs.

A post-processing file (`mtl postprocess fit`: smoothing and thresholds) is applied where one is found beside the
evaluated path (``postprocess.json``) or given (``--postprocess FILE``).

On an unlabelled split (the organisers' test set, packed from their lists) there is nothing to score: it writes
the per-frame predictions and the submission files in the organisers' order instead."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtl.data.manifest import UnlabelledSplit
from mtl.data.testset import load_lists
from mtl.errors import MtlError
from mtl.evaluation.evaluate import (
    TUNED_SUBMISSION,
    FramePredictions,
    score_predictions,
    write_predictions,
    write_submission,
    write_test_submission,
)
from mtl.evaluation.members import predict_split
from mtl.evaluation.postprocess import POSTPROCESS_FILE, PostProcess, load_postprocess, postprocess_file
from mtl.runs.layout import Checkpoint, eval_dir, resolve_trained

THRESHOLDS_FILE = "thresholds.json"  # per multi-label task, the per-unit thresholds tuned on the split evaluated
ENSEMBLE_FILE = "ensemble.json"  # an ensemble's runs and weights, in its output directory


def tuned_thresholds(checkpoint: Path) -> tuple[dict[str, np.ndarray], Path | None]:
    """Thresholds `mtl eval --split val` tuned on this run's validation split, where it has run."""
    path = eval_dir(checkpoint, "val") / THRESHOLDS_FILE
    if not path.is_file():
        return {}, None
    try:
        return {k: np.asarray(v, dtype=float) for k, v in json.loads(path.read_text()).items()}, path
    except (ValueError, AttributeError) as exc:
        raise MtlError(f"{path}: not a thresholds file written by `mtl eval` ({exc})") from None


def output_dir(paths: Sequence[Path], split: str, out_dir: Path | None) -> Path:
    """``out_dir``, else beside the one path given (a run, or a folds directory); several paths need ``--out``."""
    if out_dir is not None:
        return out_dir
    if len(paths) > 1:
        raise MtlError(f"--out: an ensemble of {len(paths)} paths has no run of its own to write beside; "
                       "give --out DIR")  # fmt: skip
    return eval_dir(paths[0], split)


def run_eval(
    checkpoint: Path | Sequence[Path],
    split: str,
    out_dir: Path | None,
    overrides: list[str],
    device: str = "auto",
    weights: Sequence[float] | None = None,
    postprocess: Path | str | None = None,
) -> dict[str, float]:
    """Metrics of a labelled split ({} for an unlabelled one); files under ``out_dir``. ``device``: auto | cuda |
    cpu (``mtl.device``), decided before anything is loaded; bf16 autocast on CUDA. ``postprocess``: a file, "none",
    or None (the one beside a single given path, where there is one)."""
    from mtl.tracking.runs import attach, check_attach  # here: `mtl predict` imports this module and needs no MLflow

    paths = [Path(checkpoint)] if isinstance(checkpoint, (str, Path)) else [Path(p) for p in checkpoint]
    out_dir = output_dir(paths, split, out_dir)
    pp_path = postprocess_file(paths, postprocess)
    # a broken store stops here (one run: its outputs are logged), not after the outputs are written
    got = predict_split(paths, split, overrides, device, weights, before_eval=lambda cfg: check_attach(cfg.tracking))
    pp = load_postprocess(pp_path, got.tasks) if pp_path else None
    preds, pp_thresholds = (pp.apply(got.preds), pp.thresholds()) if pp else (got.preds, {})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_predictions(preds, out_dir / "predictions.csv", thresholds=pp_thresholds)
    written = ["predictions.csv", "submission"]
    if pp is not None and pp_path is not None:
        if pp_path.resolve() != (out_dir / POSTPROCESS_FILE).resolve():
            shutil.copyfile(pp_path, out_dir / POSTPROCESS_FILE)
        written.append(POSTPROCESS_FILE)
        print(f"post-processing of {pp_path} applied ({_describe(pp)})")
    if got.ensemble:
        (out_dir / ENSEMBLE_FILE).write_text(json.dumps({**got.record(), "split": split}, indent=2) + "\n")
    if isinstance(got.entry, UnlabelledSplit):
        tuned = {} if (pp or got.ensemble) else tuned_thresholds(got.runs[0])[0]
        _write_test(got.root, split, got.entry, preds, out_dir, pp_thresholds, tuned)
        scores: dict[str, float] = {}
        written += [TUNED_SUBMISSION] if tuned else []
    else:
        metrics = got.metrics if (got.metrics is not None and pp is None) else score_predictions(preds, pp_thresholds)
        scores = metrics.compute()
        write_submission(preds, out_dir / "submission", thresholds=pp_thresholds)
        if pp is None:  # with a post-processing file, its thresholds are the tuned ones
            thresholds = metrics.thresholds()
            write_submission(preds, out_dir / TUNED_SUBMISSION, thresholds=thresholds)
            (out_dir / THRESHOLDS_FILE).write_text(json.dumps({k: v.tolist() for k, v in thresholds.items()}, indent=2))
            written += [TUNED_SUBMISSION, THRESHOLDS_FILE]
        (out_dir / "metrics.json").write_text(json.dumps(scores, indent=2))
        written.append("metrics.json")
        print(f"predictions, metrics and ABAW submission files written to {out_dir}")
    if got.ensemble:
        how = ", ".join(f"{m.path} ({c}, weight {m.weight:.3g})" for m, c in zip(got.members, got.combined))
        print(f"an ensemble of {len(got.runs)} runs: {how}; recorded in {out_dir / ENSEMBLE_FILE}. No single run's: "
              "nothing logged to MLflow")  # fmt: skip
    else:
        where = f"eval/{split}/{label(got.runs[0])}"
        print(attach(got.cfg.tracking, [out_dir / n for n in written], where), flush=True)
    return scores


def _describe(pp: PostProcess) -> str:
    return "; ".join(f"{n}: {f.smoothing.kind}" + (f" {f.smoothing.width}" if f.smoothing.kind != "none" else "")
                     + (" + thresholds" if f.thresholds is not None else "") for n, f in pp.tasks.items())  # fmt: skip


def label(checkpoint: Path) -> str:
    """What was evaluated, as MLflow artifact folders name it: ``best`` / ``last`` (exports) or a checkpoint tag."""
    source = resolve_trained(checkpoint)
    return source.tag if isinstance(source, Checkpoint) else source.stem


def _write_test(
    root: Path,
    split: str,
    entry: UnlabelledSplit,
    preds: FramePredictions,
    out: Path,
    thresholds: dict[str, np.ndarray],
    tuned: dict[str, np.ndarray],
) -> None:
    """Submission files at ``thresholds`` (a post-processing file's, else 0.5: ``submission/``) and, where
    `mtl eval --split val` tuned thresholds for this run, with those (``submission_tuned_au/``)."""
    lists = load_lists(root, entry)
    gaps = write_test_submission(preds, lists, entry.video_frames, out / "submission", thresholds=thresholds)
    if tuned:
        write_test_submission(preds, lists, entry.video_frames, out / TUNED_SUBMISSION, thresholds=tuned)
    for gap in gaps:
        print(f"mtl eval: warning: {gap}")
    also = f"; with thresholds tuned by `mtl eval --split val` in {out / TUNED_SUBMISSION}" if tuned else ""
    print(f"split {split!r} is unlabelled: no metrics. Predictions of its {entry.frames} frames "
          f"({entry.frames_without_image} without a crop) in {out / 'predictions.csv'}; submission files for "
          f"{', '.join(lst.track for lst in lists)} in {out / 'submission'}{also}")  # fmt: skip
    print(f"check them before upload: mtl submission check {out / 'submission'} --shards {root} --split {split}")
