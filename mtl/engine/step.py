"""The DeepSpeed engine built from our config, and one training micro-step on it.

`Trainer` and tools/bench_step.py both build and step through here, so the benchmark times what training runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mtl.config import Config
from mtl.engine.ds_config import build_ds_config, compute_dtype, resolve_precision, resolve_zero_stage
from mtl.engine.schedule import build_optimizer, build_scheduler
from mtl.model import param_groups
from mtl.runs.model_io import forward

LossFn = Callable[[dict[str, torch.Tensor], dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def any_rank_on_device(flag: torch.Tensor) -> torch.Tensor:
    """A bool tensor, True on every rank where ``flag`` is True on any rank, left on the device: the all-reduce is
    queued on the stream, and no host waits for it (unlike `mtl.engine.distributed.any_rank`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = flag.to(torch.float32).reshape(1)  # (a float MAX: gloo and nccl both have it)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0] > 0


@dataclass
class Engine:
    """A DeepSpeed engine over our model, AdamW groups and schedule, with what was resolved to build it.

    ``skip``: whether the current micro-batch is skipped (a device flag, the same on every rank); while it is True
    every parameter's gradient from backward is zero (hooks set in ``build_engine``)."""

    ds: Any  # deepspeed.DeepSpeedEngine
    ds_config: dict[str, Any]
    zero_stage: int
    precision: str
    device: torch.device
    skip: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.bool))

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.precision)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return forward(self.ds, batch, self.dtype)

    def forward_backward(
        self, loss_fn: LossFn, batch: dict
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Loss and gradients of one micro-batch: (loss, per-task parts, skipped), all on the device.

        A loss that is not finite on any rank skips the micro-batch on every rank: it adds zero gradients there
        (backward still runs, as it is collective under ZeRO). The decision is a device flag, so nothing waits
        for the GPU here; the caller reads ``skipped`` when it logs. (The optimizer still steps at the end of an
        accumulation: a window of skipped micro-batches only lets AdamW's moments decay.)"""
        loss, parts = loss_fn(self.forward(batch), batch)
        loss_value = loss.detach()
        self.skip.copy_(any_rank_on_device(~torch.isfinite(loss_value)))
        self.ds.backward(loss)
        return loss_value, parts, self.skip.clone()

    def step(self) -> bool:
        """DeepSpeed's step; True when it ended a gradient accumulation (an optimizer step was taken)."""
        before = self.ds.global_steps
        self.ds.step()
        return self.ds.global_steps != before


def _zero_when(skip: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:  # before DeepSpeed's own hooks reduce and accumulate it
        return grad.masked_fill(skip, 0)

    return hook


def build_engine(
    model: torch.nn.Module, cfg: Config, world_size: int, device: torch.device, load_universal: bool = False
) -> Engine:
    """The ZeRO stage and precision resolved (accelerate's stage wins), then ``deepspeed.initialize``.
    ``load_universal``: the engine will resume from a universal checkpoint (another world size or ZeRO stage)."""
    zero_stage, precision = resolve_zero_stage(cfg), resolve_precision(cfg, device)
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
    skip = torch.zeros((), dtype=torch.bool, device=device)
    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(_zero_when(skip))
    return Engine(ds, ds_config, zero_stage, precision, device, skip)
