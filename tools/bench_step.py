#!/usr/bin/env python
"""Training-step benchmark: engine overhead, ZeRO memory per rank, and (on a GPU) model FLOPs utilisation.

1. Speed. One process: the project's engine path (``mtl.engine.step``: ``build_engine``, then
   ``Engine.forward_backward`` and ``Engine.step`` with ``MultiTaskLoss``, the code ``Trainer`` runs) against a bare
   PyTorch loop on the same model (same initial weights), the same batch, the
   same AdamW groups, the same clipping and the same schedule. Every step is seeded by its index, so both loops
   draw the same frame masks and dropout and must report the same losses (``loss_max_rel_diff_vs_bare``) - the
   comparison is like for like. Warm-up steps, then rounds of timed steps with the loops interleaved (the order
   rotates each round); the medians of the per-round frames/s are reported and overhead % =
   (bare - engine) / bare * 100.
2. Memory. For each ZeRO stage, 2 fresh gloo processes (a new process group per stage) run one full step and
   report, per rank, the bytes of parameters, gradients, optimizer state and fp32 master copies DeepSpeed keeps
   (see ``measure_memory`` for exactly what is counted).
3. ``--device cuda``: bf16, ViT-B/16 at 112 and 224 with the temporal trunk, frames/s and MFU (FLOPs of one
   forward + backward counted by ``torch.utils.flop_counter.FlopCounterMode``, divided by ``--peak-tflops``).

Prints the JSON at the end and writes it to ``--out``. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mtl.config import Config, DataConfig, from_dict
from mtl.engine.distributed import free_port
from mtl.engine.ds_config import compute_dtype
from mtl.engine.schedule import build_optimizer, build_scheduler
from mtl.engine.step import build_engine
from mtl.model import build_model, param_groups
from mtl.objectives import MultiTaskLoss
from mtl.runs.model_io import forward
from mtl.tasks.abaw import AU, EXPR

H100_SXM_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM
_DEFAULTS = {  # per device: what a run without flags measures
    # A step of the default training batch (4 clips x 16 frames): the engine's cost is per step (ZeRO-2 copies
    # gradients and weights through flat buffers), so a smaller batch than training uses would overstate it.
    "cpu": {"backbone": "vit_tiny_patch16_224", "image_size": [112], "clip_len": DataConfig().clip_len,
            "batch_size": DataConfig().batch_size,
            "warmup": 2, "rounds": 7, "iters": 2, "memory": True, "threads": 1},
    "cuda": {"backbone": "vit_base_patch16_224", "image_size": [112, 224], "clip_len": 16, "batch_size": 16,
             "warmup": 5, "rounds": 5, "iters": 10, "memory": False, "threads": 0},
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ inputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on cuda")
    p.add_argument("--backbone", help="timm model name (cpu: vit_tiny_patch16_224, cuda: vit_base_patch16_224)")
    p.add_argument("--depth", type=int, help="ViT blocks (default: the model's own)")
    p.add_argument("--embed-dim", type=int, help="ViT width (default: the model's own)")
    p.add_argument("--num-heads", type=int, help="ViT heads (default: the model's own)")
    p.add_argument("--image-size", type=int, nargs="+", help="square frame sizes (cpu: 112; cuda: 112 224)")
    p.add_argument("-T", "--clip-len", type=int, help="frames per clip (cpu and cuda: 16)")
    p.add_argument("-B", "--batch-size", type=int, help="clips per step (cpu: 4; cuda: 16)")
    p.add_argument("--temporal-dim", type=int, help="temporal trunk width (default: the config's)")
    p.add_argument("--temporal-layers", type=int, help="temporal trunk layers (default: the config's)")
    p.add_argument("--temporal-heads", type=int, help="temporal trunk heads (default: the config's)")
    p.add_argument("--zero-stages", type=int, nargs="+", default=[0, 2], help="engine stages timed (single rank)")
    p.add_argument("--warmup", type=int, help="untimed steps per loop (cpu: 2; cuda: 5)")
    p.add_argument("--rounds", type=int, help="timed rounds, loops interleaved (cpu: 7; cuda: 5)")
    p.add_argument("--iters", type=int, help="steps per loop per round (cpu: 2; cuda: 10)")
    p.add_argument("--memory-stages", type=int, nargs="+", default=[0, 1, 2, 3], help="ZeRO stages, 2 ranks each")
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the 2-rank memory part (default: on for cpu, off for cuda; it always runs on CPU/gloo)",
    )
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True, help="run the speed part")
    p.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_TFLOPS, help="peak for MFU (H100 SXM bf16)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads; 0: torch's default (cpu: 1, since on a shared machine oversubscribed\n"
        "OpenMP threads make step times swing tenfold; the overhead is a ratio either way)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results/step.json"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for key, value in _DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.precision == "auto":
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    for key in ("clip_len", "batch_size", "rounds", "iters"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if any(s not in (0, 1, 2, 3) for s in args.zero_stages + args.memory_stages):
        p.error("ZeRO stages are 0, 1, 2 or 3")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    return args


def make_config(args: argparse.Namespace, image_size: int, zero_stage: int) -> Config:
    """The project's Config for this benchmark, so the engine sees exactly what `mtl train` would give it."""
    bb_kwargs = {k: v for k, v in (("depth", args.depth), ("embed_dim", args.embed_dim),
                                   ("num_heads", args.num_heads)) if v is not None}  # fmt: skip
    temporal = {k: v for k, v in (("dim", args.temporal_dim), ("layers", args.temporal_layers),
                                  ("heads", args.temporal_heads)) if v is not None}  # fmt: skip
    return from_dict({
        "data": {"image_size": image_size, "clip_len": args.clip_len, "batch_size": args.batch_size},
        "model": {"backbone": args.backbone, "backbone_kwargs": bb_kwargs, "temporal": temporal},
        "train": {"zero_stage": zero_stage, "precision": args.precision, "max_steps": 10_000},
    })  # fmt: skip


