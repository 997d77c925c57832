"""The temporal trunk: a Transformer encoder over the T frame features of a clip, so each frame's prediction
sees its neighbours (paper: 8 heads, 6 layers, dropout 0.2)."""

from __future__ import annotations

import torch
from torch import nn

from mtl.config import TemporalConfig
from mtl.errors import MtlError


class TemporalEncoder(nn.Module):
    """[B,T,in_dim] + pad [B,T] -> [B,T,dim]; padded positions are never attended to."""

    def __init__(self, in_dim: int, cfg: TemporalConfig) -> None:
        super().__init__()
        if cfg.dim % cfg.heads:
            raise MtlError(f"model.temporal.dim ({cfg.dim}) must be divisible by model.temporal.heads ({cfg.heads})")
        self.max_len = cfg.max_len
        self.proj = nn.Linear(in_dim, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.max_len, cfg.dim))  # learned absolute positions
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder: nn.TransformerEncoder | None = None
        if cfg.layers > 0:
            layer = nn.TransformerEncoderLayer(
                d_model=cfg.dim,
                nhead=cfg.heads,
                dim_feedforward=cfg.dim * cfg.ff_mult,
                dropout=cfg.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,  # pre-norm: stable without warm-up tricks, needs the final norm below
            )
            self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor, embedded: bool = False) -> torch.Tensor:
        """``embedded``: x is already ``proj``'s output [B,T,dim] (the masker applies it, see FrameMasker)."""
        h = x if embedded else self.proj(x)
        t = h.shape[1]
        if t > self.max_len:
            raise MtlError(f"clip of {t} frames exceeds model.temporal.max_len ({self.max_len})")
        h = self.drop(h + self.pos[:t].to(h.dtype))
        if self.encoder is not None:
            # A row of padding only (an empty eval batch) would softmax over no keys -> NaN; let it attend to
            # its first position instead. Its outputs are pad and never scored.
            key_pad = pad.clone()
            key_pad[:, 0] &= ~pad.all(dim=1)
            h = self.encoder(h, src_key_padding_mask=key_pad)
        return self.norm(h)
