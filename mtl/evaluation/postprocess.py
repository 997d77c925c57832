"""Post-processing fitted on held-out predictions, as ABAW winners do on top of a model: per task, a temporal
smoothing of the per-frame predictions along each video's frames (box, gaussian or median, of a width in frames,
or none), and per unit of each multi-label task a decision threshold (after smoothing), each chosen to maximise
the task's metric on the predictions it is fitted on (a validation split's: not the data it will be judged on).

Saved as one small JSON file (``PostProcess``) beside the run (``<run>/postprocess.json``) or an ensemble's
outputs; `mtl eval` and `mtl predict` apply it. Smoothing never crosses from one video into the next.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mtl.errors import MtlError
from mtl.evaluation.evaluate import FramePredictions
from mtl.tasks import get_task, tasks
from mtl.tasks.streams import MultiLabelStream

POSTPROCESS_FILE = "postprocess.json"
KINDS = ("box", "gaussian", "median")
WIDTHS = (5, 9, 15, 25, 45)  # frames (odd: centred windows); at 30 frames/s from 1/6 s to 1.5 s
Kind = Literal["none", "box", "gaussian", "median"]


class Smoothing(BaseModel):
    """A centred window of ``width`` frames (odd); gaussian: sigma = width / 4. Near a video's ends the window is
    cut at the end (weights renormalised; median over the frames there)."""

    model_config = ConfigDict(extra="forbid")
    kind: Kind = "none"
    width: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _odd(self) -> Smoothing:
        if self.kind == "none" and self.width != 1:
            raise ValueError("kind none has width 1")
        if self.width % 2 == 0:
            raise ValueError(f"width {self.width}: expected an odd number of frames (a centred window)")
        return self


class TaskFit(BaseModel):
    """What was chosen for one task, and its headline metric on the fitting data before and after."""

    model_config = ConfigDict(extra="forbid")
    metric: str  # the task's headline, e.g. au_f1
    smoothing: Smoothing = Field(default_factory=Smoothing)
    thresholds: list[float] | None = None  # per unit of a multi-label task, after smoothing
    before: float
    after: float
    gain: float

    @model_validator(mode="after")
    def _in_range(self) -> TaskFit:
        if self.thresholds is not None and not all(0.0 <= x <= 1.0 for x in self.thresholds):
            raise ValueError("thresholds must lie in [0, 1]")
        return self


class FittedOn(BaseModel):
    """The predictions fitted on: the paths given (runs, or folds directories: out-of-fold on their validation
    split), their weights, the split and its size."""

    model_config = ConfigDict(extra="forbid")
    runs: list[str]
    weights: list[float]
    split: str
    frames: int
    videos: int


class PostProcess(BaseModel):
    """The file: one entry per task the model predicts, and which predictions it was fitted on."""

    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    tasks: dict[str, TaskFit]
    fitted_on: FittedOn

    def thresholds(self) -> dict[str, np.ndarray]:
        return {n: np.asarray(f.thresholds, dtype=float) for n, f in self.tasks.items() if f.thresholds is not None}

    def metrics(self) -> dict[str, float]:
        """For MLflow: ``postprocess/<task>_{before,after,gain}``."""
        return {f"postprocess/{n}_{k}": float(getattr(f, k)) for n, f in self.tasks.items()
                for k in ("before", "after", "gain")}  # fmt: skip

    def apply(self, preds: FramePredictions) -> FramePredictions:
        """The predictions smoothed as fitted (thresholds are applied where decisions are made: ``thresholds()``)."""
        out = self.smooth_arrays(preds.arrays(), preds.video, preds.frame)
        labels, valid = preds.label_arrays()
        return FramePredictions.from_arrays(preds.video, preds.frame, out, labels, valid)

    def smooth_arrays(
        self, arrays: dict[str, np.ndarray], video: Sequence[str], frame: Sequence[int]
    ) -> dict[str, np.ndarray]:
        """Task -> [frames, width] values smoothed along each video's frames, as fitted for each task."""
        segments = video_segments(video, frame)
        return {n: smooth(a, segments, self.tasks[n].smoothing) if n in self.tasks else a for n, a in arrays.items()}

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path