def make_batch(b: int, t: int, image_size: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tensors shaped like a loader Batch: every frame has an image, ~80% of labels are valid."""
    g = torch.Generator().manual_seed(seed)

    def valid() -> torch.Tensor:
        return torch.rand(b, t, generator=g) < 0.8

    batch = {
        "frames": torch.randn(b, t, 3, image_size, image_size, generator=g),
        "has_image": torch.ones(b, t, dtype=torch.bool),
        "pad": torch.zeros(b, t, dtype=torch.bool),
        "va": torch.rand(b, t, 2, generator=g) * 2 - 1,
        "va_valid": valid(),
        "expr": torch.randint(0, EXPR.width, (b, t), generator=g),
        "expr_valid": valid(),
        "au": torch.randint(0, 2, (b, t, AU.width), generator=g).float(),
        "au_valid": valid(),
    }
    return {k: v.to(device) for k, v in batch.items()}


def train_stats(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The manifest's ``splits.train.tasks`` as this batch would give it (feeds the 'auto' class weights)."""
    expr_ok, au_ok = batch["expr_valid"].cpu(), batch["au_valid"].cpu()
    expr = batch["expr"].cpu()[expr_ok]
    au = batch["au"].cpu()[au_ok]
    return {
        "va": {"labeled_frames": int(batch["va_valid"].sum()), "labeled_missing_image": 0},
        "expr": {"labeled_frames": int(expr.numel()), "labeled_missing_image": 0,
                 "class_counts": torch.bincount(expr, minlength=EXPR.width).tolist()},
        "au": {"labeled_frames": int(au.shape[0]), "labeled_missing_image": 0,
               "positive_counts": au.sum(0).long().tolist()},
    }  # fmt: skip


def _quiet_deepspeed() -> None:
    """DeepSpeed logs every step at INFO and c10d warns about deprecated collectives; neither is the result."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*untested.*")


# ------------------------------------------------------------------------------------------------ loops


class EngineLoop:
    """The step ``Trainer`` takes: the engine ``build_engine`` makes, stepped by ``Engine.forward_backward`` (with
    its agreed finiteness flag) and ``Engine.step``."""

    def __init__(self, model: torch.nn.Module, cfg: Config, loss_fn: MultiTaskLoss, device: torch.device,
                 world_size: int = 1) -> None:  # fmt: skip
        self.loss_fn = loss_fn
        self.engine = build_engine(model, cfg, world_size, device)
        self.ds_config = self.engine.ds_config
        self.engine.ds.train()

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss, _, _ = self.engine.forward_backward(self.loss_fn, batch)  # (a skip would zero the gradients)
        return loss

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.forward_backward(batch)
        self.engine.step()
        return loss


class BareLoop:
    """Plain PyTorch: the same groups in torch AdamW, manual clipping, the same LambdaLR.

    bf16 mirrors what DeepSpeed does with bf16 (a bf16 model, fp32 master weights in the optimizer, gradients
    copied up before clipping and the step, weights copied back down), so precision is not what is compared.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, loss_fn: MultiTaskLoss) -> None:
        self.cfg, self.loss_fn = cfg, loss_fn
        self.dtype = compute_dtype(cfg.train.precision)
        groups = param_groups(model, cfg.optim)
        self.low: list[torch.nn.Parameter] = []
        self.high: list[torch.nn.Parameter] = []
        if self.dtype != torch.float32:
            for g in groups:
                masters = [torch.nn.Parameter(p.detach().clone().float()) for p in g["params"]]
                self.low += g["params"]
                self.high += masters
                g["params"] = masters
            model.to(self.dtype)  # keeps the Parameter objects, so self.low are the model's weights
        self.model = model.train()
        self.optimizer = build_optimizer(groups, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss, _ = self.loss_fn(forward(self.model, batch, self.dtype), batch)
        if not bool(torch.isfinite(loss)):  # the engine's check syncs on the loss too
            raise RuntimeError("non-finite loss in the benchmark")
        loss.backward()
        if self.low:
            for lo, hi in zip(self.low, self.high):
                hi.grad = None if lo.grad is None else lo.grad.float()
                lo.grad = None
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.low:
            with torch.no_grad():
                torch._foreach_copy_(self.low, self.high)
        self.scheduler.step()
        return loss.detach()


def count_step_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_fn: MultiTaskLoss,
                     dtype: torch.dtype) -> int:  # fmt: skip
    """FLOPs of one forward + backward (what MFU counts; the optimizer's elementwise work is left out)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model).to(dtype).train()
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = loss_fn(forward(model, batch, dtype), batch)
        loss.backward()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------ speed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_speed(args: argparse.Namespace, image_size: int, device: torch.device, bar: tqdm) -> dict[str, Any]:
    """Interleaved timing of the bare loop and one engine per ZeRO stage on one model and one batch."""
    cfg0 = make_config(args, image_size, args.zero_stages[0])
    torch.manual_seed(args.seed)
    base = build_model(cfg0.model, image_size=image_size).to(device)
    batch = make_batch(args.batch_size, args.clip_len, image_size, args.seed, device)
    loss_fn = MultiTaskLoss(cfg0.loss, train_stats(batch)).to(device)
    dtype = compute_dtype(args.precision)
    n_params = sum(p.numel() for p in base.parameters())
    flops = count_step_flops(base, batch, loss_fn, dtype)

    loops: dict[str, Any] = {"bare": BareLoop(copy.deepcopy(base), cfg0, loss_fn)}
    for stage in args.zero_stages:
        loops[f"zero{stage}"] = EngineLoop(copy.deepcopy(base), make_config(args, image_size, stage), loss_fn, device)
    del base

    names = list(loops)
    steps = dict.fromkeys(names, 0)
    losses: dict[str, list[float]] = {n: [] for n in names}
    fps: dict[str, list[float]] = {n: [] for n in names}
    frames_per_step = args.batch_size * args.clip_len

    cpu_fps: dict[str, list[float]] = {n: [] for n in names}

    def run(name: str, n: int) -> tuple[float, float]:
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            torch.manual_seed(args.seed + 1 + steps[name])  # same masks and dropout in every loop at step i
            losses[name].append(float(loops[name].step(batch)))
            steps[name] += 1
            bar.update(1)
        _sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    for name in names:
        run(name, args.warmup)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = run(name, args.iters)
            fps[name].append(args.iters * frames_per_step / wall)
            cpu_fps[name].append(args.iters * frames_per_step / max(cpu, 1e-9))

    def summary(name: str) -> dict[str, Any]:
        med = statistics.median(fps[name])
        out = {"frames_per_s": med, "s_per_step": frames_per_step / med, "frames_per_s_rounds": fps[name],
               "achieved_tflops": flops * med / frames_per_step / 1e12}  # fmt: skip
        if device.type == "cpu":  # CPU seconds the process used: what a busy shared machine disturbs least
            out["frames_per_cpu_s"] = statistics.median(cpu_fps[name])
            out["frames_per_cpu_s_rounds"] = cpu_fps[name]
        return out

    def overhead(bare_rate: float, rate: float) -> float:
        return (bare_rate - rate) / bare_rate * 100

    bare = summary("bare")
    engines: dict[str, Any] = {}
    for name in names[1:]:
        e = summary(name)
        e["overhead_pct"] = overhead(bare["frames_per_s"], e["frames_per_s"])
        e["overhead_pct_paired_median"] = statistics.median(map(overhead, fps["bare"], fps[name]))
        if device.type == "cpu":
            e["overhead_pct_cpu_time"] = overhead(bare["frames_per_cpu_s"], e["frames_per_cpu_s"])
        ref = losses["bare"]
        e["loss_max_rel_diff_vs_bare"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[name], ref))
        e["ds_config"] = loops[name].ds_config
        engines[name] = e
    result: dict[str, Any] = {
        "image_size": image_size,
        "backbone": args.backbone,
        "backbone_kwargs": cfg0.model.backbone_kwargs,
        "temporal": {"dim": cfg0.model.temporal.dim, "layers": cfg0.model.temporal.layers,
                     "heads": cfg0.model.temporal.heads},
        "params": n_params,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "clip_len": args.clip_len,
        "frames_per_step": frames_per_step,
        "flops_per_step": flops,
        "steps_timed_per_loop": args.rounds * args.iters,
        "bare": bare,
        "engine": engines,
        "first_losses": {n: losses[n][:3] for n in names},
    }  # fmt: skip
    if device.type == "cuda":
        peak = args.peak_tflops * 1e12
        for entry in (bare, *engines.values()):
            entry["mfu"] = entry["achieved_tflops"] * 1e12 / peak
        result["peak_tflops"] = args.peak_tflops
    return result


# ------------------------------------------------------------------------------------------------ memory


def _storages(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """data_ptr -> bytes of each distinct storage behind ``tensors`` (views of one buffer count once, whole)."""
    out: dict[int, int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        s = t.untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out


def _walk(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v, depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v, depth + 1)


def inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch AdamW DeepSpeed actually steps (ZeRO and bf16 wrappers hold it as ``.optimizer``)."""
    opt = engine.optimizer
    return opt.optimizer if hasattr(opt, "optimizer") and isinstance(opt.optimizer, torch.optim.Optimizer) else opt


