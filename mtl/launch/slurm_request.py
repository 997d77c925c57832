"""The SLURM side of `mtl submit`: its flags as slurm.* keys, tasks per node, and the request checked against the
cluster (sbatch present, partition known, time limit longer than the preemption warning, the request within what
the partition's nodes and limits offer) before anything is queued.
"""

from __future__ import annotations

from pathlib import Path

from mtl.config import Config, load_config
from mtl.errors import ConfigError
from mtl.launch import cluster
from mtl.launch.partition import Request, check_fits
from mtl.launch.prepare import absolutize

# `mtl submit` flag -> the slurm.* key it sets (flags win over the config file and key=value overrides).
FLAG_KEYS = {
    "nodes": "slurm.nodes",
    "gpus_per_node": "slurm.gpus_per_node",
    "tasks_per_node": "slurm.tasks_per_node",
    "cpus_per_task": "slurm.cpus_per_task",
    "mem_gb": "slurm.mem_gb",
    "partition": "slurm.partition",
    "time": "slurm.time_min",
    "folder": "slurm.folder",
}


def flag_overrides(flags: dict[str, object]) -> list[str]:
    """``{"nodes": 2, "partition": None}`` -> ``["slurm.nodes=2"]`` (unset flags leave the config alone)."""
    return [f"{FLAG_KEYS[k]}={v}" for k, v in flags.items() if k in FLAG_KEYS and v is not None]


def tasks_per_node(cfg: Config) -> int:
    """One task per GPU; on CPU partitions slurm.tasks_per_node, else 1."""
    s = cfg.slurm
    if s.tasks_per_node is not None:
        return s.tasks_per_node
    return max(1, s.gpus_per_node)


def request(cfg: Config) -> Request:
    s = cfg.slurm
    mem_mb = None if s.mem_gb is None else s.mem_gb * 1024
    return Request(s.nodes, tasks_per_node(cfg), s.cpus_per_task, s.gpus_per_node, mem_mb, s.time_min)


def check_request(cfg: Config) -> str:
    """The SLURM side: tools present, partition known, sensible limits, a request the partition can run.
    Returns the partition used."""
    s = cfg.slurm
    if s.time_min * 60 <= s.signal_delay_s:
        raise ConfigError(
            f"slurm.time_min={s.time_min} min is not longer than slurm.signal_delay_s={s.signal_delay_s} s: "
            "the job would be told to checkpoint before it starts"
        )
    if s.gpus_per_node == 0 and s.tasks_per_node is None and s.nodes > 1:
        raise ConfigError("slurm.gpus_per_node=0 on several nodes: set slurm.tasks_per_node (--tasks-per-node)")
    cluster.require_sbatch()
    partition = cluster.check_partition(s.partition)
    check_fits(request(cfg), partition)
    return partition


def load_for_submit(config: str | Path | None, overrides: list[str], flags: dict[str, object]) -> Config:
    """Validated config with the flags applied and paths absolute; raises before anything touches SLURM."""
    cfg = load_config(config, [*overrides, *flag_overrides(flags)])
    return absolutize(cfg)
