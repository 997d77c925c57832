"""Waiting for queued jobs: their SLURM states, what became of each, and giving up on a job that cannot start.

States come from submitit's watcher (``job.watcher``: one ``sacct`` call for every job this process queued) where
the cluster keeps accounting. Without accounting storage (``AccountingStorageType=accounting_storage/none``, as on
the local cluster of tools/slurm-local.sh) sacct fails, submitit logs a warning on every refresh and reports
``UNKNOWN``; there, and for a job sacct does not list yet, the controller's queue (``squeue``) answers. Whether a
job finished is its rank 0's result file, as ``job.done()`` reads it.

A job that pends for a reason that cannot resolve itself (the request exceeds the partition, the nodes it needs are
drained) is cancelled, with the reason, instead of being waited for ever.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtl.launch import cluster
from mtl.launch.jobs import Printer, Queued, echo
from mtl.tracking.runs import end_runs


def read_states(queued: Sequence[Queued]) -> dict[str, str | None]:
    """``{job id: SLURM state}`` of the queued jobs now (None: SLURM no longer knows the job)."""
    states: dict[str, str | None] = {}
    if queued and cluster.has_accounting():
        watcher = queued[0].job.watcher
        watcher.update()  # one sacct call for all of them (submitit's own refresh is up to 10 min apart)
        for q in queued:
            state = watcher.get_state(q.job_id, mode="cache")
            if state != "UNKNOWN":
                states[q.job_id] = state.split()[0]  # "CANCELLED by 0" -> "CANCELLED"
    missing = [q.job_id for q in queued if q.job_id not in states]
    states.update(cluster.job_states(missing))
    return states


@dataclass
class Outcome:
    state: str  # COMPLETED, or why not: FAILED (raised; detail has the error), CANCELLED, TIMEOUT, ...
    result: dict[str, Any] | None
    detail: str

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED"


def _tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def outcome(q: Queued, state: str | None) -> Outcome:
    """What happened to a job that SLURM says is over (or that wrote its result)."""
    t0 = q.task0
    if t0.paths.result_pickle.exists():
        try:
            result = t0.result()
        except Exception as exc:  # the job raised: submitit's message carries the traceback
            lines = [ln for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("---")]
            return Outcome("FAILED", None, "\n".join(lines[-12:]))
        if state not in (None, "COMPLETED"):  # rank 0 is done, but another rank failed or was killed
            return Outcome(state, result, f"rank 0 finished; see the other ranks' logs in {t0.paths.folder}")
        return Outcome("COMPLETED", result, "")
    detail = _tail(t0.paths.stderr) or f"no output; see {t0.paths.stdout}"
    return Outcome(state or "UNKNOWN", None, detail)


# PENDING reasons that waiting does not resolve: the request exceeds the partition (changed since `mtl submit`
# checked it, or a limit it cannot see), or the account/QOS may not use it. Missing nodes: see _nodes_gone.
HOPELESS_REASONS = {
    "PartitionConfig": "the request exceeds what the partition's nodes have",
    "PartitionNodeLimit": "the node count is outside the partition's limits",
    "PartitionTimeLimit": "the time limit is over the partition's",
    "PartitionInactive": "the partition takes no jobs",
    "BadConstraints": "no node has the requested features and sizes",
    "InvalidAccount": "the account is not valid",
    "InvalidQOS": "the QOS is not valid",
    "AccountNotAllowed": "the account may not use the partition",
    "QOSNotAllowed": "the QOS may not use the partition",
    "DependencyNeverSatisfied": "its dependency can never be satisfied",
}  # fmt: skip


def _never_back(state: str) -> bool:
    """Drained or failed nodes wait for an administrator; a down node returns when its slurmd registers."""
    return "drain" in state or state.startswith(("fail", "inval"))


def _nodes_gone(record: dict[str, str], since: dict[str, float], down_grace_s: float) -> str | None:
    """Why the job's partition will not have enough nodes for it (ReqNodeNotAvail, "Nodes required for job are
    DOWN, DRAINED ..."), or None: fewer nodes than it needs that are not drained or failed, or fewer that are not
    also down, for longer than ``down_grace_s``."""
    job_id, partition = record.get("JobId", ""), record.get("Partition", "")
    m = re.match(r"\d+", record.get("NumNodes", ""))
    if not partition or m is None:
        return None
    needed = int(m.group())
    states = {}
    for part in partition.split(","):
        states.update(cluster.node_states(part))
    if not states:
        return None
    never = sorted(n for n, s in states.items() if _never_back(s))
    down = sorted(n for n, s in states.items() if s.startswith("down") and n not in never)
    left = len(states) - len(never)
    listed = ", ".join(f"{n} {states[n]}" for n in [*never, *down])
    if left < needed:
        return f"it needs {needed} node(s); partition {partition} has {left} not drained or failed ({listed})"
    if left - len(down) < needed:
        first = since.setdefault(job_id, time.monotonic())
        if time.monotonic() - first > down_grace_s:
            return f"it needs {needed} node(s) and the others of partition {partition} stayed down ({listed})"
    else:
        since.pop(job_id, None)
    return None


def _hopeless(job_id: str, since: dict[str, float], down_grace_s: float) -> str | None:
    """Why a PENDING job will never start, or None while it may."""
    record = cluster.job_record(job_id)
    if record.get("JobState") != "PENDING":
        return None
    reason = record.get("Reason", "").replace("_", " ")
    key = reason.split(",")[0].strip()
    if key in HOPELESS_REASONS:
        return f"{key}: {HOPELESS_REASONS[key]}"
    gone = _nodes_gone(record, since, down_grace_s)
    return f"{reason}: {gone}" if gone else None


def wait_all(
    queued: Sequence[Queued],
    out: Printer = echo,
    poll_s: float = 2.0,
    grace_s: float = 20.0,
    down_grace_s: float = 300.0,
) -> list[Outcome]:
    """Block until every job has ended, printing state changes; SLURM's state (read_states), not only submitit's
    files, so a job killed before writing a result (node failure, scancel) ends the wait too. A job that pends for
    a reason that cannot resolve itself is cancelled. Runs of jobs that ended without ending them are ended here."""
    pending = {q.job_id: q for q in queued}
    states: dict[str, str | None] = {}
    ended_at: dict[str, float] = {}
    pending_since: dict[str, float] = {}
    outcomes: dict[str, Outcome] = {}
    while pending:
        now = read_states(list(pending.values()))
        for job_id, q in list(pending.items()):
            state = now[job_id]
            if state != states.get(job_id, "-"):
                out(f"job {job_id} ({q.name}): {state or 'gone from the queue'}")
                states[job_id] = state
            why = _hopeless(job_id, pending_since, down_grace_s) if state == "PENDING" else None
            if why is not None:
                cluster.cancel(job_id)
                outcomes[job_id] = Outcome(
                    "CANCELLED", None, f"it pended for a reason that does not resolve itself ({why}); cancelled it"
                )
            elif state in cluster.ACTIVE_STATES:  # (rank 0 may have its result while the others still finish)
                ended_at.pop(job_id, None)
                continue
            else:
                ended_at.setdefault(job_id, time.monotonic())
                # rank 0's result (a preempted rank 0 writes none), else a grace period for it to appear
                if not q.task0.paths.result_pickle.exists() and time.monotonic() - ended_at[job_id] <= grace_s:
                    continue
                outcomes[job_id] = outcome(q, state)
            o = outcomes[job_id]
            if not o.ok and q.tracking_uri:
                status = "KILLED" if o.state in ("CANCELLED", "PREEMPTED", "TIMEOUT") else "FAILED"
                end_runs(q.tracking_uri, [q.run_id], status, f"job {job_id} {o.state}: {o.detail}")
            del pending[job_id]
        if pending:
            time.sleep(poll_s)
    return [outcomes[q.job_id] for q in queued]


def failure(q: Queued, o: Outcome) -> str:
    """``job 123 (name): STATE`` and the detail, indented: how a job that did not complete is reported."""
    return f"job {q.job_id} ({q.name}): {o.state}\n  " + o.detail.replace("\n", "\n  ")
