"""How a loader's batch meets the network: one place for training, evaluation, loading a run and the benchmark."""

from __future__ import annotations

from typing import Any

import torch

from mtl.config import DataConfig
from mtl.data.loader import frames_float

Norm = tuple[tuple[float, ...], tuple[float, ...]]


def input_norm(data: DataConfig, model: Any) -> Norm:
    """(mean, std) for the loaders: data.mean / data.std when set, else the backbone's own (what its pretrained
    weights expect). ``model`` is the network, or anything with its ``data_config()``."""
    norm = model.data_config()
    return tuple(data.mean or norm["mean"]), tuple(data.std or norm["std"])


def network_input(batch: dict) -> torch.Tensor:
    """What the network reads from a batch: cached ``features``, or the frames normalised, where they are (on the
    GPU in training): the loaders hand over uint8 frames and each frame's gain/bias (augmentation folded into the
    normalisation), a quarter of the bytes of float ones. Already float frames (e.g. `mtl predict`'s crops) pass."""
    if "features" in batch:
        return batch["features"]
    x = batch["frames"]
    return frames_float(x, batch["gain"], batch["bias"]) if x.dtype == torch.uint8 else x


def forward(module: Any, batch: dict, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The network (or the DeepSpeed engine around it) on one batch: frames (normalised here) or cached
    ``features`` in the compute dtype, outputs in fp32 for the losses and metrics. The loaders' ``image_index``
    goes along, so the network runs without a host sync."""
    extra = {"image_index": batch["image_index"]} if "image_index" in batch and "features" not in batch else {}
    out = module(network_input(batch).to(dtype), batch["has_image"], batch["pad"], **extra)
    return {k: v.float() for k, v in out.items()}
