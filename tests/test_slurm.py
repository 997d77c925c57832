"""`mtl submit`, preemption/requeue, sweeps and the sbatch template on a real SLURM cluster: first one node (this
host), then two (node1 and node2, each a slurmd in its own network namespace; these tests come last, so that the
cluster switches once).

Every job is a real 2-rank (or 1-rank) DeepSpeed run of the smoke model on CPU (gloo), logging to a real MLflow
store; the cluster is started by tools/slurm-local.sh (see slurm_fixtures.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import REPO, SMOKE, mtl, ok, run, smoke_overrides
from mlflow.tracking import MlflowClient
from slurm_fixtures import (  # noqa: F401
    job_ids,
    job_info,
    slurm_cluster_fixture,
    slurm_local_fixture,
    slurm_two_nodes_fixture,
    wait_for_path,
    wait_for_state,
)

from mtl.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

CPU_JOB = ["--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "5"]


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs() -> Iterator[None]:
    """A failed test must not leave its job holding the 2 CPUs that the next tests need."""
    before = job_ids()
    yield
    left = sorted(job_ids() - before)
    if left:
        subprocess.run(["scancel", *left], capture_output=True)


def _client(db: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{db}")


def _runs(db: Path, experiment: str = "mtl-smoke") -> list:
    client = _client(db)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {db}"
    return client.search_runs([exp.experiment_id])


def _steps(db: Path, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in _client(db).get_metric_history(run_id, key))


def _submit(monkeypatch, capsys, *argv: str) -> str:
    """`mtl submit ...` in this process (its imports are paid once); returns what it printed."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job inherits the submitting environment
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc = main(["submit", *argv])
    printed = capsys.readouterr()
    assert rc == 0, f"{printed.out}\n{printed.err}"
    return printed.out


def _job_id(stdout: str) -> str:
    m = re.search(r"submitted job (\d+)", stdout)
    assert m, f"no job id in:\n{stdout}"
    return m.group(1)


def _watcher_id(stdout: str) -> str:
    m = re.search(r"watcher job (\d+) ends the run", stdout)
    assert m, f"no run watcher in:\n{stdout}"
    return m.group(1)


def test_submit_two_rank_deepspeed_job_completes_into_mlflow(
    slurm_cluster: str, tiny_shards: Path, tmp_path: Path
) -> None:
    out, db, folder = tmp_path / "run", tmp_path / "mlflow.db", tmp_path / "slurm" / "%j"
    args = smoke_overrides(tiny_shards, out, db, "train.zero_stage=2")
    proc = ok(mtl("submit", "--config", str(SMOKE), *args, "--partition", slurm_cluster, *CPU_JOB,
                  "--folder", str(folder), "--wait", timeout=300))  # fmt: skip
    job = _job_id(proc.stdout)
    run_id = re.search(r"mlflow  new run (\w+) \(experiment 'mtl-smoke'\) in sqlite:///", proc.stdout).group(1)
    stdout_log = Path(re.search(r"stdout  (\S+)", proc.stdout).group(1))
    assert stdout_log == tmp_path / "slurm" / job / f"{job}_0_log.out" and stdout_log.is_file()
    assert f"job {job} (smoke train.zero_stage=2): completed at step 6, MLflow run {run_id}" in proc.stdout

    info = job_info(job)
    assert info["JobState"] == "COMPLETED" and info["NumTasks"] == "2" and info["Restarts"] == "0"
    (r,) = _runs(db)
    assert r.info.run_id == run_id and r.info.status == "FINISHED"
    assert r.data.tags["world_size"] == "2" and r.data.tags["zero_stage"] == "2"
    assert r.data.tags["slurm_job_id"] == job and r.data.tags["submit.job_id"] == job
    assert r.data.params["slurm.tasks_per_node"] == "2" and r.data.params["train.output_dir"] == str(out)
    assert _steps(db, run_id) == list(range(1, 7))
    assert (out / "export" / "last.safetensors").is_file()
    # each rank ran on the one CPU its task asked for (SRUN_CPUS_PER_TASK, task/affinity), torch capped to it
    cpus = {}
    for rank in (0, 1):
        err = (tmp_path / "slurm" / job / f"{job}_{rank}_log.err").read_text()
        m = re.search(rf"mtl: rank {rank}: 1 CPU\(s\) \(affinity (\d+)\), torch threads 1, data.num_workers 0", err)
        assert m, err[-3000:]
        cpus[rank] = m.group(1)
    assert cpus[0] != cpus[1], cpus


