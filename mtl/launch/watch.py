"""The run watcher: a small companion job that ends the MLflow runs their training jobs left RUNNING.

`mtl submit` makes a job's MLflow run before sbatch. A job cancelled while it pends never starts, so nothing in it
can end that run; nor can a rank 0 killed outright (out of memory, a node lost). ``--wait`` ends such runs from
the login node, but a plain submission leaves no process there. So each submission also queues this job: one
CPU, a few minutes, ``--dependency=afterany`` on the training jobs, so SLURM starts it once they have left the
queue for good (a requeue puts a job back to PENDING, which does not release it). It ends every run still
RUNNING, KILLED for a job that was cancelled, preempted or timed out and FAILED otherwise, with the reason as the
tag ``mtl.end_reason``; a run its job ended itself is left as it is. Should a job be back in the queue when it
looks (requeued again), it queues itself again for that job.

    python -m mtl.launch.watch --uri URI [--partition P] [--log-dir DIR] JOB=RUN [JOB=RUN ...]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mtl.errors import MtlError
from mtl.launch import cluster
from mtl.tracking.runs import client, end_runs

WATCH_TIME_MIN = 5
KILLED_STATES = ("CANCELLED", "PREEMPTED", "TIMEOUT", "DEADLINE")

Pair = tuple[str, str]  # (job id, e.g. "123" or "123_4"; MLflow run id)


def queue_watcher(pairs: Sequence[Pair], uri: str, partition: str | None, log_dir: Path) -> str:
    """Queue the watcher of ``pairs`` (at least one); its job id. MtlError when sbatch refuses it."""
    jobs = sorted({j.split("_")[0] for j, _ in pairs}, key=int)  # an array element's job: the whole array
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mtl.launch.watch", "--uri", uri, f"--log-dir={log_dir}",
           *([f"--partition={partition}"] if partition else []), *(f"{j}={r}" for j, r in pairs)]  # fmt: skip
    args = [
        f"--job-name=mtl-watch-{jobs[0]}",
        f"--dependency=afterany:{':'.join(jobs)}",
        "--kill-on-invalid-dep=yes",
        "--nodes=1", "--ntasks=1", "--cpus-per-task=1", f"--time={WATCH_TIME_MIN}", "--no-requeue",
        f"--output={log_dir / 'watch_%j.log'}",
        *([f"--partition={partition}"] if partition else []),
        f"--chdir={os.getcwd()}",
        f"--wrap={shlex.join(cmd)}",
    ]  # fmt: skip
    return cluster.sbatch(args)


def _ending(job_id: str, state: str | None, watcher: str) -> tuple[str, str]:
    """(status, reason) for the run of a job that has left the queue without ending it."""
    record = cluster.job_record(job_id) if state else {}
    if state is None:
        what = "is no longer known to SLURM"
    else:
        never_ran = record.get("RunTime") == "00:00:00" and record.get("Restarts", "0") == "0"
        what = f"ended {state}" + (" before it started" if never_ran else "")
        reason = record.get("Reason", "None")
        if reason not in ("None", ""):
            what += f" (reason: {reason})"
    status = "KILLED" if state in KILLED_STATES else "FAILED"
    return status, f"job {job_id} {what} and left its run RUNNING; ended by the run watcher (job {watcher})"


def reap(uri: str, pairs: Sequence[Pair], out: Callable[[str], None] = print) -> list[Pair]:
    """End the runs of jobs that left the queue without ending them; the pairs whose job is queued again."""
    c = client(uri)
    watcher = os.environ.get("SLURM_JOB_ID", "none")
    again: list[Pair] = []
    for job_id, run_id in pairs:
        try:
            status = c.get_run(run_id).info.status
        except Exception as exc:
            out(f"job {job_id}: MLflow run {run_id} not readable in {uri} ({str(exc).splitlines()[0]}); left alone")
            continue
        if status != "RUNNING":
            out(f"job {job_id}: run {run_id} is {status}: nothing to do")
            continue
        state = cluster.job_state(job_id)
        if state in cluster.ACTIVE_STATES:
            out(f"job {job_id} is {state} (back in the queue): watching it further")
            again.append((job_id, run_id))
            continue
        status, reason = _ending(job_id, state, watcher)
        end_runs(uri, [run_id], status, reason)
        out(f"job {job_id}: run {run_id} ended {status}: {reason}")
    return again


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtl.launch.watch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--uri", required=True, help="the MLflow tracking URI of the runs")
    ap.add_argument("--partition", default=None, help="where to queue itself again, if needed")
    ap.add_argument("--log-dir", type=Path, default=Path("."), help="where its log goes, if queued again")
    ap.add_argument("pairs", nargs="+", metavar="JOB=RUN")
    args = ap.parse_args(argv)
    pairs = []
    for item in args.pairs:
        job, sep, run = item.partition("=")
        if not sep or not job or not run:
            ap.error(f"expected JOB=RUN, got {item!r}")
        pairs.append((job, run))
    again = reap(args.uri, pairs)
    if again:
        try:
            print(f"queued the run watcher again: job {queue_watcher(again, args.uri, args.partition, args.log_dir)}")
        except MtlError as exc:
            print(f"could not queue the run watcher again ({exc}): those runs stay RUNNING", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
