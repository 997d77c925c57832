"""The few SLURM command-line calls the launcher needs, each turning a missing tool or a bad answer into MtlError.

Job states here come from the controller, ``squeue --states=all`` (live, needs no accounting database, and sees
finished jobs for ``MinJobAge`` seconds), then from ``sacct`` where the cluster keeps accounting. Waiting on jobs
queued through submitit reads submitit's own watcher first (mtl.launch.wait); these are for the cases it does not
cover: a cluster without accounting, and a job's own decision whether SLURM still has it RUNNING.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

from mtl.errors import MtlError

# States in which a job may still run (again): keep waiting. Everything else is final.
ACTIVE_STATES = frozenset(
    {
        "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
        "RESIZING", "SUSPENDED", "PREEMPTED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
    }
)  # fmt: skip


def _run(cmd: list[str], timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    except FileNotFoundError:
        raise MtlError(f"'{cmd[0]}' not found on PATH: is this a SLURM login node?") from None
    except subprocess.TimeoutExpired:
        raise MtlError(f"'{' '.join(cmd)}' did not answer within {timeout:.0f} s: is slurmctld up?") from None


def require_sbatch() -> str:
    """Path of ``sbatch``; a clear error where there is none (a laptop, a container without SLURM)."""
    path = shutil.which("sbatch")
    if path is None:
        raise MtlError(
            "sbatch not found on PATH: `mtl submit` needs a SLURM login node "
            "(for a one-machine cluster: sudo tools/slurm-local.sh up; without SLURM use `mtl train`)"
        )
    if shutil.which("srun") is None:
        raise MtlError("srun not found on PATH (sbatch is there): the SLURM client tools are incomplete")
    return path


def partitions() -> tuple[list[str], str | None]:
    """(partition names, the default one) as ``sinfo`` reports them."""
    proc = _run(["sinfo", "--noheader", "--format=%P"])
    if proc.returncode != 0:
        raise MtlError(f"sinfo failed ({proc.stderr.strip() or proc.returncode}): is slurmctld up?")
    names, default = [], None
    for line in proc.stdout.split():
        name = line.strip()
        if name.endswith("*"):
            name = name[:-1]
            default = name
        if name and name not in names:
            names.append(name)
    return names, default


def check_partition(partition: str | None) -> str:
    """The partition a job will go to; an error naming the valid ones if it does not exist."""
    names, default = partitions()
    if partition is None:
        if default is None:
            raise MtlError(f"no default SLURM partition: pass --partition (one of: {', '.join(names) or 'none'})")
        return default
    if partition not in names:
        raise MtlError(f"unknown SLURM partition '{partition}' (partitions here: {', '.join(names) or 'none'})")
    return partition


def scontrol_records(args: list[str]) -> list[dict[str, str]]:
    """``scontrol -o <args>``: one ``Key=Value`` dict per line (a partition, a node, a job)."""
    proc = _run(["scontrol", "-o", *args])
    if proc.returncode != 0:
        raise MtlError(f"scontrol {' '.join(args)} failed: {proc.stderr.strip() or proc.returncode}")
    records = []
    for line in proc.stdout.splitlines():
        record: dict[str, str] = {}
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep:
                record.setdefault(key, value)
        if record:
            records.append(record)
    return records


def job_record(job_id: str) -> dict[str, str]:
    """``scontrol show job``: JobState, Reason, NumNodes, Partition, ... ({} when SLURM no longer knows it)."""
    try:
        records = scontrol_records(["show", "job", job_id])
    except MtlError:
        return {}
    return records[0] if records else {}


def node_states(partition: str) -> dict[str, str]:
    """``{node: state}`` of a partition's nodes, lower case (``idle``, ``drained``, ``down``...), flags stripped."""
    proc = _run(["sinfo", "--noheader", "--Node", f"--partition={partition}", "--format=%N %T"])
    states = {}
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1].lower().rstrip("*~#!%$@^-")
    return states


def cancel(job_id: str) -> None:
    proc = _run(["scancel", job_id])
    if proc.returncode != 0:
        raise MtlError(f"scancel {job_id} failed: {proc.stderr.strip() or proc.returncode}")


@functools.cache
def has_accounting() -> bool:
    """Whether ``sacct`` can answer: the cluster stores accounting (``AccountingStorageType`` is not
    ``accounting_storage/none``; without it sacct fails with "Slurm accounting storage is disabled")."""
    try:
        proc = _run(["scontrol", "show", "config"])
    except MtlError:
        return False
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        key, _, value = line.partition("=")
        if key.strip() == "AccountingStorageType":
            return value.strip() not in ("", "accounting_storage/none")
    return False


def job_states(job_ids: list[str]) -> dict[str, str | None]:
    """SLURM state of jobs or array elements (``123`` or ``123_4``), one squeue call for all of them; None for a
    job SLURM no longer knows (sacct asked for those where the cluster keeps accounting)."""
    states: dict[str, str | None] = dict.fromkeys(job_ids)
    if not job_ids:
        return states
    proc = _run(["squeue", "--noheader", "--array", "--states=all", f"--jobs={','.join(job_ids)}", "--format=%i %T"])
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        parts = line.split()
        if len(parts) == 2 and parts[0] in states:
            states[parts[0]] = parts[1]
    missing = [j for j, s in states.items() if s is None]
    if missing and has_accounting():
        proc = _run(["sacct", "--noheader", "--parsable2", "--format=JobID,State", f"--jobs={','.join(missing)}"])
        for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
            jid, _, state = line.partition("|")
            if jid in states and states[jid] is None and state:
                states[jid] = state.split()[0]  # "CANCELLED by 0" -> "CANCELLED"
    return states


def job_state(job_id: str) -> str | None:
    """SLURM state of one job or array element, or None when SLURM no longer knows it."""
    return job_states([job_id])[job_id]


def sbatch(args: list[str]) -> str:
    """``sbatch --parsable ARGS``: the new job's id. From inside a job, that job's own SLURM_* variables (which
    sbatch would read as requests) are not passed on."""
    require_sbatch()
    env = None
    if "SLURM_JOB_ID" in os.environ:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    proc = _run(["sbatch", "--parsable", *args], env=env)
    job_id = proc.stdout.strip().split(";")[0]
    if proc.returncode != 0 or not job_id.isdigit():
        lines = proc.stderr.strip().splitlines()
        raise MtlError(f"sbatch failed: {lines[-1] if lines else proc.returncode}")
    return job_id


def requeue(job_id: str) -> None:
    proc = _run(["scontrol", "requeue", job_id])
    if proc.returncode != 0:
        raise MtlError(f"scontrol requeue {job_id} failed: {proc.stderr.strip() or proc.returncode}")