# How a running job gets told to stop: SLURM's preemption/time-limit warning (--signal=USR2@90, to every task),
# after which mtl requeues the job itself; and `scontrol requeue` (SIGTERM), after which SLURM requeues it.
STOPS = {"usr2": ["scancel", "--signal=USR2"], "scontrol-requeue": ["scontrol", "requeue"]}


@pytest.mark.parametrize("how", list(STOPS))
def test_preempted_job_checkpoints_requeues_and_resumes_into_the_same_run(
    how: str, slurm_cluster: str, tiny_shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out, db, folder = tmp_path / "run", tmp_path / "mlflow.db", tmp_path / "slurm" / "%j"
    # ~50 ms a step here: 100 steps leave seconds between the first checkpoint (step 10) and the end.
    args = smoke_overrides(tiny_shards, out, db, "train.max_steps=100", "train.ckpt_every=10", "train.keep_last=5")
    printed = _submit(monkeypatch, capsys, "--config", str(SMOKE), *args, "--partition", slurm_cluster, *CPU_JOB,
                      "--folder", str(folder))  # fmt: skip
    job, watcher = _job_id(printed), _watcher_id(printed)
    wait_for_path(out / "checkpoints", "step_*/complete.json", job, timeout=180)
    subprocess.run([*STOPS[how], job], check=True)
    info = wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=240)
    err = (tmp_path / "slurm" / job / f"{job}_0_log.err").read_text()
    assert info["JobState"] == "COMPLETED", err[-3000:]
    assert info["Restarts"] == "1", "the job should have been requeued exactly once"
    saved = re.search(r"checkpoint saved at step (\d+); (requeued job|job \S+ is \w+: not requeued by mtl)", err)
    assert saved, err[-3000:]
    assert saved.group(2).startswith("requeued" if how == "usr2" else "job")  # exactly one requeue, by the right side
    preempted_at = int(saved.group(1))
    assert 10 <= preempted_at < 100

    (r,) = _runs(db)  # one MLflow run across both attempts
    assert r.info.status == "FINISHED"
    assert r.data.tags["resumed_from"] == f"step_{preempted_at:08d}"  # resumed from the preemption checkpoint
    assert _steps(db, r.info.run_id) == list(range(1, 101))  # every step once: none repeated, none skipped
    assert "restart 1" in err
    # the run watcher was not released by the requeue: it ran once, after the end, and left the run alone
    wait_for_state(watcher, {"COMPLETED"}, timeout=60)
    watch_log = (tmp_path / "slurm" / job / f"watch_{watcher}.log").read_text()
    assert f"job {job}: run {r.info.run_id} is FINISHED: nothing to do" in watch_log, watch_log
    assert " ended " not in watch_log and "watching it further" not in watch_log, watch_log


