"""Warm-up then cosine, applied per parameter group (so layer-wise lr decay survives the schedule)."""

from __future__ import annotations

import pytest
import torch

from mtl.config import OptimConfig
from mtl.engine.schedule import build_optimizer, build_scheduler, lr_factor


def test_lr_factor_shape() -> None:
    f = [lr_factor(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(25)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:20], f[5:21]))  # non-increasing after warm-up
    assert f[20] == pytest.approx(0.1) and f[24] == pytest.approx(0.1)  # floor at min_ratio
    assert f[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine


def test_scheduler_scales_each_group() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    cfg = OptimConfig(lr=1e-3, warmup_steps=2, min_lr_ratio=0.0)
    opt = build_optimizer([{"params": [a], "lr": 1e-3, "weight_decay": 0.0},
                           {"params": [b], "lr": 1e-4, "weight_decay": 0.1}], cfg)  # fmt: skip
    sched = build_scheduler(opt, cfg, total_steps=10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 5e-5])
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1]
