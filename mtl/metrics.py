"""ABAW metrics, as the challenge scores them: pooled over every valid frame of every video of a split.

One streaming metric per registered task (see `mtl.tasks.streams`): VA's CCC per dimension and their mean
(``va_ccc``), EXPR's macro F1 over 8 classes (``expr_f1``), AU's macro F1 at 0.5 (``au_f1``) and with thresholds
tuned on the same data (``au_f1_tuned``), each with per-column figures (``expr_f1/<class>``, ``au_f1/<AU>``) and
frame counts. MTL score: the sum of the tasks' headline metrics (VA mean CCC + EXPR F1 + AU F1).

Frames count when their label is valid and they are not padding, with or without an image.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mtl.tasks import get_task, tasks
from mtl.tasks.streams import ClassStream, MultiLabelStream, RegressionStream, TaskStream

_SAMPLE_SEED_STRIDE = 1_000_003  # per task, so two regression tasks draw independent subsamples


class ABAWMetrics:
    """Streaming metrics of every task: ``update()`` per batch, ``all_reduce()`` once across ranks, ``compute()``."""

    def __init__(self, bins: int = 1000, sample_size: int = 5000, seed: int = 0) -> None:
        self.bins = bins
        self.sample_size = sample_size
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = self.seed + 7919 * rank  # independent sample priorities per rank
        self.streams: dict[str, TaskStream] = {
            t.name: t.stream(bins=self.bins, sample_size=self.sample_size, seed=seed + _SAMPLE_SEED_STRIDE * i)
            for i, t in enumerate(tasks())
        }
        self._reduced = False

    def stream(self, task: str) -> TaskStream:
        return self.streams[task]

    @torch.no_grad()
    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        """Add a batch: ``outputs`` of the network, ``batch`` as the loaders give it (see the batch contract)."""
        if self._reduced:
            raise RuntimeError("ABAWMetrics.update() after all_reduce(); call reset() first")
        frame_ok = ~batch["pad"].reshape(-1)
        for name, s in self.streams.items():
            s.update(outputs[name], batch[name], batch[f"{name}_valid"].reshape(-1) & frame_ok)

    def all_reduce(self) -> None:
        """Sum the state of every rank (no-op without an initialised process group). Call once, after updates."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        if self._reduced:
            raise RuntimeError("ABAWMetrics.all_reduce() called twice; the state would be counted twice")
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        parts = [p for s in self.streams.values() for p in s.summed()]
        flat = torch.cat([p.reshape(-1) for p in parts]).to(dev)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.cpu()
        offset = 0
        for p in parts:
            p.copy_(flat[offset : offset + p.numel()].reshape(p.shape))
            offset += p.numel()
        for s in self.streams.values():
            s.gather()
        self._reduced = True

    # ------------------------------------------------------------------------------------------ results

    def compute(self) -> dict[str, float]:
        """Headlines and per-task figures, then ``mtl_score``, then per-column figures, then frame counts."""
        scores: dict[str, float] = {}
        for s in self.streams.values():
            scores.update(s.scores())
        head = {k: v for k, v in scores.items() if "/" not in k and not k.endswith("_frames")}
        head["mtl_score"] = float(sum(scores[get_task(name).headline()] for name in self.streams))
        detail = {k: v for k, v in scores.items() if "/" in k}
        frames = {k: v for k, v in scores.items() if k.endswith("_frames")}
        return {**head, **detail, **frames}

    def thresholds(self) -> dict[str, np.ndarray]:
        """Per-unit thresholds tuned on this data, for every multi-label task (for predictions and submissions)."""
        return {n: s.thresholds() for n, s in self.streams.items() if isinstance(s, MultiLabelStream)}

    def confusion(self, task: str) -> np.ndarray:
        """Confusion matrix (rows: label, columns: prediction) of a single-label task."""
        s = self.streams[task]
        assert isinstance(s, ClassStream), task
        return s.confusion()

    def sample(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """A uniform random subsample of (pred, true) pairs of a regression task."""
        s = self.streams[task]
        assert isinstance(s, RegressionStream), task
        return s.sample()


def summary_line(scores: dict[str, Any]) -> str:
    """The one-line JSON that `mtl demo`, `mtl train` and `mtl eval` end with: each task's headline, MTL score."""
    keys = [t.headline() for t in tasks()] + ["mtl_score"]
    return json.dumps({k: round(float(scores[k]), 4) for k in keys if k in scores})