def param_storages(model: torch.nn.Module) -> dict[int, int]:
    """Parameter bytes this rank holds: ``p.ds_tensor`` (ZeRO-3 partition) plus any non-empty ``p.data``
    (full weights under stages 0-2; ZeRO-3's persistent small parameters, which every rank keeps whole)."""
    tensors: list[torch.Tensor] = []
    for p in model.parameters():
        tensors.append(p.data)
        tensors.append(getattr(p, "ds_tensor", None))
    return _storages(tensors)


def grad_storages(engine: Any, model: torch.nn.Module) -> dict[int, int]:
    """Gradient bytes held after backward, before the step, wherever DeepSpeed keeps them: ``p.grad`` and
    ``p.grad_accum`` of the model, ``.grad`` of the tensors the torch optimizer updates, and every tensor under
    the ZeRO optimizer's own gradient attributes (``averaged_gradients``, ``grads_in_partition``,
    ``grad_partitions_flat_buffer``, ipg buckets, ...: attribute names containing 'grad' or 'ipg')."""
    tensors: list[torch.Tensor] = []
    for p in model.parameters():
        tensors += [p.grad, getattr(p, "grad_accum", None)]
    for g in inner_optimizer(engine).param_groups:
        tensors += [p.grad for p in g["params"]]
    if engine.optimizer is not inner_optimizer(engine):
        for name, value in vars(engine.optimizer).items():
            low = name.lower()
            if ("grad" in low or "ipg" in low) and "norm" not in low:
                tensors += [t for t in _walk(value) if t.numel() > 1]
    return _storages(tensors)