def test_a_job_cancelled_before_it_starts_has_its_run_ended_by_the_watcher(
    slurm_cluster: str, tiny_shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """No --wait: the job pends behind another one and is cancelled; it never runs, its watcher ends its run."""
    db = tmp_path / "mlflow.db"
    blocker = ok(run(["sbatch", "--parsable", f"--partition={slurm_cluster}", "--exclusive", "--time=5",
                      "--output=/dev/null", "--wrap", "sleep 300"])).stdout.strip()  # fmt: skip
    try:
        wait_for_state(blocker, {"RUNNING"}, timeout=60)
        args = smoke_overrides(tiny_shards, tmp_path / "run", db)
        printed = _submit(monkeypatch, capsys, "--config", str(SMOKE), *args, "--partition", slurm_cluster, *CPU_JOB,
                          "--folder", str(tmp_path / "slurm" / "%j"))  # fmt: skip
        job, watcher = _job_id(printed), _watcher_id(printed)
        time.sleep(2)
        assert job_info(job)["JobState"] == "PENDING" and job_info(watcher)["Reason"] == "Dependency"
        (r,) = _runs(db)
        assert r.info.status == "RUNNING" and r.data.tags["submit.watcher_job_id"] == watcher
        subprocess.run(["scancel", job], check=True)
    finally:
        subprocess.run(["scancel", blocker], check=True)
    wait_for_state(watcher, {"COMPLETED"}, timeout=90)
    (r,) = _runs(db)
    reason = r.data.tags["mtl.end_reason"]
    assert r.info.status == "KILLED", reason
    assert reason.startswith(f"job {job} ended CANCELLED before it started") and f"(job {watcher})" in reason, reason
    watch_log = (tmp_path / "slurm" / job / f"watch_{watcher}.log").read_text()
    assert f"job {job}: run {r.info.run_id} ended KILLED" in watch_log, watch_log


def test_cancelled_job_saves_and_stays_cancelled(
    slurm_cluster: str, tiny_shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """scancel is the user's decision: the job checkpoints on SIGTERM but is not requeued."""
    out, db, folder = tmp_path / "run", tmp_path / "mlflow.db", tmp_path / "slurm" / "%j"
    args = smoke_overrides(tiny_shards, out, db, "train.max_steps=100", "train.ckpt_every=10")
    job = _job_id(_submit(monkeypatch, capsys, "--config", str(SMOKE), *args, "--partition", slurm_cluster, *CPU_JOB,
                          "--folder", str(folder)))  # fmt: skip
    wait_for_path(out / "checkpoints", "step_*/complete.json", job, timeout=180)
    subprocess.run(["scancel", job], check=True)
    info = wait_for_state(job, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=120)
    time.sleep(3)  # a wrong requeue would show by now
    info = job_info(job)
    err = (tmp_path / "slurm" / job / f"{job}_0_log.err").read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", err[-3000:]
    saved = re.search(r"checkpoint saved at step (\d+); job \S+ is \w+: not requeued by mtl", err)
    assert saved, err[-3000:]
    assert (out / "checkpoints" / f"step_{int(saved.group(1)):08d}" / "complete.json").is_file()
    (r,) = _runs(db)
    assert r.info.status == "KILLED"


def _sbatch_preempted(slurm_cluster: str, tiny_shards: Path, tmp_path: Path, **env: str) -> tuple[str, Path]:
    """slurm/train.sbatch on 2 CPU tasks, sent USR2 once the first checkpoint exists: (job id, its log)."""
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    args = smoke_overrides(tiny_shards, out, db, "train.max_steps=100", "train.ckpt_every=10", "train.keep_last=5")
    log = tmp_path / "job.out"
    env = {
        "CONFIG": str(SMOKE),
        "OVERRIDES": " ".join(args[:2]),  # the rest as script arguments: both ways reach `mtl train`
        "MTL": f"{sys.executable} -m mtl.cli",
        **env,
    }
    proc = ok(run(["sbatch", "--parsable", "--partition", slurm_cluster, "--gpus-per-node=0", "--ntasks-per-node=2",
                   "--cpus-per-task=1", "--time=5", f"--output={log}", str(REPO / "slurm" / "train.sbatch"),
                   *args[2:]], env=env))  # fmt: skip
    job = proc.stdout.strip().split(";")[0]
    wait_for_path(out / "checkpoints", "step_*/complete.json", job, timeout=180)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    return job, log


# What a task of slurm/train.sbatch sees, run in place of `mtl slurm-train` (MTL=python probe.py).
PROBE = """
import json, os
os.environ.pop("OMP_NUM_THREADS", None)  # torch's own default, then mtl's cap
import torch
from mtl.config import load_config
from mtl.engine.cpus import fit_to_cpus
cfg = fit_to_cpus(load_config(None, ["data.num_workers=8"]))
print("probe " + json.dumps({"rank": int(os.environ["SLURM_PROCID"]), "affinity": sorted(os.sched_getaffinity(0)),
      "threads": torch.get_num_threads(), "workers": cfg.data.num_workers, "port": int(os.environ["MASTER_PORT"]),
      "srun_cpus": os.environ.get("SRUN_CPUS_PER_TASK")}), flush=True)
"""


@pytest.mark.parametrize(("tasks", "cpus"), [(2, 1), (1, 2)])
def test_sbatch_template_task_runs_on_the_cpus_it_asked_for(
    tasks: int, cpus: int, slurm_cluster: str, tmp_path: Path
) -> None:
    """Each task's CPU affinity is its --cpus-per-task CPUs (none shared), and torch's threads and the loader's
    workers are capped at them; the rendezvous port is outside the ephemeral range."""
    import json

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    plugin = ok(run(["scontrol", "show", "config"])).stdout
    assert re.search(r"TaskPlugin\s*=\s*\S*task/affinity", plugin), "restart the cluster: tools/slurm-local.sh up"
    probe, log = tmp_path / "probe.py", tmp_path / "job.out"
    probe.write_text(PROBE)
    env = {"MTL": f"{sys.executable} {probe}", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = ok(run(["sbatch", "--parsable", "--partition", slurm_cluster, "--gpus-per-node=0",
                   f"--ntasks-per-node={tasks}", f"--cpus-per-task={cpus}", "--time=5", f"--output={log}",
                   str(REPO / "slurm" / "train.sbatch")], env=env))  # fmt: skip
    job = proc.stdout.strip().split(";")[0]
    info = wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    seen = sorted((json.loads(line[len("probe ") :]) for line in text.splitlines() if line.startswith("probe ")),
                  key=lambda r: r["rank"])  # fmt: skip
    assert [r["rank"] for r in seen] == list(range(tasks)), text[-3000:]
    for r in seen:
        assert len(r["affinity"]) == cpus and r["threads"] == cpus and r["workers"] == cpus, r
        assert r["srun_cpus"] == str(cpus) and 10000 <= r["port"] < 32768, r
    assert len({c for r in seen for c in r["affinity"]}) == tasks * cpus  # no CPU given to two tasks


def test_sbatch_template_runs_to_the_end_and_resumes_after_preemption(
    slurm_cluster: str, tiny_shards: Path, tmp_path: Path
) -> None:
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    job, log = _sbatch_preempted(slurm_cluster, tiny_shards, tmp_path)
    info = wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=240)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert info["Restarts"] == "1", text[-3000:]
    # rank 0 requeued it with the same code as a submitit job (tasks: `mtl slurm-train`), within max_requeue
    saved = re.search(rf"checkpoint saved at step (\d+); requeued job {job} \(1 of 3\)", text)
    assert saved, text[-3000:]
    assert "(restart 1)" in text

    (r,) = _runs(db)
    assert r.info.status == "FINISHED" and r.data.tags["world_size"] == "2"
    assert r.data.tags["resumed_from"] == f"step_{int(saved.group(1)):08d}"
    assert _steps(db, r.info.run_id) == list(range(1, 101))
    assert (out / "export" / "last.safetensors").is_file()


def test_sbatch_template_stops_requeueing_at_max_requeue(slurm_cluster: str, tiny_shards: Path, tmp_path: Path) -> None:
    """MAX_REQUEUE=0 (slurm.max_requeue): the checkpoint is kept, the job is not requeued, and it fails saying how
    to continue."""
    job, log = _sbatch_preempted(slurm_cluster, tiny_shards, tmp_path, MAX_REQUEUE="0")
    info = wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=240)
    time.sleep(3)  # a wrong requeue would show by now
    info, text = job_info(job), log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text[-3000:]
    refused = re.search(
        rf"mtl slurm-train: error: checkpoint saved at step (\d+), but job {job} was already requeued 0 times "
        r"\(slurm.max_requeue=0\); submit again with the same train.output_dir",
        text,
    )
    assert refused, text[-3000:]
    assert (tmp_path / "run" / "checkpoints" / f"step_{int(refused.group(1)):08d}" / "complete.json").is_file()
    (r,) = _runs(tmp_path / "mlflow.db")
    assert r.info.status == "KILLED"


def test_sweep_is_one_array_with_child_runs_under_one_parent(
    slurm_cluster: str, tiny_shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out, db = tmp_path / "sweep", tmp_path / "mlflow.db"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "mask-test",
        "base": {"train.max_steps": 4, "train.ckpt_every": 4},
        "runs": [{"model.mask.prob": 0.1}, {"model.mask.prob": 0.4}],
    }))  # fmt: skip
    # One task per element, so that both elements run at once on the 2 CPUs.
    printed = _submit(monkeypatch, capsys, "--sweep", str(sweep), "--config", str(SMOKE),
                      *smoke_overrides(tiny_shards, out, db), "--partition", slurm_cluster, "--gpus-per-node", "0",
                      "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "5",
                      "--folder", str(tmp_path / "slurm" / "%j"), "--wait")  # fmt: skip
    array = re.search(r"submitted job array (\d+) with 2 element", printed).group(1)
    assert f"{array}_0" in printed and f"{array}_1" in printed

    runs = _runs(db)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.run_name == "mask-test" and parent.data.tags["submit.job_id"] == array
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"model.mask.prob=0.1", "model.mask.prob=0.4"}
    for name, child in by_name.items():
        assert child.info.status == "FINISHED"
        assert child.data.params["model.mask.prob"] == name.split("=")[1]  # the element's override took effect
        assert child.data.tags["slurm_job_id"] == array
        assert _steps(db, child.info.run_id) == [1, 2, 3, 4]
    dirs = {by_name[n].data.params["train.output_dir"] for n in by_name}
    assert dirs == {str(out / "000-model.mask.prob=0.1"), str(out / "001-model.mask.prob=0.4")}
    assert all((Path(d) / "export" / "last.safetensors").is_file() for d in dirs)


