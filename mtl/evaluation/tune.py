"""`mtl postprocess fit`: post-processing (smoothing, per-unit thresholds) fitted on a labelled held-out split's
predictions of one run or an ensemble, written beside it, and logged to the run that trained the weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mtl.config import replace
from mtl.errors import MtlError
from mtl.evaluation.ensemble import cv_parent_run
from mtl.evaluation.members import predict_split
from mtl.evaluation.offline import label
from mtl.evaluation.postprocess import KINDS, WIDTHS, FittedOn, PostProcess, fit, postprocess_beside


def run_fit(
    paths: Sequence[Path],
    split: str,
    out: Path | None,
    overrides: list[str],
    device: str = "auto",
    weights: Sequence[float] | None = None,
    kinds: Sequence[str] = KINDS,
    widths: Sequence[int] = WIDTHS,
) -> tuple[PostProcess, Path]:
    """Fit on ``split`` (labelled, not trained on) and save to ``out`` (default: ``postprocess.json`` beside the
    one path given; several paths need ``out``)."""
    from mtl.tracking.runs import attach, check_attach  # MLflow only where a command logs

    paths = [Path(p) for p in paths]
    if out is None and len(paths) > 1:
        raise MtlError(f"--out: an ensemble of {len(paths)} paths has no run of its own to write beside; "
                       "give --out FILE")  # fmt: skip
    target = out or postprocess_beside(paths[0])
    got = predict_split(paths, split, overrides, device, weights, before_eval=lambda cfg: check_attach(cfg.tracking))
    if not got.labelled:
        raise MtlError(f"split {split!r} is unlabelled: post-processing is fitted on a labelled held-out split")
    fitted_on = FittedOn(runs=[str(m.path) for m in got.members], weights=[m.weight for m in got.members], split=split,
                         frames=len(got.preds.frame), videos=len(set(got.preds.video)))  # fmt: skip
    pp = fit(got.preds, fitted_on, kinds, widths)
    pp.save(target)
    for name, f in pp.tasks.items():
        how = f.smoothing.kind + (f" width {f.smoothing.width}" if f.smoothing.kind != "none" else "")
        thr = ", per-unit thresholds" if f.thresholds is not None else ""
        print(f"{name}: {how}{thr}: {f.metric} {f.before:.4f} -> {f.after:.4f} (gain {f.gain:+.4f})")
    print(f"post-processing fitted on {split!r} ({fitted_on.frames} frames) written to {target}")
    parent = cv_parent_run(paths[0]) if len(paths) == 1 else None
    if got.ensemble and parent is None:
        print("an ensemble is no single run's: nothing logged to MLflow")
    else:  # one run: to it; a cv directory: to the cv's parent run
        tracking = replace(got.cfg.tracking, run_id=parent) if parent else got.cfg.tracking
        where = f"postprocess/{split}/{'folds' if parent else label(got.runs[0])}"
        print(attach(tracking, [target], where, metrics=pp.metrics()), flush=True)
    return pp, target
