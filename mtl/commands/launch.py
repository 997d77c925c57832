"""`mtl submit`: one training job on SLURM, or with ``--sweep FILE`` one job array of them; `mtl slurm-train`:
what each task of slurm/train.sbatch runs."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _flags(args: argparse.Namespace) -> dict[str, object]:
    keys = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "partition", "time", "folder")
    return {k: getattr(args, k) for k in keys}


def _submit(args: argparse.Namespace) -> int:
    if args.sweep is not None:
        from mtl.launch.sweep import submit_sweep

        return submit_sweep(args.sweep, args.config, args.overrides, _flags(args), wait=args.wait)
    from mtl.launch.submit import submit

    return submit(args.config, args.overrides, _flags(args), wait=args.wait)


def _cv(args: argparse.Namespace) -> int:
    from mtl.launch.cv import run_cv

    return run_cv(args.config, args.overrides, _flags(args), args.folds, args.seed, args.out, wait=args.wait)


def _slurm_train(args: argparse.Namespace) -> int:
    from mtl.engine.preemption import StopFlag

    # Before the seconds of imports and set-up: a USR2/SIGTERM now would kill the task instead of ending it as
    # preempted; the trainer's StopFlag takes this one's signal over (it stops after its first step and requeues).
    StopFlag().install()
    from mtl.launch.requeue import slurm_job_id, train_and_requeue

    job_id = slurm_job_id()  # outside a job: an error before anything is loaded
    log_task_start()
    from mtl.commands.train import print_result
    from mtl.config import load_config

    cfg = load_config(args.config, args.overrides)
    # rank, world size and the rendezvous come from SLURM's variables (mtl.engine.distributed)
    print_result(train_and_requeue(cfg, job_id, int(os.environ.get("SLURM_PROCID", "0"))))
    return 0


def log_task_start() -> None:
    """One line per task: where SLURM put it (rank, node, local rank), so a multi-node log shows the layout."""
    e = {k: os.environ.get(f"SLURM{k}", "?") for k in ("_PROCID", "_NTASKS", "D_NODENAME", "_LOCALID", "_JOB_NODELIST")}
    print(
        f"mtl: task {e['_PROCID']} of {e['_NTASKS']} on {e['D_NODENAME']} (local {e['_LOCALID']}, "
        f"nodes {e['_JOB_NODELIST']}): stop signals handled",
        file=sys.stderr,
        flush=True,
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML config (defaults: mtl/config.py)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    g = p.add_argument_group("SLURM request (each sets the slurm.* key of the config)")
    g.add_argument("--nodes", type=int, metavar="N", help="slurm.nodes")
    g.add_argument("--gpus-per-node", type=int, metavar="G", help="slurm.gpus_per_node (0: a CPU job)")
    g.add_argument(
        "--tasks-per-node", type=int, metavar="K", help="slurm.tasks_per_node (default: one per GPU, else 1)"
    )
    g.add_argument("--cpus-per-task", type=int, metavar="C", help="slurm.cpus_per_task")
    g.add_argument("--mem-gb", type=int, metavar="M", help="slurm.mem_gb")
    g.add_argument("--partition", "-p", metavar="P", help="slurm.partition (default: the cluster's default)")
    g.add_argument("--time", type=int, metavar="MIN", help="slurm.time_min, the time limit in minutes")
    g.add_argument("--folder", metavar="DIR", help="slurm.folder for submitit's files and the logs (%%j: job id)")
    p.add_argument("--wait", action="store_true", help="block until the job(s) end; exit 0 only if all completed")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="train on SLURM through submitit (validated on the login node; requeues itself on preemption)",
        description="Validate the config and the SLURM request on the login node, create the MLflow run, and queue "
        "`mtl train` as a submitit job (with --sweep: one job array, one child run per element). Options first, "
        "key=value overrides last. Prints the job id, the log paths and the MLflow run.",
    )
    _add_common(p)
    p.add_argument("--sweep", type=Path, default=None, metavar="FILE", help="a sweep YAML: one job array")
    p.set_defaults(func=_submit)

    p = sub.add_parser(
        "cv",
        help="K-fold cross-validation by video over train + val: one run per fold, here or as a SLURM job array",
        description="Split the labelled videos of train and val into K folds (by video, `_left`/`_right` together, "
        "every task labelled on both sides of each fold; <out>/folds.json), train fold k on the others and "
        "validate on it (<out>/fold_<k>, an MLflow child run of one parent run), write its out-of-fold predictions "
        "(<out>/fold_<k>/eval_val), and log the folds' mean and std to the parent. Without SLURM options the folds "
        "run one after another here; with them, as one job array. Rerun the same command to resume: finished folds "
        "are skipped. The last line printed is the summary as JSON.",
    )
    _add_common(p)
    p.add_argument("--folds", type=int, required=True, metavar="K", help="number of folds (>= 2)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the fold assignment (default 0)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="cv dir (default: train.output_dir)")
    p.set_defaults(func=_cv)

    p = sub.add_parser(
        "slurm-train",
        help="`mtl train` inside an sbatch job (slurm/train.sbatch); requeues the job after a preemption",
        description="What every `srun` task of slurm/train.sbatch runs: `mtl train` with the same arguments; after "
        "a preemption checkpoint global rank 0 requeues the job as `mtl submit` does (only while SLURM still has "
        "it RUNNING, at most slurm.max_requeue times) and the tasks exit with status 3.",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML config (defaults: mtl/config.py)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=_slurm_train)
