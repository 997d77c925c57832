"""What a SLURM partition offers, as ``scontrol show partition/node`` report it, and whether a request fits.

Many clusters (and SLURM's default, ``EnforcePartLimits=NO``) queue a request that no node of the partition can
satisfy; it then pends (``PartitionConfig``, ``PartitionNodeLimit``, ...) forever. `mtl submit` asks here first
and refuses such a request, naming the limit and what the partition has. The nodes' configured sizes count, not
their current state: a node that is down now may come back (a pending job waiting for it is mtl.launch.submit's
business).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from mtl.errors import MtlError
from mtl.launch.cluster import scontrol_records


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    gpus: int
    mem_mb: int  # RealMemory; 1 where the cluster does not configure it (SLURM's default)


@dataclass(frozen=True)
class Partition:
    name: str
    nodelist: str  # as SLURM writes it, e.g. node[1-2]
    nodes: tuple[Node, ...]
    max_nodes: int | None  # None: unlimited
    max_time_min: int | None
    max_cpus_per_node: int | None
    max_mem_per_node_mb: int | None

    def offers(self) -> str:
        """``2 node(s) (node[1-2]): node1, node2 with 2 CPUs, 0 GPUs, 10847 MB each; time limit unlimited``"""
        groups: dict[tuple[int, int, int], list[str]] = defaultdict(list)
        for n in self.nodes:
            groups[(n.cpus, n.gpus, n.mem_mb)].append(n.name)
        kinds = "; ".join(
            f"{', '.join(names)} with {c} CPUs, {g} GPUs, {m} MB each" for (c, g, m), names in groups.items()
        )
        limits = [f"time limit {_minutes(self.max_time_min)}"]
        if self.max_nodes is not None:
            limits.append(f"at most {self.max_nodes} node(s) per job")
        if self.max_cpus_per_node is not None:
            limits.append(f"at most {self.max_cpus_per_node} CPUs per node")
        if self.max_mem_per_node_mb is not None:
            limits.append(f"at most {self.max_mem_per_node_mb} MB per node")
        return f"{len(self.nodes)} node(s) ({self.nodelist}): {kinds}; {', '.join(limits)}"


def _minutes(value: int | None) -> str:
    return "unlimited" if value is None else f"{value} min"


_UNLIMITED = {"UNLIMITED", "INFINITE", "NONE", "N/A", ""}


def _limit(value: str | None) -> int | None:
    if value is None or value.upper() in _UNLIMITED:
        return None
    return int(value)


def parse_time_min(value: str | None) -> int | None:
    """SLURM's time format (``30``, ``1:30:00``, ``2-00:00:00``, ``UNLIMITED``) in whole minutes."""
    if value is None or value.upper() in _UNLIMITED:
        return None
    days, _, clock = value.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        h, m, s = parts
    elif len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:  # MM:SS
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = 0, parts[0], 0
    return int(days or 0) * 1440 + h * 60 + m + (1 if s else 0)


def gres_gpus(gres: str | None) -> int:
    """GPUs in a node's ``Gres`` (``gpu:4``, ``gpu:a100:4(S:0-1),shard:8``; ``(null)``: none)."""
    total = 0
    for item in (gres or "").split(","):
        fields = re.sub(r"\(.*?\)", "", item).split(":")
        if fields[0] == "gpu" and len(fields) >= 2 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def partition_info(name: str) -> Partition:
    """The partition's limits and its nodes' sizes, from ``scontrol show partition`` and ``scontrol show node``."""
    records = scontrol_records(["show", "partition", name])
    if not records:
        raise MtlError(f"scontrol knows no partition '{name}'")
    p = records[0]
    nodelist = p.get("Nodes", "")
    nodes = []
    if nodelist and nodelist != "(null)":
        for r in scontrol_records(["show", "node", nodelist]):
            cpus = r.get("CPUEfctv") or r.get("CPUTot") or "0"
            nodes.append(Node(r["NodeName"], int(cpus), gres_gpus(r.get("Gres")), int(r.get("RealMemory", "1"))))
    return Partition(
        name=name,
        nodelist=nodelist,
        nodes=tuple(nodes),
        max_nodes=_limit(p.get("MaxNodes")),
        max_time_min=parse_time_min(p.get("MaxTime")),
        max_cpus_per_node=_limit(p.get("MaxCPUsPerNode")),
        max_mem_per_node_mb=_limit(p.get("MaxMemPerNode")),
    )


@dataclass(frozen=True)
class Request:
    """One job's request per node, as `mtl submit` would pass it to sbatch."""

    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    gpus_per_node: int
    mem_mb: int | None
    time_min: int

    @property
    def cpus_per_node(self) -> int:
        return self.tasks_per_node * self.cpus_per_task


def misfit(req: Request, part: Partition) -> str | None:
    """Why ``req`` can never start in ``part`` (the first reason found), or None if it fits."""
    p = part.name
    if not part.nodes:
        return f"partition {p} has no nodes"
    if part.max_time_min is not None and req.time_min > part.max_time_min:
        return f"slurm.time_min={req.time_min} is over partition {p}'s time limit of {part.max_time_min} min"
    if req.nodes > len(part.nodes):
        return f"slurm.nodes={req.nodes}, but partition {p} has {len(part.nodes)} node(s)"
    if part.max_nodes is not None and req.nodes > part.max_nodes:
        return f"slurm.nodes={req.nodes} is over partition {p}'s limit of {part.max_nodes} node(s) per job"
    cpus = (
        f"slurm.cpus_per_task={req.cpus_per_task} x {req.tasks_per_node} task(s) per node = "
        f"{req.cpus_per_node} CPUs per node"
    )
    if part.max_cpus_per_node is not None and req.cpus_per_node > part.max_cpus_per_node:
        return f"{cpus} is over partition {p}'s limit of {part.max_cpus_per_node} CPUs per node"
    if req.mem_mb is not None and part.max_mem_per_node_mb is not None and req.mem_mb > part.max_mem_per_node_mb:
        return f"slurm.mem_gb={req.mem_mb // 1024} is over partition {p}'s limit of {part.max_mem_per_node_mb} MB"
    checks = [
        (f"{cpus}", lambda n: n.cpus >= req.cpus_per_node, max(n.cpus for n in part.nodes), "CPUs"),
        (f"slurm.gpus_per_node={req.gpus_per_node}", lambda n: n.gpus >= req.gpus_per_node,
         max(n.gpus for n in part.nodes), "GPUs"),
    ]  # fmt: skip
    if req.mem_mb is not None:
        checks.append(
            (f"slurm.mem_gb={req.mem_mb // 1024}", lambda n: n.mem_mb >= req.mem_mb,
             max(n.mem_mb for n in part.nodes), "MB of memory"),
        )  # fmt: skip
    for what, fits, most, unit in checks:
        k = sum(fits(n) for n in part.nodes)
        if k == 0:
            return f"{what}, but partition {p}'s nodes have at most {most} {unit}"
        if k < req.nodes:
            return f"{what}, but only {k} of partition {p}'s nodes have that many ({req.nodes} needed)"
    if sum(all(fits(n) for _, fits, _, _ in checks) for n in part.nodes) < req.nodes:
        return f"no {req.nodes} node(s) of partition {p} have all of: {', '.join(c[0] for c in checks)}"
    return None


def check_fits(req: Request, partition: str) -> None:
    """Refuse, before anything is queued, a request that the partition's nodes or limits can never run."""
    part = partition_info(partition)
    why = misfit(req, part)
    if why is not None:
        raise MtlError(f"the job could never start: {why}. Partition {partition} offers {part.offers()}")
