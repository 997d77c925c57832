"""What every SLURM task of a submitit job runs: torch.distributed from the job environment, then `train`.

Preemption and time-outs: SLURM sends USR2 (``--signal=USR2@<slurm.signal_delay_s>``) to every task; the engine's
handler makes all ranks finish the step, save a checkpoint together and return "preempted". Then global rank 0
requeues the job with ``scontrol requeue``, but only while SLURM still has it RUNNING: after ``scancel`` (a user's
SIGTERM) the job stays cancelled, and after ``scontrol requeue`` or SLURM's own preemption SLURM requeues it
itself. The requeued job runs this same callable; ``train.resume=auto`` finds the last complete checkpoint in
``train.output_dir`` and the MLflow run id it carries, so the step count and the run continue.

A preempted task ends with ``SystemExit`` rather than a return value, so that submitit writes no result file and
``mtl submit --wait`` keeps waiting for the requeued job (submitit's own handler does the same).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from mtl.engine.cli import EXIT_PREEMPTED  # the sbatch templates requeue on the same code
from mtl.errors import MtlError


def _log(msg: str) -> None:
    print(f"mtl task: {msg}", file=sys.stderr, flush=True)


class TrainTask:
    """Picklable callable for ``executor.submit(TrainTask(), cfg_dict)``; the config travels as a plain dict."""

    def __call__(self, cfg_dict: dict[str, Any]) -> dict[str, Any]:
        import submitit

        from mtl.config import from_dict

        cfg = from_dict(cfg_dict)  # validated on the login node already; cheap, and catches version skew
        job_env = submitit.JobEnvironment()
        # CUDA_VISIBLE_DEVICES stays as SLURM set it (all GPUs of the node for every task): the engine picks
        # cuda:LOCAL_RANK, which is right also where SLURM hands out GPUs 2,3 of a shared node.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if job_env.global_rank == 0:
            _log(f"{job_env}, restart {restarts}, output {cfg.train.output_dir}")

        from mtl.engine.trainer import train

        result = train(cfg)
        if result.status != "preempted":
            return dataclasses.asdict(result)
        if job_env.global_rank == 0:
            self._requeue(job_env.job_id, restarts, cfg.slurm.max_requeue, result.step)
        raise SystemExit(EXIT_PREEMPTED)

    @staticmethod
    def _requeue(job_id: str, restarts: int, max_requeue: int, step: int) -> None:
        from mtl.launch import cluster

        state = cluster.job_state(job_id)
        if state != "RUNNING":
            _log(f"checkpoint saved at step {step}; job {job_id} is {state}: not requeued by mtl")
            return
        if restarts >= max_requeue:
            raise MtlError(
                f"checkpoint saved at step {step}, but job {job_id} was already requeued {restarts} times "
                f"(slurm.max_requeue={max_requeue}); submit again with the same train.output_dir to continue"
            )
        cluster.requeue(job_id)
        _log(f"checkpoint saved at step {step}; requeued job {job_id} ({restarts + 1} of {max_requeue})")

    def checkpoint(self, cfg_dict: dict[str, Any]) -> Any:
        """submitit's hook for a signal that comes before `train` has taken over the handlers (during start-up):
        run the same call again; it resumes from whatever checkpoint exists."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, cfg_dict)