def load_postprocess(path: Path, predicted: Sequence[str]) -> PostProcess:
    """The file at ``path``, checked against the tasks the model predicts (one line naming both otherwise)."""
    try:
        pp = PostProcess.model_validate(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            e = exc.errors()[0]
            why = f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
        else:
            why = str(exc).splitlines()[0]
        raise MtlError(f"{path}: not a post-processing file written by `mtl postprocess fit` ({why})") from None
    if set(pp.tasks) != set(predicted):
        raise MtlError(f"{path}: fitted for tasks {', '.join(pp.tasks)} but the model predicts {', '.join(predicted)}; "
                       "fit it again for this model")  # fmt: skip
    for name, fit in pp.tasks.items():
        width = get_task(name).width
        if fit.thresholds is not None and len(fit.thresholds) != width:
            raise MtlError(f"{path}: tasks.{name}.thresholds has {len(fit.thresholds)} values, the task {width} units")
    return pp


# ------------------------------------------------------------------------------------------------ smoothing


def video_segments(video: Sequence[str], frame: Sequence[int]) -> list[np.ndarray]:
    """Row indices of each video, in frame order: what a smoothing runs along (never across two videos)."""
    v = np.asarray(video)
    order = np.lexsort((np.asarray(frame), v))
    sv = v[order]
    cuts = np.flatnonzero(sv[1:] != sv[:-1]) + 1
    return np.split(order, cuts) if len(order) else []


def _kernel(kind: str, width: int) -> np.ndarray:
    if kind == "box":
        return np.ones(width)
    x = np.arange(width) - width // 2
    return np.exp(-0.5 * (x / (width / 4.0)) ** 2)


def _convolve(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Centred weighted mean of the rows of ``x`` [n, w], the window cut at both ends (weights renormalised)."""
    n, h = len(x), len(k) // 2
    den = np.convolve(np.ones(n), k, "full")[h : h + n]
    cols = [np.convolve(x[:, j], k, "full")[h : h + n] for j in range(x.shape[1])]
    return np.stack(cols, axis=1) / den[:, None]


def _median(x: np.ndarray, width: int, chunk: int = 4096) -> np.ndarray:
    """Centred running median of the rows of ``x`` [n, w] over the frames of the window inside the video."""
    h = width // 2
    padded = np.concatenate([np.full((h, x.shape[1]), np.nan), x, np.full((h, x.shape[1]), np.nan)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=0)  # [n, w, width], a view
    return np.concatenate([np.nanmedian(windows[a : a + chunk], axis=-1) for a in range(0, len(x), chunk)])


def smooth(values: np.ndarray, segments: Sequence[np.ndarray], how: Smoothing) -> np.ndarray:
    """``values`` [frames, width] smoothed along each segment (a video's rows in frame order)."""
    if how.kind == "none" or how.width == 1:
        return values
    x = values.astype(np.float64)
    out = np.empty_like(x)
    for rows in segments:
        seg = x[rows]
        out[rows] = _median(seg, how.width) if how.kind == "median" else _convolve(seg, _kernel(how.kind, how.width))
    return out.astype(values.dtype)


# ------------------------------------------------------------------------------------------------ fitting


def _score(
    name: str, values: np.ndarray, labels: np.ndarray, valid: np.ndarray
) -> tuple[float, float, np.ndarray | None]:
    """(headline as scored today, best figure reachable with per-unit thresholds, those thresholds) of one task."""
    task = get_task(name)
    stream = task.stream(sample_size=0)
    stream.update(task.output_from(torch.as_tensor(values, dtype=torch.float64)), torch.as_tensor(labels),
                  torch.as_tensor(valid))  # fmt: skip
    plain = stream.scores()[task.headline()]
    if isinstance(stream, MultiLabelStream):
        return plain, float(stream.f1_tuned_per_unit().mean()), stream.thresholds()
    return plain, plain, None


def candidates(kinds: Sequence[str] = KINDS, widths: Sequence[int] = WIDTHS) -> list[Smoothing]:
    """'none' first, then each kind at each width (ties keep the earlier, i.e. the lighter, choice)."""
    bad = [w for w in widths if w < 3 or w % 2 == 0]
    if bad:
        raise MtlError(f"--widths {' '.join(map(str, bad))}: expected odd numbers of frames, at least 3")
    return [Smoothing()] + [Smoothing(kind=k, width=w) for k in kinds for w in widths]  # type: ignore[arg-type]


def fit(
    preds: FramePredictions,
    fitted_on: FittedOn,
    kinds: Sequence[str] = KINDS,
    widths: Sequence[int] = WIDTHS,
) -> PostProcess:
    """Per task the smoothing (from the grid) that maximises its metric on ``preds``, which must carry labels;
    per multi-label task also its per-unit thresholds, fitted after that smoothing."""
    arrays, (labels, valid) = preds.arrays(), preds.label_arrays()
    segments = video_segments(preds.video, preds.frame)
    grid = candidates(kinds, widths)
    fits: dict[str, TaskFit] = {}
    for t in tasks():
        if t.name not in labels or not valid[t.name].any():
            raise MtlError(f"split {fitted_on.split!r} has no valid {t.name} labels to fit post-processing on")
        before, _, _ = _score(t.name, arrays[t.name], labels[t.name], valid[t.name])
        best: tuple[float, Smoothing, np.ndarray | None] | None = None
        for how in grid:
            _, score, thr = _score(t.name, smooth(arrays[t.name], segments, how), labels[t.name], valid[t.name])
            if best is None or score > best[0] + 1e-12:
                best = (score, how, thr)
        assert best is not None
        score, how, thr = best
        fits[t.name] = TaskFit(metric=t.headline(), smoothing=how, before=before, after=score, gain=score - before,
                               thresholds=None if thr is None else [float(x) for x in thr])  # fmt: skip
    return PostProcess(tasks=fits, fitted_on=fitted_on)


def postprocess_beside(path: Path) -> Path:
    """Where a run's (or a folds directory's) file lives: in the directory given, or beside the file given."""
    path = Path(path)
    return (path if path.is_dir() else path.parent) / POSTPROCESS_FILE


def postprocess_file(paths: Sequence[Path], given: Path | str | None) -> Path | None:
    """The file to apply: ``given`` (``none``: no file), else the one beside the single path given, if any."""
    if given is not None:
        if str(given) == "none":
            return None
        if not Path(given).is_file():
            raise MtlError(f"--postprocess {given}: no such file")
        return Path(given)
    beside = postprocess_beside(paths[0]) if len(paths) == 1 else None
    return beside if beside is not None and beside.is_file() else None
