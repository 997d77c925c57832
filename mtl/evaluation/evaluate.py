"""Evaluation over every frame of a split, and the files it leaves: per-frame predictions and ABAW submissions."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mtl.data.submission import image_name, track_format
from mtl.data.testset import TrackList, expected_rows
from mtl.metrics import ABAWMetrics
from mtl.tasks import tasks

Forward = Callable[[dict], dict[str, torch.Tensor]]
TUNED_SUBMISSION = "submission_tuned_au"  # submission with tuned thresholds (named when AU was the only such task)


@dataclass
class FramePredictions:
    """Per-frame outputs in loader order; filled only when asked for (``mtl eval``), not during training.

    ``outputs[task]``: what the task's ``predict`` makes of its head (VA values, EXPR and AU probabilities)."""

    video: list[str] = field(default_factory=list)
    frame: list[int] = field(default_factory=list)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=lambda: {t.name: [] for t in tasks()})
    # each task's labels and validity per frame, as the batches carried them (for scoring predictions made outside
    # the network: ensembles, post-processing); an unlabelled split's are all invalid
    labels: dict[str, list[np.ndarray]] = field(default_factory=lambda: {t.name: [] for t in tasks()})
    valid: dict[str, list[np.ndarray]] = field(default_factory=lambda: {t.name: [] for t in tasks()})

    def add(self, outputs: dict[str, torch.Tensor], batch: dict) -> None:
        keep = ~batch["pad"].cpu()
        pred = {t.name: t.predict(outputs[t.name].float()).cpu() for t in tasks()}
        frames = batch["frame"].cpu()
        for b, name in enumerate(batch["video"]):
            sel = keep[b]
            n = int(sel.sum())
            if n == 0:
                continue
            self.video.extend([name] * n)
            self.frame.extend(frames[b][sel].tolist())
            for task, p in pred.items():
                self.outputs[task].append(p[b][sel].numpy())
                if task in batch:
                    self.labels[task].append(batch[task][b][sel].cpu().numpy())
                    self.valid[task].append(batch[f"{task}_valid"][b][sel].cpu().numpy())

    @classmethod
    def from_arrays(
        cls,
        video: list[str],
        frame: list[int],
        outputs: dict[str, np.ndarray],
        labels: dict[str, np.ndarray] | None = None,
        valid: dict[str, np.ndarray] | None = None,
    ) -> FramePredictions:
        """Predictions made outside the evaluation loop (an ensemble's mean, smoothed outputs), one row per frame."""

        def lists(arrays: dict[str, np.ndarray] | None) -> dict[str, list[np.ndarray]]:
            return {k: [np.asarray(v)] for k, v in (arrays or {}).items()}

        return cls(list(video), [int(f) for f in frame], lists(outputs), lists(labels), lists(valid))

    def arrays(self) -> dict[str, np.ndarray]:
        """Task -> [frames, width] array."""
        return {t.name: np.concatenate(self.outputs[t.name]) if self.outputs[t.name] else np.zeros((0, t.width))
                for t in tasks()}  # fmt: skip

    def label_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Task -> labels [frames, ...] and validity [frames] (tasks whose labels were not collected left out)."""
        have = [t.name for t in tasks() if len(self.labels.get(t.name, [])) and len(self.valid.get(t.name, []))]
        return ({n: np.concatenate(self.labels[n]) for n in have},
                {n: np.concatenate(self.valid[n]).astype(bool) for n in have})  # fmt: skip


def score_predictions(preds: FramePredictions, thresholds: dict[str, np.ndarray] | None = None) -> ABAWMetrics:
    """The metrics of per-frame predictions held outside the network (an ensemble's, smoothed ones), by the same
    streams as `evaluate`: each prediction turned back into a head output (``Task.output_from``). A multi-label
    task's ``thresholds`` move its decision point, so ``<task>_f1`` is its F1 at them instead of at 0.5."""
    arrays, (labels, valid) = preds.arrays(), preds.label_arrays()
    thresholds = thresholds or {}
    n = len(preds.frame)
    outputs, batch = {}, {"pad": torch.zeros(n, dtype=torch.bool)}
    for t in tasks():
        out = t.output_from(torch.as_tensor(arrays[t.name], dtype=torch.float64))
        if t.name in thresholds:  # logit(p) - logit(t) >= 0 exactly where p >= t
            out = out - torch.as_tensor(thresholds[t.name], dtype=torch.float64).logit(eps=1e-7)
        outputs[t.name] = out
        batch[t.name] = torch.as_tensor(labels[t.name]) if t.name in labels else torch.zeros((n, *t.label_shape))
        batch[t.valid_key] = torch.as_tensor(valid[t.name]) if t.name in valid else torch.zeros(n, dtype=torch.bool)
    metrics = ABAWMetrics()
    metrics.update(outputs, batch)
    return metrics


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    forward: Forward,
    loader: Iterable[dict],
    device: torch.device,
    collect: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> tuple[ABAWMetrics, FramePredictions | None]:
    """Run every batch (ranks run the same count: the loader pads), then pool the metrics over ranks."""
    metrics = ABAWMetrics()
    preds = FramePredictions() if collect else None
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total, desc=desc, disable=not progress, leave=False):
        batch = to_device(batch, device)
        outputs = forward(batch)
        metrics.update(outputs, batch)
        if preds is not None:
            preds.add(outputs, batch)
    metrics.all_reduce()
    return metrics, preds


