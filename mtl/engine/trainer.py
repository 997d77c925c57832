"""The training loop: the same code under one process, torchrun, accelerate launch, srun and submitit.

DeepSpeed is driven directly (not through accelerate's plugin, which forms no process group on CPU); every
decision that involves a collective (skip a bad step, stop for preemption, evaluate) is agreed by all ranks first.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mtl.config import Config, dump_yaml, flatten, to_dict
from mtl.data.loader import make_eval_loader, make_train_loader
from mtl.data.manifest import read_manifest
from mtl.engine import checkpoint as ckpt
from mtl.engine.distributed import DistEnv, any_rank, barrier, broadcast_object, init_distributed
from mtl.engine.ds_config import build_ds_config, resolve_precision, resolve_zero_stage
from mtl.engine.evaluate import evaluate, to_device
from mtl.engine.export import consolidate, save_weights
from mtl.engine.layout import CHECKPOINTS, EXPORT, RUN_ID_FILE
from mtl.engine.preemption import StopFlag
from mtl.engine.schedule import build_optimizer, build_scheduler
from mtl.errors import MtlError
from mtl.model import build_model, param_groups
from mtl.objectives import MultiTaskLoss
from mtl.tracking.mlflow_run import Tracker
from mtl.tracking.report import log_evaluation


@dataclass
class TrainResult:
    status: str  # "completed" | "preempted"
    step: int
    run_id: str | None
    output_dir: str
    metrics: dict[str, float] = field(default_factory=dict)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _resume_tag(resume: str, ckpt_dir: Path) -> tuple[Path, str | None]:
    """Where to resume from: (checkpoint root, tag) for auto / never / an explicit directory."""
    if resume == "never":
        if ckpt.complete_tags(ckpt_dir):
            raise MtlError(
                f"train.resume=never but {ckpt_dir} already holds checkpoints; "
                "use train.resume=auto to continue it or choose another train.output_dir"
            )
        return ckpt_dir, None
    if resume == "auto":
        return ckpt_dir, ckpt.latest_complete(ckpt_dir)
    path = Path(resume)
    if (path / ckpt.COMPLETE).is_file():
        return path.parent, path.name
    latest = ckpt.latest_complete(path / "checkpoints") or ckpt.latest_complete(path)
    if latest is None:
        raise MtlError(f"train.resume={resume}: no complete checkpoint found there")
    root = path / "checkpoints" if (path / "checkpoints" / latest).is_dir() else path
    return root, latest


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.env: DistEnv = init_distributed()
        _seed_everything(cfg.train.seed + self.env.rank)
        self.out = Path(cfg.train.output_dir).resolve()
        self.ckpt_dir = self.out / CHECKPOINTS
        if self.env.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        self.manifest = read_manifest(cfg.data.shards)
        self.zero_stage = resolve_zero_stage(cfg)
        self.precision = resolve_precision(cfg)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32

        model = build_model(cfg.model, image_size=cfg.data.image_size)
        norm = model.data_config()
        self.mean = tuple(cfg.data.mean or norm["mean"])
        self.std = tuple(cfg.data.std or norm["std"])
        splits = self.manifest["splits"]
        if cfg.data.train_split not in splits:
            raise MtlError(f"data.train_split={cfg.data.train_split!r} is not in {cfg.data.shards} ({list(splits)})")
        self.loss_fn = MultiTaskLoss(cfg.loss, splits[cfg.data.train_split]["tasks"])
        optimizer = build_optimizer(param_groups(model, cfg.optim), cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        self.ds_config = build_ds_config(cfg, self.env.world_size, self.zero_stage, self.precision)

        import deepspeed
        from deepspeed.utils import logger as ds_logger

        if not os.environ.get("MTL_DEEPSPEED_VERBOSE"):  # its INFO lines drown the progress bar and our logs
            ds_logger.setLevel(logging.WARNING)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.state = ckpt.TrainState(config=to_dict(cfg))
        root, tag = _resume_tag(cfg.train.resume, self.ckpt_dir)
        self.resumed_from = tag
        if tag is not None:
            self.state = ckpt.load(self.engine, root, tag, self.env.rank)
        self.tracker = self._open_tracker()
        self.stop = StopFlag()

    # ------------------------------------------------------------------------------------------ tracking

    def _open_tracker(self) -> Tracker:
        """One MLflow run per training run: from the checkpoint, else the run-id file, else config, else new."""
        run_id = self.state.run_id
        id_file = self.out / RUN_ID_FILE
        if run_id is None and self.cfg.train.resume != "never" and id_file.is_file():
            run_id = id_file.read_text().strip() or None  # killed before its first checkpoint
        run_id = run_id or self.cfg.tracking.run_id
        tracker = Tracker(self.cfg.tracking, run_id, active=self.env.is_main)
        run_id = broadcast_object(tracker.run_id)
        tracker.run_id = run_id
        self.state.run_id = run_id
        if not self.env.is_main or not tracker.active:
            return tracker
        id_file.write_text(f"{run_id}\n")
        tags = {
            "git_commit": _git_commit(),
            "world_size": self.env.world_size,
            "zero_stage": self.zero_stage,
            "precision": self.precision,
            "host": socket.gethostname(),
            "output_dir": str(self.out),
        }
        if os.environ.get("SLURM_JOB_ID"):
            tags["slurm_job_id"] = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
            tags["slurm_job_ids"] = os.environ["SLURM_JOB_ID"]
        if self.resumed_from:
            tags["resumed_from"] = self.resumed_from
        tracker.set_tags(tags)
        if not tracker.resumed:
            tracker.log_params(flatten(self.cfg))
            dump_yaml(self.cfg, self.out / "config.yaml")
            (self.out / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
            tracker.log_artifact(self.out / "config.yaml")
            tracker.log_artifact(self.out / "ds_config.json")
            tracker.log_artifact(Path(self.cfg.data.shards) / "manifest.json")
        return tracker

    # ------------------------------------------------------------------------------------------ steps

    def _forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.engine(batch["frames"].to(self.dtype), batch["has_image"], batch["pad"])
        return {k: v.float() for k, v in out.items()}

    def _train_loader(self):
        c = self.cfg
        return make_train_loader(
            c.data,
            mean=self.mean,
            std=self.std,
            rank=self.env.rank,
            world_size=self.env.world_size,
            epoch=self.state.epoch,
            seed=c.train.seed,
            skip_batches=self.state.micro_in_epoch,
        )

    def evaluate(self) -> dict[str, float]:
        loader = make_eval_loader(
            self.cfg.data, self.cfg.data.val_split, mean=self.mean, std=self.std,
            rank=self.env.rank, world_size=self.env.world_size,
        )  # fmt: skip
        self.engine.eval()
        metrics, _ = evaluate(self._forward, loader, self.env.device, progress=self._show_progress, desc="validate")
        self.engine.train()
        scores = metrics.compute()
        log_evaluation(self.tracker, metrics, scores, self.state.step, "val")
        return scores

    @property
    def _show_progress(self) -> bool:
        return self.cfg.train.progress and self.env.is_main

    def _save(self) -> str:
        self.tracker.flush()
        return ckpt.save(self.engine, self.ckpt_dir, self.state, self.env.rank, self.cfg.train.keep_last)

    def _export(self) -> None:
        """Consolidated fp32 weights of the last and the best checkpoint (rank 0; others wait)."""
        if self.env.is_main:
            export_dir = self.out / EXPORT
            last = ckpt.tag_for(self.state.step)
            for name, tag in (("last", last), ("best", self.state.best_tag or last)):
                save_weights(consolidate(self.ckpt_dir, tag), export_dir / f"{name}.safetensors", to_dict(self.cfg))
        barrier()

    # ------------------------------------------------------------------------------------------ loop

    def run(self) -> TrainResult:
        c = self.cfg.train
        self.stop.install()
        self.engine.train()
        bar = tqdm(total=c.max_steps, initial=self.state.step, desc="train", disable=not self._show_progress)
        sums: dict[str, float] = {}
        n_sums, bad_streak, frames = 0, 0, 0
        last_scores: dict[str, float] = {}
        t_log = time.time()
        status = "completed"
        try:
            while self.state.step < c.max_steps:
                loader = self._train_loader()
                if len(loader) < c.grad_accum:
                    raise MtlError(
                        f"{self.cfg.data.shards}: an epoch has {len(loader)} batches per rank, fewer than "
                        f"train.grad_accum={c.grad_accum}; use a smaller data.batch_size or more data"
                    )
                stepped_out = False
                for batch in loader:
                    self.state.micro_in_epoch += 1
                    batch = to_device(batch, self.env.device)
                    outputs = self._forward(batch)
                    loss, parts = self.loss_fn(outputs, batch)
                    if any_rank(not bool(torch.isfinite(loss)), self.env.device):
                        # Every rank skips this micro-batch together (backward is collective under ZeRO).
                        bad_streak += 1
                        self.state.bad_steps_total += 1
                        if bad_streak >= c.max_bad_steps:
                            raise MtlError(
                                f"{bad_streak} consecutive non-finite losses at step {self.state.step} "
                                f"(train.max_bad_steps={c.max_bad_steps}); lower optim.lr or check the data"
                            )
                        continue
                    bad_streak = 0
                    self.engine.backward(loss)
                    before = self.engine.global_steps
                    self.engine.step()
                    frames += int(batch["frames"].shape[0] * batch["frames"].shape[1]) * self.env.world_size
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                    n_sums += 1
                    if self.engine.global_steps == before:
                        continue  # inside a gradient accumulation
                    self.state.step += 1
                    bar.update(1)
                    step = self.state.step
                    if step % c.log_every == 0 or step == c.max_steps:
                        dt = max(time.time() - t_log, 1e-9)
                        logged = {f"train/{k}": v / max(n_sums, 1) for k, v in sums.items()}
                        grad_norm = self.engine.get_global_grad_norm()
                        logged.update({
                            "train/lr": max(g["lr"] for g in self.engine.optimizer.param_groups),
                            "train/frames_per_s": frames / dt,
                            "train/bad_steps_total": self.state.bad_steps_total,
                            "train/epoch": self.state.epoch,
                        })  # fmt: skip
                        if grad_norm is not None and math.isfinite(float(grad_norm)):
                            logged["train/grad_norm"] = float(grad_norm)
                        self.tracker.log_metrics(logged, step)
                        bar.set_postfix(loss=f"{logged['train/loss']:.3f}", fps=f"{logged['train/frames_per_s']:.0f}")
                        sums, n_sums, frames, t_log = {}, 0, 0, time.time()
                    is_best = False
                    if step % c.eval_every == 0 or step == c.max_steps:
                        last_scores = self.evaluate()
                        if last_scores["mtl_score"] > self.state.best_score:
                            self.state.best_score = last_scores["mtl_score"]
                            self.state.best_tag = ckpt.tag_for(step)
                            is_best = True
                        self.tracker.log_metrics({"val/best_mtl_score": self.state.best_score}, step)
                        t_log = time.time()
                    if is_best or step % c.ckpt_every == 0 or step == c.max_steps:
                        self._save()
                    if any_rank(self.stop.requested, self.env.device):
                        self._save()
                        status = "preempted"
                        stepped_out = True
                        break
                    if step >= c.max_steps:
                        stepped_out = True
                        break
                if stepped_out:
                    break
                self.state.epoch += 1
                self.state.micro_in_epoch = 0
            if status == "completed":
                self._export()
        except BaseException:
            self.tracker.end("FAILED")
            raise
        finally:
            bar.close()
            self.stop.uninstall()
        self.tracker.end("KILLED" if status == "preempted" else "FINISHED")
        return TrainResult(status, self.state.step, self.tracker.run_id, str(self.out), last_scores)


def train(cfg: Config) -> TrainResult:
    """Entry point for every launcher; see the module docstring."""
    return Trainer(cfg).run()
