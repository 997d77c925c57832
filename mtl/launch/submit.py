"""`mtl submit`: validate on the login node, create the MLflow run(s), queue, optionally wait. One flow for a single
job and for a sweep (mtl.launch.sweep), which differs only in making N configs and a parent run:

1. prepare: the config(s) validated, the request checked against the partition, the inputs the job opens first
   checked, the MLflow run(s) made (a `Plan`);
2. queue (`queue_plan`): one submitit job, or one job array for several configs; each run is tagged with its job;
3. print what was queued; queue the run watcher (`watch`);
4. with ``--wait``, wait (mtl.launch.wait) and report each job (`follow`).

The MLflow run is made before the job is queued, so its id can be printed next to the job id and passed to the job
(``tracking.run_id``); a requeued job carries the same config and so logs into the same run. If sbatch refuses
the job, the runs made for it are ended FAILED; if the job ends without having ended its run (cancelled before it
started, killed), the run watcher queued next to it (mtl.launch.watch) ends it, KILLED or FAILED, and so does
``--wait`` when it sees the job end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtl.config import Config, replace, to_dict
from mtl.errors import MtlError
from mtl.launch.jobs import Printer, Queued, echo, queue
from mtl.launch.prepare import check_inputs, existing_run_id
from mtl.launch.slurm_request import check_request, load_for_submit, tasks_per_node
from mtl.launch.wait import Outcome, failure, wait_all
from mtl.launch.watch import queue_watcher
from mtl.tracking.runs import end_runs, open_run, tag_run


@dataclass
class Plan:
    """What one submission queues: a validated config per job (``tracking.run_id`` set), each job's name, the
    partition, the executor's job name, whether the jobs form an array (a sweep; else one plain job), and the MLflow
    runs made for it here (ended FAILED if sbatch refuses)."""

    cfgs: list[Config]
    names: list[str]
    partition: str
    title: str
    array: bool = False
    made: list[str] = field(default_factory=list)

    @property
    def first(self) -> Config:
        return self.cfgs[0]


def describe(cfg: Config, partition: str) -> str:
    s = cfg.slurm
    gpus = f", {s.gpus_per_node} GPU(s) per node" if s.gpus_per_node else ", CPU only"
    return (
        f"partition {partition}: {s.nodes} node(s) x {tasks_per_node(cfg)} task(s){gpus}, "
        f"{s.cpus_per_task} CPU(s) per task, {s.time_min} min"
    )


def queue_plan(plan: Plan, task: Any = None) -> list[Queued]:
    """Queue the plan's jobs (one plain job, or one array) and tag each run with its job and its log. ``task``: what
    each job runs with its config (default `mtl.launch.task.TrainTask`; `mtl cv` adds its held-out evaluation)."""
    from mtl.launch.task import TrainTask

    t = plan.first.tracking
    try:
        jobs = queue(plan.first, plan.partition, plan.title, task or TrainTask(), [(to_dict(c),) for c in plan.cfgs],
                     array=plan.array)  # fmt: skip
    except MtlError as exc:
        if plan.made:
            end_runs(t.uri, plan.made, "FAILED", str(exc))
        raise
    queued = [
        Queued(job, name, c.tracking.run_id, c.train.output_dir, t.uri if c.tracking.run_id else None)
        for job, name, c in zip(jobs, plan.names, plan.cfgs)
    ]
    for q in queued:
        tag_run(t.uri, q.run_id, {"submit.job_id": q.job_id, "submit.stdout": str(q.task0.paths.stdout)})
    return queued


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
        out(failure(q, o))


def follow(plan: Plan, queued: Sequence[Queued], wait: bool, out: Printer = echo) -> list[Outcome] | None:
    """Queue the run watcher; with ``wait``, block until every job has ended and report each (None without)."""
    watch(plan.first, queued, plan.partition, out)
    if not wait:
        return None
    outcomes = wait_all(queued, out)
    for q, o in zip(queued, outcomes):
        report(q, o, out)
    return outcomes


def prepare(config: str | Path | None, overrides: list[str], flags: dict[str, object]) -> tuple[Plan, bool]:
    """One job's plan, and whether its MLflow run is new (else a resubmitted output_dir continues its run)."""
    cfg = load_for_submit(config, overrides, flags)
    partition = check_request(cfg)
    check_inputs(cfg)
    name = cfg.tracking.run_name or "mtl"  # load_config named it after the config file and overrides (mtl.naming)
    run_id, made = open_run(cfg.tracking, name, {"mtl.launcher": "submitit"}, existing_run_id(cfg))
    cfg = replace(cfg, tracking=replace(cfg.tracking, run_id=run_id))
    return Plan([cfg], [name], partition, name, made=[run_id] if made and run_id else []), made


def submit(
    config: str | Path | None,
    overrides: list[str],
    flags: dict[str, object],
    wait: bool = False,
    out: Printer = echo,
) -> int:
    """`mtl submit` without a sweep. Returns the exit status (the job's, with ``wait``)."""
    plan, made = prepare(config, overrides, flags)
    (q,) = queue_plan(plan)
    cfg, t0 = plan.first, q.task0
    out(f"submitted job {q.job_id} ({describe(cfg, plan.partition)})")
    out(f"  stdout  {t0.paths.stdout}")
    out(f"  stderr  {t0.paths.stderr}")
    if q.run_id:
        how = "new" if made else "continuing"
        out(f"  mlflow  {how} run {q.run_id} (experiment '{cfg.tracking.experiment}') in {cfg.tracking.uri}")
    out(f"  output  {cfg.train.output_dir}")
    outcomes = follow(plan, [q], wait, out)
    return 0 if outcomes is None or outcomes[0].ok else 1