def test_cv_folds_run_as_one_array_and_a_rerun_skips_them(
    slurm_cluster: str, tiny_shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """`mtl cv --folds 2` with SLURM options: one job array, each task a fold run that also writes its out-of-fold
    predictions; --wait, then the summary under the parent run. A rerun submits nothing and gives the same summary."""
    out, db = tmp_path / "cv", tmp_path / "mlflow.db"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = ["cv", "--config", str(SMOKE), "--folds", "2", "--out", str(out),
            *smoke_overrides(tiny_shards, tmp_path / "unused", db, "train.max_steps=2"),
            "--partition", slurm_cluster, "--gpus-per-node", "0", "--tasks-per-node", "1", "--cpus-per-task", "1",
            "--time", "5", "--folder", str(tmp_path / "slurm" / "%j")]  # fmt: skip
    assert main([*argv, "--wait"]) == 0, capsys.readouterr().err[-3000:]
    printed = capsys.readouterr().out
    array = re.search(r"submitted job array (\d+) with 2 fold\(s\)", printed).group(1)
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["status"] == "finished" and [f["fold"] for f in summary["per_fold"]] == [0, 1]
    client = _client(db)
    parent = client.get_run(summary["parent_run_id"])
    children = [client.get_run(f["run_id"]) for f in summary["per_fold"]]
    for k, child in enumerate(children):
        assert child.info.status == "FINISHED" and child.data.tags["slurm_job_id"] == array
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert _steps(db, child.info.run_id) == [1, 2]
        assert (out / f"fold_{k}" / "eval_val" / "predictions.csv").is_file()  # written in the array task
    assert parent.data.metrics["cv/mtl_score_mean"] == pytest.approx(summary["mean"]["mtl_score"])

    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "submitted job array" not in again and again.count("finished already") == 2
    assert json.loads(again.strip().splitlines()[-1])["mean"] == pytest.approx(summary["mean"])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no-sbatch", "sbatch not found on PATH"),
        ("partition", "unknown SLURM partition 'no-such-partition' (partitions here: debug)"),
        ("override", "unknown config key 'train.max_stepz'; did you mean max_steps"),
        ("shards", "no manifest.json there"),
        ("cpus", "slurm.cpus_per_task=1000 x 2 task(s) per node = 2000 CPUs per node, but partition debug's nodes "
                 "have at most"),
        ("default-cpus", "slurm.cpus_per_task=8 x 2 task(s) per node = 16 CPUs per node, but partition debug's"),
    ],
)  # fmt: skip
def test_bad_input_fails_on_the_login_node_and_queues_nothing(
    case: str, expected: str, slurm_cluster: str, tiny_shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    db, folder = tmp_path / "mlflow.db", tmp_path / "slurm"
    args = smoke_overrides(tiny_shards, tmp_path / "run", db)
    flags = ["--partition", slurm_cluster, *CPU_JOB, "--folder", str(folder / "%j")]
    before = job_ids()
    if case == "no-sbatch":
        monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    elif case == "partition":
        flags[1] = "no-such-partition"
    elif case == "override":
        args.append("train.max_stepz=5")
    elif case == "shards":
        args[0] = f"data.shards={tmp_path / 'missing'}"
    elif case == "cpus":
        flags[flags.index("--cpus-per-task") + 1] = "1000"
    elif case == "default-cpus":  # slurm.cpus_per_task=8: more than this cluster's node has (CI: 2 CPUs)
        if len(os.sched_getaffinity(0)) >= 16:  # (nproc: what the node advertises)
            pytest.skip("this machine's node has 16 CPUs or more: the default request fits")
        i = flags.index("--cpus-per-task")
        del flags[i : i + 2]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc = main(["submit", "--config", str(SMOKE), *args, *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mtl submit: error: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    monkeypatch.undo()
    assert job_ids() == before, "a job was queued"
    assert not folder.exists() and not db.exists(), "submitit files or an MLflow run were created"


def test_features_job_array_writes_the_same_cache_as_one_process(
    slurm_cluster: str, tiny_shards: Path, tmp_path: Path
) -> None:
    """`mtl features --array 2`: two array tasks, each a disjoint set of output shards; the last to finish writes
    the manifest. The cache equals a one-process extraction byte for byte."""
    import json

    import timm
    import torch
    from safetensors.torch import save_file

    from mtl.extraction.extract import ExtractSpec, extract
    from mtl.features.manifest import read_feature_manifest

    kwargs = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 16}
    torch.manual_seed(1)
    weights = tmp_path / "tiny.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, **kwargs).state_dict(),
              str(weights))  # fmt: skip
    spec = ExtractSpec(backbone="vit_tiny_patch16_224", weights=str(weights), image_size=32, backbone_kwargs=kwargs,
                       shard_frames=1)  # fmt: skip
    reference = tmp_path / "one-process"
    extract(tiny_shards, reference, spec, progress=False)

    out, folder = tmp_path / "array", tmp_path / "slurm" / "%j"
    proc = ok(mtl("features", "--shards", str(tiny_shards), "--out", str(out), "--backbone", "vit_tiny_patch16_224",
                  "--weights", str(weights), "--backbone-kwargs", json.dumps(kwargs), "--image-size", "32",
                  "--shard-frames", "1", "--array", "2", "--partition", slurm_cluster, "--gpus-per-node", "0",
                  "--cpus-per-task", "1", "--time", "5", "--folder", str(folder), "--wait", timeout=300))  # fmt: skip
    assert "submitted job array" in proc.stdout and "2 of 2 task(s) completed; manifest written" in proc.stdout
    files = {p.relative_to(reference): p.read_bytes() for p in sorted(reference.glob("*/*.tar"))}
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.glob("*/*.tar"))} == files and len(files) == 6
    assert read_feature_manifest(out) == read_feature_manifest(reference)


