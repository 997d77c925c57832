"""Per-frame prediction heads: one linear layer per registered task, then the task's activation.

A ``ModuleDict`` keyed by task name, so the state-dict keys stay ``heads.va.*``, ``heads.expr.*``, ``heads.au.*``.
"""

from __future__ import annotations

import torch
from torch import nn

from mtl.tasks import tasks


class TaskHeads(nn.ModuleDict):
    """[B,T,dim] -> {task: [B,T,width]}: VA in [-1,1], EXPR [8] and AU [12] logits (and any registered task)."""

    def __init__(self, dim: int) -> None:
        super().__init__({t.name: nn.Linear(dim, t.width) for t in tasks()})
        self._tasks = {t.name: t for t in tasks()}

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: self._tasks[name].activate(head(h)) for name, head in self.items()}
