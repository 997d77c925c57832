"""The whole network: frames -> ViT per frame -> masking -> temporal Transformer -> one head per task per frame."""

from __future__ import annotations

import torch
from torch import nn

from mtl.config import ModelConfig
from mtl.model.backbone import FrameEncoder, create_backbone
from mtl.model.heads import TaskHeads
from mtl.model.masking import FrameMasker
from mtl.model.temporal import TemporalEncoder


class MultiTaskNet(nn.Module):
    """``net(frames [B,T,3,H,W], has_image [B,T], pad [B,T]) -> {task: [B,T,width]}`` ("va", "expr", "au", ...)."""

    def __init__(self, encoder: FrameEncoder, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.masker = FrameMasker(encoder.num_features, cfg.mask.mode, cfg.mask.prob)
        self.temporal = TemporalEncoder(encoder.num_features, cfg.temporal)
        self.heads = TaskHeads(cfg.temporal.dim)
        self.frozen_backbone = cfg.freeze_backbone
        if cfg.freeze_backbone:
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        if cfg.grad_checkpointing and hasattr(encoder.backbone, "set_grad_checkpointing"):
            encoder.backbone.set_grad_checkpointing(True)

    def train(self, mode: bool = True) -> MultiTaskNet:
        super().train(mode)
        if self.frozen_backbone:
            self.encoder.eval()  # a frozen backbone keeps its eval behaviour (dropout, drop-path) in training
        return self

    def encode_frames(self, frames: torch.Tensor, has_image: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """[B,T,3,H,W] -> [B,T,D]; only frames with an image run through the backbone (others are masked anyway)."""
        b, t = frames.shape[:2]
        flat = frames.reshape(b * t, *frames.shape[2:])
        idx = (has_image & ~pad).reshape(-1).nonzero().squeeze(1)
        run_dummy = idx.numel() == 0
        # With no image at all the backbone still runs once, on a blank frame, so every rank calls it the same
        # number of times (ZeRO-3 gathers parameters collectively) and its parameters get (zero) gradients.
        images = flat[:1] if run_dummy else flat.index_select(0, idx)
        if self.frozen_backbone:
            with torch.no_grad():
                out = self.encoder(images)
        else:
            out = self.encoder(images)
        feats = out.new_zeros(b * t, out.shape[-1])
        if run_dummy:
            feats = feats + 0.0 * out.sum()
        else:
            feats = feats.index_copy(0, idx, out)
        return feats.reshape(b, t, -1)

    def forward(self, frames: torch.Tensor, has_image: torch.Tensor, pad: torch.Tensor) -> dict[str, torch.Tensor]:
        has_image = has_image & ~pad
        feats = self.encode_frames(frames, has_image, pad)
        seq = self.masker(feats, has_image)
        return self.heads(self.temporal(seq, pad))

    def data_config(self) -> dict[str, tuple[float, float, float]]:
        """The backbone's input normalisation, for the loaders."""
        return self.encoder.data_config()


def build_model(cfg: ModelConfig, image_size: int = 112) -> MultiTaskNet:
    """The network described by ``cfg`` (``model`` section) for square ``image_size`` frames."""
    backbone = create_backbone(cfg, image_size)
    return MultiTaskNet(FrameEncoder(backbone, cfg.pool), cfg)
