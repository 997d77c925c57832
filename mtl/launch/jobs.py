"""Queueing submitit jobs: the executor, one job or one array, and what a queued job is. `mtl submit`, sweeps and
`mtl features --array` all queue through here (and wait through mtl.launch.wait).

Each task gets the CPUs the job asked for: since Slurm 22.05 ``srun`` does not take ``--cpus-per-task`` from the
job, so the job script exports ``SRUN_CPUS_PER_TASK`` before submitit's ``srun`` line, and a ``MASTER_PORT``
outside the ephemeral port range (slurm/train.sbatch does the same).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtl.config import Config
from mtl.errors import MtlError
from mtl.launch.slurm_request import tasks_per_node

Printer = Callable[[str], None]


def echo(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Queued:
    """One queued job (a plain job or one element of an array) and the MLflow run it logs into, if any."""

    job: Any  # submitit.Job
    name: str
    run_id: str | None
    output_dir: str
    tracking_uri: str | None = None

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    @property
    def task0(self) -> Any:
        return self.job.task(0)


def array_id(queued: Sequence[Queued]) -> str:
    """The array's own id (``123`` of ``123_0``, ``123_1``...)."""
    return queued[0].job_id.split("_")[0]


def last_line(exc: BaseException) -> str:
    """The part of an sbatch failure worth showing (submitit's message ends with sbatch's own error)."""
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def slug(text: str, limit: int) -> str:
    """``text`` as a job or directory name: runs of other characters than ``A-Za-z0-9._=+-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)[:limit]


def job_name(name: str) -> str:
    return "mtl-" + slug(name, 60)


def task_setup(cpus_per_task: int) -> list[str]:
    """Lines of the job script before its ``srun``: the task's CPUs for srun (Slurm >= 22.05 no longer passes
    ``--cpus-per-task`` on), and a rendezvous port from the job id outside the ephemeral range (submitit would
    draw one from 20000-60000; mtl.engine.distributed.master_port)."""
    return [
        f"export SRUN_CPUS_PER_TASK={cpus_per_task}",
        "export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}",
    ]


def make_executor(cfg: Config, partition: str, name: str) -> Any:
    """submitit's AutoExecutor for SLURM with the slurm.* section of the config."""
    import submitit

    s = cfg.slurm
    executor = submitit.AutoExecutor(folder=Path(s.folder), cluster="slurm")
    params: dict[str, Any] = {
        "name": job_name(name),
        "nodes": s.nodes,
        "tasks_per_node": tasks_per_node(cfg),
        "cpus_per_task": s.cpus_per_task,
        "timeout_min": s.time_min,
        "slurm_partition": partition,
        "slurm_signal_delay_s": s.signal_delay_s,
        # explicit, for clusters whose JobRequeue default is 0: our own `scontrol requeue` needs it
        "slurm_additional_parameters": {"requeue": True},
        "slurm_setup": task_setup(s.cpus_per_task),
    }
    if s.gpus_per_node:  # no --gpus-per-node at all on CPU partitions (clusters without GRES reject =0)
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb is not None:
        params["mem_gb"] = s.mem_gb
    executor.update_parameters(**params)
    return executor


def queue(
    cfg: Config, partition: str, name: str, fn: Callable[..., Any], calls: Sequence[tuple], *, array: bool
) -> list[Any]:
    """``fn(*call)`` for each call, with the executor of ``cfg``'s slurm.* section: one job array (``array``; its
    elements are ``<id>_<i>``), else one plain job (one call). MtlError with sbatch's own reason when sbatch (or
    submitit, before it) refuses."""
    try:
        executor = make_executor(cfg, partition, name)
        if not array:
            (call,) = calls
            return [executor.submit(fn, *call)]
        with executor.batch():
            jobs = [executor.submit(fn, *call) for call in calls]
        return jobs
    except Exception as exc:
        raise MtlError(f"sbatch refused the job{' array' if array else ''}: {last_line(exc)}") from exc
