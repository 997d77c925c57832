"""`mtl submit`: validate on the login node, create the MLflow run, queue one submitit job, optionally wait.

The MLflow run is made here (mtl.tracking.runs), before the job is queued, so its id can be printed next to the
job id and passed to the job (``tracking.run_id``); a requeued job carries the same config and so logs into the
same run. If queuing fails, the run made for it is deleted again.
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
from mtl.tracking.runs import delete_runs, open_run, tag_run

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

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    @property
    def task0(self) -> Any:
        return self.job.task(0)


# --------------------------------------------------------------------------------------------- executor


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


def wait_all(queued: Sequence[Queued], out: Printer = echo, poll_s: float = 2.0, grace_s: float = 20.0) -> list:
    """Block until every job has ended, printing state changes; SLURM's state, not only submitit's files, so a
    job killed before writing a result (node failure, scancel) ends the wait too."""
    pending = {q.job_id: q for q in queued}
    states: dict[str, str | None] = {}
    ended_at: dict[str, float] = {}
    outcomes: dict[str, Outcome] = {}
    while pending:
        for job_id, q in list(pending.items()):
            state = cluster.job_state(job_id)
            if state != states.get(job_id, "-"):
                out(f"job {job_id} ({q.name}): {state or 'gone from the queue'}")
                states[job_id] = state
            if state in cluster.ACTIVE_STATES:  # (rank 0 may have its result while the others still finish)
                ended_at.pop(job_id, None)
                continue
            ended_at.setdefault(job_id, time.monotonic())
            # rank 0's result (a preempted rank 0 writes none), else a grace period for it to appear
            if q.task0.paths.result_pickle.exists() or time.monotonic() - ended_at[job_id] > grace_s:
                outcomes[job_id] = outcome(q, state)
                del pending[job_id]
        if pending:
            time.sleep(poll_s)
    return [outcomes[q.job_id] for q in queued]


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
        if made and run_id:
            delete_runs(cfg.tracking.uri, [run_id])
        raise MtlError(f"sbatch refused the job: {str(exc).strip().splitlines()[-1]}") from exc
    q = Queued(job, name, run_id, cfg.train.output_dir)
    t0 = q.task0
    tag_run(cfg.tracking.uri, run_id, {"submit.job_id": q.job_id, "submit.stdout": str(t0.paths.stdout)})
    out(f"submitted job {q.job_id} ({describe(cfg, partition)})")
    out(f"  stdout  {t0.paths.stdout}")
    out(f"  stderr  {t0.paths.stderr}")
    if run_id:
        how = "new" if made else "continuing"
        out(f"  mlflow  {how} run {run_id} (experiment '{cfg.tracking.experiment}') in {cfg.tracking.uri}")
    out(f"  output  {cfg.train.output_dir}")
    if not wait:
        return 0
    (o,) = wait_all([q], out)
    report(q, o, out)
    return 0 if o.ok else 1
