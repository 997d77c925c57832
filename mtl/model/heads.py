"""Per-frame prediction heads: VA regression (tanh to the label range), EXPR and AU logits."""

from __future__ import annotations

import torch
from torch import nn

from mtl.constants import NUM_AU, NUM_EXPR


class TaskHeads(nn.Module):
    """[B,T,dim] -> {"va": [B,T,2] in [-1,1], "expr": [B,T,8] logits, "au": [B,T,12] logits}."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.va = nn.Linear(dim, 2)
        self.expr = nn.Linear(dim, NUM_EXPR)
        self.au = nn.Linear(dim, NUM_AU)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"va": torch.tanh(self.va(h)), "expr": self.expr(h), "au": self.au(h)}
