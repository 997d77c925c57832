"""The one preemption/requeue protocol of both SLURM launchers: `mtl submit` (submitit) and slurm/train.sbatch.

SLURM sends USR2 (``--signal=USR2@<seconds>``) before a time limit or a preemption to every task; the engine's
handler makes all ranks finish the step, save a checkpoint together and return "preempted". Then global rank 0
requeues the job with ``scontrol requeue``, but only while SLURM still has it RUNNING: after ``scancel`` (a user's
SIGTERM) the job stays cancelled, and after ``scontrol requeue`` or SLURM's own preemption SLURM requeues it
itself. At most ``slurm.max_requeue`` times. The requeued job runs the same command; ``train.resume=auto`` finds
the last complete checkpoint in ``train.output_dir`` and the MLflow run id it carries, so the step count and the
run continue.

Every task of a preempted job ends with ``SystemExit(EXIT_PREEMPTED)``: submitit then writes no result file (so
``mtl submit --wait`` keeps waiting for the requeued job) and a bare ``srun`` step ends with that status.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from mtl.config import Config
from mtl.engine.preemption import EXIT_PREEMPTED
from mtl.errors import MtlError
from mtl.launch import cluster

if TYPE_CHECKING:  # the trainer (torch, DeepSpeed) is imported in the job, not on the login node
    from mtl.engine.trainer import TrainResult


def log(msg: str) -> None:
    print(f"mtl: {msg}", file=sys.stderr, flush=True)


def restart_count() -> int:
    """How often SLURM has started this job before (0 on the first run)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def slurm_job_id() -> str:
    """This job's id as squeue and scontrol name it (``123``, or ``123_4`` for an array element); submitit's
    ``JobEnvironment().job_id`` is the same."""
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and index:
        return f"{array}_{index}"
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise MtlError("SLURM_JOB_ID is not set: this runs inside a SLURM job (outside one use `mtl train`)")
    return job_id


def requeue_if_running(job_id: str, restarts: int, max_requeue: int, step: int) -> None:
    """After the checkpoint at ``step``: requeue the job unless SLURM already ends or requeues it, or the cap is
    reached (an error: the user has to submit again)."""
    state = cluster.job_state(job_id)
    if state != "RUNNING":
        log(f"checkpoint saved at step {step}; job {job_id} is {state}: not requeued by mtl")
        return
    if restarts >= max_requeue:
        raise MtlError(
            f"checkpoint saved at step {step}, but job {job_id} was already requeued {restarts} times "
            f"(slurm.max_requeue={max_requeue}); submit again with the same train.output_dir to continue"
        )
    cluster.requeue(job_id)
    log(f"checkpoint saved at step {step}; requeued job {job_id} ({restarts + 1} of {max_requeue})")


def train_and_requeue(cfg: Config, job_id: str, global_rank: int) -> TrainResult:
    """`train(cfg)` in one task of a SLURM job: its result when the run ended; after a preemption, rank 0
    requeues the job and every task raises ``SystemExit(EXIT_PREEMPTED)``."""
    from mtl.engine.trainer import train

    result = train(cfg)
    if result.status != "preempted":
        return result
    if global_rank == 0:
        requeue_if_running(job_id, restart_count(), cfg.slurm.max_requeue, result.step)
    raise SystemExit(EXIT_PREEMPTED)
