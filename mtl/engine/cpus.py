"""Each rank uses the CPUs its task was given, and no more: torch's threads and the loader's workers.

Where SLURM starts each rank as a task, the task has ``--cpus-per-task`` CPUs (``SLURM_CPUS_PER_TASK``; with
SLURM's task/affinity or task/cgroup plugin also its affinity mask). torch sizes its thread pool from the machine,
not from the task, so 8 ranks of a 64-core node would each start 64 threads. Where torchrun or accelerate start
the ranks, the CPUs this process may use are shared by the ``LOCAL_WORLD_SIZE`` ranks it started. This runs
before the trainer starts (mtl.engine.trainer.train), whatever the launcher.
"""

from __future__ import annotations

import os
import sys

import torch

from mtl.config import Config, replace


def rank_cpus() -> int:
    """How many CPUs this rank may use: its affinity mask, at most SLURM's per-task count, shared by the ranks a
    torchrun-style launcher started in this task."""
    cpus = len(os.sched_getaffinity(0))
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit():  # SLURM without CPU binding (task/none) leaves the whole node in the mask
        cpus = min(cpus, int(per_task))
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun, accelerate launch: ranks are processes of one task
        cpus //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cpus)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_list(cpus: set[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``0-2,5`` (as taskset and SLURM write CPU lists)."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def fit_to_cpus(cfg: Config) -> Config:
    """Cap torch's threads at this rank's CPUs, and ``data.num_workers`` at them too (a warning from rank 0 when
    that lowers it): loader workers never ask for more CPUs than the task has. In a SLURM job each rank logs what
    it got, so a job's logs show its CPU layout."""
    cpus = rank_cpus()
    if torch.get_num_threads() > cpus:
        torch.set_num_threads(cpus)
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    workers = min(cfg.data.num_workers, cpus)
    if workers < cfg.data.num_workers and rank == "0":
        _log(f"mtl train: warning: data.num_workers={cfg.data.num_workers} is more than this rank's {cpus} CPU(s): "
             f"using {cpus} (ask for more CPUs per task, e.g. slurm.cpus_per_task)")  # fmt: skip
    if "SLURM_JOB_ID" in os.environ:
        _log(f"mtl: rank {rank}: {cpus} CPU(s) (affinity {cpu_list(os.sched_getaffinity(0))}), torch threads "
             f"{torch.get_num_threads()}, data.num_workers {workers}")  # fmt: skip
    if workers == cfg.data.num_workers:
        return cfg
    return replace(cfg, data=replace(cfg.data, num_workers=workers))