def write_predictions(preds: FramePredictions, path: Path, thresholds: dict[str, np.ndarray] | None = None) -> None:
    """One row per frame: ids, then each task's columns (VA values; EXPR class and probabilities; AU decisions
    at ``thresholds`` (default 0.5) and probabilities)."""
    arrays, thresholds = preds.arrays(), thresholds or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "frame"] + [c for t in tasks() for c in t.prediction_header()])
        for i, (video, frame) in enumerate(zip(preds.video, preds.frame)):
            cells = [c for t in tasks() for c in t.prediction_cells(arrays[t.name][i], thresholds.get(t.name))]
            w.writerow([video, frame, *cells])


def write_submission(
    preds: FramePredictions, out_dir: Path, thresholds: dict[str, np.ndarray] | None = None
) -> list[Path]:
    """ABAW test-submission files, one per task, a row for every frame: ``video/NNNNN.jpg,...``."""
    arrays, thresholds = preds.arrays(), thresholds or {}
    order = sorted(range(len(preds.frame)), key=lambda i: (preds.video[i], preds.frame[i]))
    images = [f"{preds.video[i]}/{preds.frame[i]:05d}.jpg" for i in order]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for t in tasks():
        path = out_dir / t.submission
        rows = [t.submission_cells(arrays[t.name][i], thresholds.get(t.name)) for i in order]
        with open(path, "w") as f:
            f.write("image_location," + ",".join(t.columns) + "\n")
            f.writelines(f"{img},{row}\n" for img, row in zip(images, rows))
        written.append(path)
    return written


def write_test_submission(
    preds: FramePredictions,
    lists: list[TrackList],
    video_frames: dict[str, int],
    out_dir: Path,
    thresholds: dict[str, np.ndarray] | None = None,
) -> list[str]:
    """The organisers' files of an unlabelled split, one per packed test list, rows in the list's order (see
    `mtl.data.submission`). Returns what could not be written (rows of videos skipped by the pack)."""
    arrays, thresholds = preds.arrays(), thresholds or {}
    index = {vf: i for i, vf in enumerate(zip(preds.video, preds.frame))}
    out_dir.mkdir(parents=True, exist_ok=True)
    gaps = []
    for lst in lists:
        fmt = track_format(lst.track)
        path = out_dir / fmt.file
        absent = 0
        with open(path, "w") as f:
            f.write(fmt.header + "\n")
            for video, frame in expected_rows(lst, video_frames):
                i = index.get((video, frame))
                if i is None:
                    absent += 1
                    continue
                cells = ",".join(t.submission_cells(arrays[t.name][i], thresholds.get(t.name)) for t in fmt.tasks)
                f.write(f"{image_name(video, frame)},{cells}\n")
        skipped = [v for v in lst.videos if v not in video_frames]
        if skipped:
            gaps.append(f"{path}: no rows for the videos skipped by `mtl pack`: {', '.join(skipped)}")
        elif absent:
            gaps.append(f"{path}: no prediction for {absent} listed frames")
    return gaps
