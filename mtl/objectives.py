"""Training objective: each registered task's loss term (CCC, softmax or sigmoid focal; see `mtl.tasks.losses`),
built by the task from its own options (``loss.tasks.<name>``), masked by label validity, summed with the
``loss.weights``.

A task absent from the training split's stats (no labels were packed for it) gets no term.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtl.config import LossConfig
from mtl.tasks import Task, tasks
from mtl.tasks.losses import (
    ccc_loss,
    class_alpha,
    pos_neg_weights,
    sigmoid_focal_loss,
    softmax_focal_loss,
)

__all__ = ["MultiTaskLoss", "ccc_loss", "class_alpha", "pos_neg_weights", "sigmoid_focal_loss", "softmax_focal_loss"]


def trained_tasks(train_stats: dict[str, Any] | None) -> tuple[Task, ...]:
    """The registered tasks the training data has (all of them when no stats are given)."""
    return tuple(t for t in tasks() if train_stats is None or t.name in train_stats)


class MultiTaskLoss(nn.Module):
    """``loss_fn(outputs, batch, use_imageless=False) -> (total, parts)``; parts are detached per-task terms."""

    def __init__(self, cfg: LossConfig, train_stats: dict[str, Any] | None = None) -> None:
        super().__init__()
        active = trained_tasks(train_stats)
        self.weights = {t.name: float(cfg.weights.get(t.name, 1.0)) for t in active}
        self.terms = nn.ModuleDict({t.name: t.loss(cfg.options(t), train_stats) for t in active})

    def forward(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, Any], use_imageless: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        frame_ok = ~batch["pad"]
        if not use_imageless:
            frame_ok = frame_ok & batch["has_image"]
        parts = {
            name: term(outputs[name], batch[name], (batch[f"{name}_valid"] & frame_ok).reshape(-1))
            for name, term in self.terms.items()
        }
        total = sum(self.weights[k] * v for k, v in parts.items())
        return total, {k: v.detach() for k, v in parts.items()}
