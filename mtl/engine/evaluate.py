"""Evaluation over every frame of a split, and the files it leaves: per-frame predictions and ABAW submissions."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mtl.constants import AU_NAMES, EXPR_NAMES
from mtl.metrics import ABAWMetrics

Forward = Callable[[dict], dict[str, torch.Tensor]]


@dataclass
class FramePredictions:
    """Per-frame outputs in loader order; filled only when asked for (``mtl eval``), not during training."""

    video: list[str] = field(default_factory=list)
    frame: list[int] = field(default_factory=list)
    va: list[np.ndarray] = field(default_factory=list)
    expr_prob: list[np.ndarray] = field(default_factory=list)
    au_prob: list[np.ndarray] = field(default_factory=list)

    def add(self, outputs: dict[str, torch.Tensor], batch: dict) -> None:
        keep = ~batch["pad"].cpu()
        va = outputs["va"].float().cpu()
        expr = outputs["expr"].float().softmax(-1).cpu()
        au = outputs["au"].float().sigmoid().cpu()
        frames = batch["frame"].cpu()
        for b, name in enumerate(batch["video"]):
            sel = keep[b]
            n = int(sel.sum())
            if n == 0:
                continue
            self.video.extend([name] * n)
            self.frame.extend(frames[b][sel].tolist())
            self.va.append(va[b][sel].numpy())
            self.expr_prob.append(expr[b][sel].numpy())
            self.au_prob.append(au[b][sel].numpy())

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.va:
            return np.zeros((0, 2)), np.zeros((0, len(EXPR_NAMES))), np.zeros((0, len(AU_NAMES)))
        return np.concatenate(self.va), np.concatenate(self.expr_prob), np.concatenate(self.au_prob)


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


def write_predictions(preds: FramePredictions, path: Path, au_thresholds: np.ndarray | None = None) -> None:
    """One row per frame: ids, VA, EXPR class and probabilities, AU decisions and probabilities."""
    va, expr_prob, au_prob = preds.arrays()
    thr = np.full(len(AU_NAMES), 0.5) if au_thresholds is None else np.asarray(au_thresholds)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["video", "frame", "valence", "arousal", "expression"]
            + [f"p_{n}" for n in EXPR_NAMES]
            + list(AU_NAMES)
            + [f"p_{n}" for n in AU_NAMES]
        )
        for i, (video, frame) in enumerate(zip(preds.video, preds.frame)):
            w.writerow(
                [video, frame, f"{va[i, 0]:.5f}", f"{va[i, 1]:.5f}", int(expr_prob[i].argmax())]
                + [f"{p:.5f}" for p in expr_prob[i]]
                + [int(p >= t) for p, t in zip(au_prob[i], thr)]
                + [f"{p:.5f}" for p in au_prob[i]]
            )


def write_submission(preds: FramePredictions, out_dir: Path, au_thresholds: np.ndarray | None = None) -> list[Path]:
    """ABAW test-submission files, one per task, a row for every frame: ``video/NNNNN.jpg,...``."""
    va, expr_prob, au_prob = preds.arrays()
    thr = np.full(len(AU_NAMES), 0.5) if au_thresholds is None else np.asarray(au_thresholds)
    order = sorted(range(len(preds.frame)), key=lambda i: (preds.video[i], preds.frame[i]))
    images = [f"{preds.video[i]}/{preds.frame[i]:05d}.jpg" for i in order]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "VA.txt": ("image_location,valence,arousal", [f"{va[i, 0]:.5f},{va[i, 1]:.5f}" for i in order]),
        "EXPR.txt": ("image_location," + ",".join(EXPR_NAMES), [str(int(expr_prob[i].argmax())) for i in order]),
        "AU.txt": (
            "image_location," + ",".join(AU_NAMES),
            [",".join(str(int(p >= t)) for p, t in zip(au_prob[i], thr)) for i in order],
        ),
    }
    written = []
    for name, (header, rows) in files.items():
        path = out_dir / name
        with open(path, "w") as f:
            f.write(header + "\n")
            f.writelines(f"{img},{row}\n" for img, row in zip(images, rows))
        written.append(path)
    return written