# --------------------------------------------------------------------------------------------- two nodes
# One rank on each of node1 and node2 (own network namespace, hostname and address): gloo across the bridge, the
# rendezvous on node1 as SLURM's node list `node[1-2]` names it.

TWO_NODE_JOB = ["--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "10"]


def _two_node_run(db: Path, job: str) -> object:
    (r,) = _runs(db)
    assert r.data.tags["world_size"] == "2" and r.data.tags["slurm_job_id"] == job
    assert r.data.tags["host"] == "node1"  # global rank 0 ran on the first node of the list
    return r


def test_two_node_zero2_job_completes(
    slurm_two_nodes: str, tiny_shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    args = smoke_overrides(tiny_shards, out, db, "train.zero_stage=2")
    printed = _submit(monkeypatch, capsys, "--config", str(SMOKE), *args, "--partition", slurm_two_nodes,
                      *TWO_NODE_JOB, "--folder", str(tmp_path / "slurm" / "%j"), "--wait")  # fmt: skip
    job = _job_id(printed)
    assert "partition debug: 2 node(s) x 1 task(s)" in printed
    assert f"job {job} (smoke train.zero_stage=2): completed at step 6" in printed
    info = job_info(job)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node[1-2]" and info["NumTasks"] == "2"
    out1 = (tmp_path / "slurm" / job / f"{job}_1_log.out").read_text()
    assert "hostname=node2, local_rank=0(1), node=1(2), global_rank=1(2)" in out1  # submitit's view of rank 1
    r = _two_node_run(db, job)
    assert r.info.status == "FINISHED" and r.data.tags["zero_stage"] == "2"
    assert _steps(db, r.info.run_id) == list(range(1, 7))
    assert (out / "export" / "last.safetensors").is_file()


def test_two_node_zero3_job_requeued_by_slurm_resumes_into_the_same_run(
    slurm_two_nodes: str, tiny_shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """`scontrol requeue` (SIGTERM to both nodes): both ranks save the ZeRO-3 shards, SLURM requeues, the job
    resumes on both nodes from that checkpoint and runs to the end in the same MLflow run."""
    out, db, folder = tmp_path / "run", tmp_path / "mlflow.db", tmp_path / "slurm" / "%j"
    args = smoke_overrides(tiny_shards, out, db, "train.zero_stage=3", "train.max_steps=60", "train.ckpt_every=10")
    job = _job_id(_submit(monkeypatch, capsys, "--config", str(SMOKE), *args, "--partition", slurm_two_nodes,
                          *TWO_NODE_JOB, "--folder", str(folder)))  # fmt: skip
    wait_for_path(out / "checkpoints", "step_*/complete.json", job, timeout=300)
    subprocess.run(["scontrol", "requeue", job], check=True)
    info = wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=300)
    err = (tmp_path / "slurm" / job / f"{job}_0_log.err").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", err[-3000:]
    saved = re.search(r"checkpoint saved at step (\d+); job \S+ is \w+: not requeued by mtl", err)
    assert saved and 10 <= int(saved.group(1)) < 60, err[-3000:]
    r = _two_node_run(db, job)
    assert r.info.status == "FINISHED" and r.data.tags["zero_stage"] == "3"
    assert r.data.tags["resumed_from"] == f"step_{int(saved.group(1)):08d}"
    assert _steps(db, r.info.run_id) == list(range(1, 61))


def test_two_node_sbatch_template_preempted_during_start_up_resumes(
    slurm_two_nodes: str, tiny_shards: Path, tmp_path: Path
) -> None:
    """slurm/train.sbatch with --nodes 2, USR2 while the tasks still import torch: `mtl slurm-train` has its stop
    flag up first thing, so the ranks train one step, save together, rank 0 requeues, and the job resumes."""
    out, db, log = tmp_path / "run", tmp_path / "mlflow.db", tmp_path / "job.out"
    args = smoke_overrides(tiny_shards, out, db, "train.max_steps=6", "train.ckpt_every=100")
    env = {"CONFIG": str(SMOKE), "MTL": f"{sys.executable} -m mtl.cli"}
    proc = ok(run(["sbatch", "--parsable", "--partition", slurm_two_nodes, "--nodes=2", "--gpus-per-node=0",
                   "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10", f"--output={log}",
                   str(REPO / "slurm" / "train.sbatch"), *args], env=env))  # fmt: skip
    job = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 180
    started = re.compile(r"mtl: task (\d) of 2 on (node\d) \(local 0, nodes node\[1-2\]\): stop signals handled")
    while len({m.groups() for m in started.finditer(log.read_text() if log.exists() else "")}) < 2:
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    info = wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    assert {m.groups() for m in started.finditer(text)} == {("0", "node1"), ("1", "node2")}
    saved = re.search(rf"checkpoint saved at step (\d+); requeued job {job} \(1 of 3\)", text)
    assert saved, text[-3000:]
    r = _two_node_run(db, job)
    assert r.info.status == "FINISHED" and r.data.tags["resumed_from"] == f"step_{int(saved.group(1)):08d}"
    assert _steps(db, r.info.run_id) == list(range(1, 7))


def test_two_node_request_over_the_partition_is_refused_before_queuing(
    slurm_two_nodes: str, tiny_shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    db = tmp_path / "mlflow.db"
    before = job_ids()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    flags = [*TWO_NODE_JOB, "--folder", str(tmp_path / "slurm" / "%j")]
    flags[1] = "3"  # --nodes 3
    rc = main(["submit", "--config", str(SMOKE), *smoke_overrides(tiny_shards, tmp_path / "run", db),
               "--partition", slurm_two_nodes, *flags])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "slurm.nodes=3, but partition debug has 2 node(s)" in err, err
    assert "Partition debug offers 2 node(s) (node[1-2]): node1, node2 with" in err
    assert job_ids() == before and not db.exists()


def test_wait_cancels_a_job_whose_nodes_are_drained_and_ends_its_run(
    slurm_two_nodes: str, tiny_shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """node2 drained: a 2-node job could only pend for ever; --wait cancels it, says why, ends the run KILLED."""
    db = tmp_path / "mlflow.db"
    subprocess.run(["scontrol", "update", "NodeName=node2", "State=DRAIN", "Reason=mtl-test"], check=True)
    try:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        rc = main(["submit", "--config", str(SMOKE), *smoke_overrides(tiny_shards, tmp_path / "run", db),
                   "--partition", slurm_two_nodes, *TWO_NODE_JOB, "--folder", str(tmp_path / "slurm" / "%j"),
                   "--wait"])  # fmt: skip
    finally:
        subprocess.run(["scontrol", "update", "NodeName=node2", "State=RESUME"], check=True)
    out = capsys.readouterr().out
    job = _job_id(out)
    assert rc == 1, out
    assert re.search(
        rf"job {job} \(smoke\): CANCELLED\n  it pended for a reason that does not resolve itself "
        r".*it needs 2 node\(s\); partition debug has 1 not drained or failed \(node2 drained",
        out,
    ), out
    assert job_info(job)["JobState"] == "CANCELLED"
    (r,) = _runs(db)
    assert r.info.status == "KILLED" and "not drained or failed" in r.data.tags["mtl.end_reason"]


def test_a_run_whose_job_sbatch_refuses_is_ended(
    slurm_two_nodes: str, tiny_shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    db = tmp_path / "mlflow.db"
    subprocess.run(["scontrol", "update", f"PartitionName={slurm_two_nodes}", "State=INACTIVE"], check=True)
    try:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        rc = main(
            [
                "submit",
                "--config",
                str(SMOKE),
                *smoke_overrides(tiny_shards, tmp_path / "run", db),
                "--partition",
                slurm_two_nodes,
                *TWO_NODE_JOB,
                "--folder",
                str(tmp_path / "slurm" / "%j"),
            ]
        )
    finally:
        subprocess.run(["scontrol", "update", f"PartitionName={slurm_two_nodes}", "State=UP"], check=True)
    err = capsys.readouterr().err
    assert rc == 2 and "mtl submit: error: sbatch refused the job: " in err and "partition not available" in err, err
    (r,) = _runs(db)
    assert r.info.status == "FAILED" and "sbatch refused the job" in r.data.tags["mtl.end_reason"]
