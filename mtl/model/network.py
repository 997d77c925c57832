"""The whole network: frames -> ViT per frame -> masking -> temporal Transformer -> one head per task per frame.

Trained on cached features (two-stage recipe), it has no backbone: the features [B,T,D] enter the masking
directly, and the trunk's input projection maps D to its width.
"""

from __future__ import annotations

import torch
from torch import nn

from mtl.config import ModelConfig
from mtl.errors import MtlError
from mtl.model.backbone import FrameEncoder, create_backbone
from mtl.model.heads import TaskHeads
from mtl.model.masking import FrameMasker
from mtl.model.temporal import TemporalEncoder


class MultiTaskNet(nn.Module):
    """``net(frames [B,T,3,H,W], has_image [B,T], pad [B,T]) -> {task: [B,T,width]}`` ("va", "expr", "au", ...).

    Without an encoder (``feature_dim`` given instead) the first input is frame features [B,T,feature_dim].
    """

    def __init__(self, encoder: FrameEncoder | None, cfg: ModelConfig, feature_dim: int | None = None) -> None:
        super().__init__()
        if (encoder is None) == (feature_dim is None):
            raise ValueError("MultiTaskNet needs a frame encoder or a feature_dim, not both")
        self.encoder = encoder
        in_dim = encoder.num_features if encoder is not None else int(feature_dim)
        self.feature_dim = feature_dim
        self.masker = FrameMasker(in_dim, cfg.mask.mode, cfg.mask.prob)
        self.temporal = TemporalEncoder(in_dim, cfg.temporal)
        self.heads = TaskHeads(cfg.temporal.dim)
        self.frozen_backbone = cfg.freeze_backbone and encoder is not None
        if encoder is None:
            return
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

    def encode_frames(
        self, frames: torch.Tensor, has_image: torch.Tensor, pad: torch.Tensor, image_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B,T,3,H,W] -> [B,T,D]; only frames with an image run through the backbone (others are masked anyway).
        ``image_index``: their flat indices when the caller has them (the loaders do); else found here, which makes
        the host wait for the GPU."""
        b, t = frames.shape[:2]
        flat = frames.reshape(b * t, *frames.shape[2:])
        idx = image_index if image_index is not None else (has_image & ~pad).reshape(-1).nonzero().squeeze(1)
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

    def forward(
        self, frames: torch.Tensor, has_image: torch.Tensor, pad: torch.Tensor, image_index: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``image_index``: see ``encode_frames``."""
        has_image = has_image & ~pad
        feats = frames if self.encoder is None else self.encode_frames(frames, has_image, pad, image_index)
        return self.from_features(feats, has_image, pad)

    def from_features(self, feats: torch.Tensor, has_image: torch.Tensor, pad: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything after the frame encoder: features [B,T,D] (has_image already excludes pad) -> task outputs."""
        seq = self.masker(feats, has_image, embed=self.temporal.proj)
        return self.heads(self.temporal(seq, pad, embedded=True))

    def data_config(self) -> dict[str, tuple[float, float, float]]:
        """The backbone's input normalisation, for the loaders."""
        if self.encoder is None:
            raise MtlError("this network was trained on cached features: it has no backbone and reads no images")
        return self.encoder.data_config()


def build_model(cfg: ModelConfig, image_size: int = 112, feature_dim: int | None = None) -> MultiTaskNet:
    """The network described by ``cfg`` (``model`` section) for square ``image_size`` frames, or, given
    ``feature_dim``, for cached frame features of that width (no backbone)."""
    if feature_dim is not None:
        return MultiTaskNet(None, cfg, feature_dim)
    backbone = create_backbone(cfg, image_size)
    return MultiTaskNet(FrameEncoder(backbone, cfg.pool), cfg)
