"""What every SLURM task of a submitit job runs: torch.distributed from the job environment, then `train`.

Preemption and requeue follow mtl.launch.requeue, the same code as slurm/train.sbatch's tasks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


class TrainTask:
    """Picklable callable for ``executor.submit(TrainTask(), cfg_dict)``; the config travels as a plain dict."""

    def __call__(self, cfg_dict: dict[str, Any]) -> dict[str, Any]:
        import submitit

        from mtl.config import from_dict
        from mtl.launch.requeue import log, restart_count, train_and_requeue

        cfg = from_dict(cfg_dict)  # validated on the login node already; cheap, and catches version skew
        job_env = submitit.JobEnvironment()
        # CUDA_VISIBLE_DEVICES stays as SLURM set it: every GPU of the node for every task (mtl.device picks
        # cuda:LOCAL_RANK, right also where SLURM hands out GPUs 2,3 of a shared node), or the task's own one
        # (--gpus-per-task: cuda:0, and LOCAL_RANK set to 0 for DeepSpeed).
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if job_env.global_rank == 0:
            log(f"{job_env}, restart {restart_count()}, output {cfg.train.output_dir}")
        result = train_and_requeue(cfg, job_env.job_id, job_env.global_rank)
        return dataclasses.asdict(result)

    def checkpoint(self, cfg_dict: dict[str, Any]) -> Any:  # (subclasses resubmit themselves)
        """submitit's hook for a signal that comes before `train` has taken over the handlers (during start-up):
        run the same call again; it resumes from whatever checkpoint exists."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, cfg_dict)


class CvFoldTask(TrainTask):
    """A fold of `mtl cv` in a job array: train (as `TrainTask`), then, once complete, global rank 0 writes the
    fold's out-of-fold predictions (`mtl eval --split <val>` of the run, on its held-out videos) on the job's own
    device, so the login node that summarises the folds only reads them."""

    def __call__(self, cfg_dict: dict[str, Any]) -> dict[str, Any]:
        result = super().__call__(cfg_dict)
        import submitit

        if result["status"] == "completed" and submitit.JobEnvironment().global_rank == 0:
            from mtl.config import from_dict
            from mtl.evaluation.offline import run_eval
            from mtl.launch.requeue import log

            cfg = from_dict(cfg_dict)
            log(f"out-of-fold predictions of {cfg.train.output_dir} on its held-out videos")
            run_eval(Path(cfg.train.output_dir), cfg.data.val_split, None, [], device=cfg.train.device)
        return result
