"""How a loader's batch meets the network: one place for training, evaluation, loading a run and the benchmark."""

from __future__ import annotations

from typing import Any

import torch

from mtl.config import DataConfig

Norm = tuple[tuple[float, ...], tuple[float, ...]]


def input_norm(data: DataConfig, model: Any) -> Norm:
    """(mean, std) for the loaders: data.mean / data.std when set, else the backbone's own (what its pretrained
    weights expect). ``model`` is the network, or anything with its ``data_config()``."""
    norm = model.data_config()
    return tuple(data.mean or norm["mean"]), tuple(data.std or norm["std"])


def forward(module: Any, batch: dict, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The network (or the DeepSpeed engine around it) on one batch: frames (or cached ``features``) in the
    compute dtype, outputs in fp32 for the losses and metrics."""
    x = batch["features"] if "features" in batch else batch["frames"]
    out = module(x.to(dtype), batch["has_image"], batch["pad"])
    return {k: v.float() for k, v in out.items()}
