"""`mtl submit`: validate on the login node, create the MLflow run, queue one submitit job, optionally wait.

The MLflow run is made here (mtl.tracking.runs), before the job is queued, so its id can be printed next to the
job id and passed to the job (``tracking.run_id``); a requeued job carries the same config and so logs into the
same run. If sbatch refuses the job, the run made for it is ended FAILED; if the job ends without having ended
its run (cancelled before it started, killed), the run watcher queued next to it (mtl.launch.watch) ends it,
KILLED or FAILED, and so does ``--wait`` when it sees the job end.

``--wait`` also gives up on a job that pends for a reason that cannot resolve itself (the request exceeds the
partition, the nodes it needs are drained): it cancels the job and says why, instead of waiting for ever.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtl.config import Config, replace, to_dict
from mtl.errors import MtlError
from mtl.launch import cluster
from mtl.launch.prepare import check_inputs, existing_run_id
from mtl.launch.slurm_request import check_request, load_for_submit, tasks_per_node
from mtl.launch.watch import queue_watcher
from mtl.tracking.runs import end_runs, open_run, tag_run

Printer = Callable[[str], None]


def echo(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Queued:
    """One queued training job (a plain job or one element of an array)."""

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


# --------------------------------------------------------------------------------------------- executor


def last_line(exc: BaseException) -> str:
    """The part of an sbatch failure worth showing (submitit's message ends with sbatch's own error)."""
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def slug(text: str, limit: int) -> str:
    """``text`` as a job or directory name: runs of other characters than ``A-Za-z0-9._=+-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)[:limit]


def job_name(name: str) -> str:
    return "mtl-" + slug(name, 60)


def make_executor(cfg: Config, partition: str, name: str) -> Any:
    """submitit's AutoExecutor for SLURM with the slurm.* section of the config."""
    import submitit

    s = cfg.slurm
    folder = Path(s.folder)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
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
    }
    if s.gpus_per_node:  # no --gpus-per-node at all on CPU partitions (clusters without GRES reject =0)
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb is not None:
        params["mem_gb"] = s.mem_gb
    executor.update_parameters(**params)
    return executor


# --------------------------------------------------------------------------------------------- waiting


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
) -> list:
    """Block until every job has ended, printing state changes; SLURM's state, not only submitit's files, so a
    job killed before writing a result (node failure, scancel) ends the wait too. A job that pends for a reason
    that cannot resolve itself is cancelled. Runs of jobs that ended without ending them are ended here."""
    pending = {q.job_id: q for q in queued}
    states: dict[str, str | None] = {}
    ended_at: dict[str, float] = {}
    pending_since: dict[str, float] = {}
    outcomes: dict[str, Outcome] = {}
    while pending:
        for job_id, q in list(pending.items()):
            state = cluster.job_state(job_id)
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


def watch(cfg: Config, queued: Sequence[Queued], partition: str, out: Printer = echo) -> None:
    """Queue the run watcher of these jobs (slurm.watch_runs), or say why their runs are not watched."""
    pairs = [(q.job_id, q.run_id) for q in queued if q.run_id and q.tracking_uri]
    if not pairs or not cfg.slurm.watch_runs:
        return
    try:
        watcher = queue_watcher(pairs, cfg.tracking.uri, partition, Path(queued[0].task0.paths.folder))
    except MtlError as exc:
        out(f"  watcher not queued ({exc}): a job cancelled before it starts leaves its run RUNNING")
        return
    for _, run_id in pairs:
        tag_run(cfg.tracking.uri, run_id, {"submit.watcher_job_id": watcher})
    out(f"  watcher job {watcher} ends the run(s) their job leaves RUNNING (cancelled before it starts, killed)")


def report(q: Queued, o: Outcome, out: Printer = echo) -> None:
    if o.ok and o.result:
        r = o.result
        out(f"job {q.job_id} ({q.name}): completed at step {r['step']}, MLflow run {r['run_id']}")
    else:
        out(f"job {q.job_id} ({q.name}): {o.state}\n  " + o.detail.replace("\n", "\n  "))


# --------------------------------------------------------------------------------------------- submit


def describe(cfg: Config, partition: str) -> str:
    s = cfg.slurm
    gpus = f", {s.gpus_per_node} GPU(s) per node" if s.gpus_per_node else ", CPU only"
    return (
        f"partition {partition}: {s.nodes} node(s) x {tasks_per_node(cfg)} task(s){gpus}, "
        f"{s.cpus_per_task} CPU(s) per task, {s.time_min} min"
    )


def submit(
    config: str | Path | None,
    overrides: list[str],
    flags: dict[str, object],
    wait: bool = False,
    out: Printer = echo,
) -> int:
    """`mtl submit` without a sweep. Returns the exit status (the job's, with ``wait``)."""
    from mtl.launch.task import TrainTask

    cfg = load_for_submit(config, overrides, flags)
    partition = check_request(cfg)
    check_inputs(cfg)
    name = cfg.tracking.run_name or "mtl"  # load_config named it after the config file and overrides (mtl.naming)
    run_id, made = open_run(cfg.tracking, name, {"mtl.launcher": "submitit"}, existing_run_id(cfg))
    cfg = replace(cfg, tracking=replace(cfg.tracking, run_id=run_id))
    try:
        executor = make_executor(cfg, partition, name)
        job = executor.submit(TrainTask(), to_dict(cfg))
    except Exception as exc:
        error = MtlError(f"sbatch refused the job: {last_line(exc)}")
        if made:
            end_runs(cfg.tracking.uri, [run_id], "FAILED", str(error))
        raise error from exc
    q = Queued(job, name, run_id, cfg.train.output_dir, cfg.tracking.uri if run_id else None)
    t0 = q.task0
    tag_run(cfg.tracking.uri, run_id, {"submit.job_id": q.job_id, "submit.stdout": str(t0.paths.stdout)})
    out(f"submitted job {q.job_id} ({describe(cfg, partition)})")
    out(f"  stdout  {t0.paths.stdout}")
    out(f"  stderr  {t0.paths.stderr}")
    if run_id:
        how = "new" if made else "continuing"
        out(f"  mlflow  {how} run {run_id} (experiment '{cfg.tracking.experiment}') in {cfg.tracking.uri}")
    out(f"  output  {cfg.train.output_dir}")
    watch(cfg, [q], partition, out)
    if not wait:
        return 0
    (o,) = wait_all([q], out)
    report(q, o, out)
    return 0 if o.ok else 1