def optimizer_storages(engine: Any, model: torch.nn.Module) -> tuple[dict[int, int], dict[int, int]]:
    """(Adam state: every tensor in the torch optimizer's ``.state``; fp32 masters: the tensors it updates
    when they are not the model's own weights - ZeRO's flat fp32 partitions, bf16's fp32 copies)."""
    opt = inner_optimizer(engine)
    state = _storages(t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    own = param_storages(model)
    masters = _storages(p for g in opt.param_groups for p in g["params"])
    return state, {k: v for k, v in masters.items() if k not in own}


def _memory_worker(local_rank: int, stage: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    """One rank of a 2-rank ZeRO ``stage`` run: one full step, then the byte counts to ``out_dir``."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    _quiet_deepspeed()
    import torch.distributed as dist

    from mtl.engine.distributed import init_distributed

    env = init_distributed(device="cpu")  # the memory part always runs on CPU/gloo
    image_size = args.image_size[0]
    cfg = make_config(args, image_size, stage)
    cfg.train.precision = "fp32"
    torch.manual_seed(args.seed)
    model = build_model(cfg.model, image_size=image_size)
    n_params = sum(p.numel() for p in model.parameters())
    batch = make_batch(args.batch_size, args.clip_len, image_size, args.seed + env.rank, env.device)
    loop = EngineLoop(model, cfg, MultiTaskLoss(cfg.loss, train_stats(batch)), env.device, env.world_size)
    engine = loop.engine.ds
    torch.manual_seed(args.seed + 1)
    loop.forward_backward(batch)
    grads = grad_storages(engine, model)
    engine.step()
    params = param_storages(model)
    state, masters = optimizer_storages(engine, model)
    persistent = [p for p in model.parameters() if getattr(p, "ds_persist", False)]
    result = {
        "rank": env.rank,
        "model_params": n_params,
        "model_param_bytes_fp32": n_params * 4,
        "param_bytes": sum(params.values()),
        "grad_bytes": sum(grads.values()),
        "optimizer_state_bytes": sum(state.values()),
        "master_bytes": sum(masters.values()),
        "optimizer_total_bytes": sum(state.values()) + sum(masters.values()),
        "optimizer": type(engine.optimizer).__name__,
    }
    if stage == 3:
        result["persistent_params"] = len(persistent)
        result["persistent_param_elements"] = sum(p.numel() for p in persistent)
    Path(out_dir, f"stage{stage}_rank{env.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def _cpu_only_env() -> Iterator[None]:
    """The memory part is a 2-rank gloo run on CPU even on a GPU host (one GPU cannot hold two nccl ranks)."""
    saved = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR", "OMP_NUM_THREADS")}
    os.environ.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench_memory(args: argparse.Namespace, progress: bool) -> dict[str, Any]:
    """Per stage: 2 fresh processes (forked from a server that imported torch/DeepSpeed once), fp32, gloo."""
    import multiprocessing

    import torch.multiprocessing as tmp

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "deepspeed", "timm", "mtl.model", "mtl.objectives"])
    stages: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmpdir, _cpu_only_env():
        for stage in tqdm(args.memory_stages, desc="memory (2 ranks per ZeRO stage)", disable=not progress):
            tmp.start_processes(_memory_worker, args=(stage, free_port(), args, tmpdir), nprocs=2,
                                join=True, start_method="forkserver")  # fmt: skip
            ranks = [json.loads(Path(tmpdir, f"stage{stage}_rank{r}.json").read_text()) for r in range(2)]
            stages[str(stage)] = {"ranks": ranks}
    for entry in stages.values():
        for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "master_bytes", "optimizer_total_bytes"):
            entry[f"mean_{key}"] = sum(r[key] for r in entry["ranks"]) / len(entry["ranks"])
    ratios: dict[str, Any] = {}
    if "0" in stages:
        ref = stages["0"]
        for s, entry in stages.items():
            ratios[f"stage{s}_vs_stage0"] = {
                key: entry[f"mean_{key}"] / ref[f"mean_{key}"] if ref[f"mean_{key}"] else None
                for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "optimizer_total_bytes")
            }
    return {
        "world_size": 2,
        "backend": "gloo",
        "precision": "fp32",
        "image_size": args.image_size[0],
        "stages": stages,
        "ratios": ratios,
        "method": MEMORY_METHOD,
    }


MEMORY_METHOD = {
    "general": "Bytes of distinct tensor storages (views of one flat buffer count once, as the whole buffer), "
    "per rank, 2 gloo ranks, fp32, one full step on a random batch; project config from build_ds_config.",
    "param_bytes": "After the step: storages of every parameter's p.data (when non-empty) and p.ds_tensor. "
    "Stages 0-2: the full weights (stages 1-2: DeepSpeed's flat buffers, alignment padding included). "
    "Stage 3: this rank's partition (ds_tensor) plus parameters below stage3_param_persistence_threshold, which "
    "every rank keeps whole.",
    "grad_bytes": "Right after engine.backward, before engine.step: storages of p.grad and p.grad_accum of the "
    "model, .grad of the tensors the torch optimizer updates, and tensors under the ZeRO optimizer's gradient "
    "attributes (names containing 'grad'/'ipg': averaged_gradients, grads_in_partition, "
    "grad_partitions_flat_buffer, ...). Stage 0: full p.grad. Stages 1-2: the partition buffer, which holds whole "
    "gradients of every parameter overlapping this rank's partition. Stage 3: the flat gradient partition.",
    "optimizer_state_bytes": "After the step: storages of all tensors in the wrapped torch AdamW's .state "
    "(exp_avg, exp_avg_sq, step) - engine.optimizer.optimizer.state under ZeRO, engine.optimizer.state otherwise.",
    "master_bytes": "After the step: the tensors the torch AdamW updates when they are not the model's own "
    "weights, i.e. ZeRO's fp32 master partitions (kept even in fp32 training). Stage 0 fp32 has none.",
    "optimizer_total_bytes": "optimizer_state_bytes + master_bytes.",
}


# ------------------------------------------------------------------------------------------------ main


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """DeepSpeed prints and logs to stdout (here and in the rank processes); stdout is kept for the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    progress = not args.no_progress
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    _quiet_deepspeed()
    import deepspeed
    import timm

    from mtl.engine.distributed import init_distributed

    result: dict[str, Any] = {
        "benchmark": "step",
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "timm": timm.__version__},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": None,
        "speed": [],
        "memory": None,
    }
    if args.speed:
        env = init_distributed(device=args.device)  # world size 1 (gloo on CPU, nccl on GPU), as Trainer does
        device = env.device
        result["device"] = _device_name(device)
        per_size = (1 + len(args.zero_stages)) * (args.warmup + args.rounds * args.iters)
        with tqdm(total=per_size * len(args.image_size), desc="step (bare vs engine)", disable=not progress) as bar:
            for size in args.image_size:
                result["speed"].append(bench_speed(args, size, device, bar))
    if args.memory:
        result["memory"] = bench_memory(args, progress)
    return result


def _summary(result: dict[str, Any]) -> list[str]:
    lines = []
    for entry in result["speed"]:
        parts = [f"bare {entry['bare']['frames_per_s']:.1f}"] + [
            f"{n} {e['frames_per_s']:.1f} (overhead {e['overhead_pct']:+.1f}%"
            + (f", by CPU time {e['overhead_pct_cpu_time']:+.1f}%)" if "overhead_pct_cpu_time" in e else ")")
            for n, e in entry["engine"].items()
        ]
        lines.append(f"step {entry['image_size']}px frames/s: " + ", ".join(parts))
    for s, e in (result["memory"] or {}).get("stages", {}).items():
        keys = ("param_bytes", "grad_bytes", "optimizer_state_bytes", "master_bytes")
        mib = {k: e[f"mean_{k}"] / 2**20 for k in keys}
        lines.append(
            f"ZeRO-{s} per rank (MiB): params {mib['param_bytes']:.2f}, grads {mib['grad_bytes']:.2f}, "
            f"Adam state {mib['optimizer_state_bytes']:.2f}, fp32 master {mib['master_bytes']:.2f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with _stdout_to_stderr():
        result = run_benchmark(args)
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(text + "\n")
    tmp_out.replace(args.out)  # never leaves a half-written result behind
    print(text, flush=True)
    for line in _summary(result):
        print(line, file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
