"""The DeepSpeed engine built from our config, and one training micro-step on it.

`Trainer` and tools/bench_step.py both build and step through here, so the benchmark times what training runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mtl.config import Config
from mtl.engine.distributed import any_rank
from mtl.engine.ds_config import build_ds_config, compute_dtype, resolve_precision, resolve_zero_stage
from mtl.engine.schedule import build_optimizer, build_scheduler
from mtl.model import param_groups
from mtl.runs.model_io import forward

LossFn = Callable[[dict[str, torch.Tensor], dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Engine:
    """A DeepSpeed engine over our model, AdamW groups and schedule, with what was resolved to build it."""

    ds: Any  # deepspeed.DeepSpeedEngine
    ds_config: dict[str, Any]
    zero_stage: int
    precision: str
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.precision)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return forward(self.ds, batch, self.dtype)

    def forward_backward(self, loss_fn: LossFn, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Loss and gradients of one micro-batch: (loss, per-task parts), or None on every rank when the loss
        is not finite on any rank (backward is collective under ZeRO, so the skip is agreed first)."""
        loss, parts = loss_fn(self.forward(batch), batch)
        if any_rank(not bool(torch.isfinite(loss)), self.device):
            return None
        self.ds.backward(loss)
        return loss.detach(), parts

    def step(self) -> bool:
        """DeepSpeed's step; True when it ended a gradient accumulation (an optimizer step was taken)."""
        before = self.ds.global_steps
        self.ds.step()
        return self.ds.global_steps != before


def build_engine(
    model: torch.nn.Module, cfg: Config, world_size: int, device: torch.device, load_universal: bool = False
) -> Engine:
    """The ZeRO stage and precision resolved (accelerate's stage wins), then ``deepspeed.initialize``.
    ``load_universal``: the engine will resume from a universal checkpoint (another world size or ZeRO stage)."""
    zero_stage, precision = resolve_zero_stage(cfg), resolve_precision(cfg)
    optimizer = build_optimizer(param_groups(model, cfg.optim), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    ds_config = build_ds_config(cfg, world_size, zero_stage, precision, sum(p.numel() for p in model.parameters()))
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}

    import deepspeed
    from deepspeed.utils import logger as ds_logger

    if not os.environ.get("MTL_DEEPSPEED_VERBOSE"):  # its INFO lines drown the progress bar and our logs
        ds_logger.setLevel(logging.WARNING)
    ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return Engine(ds, ds_config, zero_stage, precision, device)
