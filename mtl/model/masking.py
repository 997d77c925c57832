"""Frame features -> the sequence the temporal trunk reads: imageless frames and, in training, random frames
become a learned mask token, so the trunk learns to fill gaps from context (masked learning, Min et al.).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mtl.errors import MtlError

MASK_MODES = ("token", "feature", "none")


class FrameMasker(nn.Module):
    """Holds the learned mask token; replaces missing frames always and random frames while training.

    Modes (training only): ``token`` replaces each frame with an image by the mask token with probability
    ``prob``; ``feature`` drops feature elements with probability ``prob`` (inverted dropout, as the paper's
    public code does); ``none`` leaves them. ``eval()`` makes it deterministic: only imageless frames change.
    """

    def __init__(self, dim: int, mode: str = "token", prob: float = 0.3) -> None:
        super().__init__()
        if mode not in MASK_MODES:
            raise MtlError(f"model.mask.mode: expected one of {MASK_MODES}, got {mode!r}")
        if not 0.0 <= prob <= 1.0:
            raise MtlError(f"model.mask.prob: expected a value in [0, 1], got {prob}")
        self.mode = mode
        self.prob = float(prob)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, feats: torch.Tensor, has_image: torch.Tensor,
                embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        """feats [B,T,D] (rows of imageless frames are ignored), has_image bool [B,T] -> [B,T,D], or embed's width.

        ``embed`` (a row-wise affine map, the trunk's input projection) is applied to the frames and to the token
        before choosing between them: the same result as embedding the masked sequence, but backward then needs
        no gradient over the [B,T,D] input, which dominates a step on wide cached features.
        """
        token = self.mask_token.to(feats.dtype)
        keep = has_image
        if self.training and self.prob > 0:
            if self.mode == "token":
                drop = torch.rand(keep.shape, device=feats.device) < self.prob
                keep = keep & ~drop
            elif self.mode == "feature":
                feats = F.dropout(feats, p=self.prob, training=True)
        embed = embed or (lambda x: x)
        feats = feats.masked_fill(~has_image.unsqueeze(-1), 0.0)  # never let a non-finite unused row reach backward
        return torch.where(keep.unsqueeze(-1), embed(feats), embed(token))
