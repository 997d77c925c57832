"""What a training start decides once, on global rank 0, for every rank: who owns the run folder, and what a
resume changes. Each decision (an error included) is broadcast, so no rank trains alone or waits forever.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from mtl.config import Config
from mtl.engine.distributed import DistEnv, broadcast_object
from mtl.errors import MtlError, os_error_line
from mtl.runs import lock
from mtl.runs.layout import Checkpoint, RunDir
from mtl.runs.resume_changes import EXPERIMENT, SETTING, ResumeChanges, check

T = TypeVar("T")


def _warn(msg: str) -> None:
    print(f"mtl train: warning: {msg}", file=sys.stderr, flush=True)


def _say(msg: str) -> None:
    print(f"mtl train: {msg}", file=sys.stderr, flush=True)


def decided_on_main(env: DistEnv, decide: Callable[[], T], share: bool = True) -> T | None:
    """``decide()`` on rank 0; its MtlError (or OSError) raised on every rank. ``share``: its value is broadcast
    too (else the other ranks get None: a value that cannot travel, a lock)."""
    value, error = None, None
    if env.is_main:
        try:
            value = decide()
        except MtlError as exc:
            error = str(exc)
        except OSError as exc:
            error = os_error_line(exc)
    value, error = broadcast_object((value if share else None, error))  # type: ignore[misc]
    if error is not None:
        raise MtlError(error)
    return value


class Ownership:
    """Rank 0's lock on the run folder (the other ranks hold nothing); ``release`` on every way out."""

    def __init__(self, held: lock.RunLock | None):
        self.held = held

    def release(self) -> None:
        if self.held is not None:
            self.held.release()


def own_run_dir(env: DistEnv, run_dir: RunDir) -> Ownership:
    """Take the run folder before anything is written in it, or stop every rank naming who trains there."""
    held: list[lock.RunLock] = []
    decided_on_main(env, lambda: held.append(lock.take(run_dir, warn=_warn)), share=False)
    return Ownership(held[0] if held else None)


def resume_changes(env: DistEnv, cfg: Config, found: Checkpoint | None) -> ResumeChanges:
    """The settings this resume changes, decided before any model is built: refused when they make another
    experiment (unless train.resume=force); said when taken."""

    def decide() -> ResumeChanges:
        if found is None:
            return ResumeChanges()
        saved = found.state().get("config") or {}
        return check(saved, cfg, found.dir, found.tag) if saved else ResumeChanges(found.tag)

    changes: ResumeChanges = decided_on_main(env, decide)  # type: ignore[assignment]
    if env.is_main and changes.of(SETTING):
        _say(f"resuming {changes.tag} with changed settings: {changes.summary(SETTING)}")
    return changes


def take_optim_settings(ds: Any, cfg: Config) -> None:
    """Each parameter group's lr, weight decay, betas and eps from ``cfg``, in place of the ones DeepSpeed
    restored with the checkpoint; the schedule continues at its step from the new base lrs."""
    from mtl.model import param_groups

    sched = ds.lr_scheduler
    groups, wanted = sched.optimizer.param_groups, param_groups(ds.module, cfg.optim)
    if len(groups) != len(wanted):
        raise MtlError(f"optim: {len(wanted)} parameter groups now, the checkpoint has {len(groups)}")
    for i, (group, want) in enumerate(zip(groups, wanted)):
        sched.base_lrs[i] = group["initial_lr"] = want["lr"]
        group.update(weight_decay=want["weight_decay"], betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        group["lr"] = want["lr"] * sched.lr_lambdas[i](sched.last_epoch)


def take_changes(env: DistEnv, changes: ResumeChanges, ds: Any, cfg: Config, run_dir: RunDir) -> None:
    """After the checkpoint is loaded: forced optimiser changes replace the loaded hyperparameters (DeepSpeed
    restored the saved ones), and the changes are recorded in the run folder and said."""
    if any(c.key.startswith("optim.") for c in changes.of(EXPERIMENT)):
        take_optim_settings(ds, cfg)
    if env.is_main and changes.of(EXPERIMENT):
        where = changes.record(run_dir)
        _say(f"train.resume=force: {changes.tag} continues with changed experiment settings: "
             f"{changes.summary(EXPERIMENT)} (recorded in {where} and as MLflow tags)")  # fmt: skip
    elif env.is_main:
        changes.record(run_dir)
