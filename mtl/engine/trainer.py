"""The training loop: the same code under one process, torchrun, accelerate launch, srun and submitit.

DeepSpeed is driven directly (not through accelerate's plugin, which forms no process group on CPU); every
decision that involves a collective (skip a bad step, stop for preemption, evaluate) is agreed by all ranks first.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mtl.config import Config, dump_yaml, flatten, replace, to_dict
from mtl.data.legs import Leg
from mtl.data.manifest import LabelledSplit, read_manifest
from mtl.data.prefetch import prefetch
from mtl.engine import checkpoint as ckpt
from mtl.engine.cpus import fit_to_cpus
from mtl.engine.distributed import DistEnv, any_rank, barrier, broadcast_object, init_distributed
from mtl.engine.ds_config import resolve_zero_stage
from mtl.engine.preemption import StopFlag
from mtl.engine.start import own_run_dir, resume_changes, take_changes
from mtl.engine.step import build_engine
from mtl.errors import MtlError
from mtl.evaluation.evaluate import evaluate
from mtl.objectives import MultiTaskLoss
from mtl.runs.export import consolidate, save_weights
from mtl.runs.inputs import DataSource
from mtl.runs.layout import EXPORTS, Checkpoint, RunDir, resume_point, tag_for
from mtl.tracking.inputs import shard_datasets
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


@dataclass
class _Window:
    """What the training log reports, accumulated on the device over the micro-batches since the last log line
    and read there only: between log lines nothing waits for the GPU."""

    names: list[str] = field(default_factory=list)
    sums: torch.Tensor | None = None  # loss and parts, summed over the finite micro-batches
    finite: torch.Tensor | None = None  # how many micro-batches were
    frames: int = 0  # over all ranks
    since: float = field(default_factory=time.time)

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], skipped: torch.Tensor, frames: int) -> None:
        values = torch.stack([loss.float(), *(v.float() for v in parts.values())])
        values = values.masked_fill(skipped, 0.0)
        kept = (~skipped).to(torch.int64)
        if self.sums is None:
            self.names, self.sums, self.finite = ["loss", *parts], values, kept
        else:
            self.sums, self.finite = self.sums + values, self.finite + kept
        self.frames += frames

    def metrics(self) -> dict[str, float]:
        dt = max(time.time() - self.since, 1e-9)
        logged = {"train/frames_per_s": self.frames / dt}
        if self.sums is not None:
            *sums, finite = torch.cat([self.sums, self.finite.reshape(1).to(self.sums.dtype)]).tolist()
            logged.update({f"train/{k}": v / max(finite, 1) for k, v in zip(self.names, sums)})
        return logged


class _Skips:
    """Skipped (non-finite) micro-batches, counted on the device: since the last read, the current run of them,
    and the longest run since the last read."""

    def __init__(self, device: torch.device) -> None:
        self.new, self.run, self.longest = (torch.zeros((), dtype=torch.int64, device=device) for _ in range(3))

    def add(self, skipped: torch.Tensor) -> None:
        one = skipped.to(torch.int64)
        self.new = self.new + one
        self.run = (self.run + one) * one
        self.longest = torch.maximum(self.longest, self.run)

    def read(self) -> tuple[int, int]:
        """(skipped since the last read, longest run of consecutive skips in that time); one host read."""
        new, longest = torch.stack([self.new, self.longest]).tolist()
        self.new, self.longest = torch.zeros_like(self.new), self.run.clone()
        return new, longest


def _warn(msg: str) -> None:
    print(f"mtl train: warning: {msg}", file=sys.stderr, flush=True)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.env: DistEnv = init_distributed(timedelta(minutes=cfg.train.dist_timeout_min), cfg.train.device)
        _seed_everything(cfg.train.seed + self.env.rank)
        self.run_dir = RunDir(Path(cfg.train.output_dir).resolve())
        self.out = self.run_dir.root
        self.owner = own_run_dir(self.env, self.run_dir)  # before anything is written in it
        try:
            self._open()
        except BaseException:
            self.owner.release()
            raise

    def _open(self) -> None:
        cfg = self.cfg
        if self.env.is_main:
            self.run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
        barrier()
        resume_from = self._resume_point()
        self.changes = resume_changes(self.env, cfg, resume_from)  # another experiment refused before any model
        self.manifest = read_manifest(cfg.data.shards)
        splits = self.manifest.splits
        if cfg.data.train_split not in splits:
            raise MtlError(f"data.train_split={cfg.data.train_split!r} is not in {cfg.data.shards} ({list(splits)})")
        train_entry = splits[cfg.data.train_split]
        if not isinstance(train_entry, LabelledSplit):
            raise MtlError(f"data.train_split={cfg.data.train_split!r}: an unlabelled split (the test set) in "
                           f"{cfg.data.shards}; train on a labelled one")  # fmt: skip

        self.source = DataSource(cfg)  # pixels or cached features; their inputs checked before any model exists
        if self.source.uses_features:
            self.source.split(cfg.data.train_split)
        model = self.source.build_model()
        self.loss_fn = MultiTaskLoss(cfg.loss, train_entry.task_stats())
        universal = resume_from is not None and self._universal(resume_from)
        self.engine = build_engine(model, cfg, self.env.world_size, self.env.device, load_universal=universal)
        self.state = ckpt.TrainState(config=to_dict(cfg))
        self.resumed_from = resume_from.tag if resume_from else None
        if resume_from is not None:
            self.state = ckpt.load(self.engine.ds, resume_from.root, resume_from.tag, self.env.rank, universal)
            take_changes(self.env, self.changes, self.engine.ds, cfg, self.run_dir)
            self.state.config = to_dict(cfg)  # what the next resume compares with
        self._record_setup()
        self.tracker = self._open_tracker()
        self.stop = StopFlag()
        self.window = _Window()
        self.skips = _Skips(self.env.device)
        self.last_scores: dict[str, float] = {}
        self.bar: tqdm | None = None

    def _resume_point(self) -> Checkpoint | None:
        """Decided on rank 0 (which marks damaged checkpoints) and shared, errors included, so no rank waits."""
        answer: tuple[Checkpoint | None, str | None] = (None, None)
        if self.env.is_main:
            try:
                full = self.cfg.train.verify_checkpoint
                answer = (resume_point(self.cfg.train.resume, self.run_dir, warn=_warn, full=full), None)
            except MtlError as exc:
                answer = (None, str(exc))
        found, error = broadcast_object(answer)
        if error is not None:
            raise MtlError(error)
        return found

    def _universal(self, found: Checkpoint) -> bool:
        """Whether ``found`` was saved on another world size or ZeRO stage; if so rank 0 converts it to DeepSpeed's
        universal form (once; the others wait) and the engine loads that."""
        saved = ckpt.TrainState.from_dict(found.state())
        now = (self.env.world_size, resolve_zero_stage(self.cfg))
        if saved.world_size is None or (saved.world_size, saved.zero_stage) == now:
            return False
        error = None
        if self.env.is_main:
            _warn(f"{found.dir} was saved on {saved.world_size} rank(s) at ZeRO-{saved.zero_stage}, this run has "
                  f"{now[0]} at ZeRO-{now[1]}: resuming from DeepSpeed's universal checkpoint")  # fmt: skip
            try:
                ckpt.convert_to_universal(found.dir)
            except Exception as exc:  # every rank must hear of it, or the others wait forever
                error = f"{found.dir}: conversion to a universal checkpoint failed ({exc})"
        error = broadcast_object(error)
        if error is not None:
            raise MtlError(error)
        return True

    def _record_setup(self) -> None:
        """World size, ZeRO stage and reader set-up into the state. A position counted under another reader set-up
        ends that leg of the epoch; the loader then gives this run the samples the legs left."""
        st, d = self.state, self.cfg.data
        st.world_size, st.zero_stage = self.env.world_size, self.engine.zero_stage
        reader = {"world_size": self.env.world_size, "batch_size": d.batch_size, "workers": d.num_workers,
                  "shuffle_buffer": d.shuffle_buffer}  # fmt: skip
        if st.reader is not None and st.reader != reader and st.micro_in_epoch > 0:
            if self.env.is_main:
                _warn(f"epoch {st.epoch} continues after {st.samples_in_epoch()} samples read with {st.reader}; "
                      f"its remaining samples are cut over {reader}")  # fmt: skip
            st.epoch_legs.append({**st.reader, "batches": st.micro_in_epoch})
            st.micro_in_epoch = 0
        st.reader = reader

    # ------------------------------------------------------------------------------------------ tracking

    def _open_tracker(self) -> Tracker:
        """One MLflow run per training run: from the checkpoint, else the run-id file, else config, else new."""
        # The run-id file covers a run killed before its first checkpoint.
        run_id = self.state.run_id or self.run_dir.recorded_run_id(self.cfg.train.resume) or self.cfg.tracking.run_id
        tracker = Tracker(self.cfg.tracking, run_id, active=self.env.is_main)
        run_id = broadcast_object(tracker.run_id)
        tracker.run_id = run_id
        self.state.run_id = run_id
        if not self.env.is_main or not tracker.active:
            return tracker
        self.run_dir.write_run_id(run_id)
        tags = {
            "git_commit": _git_commit(),
            "world_size": self.env.world_size,
            "zero_stage": self.engine.zero_stage,
            "precision": self.engine.precision,
            "host": socket.gethostname(),
            "output_dir": str(self.out),
        }
        if os.environ.get("SLURM_JOB_ID"):
            tags["slurm_job_id"] = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
            tags["slurm_job_ids"] = os.environ["SLURM_JOB_ID"]
        if self.resumed_from:
            tags["resumed_from"] = self.resumed_from
        tags.update(self.changes.tags())
        tracker.set_tags(tags)
        if not tracker.resumed:
            tracker.log_params({**flatten(self.cfg), **self.source.params()})
            dump_yaml(self.cfg, self.out / "config.yaml")
            (self.out / "ds_config.json").write_text(json.dumps(self.engine.ds_config, indent=2))
            tracker.log_artifact(self.out / "config.yaml")
            tracker.log_artifact(self.out / "ds_config.json")
            tracker.log_artifact(Path(self.cfg.data.shards) / "manifest.json")
            tracker.log_datasets(shard_datasets(self.cfg.data, self.manifest))
        return tracker

    # ------------------------------------------------------------------------------------------ the parts

    @property
    def _show_progress(self) -> bool:
        return self.cfg.train.progress and self.env.is_main

    def _epoch(self) -> Iterable[dict]:
        """This rank's batches of the current epoch, from where the state says it stopped."""
        c = self.cfg
        loader = self.source.train_loader(
            rank=self.env.rank,
            world_size=self.env.world_size,
            epoch=self.state.epoch,
            seed=c.train.seed,
            skip_batches=self.state.micro_in_epoch,
            legs=[Leg(**g) for g in self.state.epoch_legs],
        )
        if not self.state.epoch_legs and len(loader) < c.train.grad_accum:  # a later leg may hold a few or none
            raise MtlError(
                f"{c.data.shards}: an epoch has {len(loader)} batches per rank, fewer than "
                f"train.grad_accum={c.train.grad_accum}; use a smaller data.batch_size or more data"
            )
        return loader

    def _micro_step(self, batch: dict) -> bool:
        """Forward, backward and DeepSpeed's step on one micro-batch; True when an optimizer step was taken.
        Nothing here waits for the GPU: a non-finite loss is skipped on the device (see ``Engine.forward_backward``)
        and counted there, and read at the next log line (``_check_skips``)."""
        self.state.micro_in_epoch += 1
        loss, parts, skipped = self.engine.forward_backward(self.loss_fn, batch)
        stepped = self.engine.step()
        frames = batch["pad"].shape[0] * batch["pad"].shape[1] * self.env.world_size
        self.window.add(loss, parts, skipped, frames=int(frames))
        self.skips.add(skipped)
        if stepped:
            self.state.step += 1
        return stepped

    def _check_skips(self) -> None:
        """The skipped micro-batches since the last check into the state; too many in a row means training
        diverged (all ranks read the same counts, so all stop)."""
        new, longest = self.skips.read()
        self.state.bad_steps_total += new
        c = self.cfg.train
        if longest >= c.max_bad_steps:
            raise MtlError(
                f"{longest} consecutive non-finite losses by step {self.state.step} "
                f"(train.max_bad_steps={c.max_bad_steps}); lower optim.lr or check the data"
            )

    def _log(self, step: int) -> None:
        """The training metrics of the window since the last log, then a new window."""
        ds = self.engine.ds
        self._check_skips()
        logged = self.window.metrics()
        logged.update({
            "train/lr": max(g["lr"] for g in ds.optimizer.param_groups),
            "train/bad_steps_total": self.state.bad_steps_total,
            "train/epoch": self.state.epoch,
        })  # fmt: skip
        grad_norm = ds.get_global_grad_norm()
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            logged["train/grad_norm"] = float(grad_norm)
        self.tracker.log_metrics(logged, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{logged['train/loss']:.3f}", fps=f"{logged['train/frames_per_s']:.0f}")
        self.window = _Window()

    def evaluate(self) -> dict[str, float]:
        """Scores on the validation split (every rank takes part), logged with their plots."""
        loader = self.source.eval_loader(self.cfg.data.val_split, rank=self.env.rank, world_size=self.env.world_size,
                                         device=self.env.device)  # fmt: skip
        self.engine.ds.eval()
        metrics, _ = evaluate(self.engine.forward, loader, self.env.device, progress=self._show_progress,
                              desc="validate")  # fmt: skip
        self.engine.ds.train()
        scores = metrics.compute()
        log_evaluation(self.tracker, metrics, scores, self.state.step, "val")
        return scores

    def _evaluate_and_checkpoint(self, step: int) -> None:
        """Evaluate when due and track the best; save when due, at the end, or when this step is the best."""
        c = self.cfg.train
        is_best = False
        if step % c.eval_every == 0 or step == c.max_steps:
            self.last_scores = self.evaluate()
            if self.last_scores["mtl_score"] > self.state.best_score:
                self.state.best_score = self.last_scores["mtl_score"]
                self.state.best_tag = tag_for(step)
                is_best = True
            self.tracker.log_metrics({"val/best_mtl_score": self.state.best_score}, step)
            self.window.since = time.time()  # evaluation time is not training throughput
        if is_best or step % c.ckpt_every == 0 or step == c.max_steps:
            self._save()

    def _save(self) -> str:
        self._check_skips()  # the checkpoint's count of skipped micro-batches is up to date
        self.tracker.flush()
        return ckpt.save(self.engine.ds, self.run_dir.checkpoints, self.state, self.env.rank, self.cfg.train.keep_last)

    def _export(self) -> None:
        """Consolidated fp32 weights of the last and the best checkpoint (rank 0; others wait)."""
        if self.env.is_main:
            last = tag_for(self.state.step)
            tags = {"last": last, "best": self.state.best_tag or last}
            # The run that made them travels with the weights (`mtl eval` logs its outputs there).
            tracking = replace(self.cfg.tracking, run_id=self.tracker.run_id, uri=self.tracker.uri)
            consolidated = {tag: consolidate(self.run_dir.checkpoints, tag) for tag in set(tags.values())}  # once each
            for name in EXPORTS:
                weights = consolidated[tags[name]]
                save_weights(weights, self.run_dir.export_file(name), to_dict(replace(self.cfg, tracking=tracking)))
        barrier()

    # ------------------------------------------------------------------------------------------ loop

    def _train(self) -> str:
        """Micro-batches until train.max_steps ("completed") or until any rank is told to stop ("preempted")."""
        c = self.cfg.train
        while self.state.step < c.max_steps:
            for batch in prefetch(self._epoch(), self.env.device):  # on the GPU one batch ahead
                if not self._micro_step(batch):
                    continue  # inside a gradient accumulation, or a skipped non-finite batch
                step = self.state.step
                self.bar.update(1)
                log_step = step % c.log_every == 0 or step == c.max_steps
                if log_step:
                    self._log(step)
                self._evaluate_and_checkpoint(step)
                # Agreed at log steps only (a collective the host waits for): a stop signal ends the run
                # within train.log_every steps.
                if log_step and any_rank(self.stop.requested, self.env.device):
                    self._save()
                    return "preempted"
                if step >= c.max_steps:
                    return "completed"
            self.state.epoch += 1
            self.state.micro_in_epoch = 0
            self.state.epoch_legs = []
        return "completed"

    def run(self) -> TrainResult:
        """Train, export the weights when complete, and end the MLflow run with the outcome."""
        self.stop.install()
        self.engine.ds.train()
        self.window = _Window()
        self.bar = tqdm(total=self.cfg.train.max_steps, initial=self.state.step, desc="train",
                        disable=not self._show_progress)  # fmt: skip
        try:
            status = self._train()
            if status == "completed":
                self._export()
            self.tracker.end("KILLED" if status == "preempted" else "FINISHED")
        except BaseException:
            self.tracker.end("FAILED")
            raise
        finally:
            self.bar.close()
            self.stop.uninstall()
            self.source.close()
            self.owner.release()  # on every way out; after the MLflow run's end, which the next owner reopens
        return TrainResult(status, self.state.step, self.tracker.run_id, str(self.out), self.last_scores)


def train(cfg: Config) -> TrainResult:
    """Entry point for every launcher; see the module docstring."""
    return Trainer(fit_to_cpus(cfg)).run()
