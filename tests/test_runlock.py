"""One training per run folder (run.lock), and resumes that take changed settings or refuse another experiment."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import SMOKE, mtl, ok, run, smoke_overrides
from mlflow.tracking import MlflowClient

from mtl.config import Config, flatten, load_config
from mtl.engine.checkpoint import read_state
from mtl.engine.schedule import lr_factor
from mtl.errors import MtlError
from mtl.runs import layout, lock
from mtl.runs.layout import RunDir
from mtl.runs.resume_changes import EXPERIMENT, POLICY, SETTING, UNCOMPARED, check, compare, kind_of

# ------------------------------------------------------------------------------------------ the lock itself


def _write_lock(run_dir: RunDir, **fields) -> None:
    now = time.time()
    holder = {"token": "x" * 32, "host": socket.gethostname(), "pid": 1, "started": now, "renewed": now, **fields}
    run_dir.root.mkdir(parents=True, exist_ok=True)
    run_dir.lock_file.write_text(json.dumps(holder))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_owner_is_refused_naming_the_holder(tmp_path: Path) -> None:
    run_dir, warned = RunDir(tmp_path / "run"), []
    held = lock.take(run_dir, warned.append)
    try:
        content = json.loads(run_dir.lock_file.read_text())
        assert (content["host"], content["pid"]) == (socket.gethostname(), os.getpid())
        code = "import sys; from pathlib import Path; from mtl.runs import lock, layout\n" \
               "lock.take(layout.RunDir(Path(sys.argv[1])), print)"  # fmt: skip
        other = run([sys.executable, "-c", code, str(run_dir.root)])
        assert other.returncode != 0 and "MtlError" in other.stderr
        line = other.stderr.strip().splitlines()[-1]
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in line and str(run_dir.root) in line, line
        with pytest.raises(MtlError, match="in use by"):  # this process twice: refused as well
            lock.take(run_dir, warned.append)
        assert held.renew() and not held.lost
    finally:
        held.release()
    assert not run_dir.lock_file.exists() and not warned
    assert sorted(p.name for p in run_dir.root.iterdir()) == [], "no temporary file left behind"


@pytest.mark.parametrize(
    "fields, why",
    [
        ({"pid": "dead"}, "has ended"),
        ({"host": "elsewhere", "renewed": time.time() - lock.LEASE_S - 5}, "lease was last renewed"),
        ({"host": "elsewhere", "slurm_job": "4242"}, "SLURM job 4242 starts again"),
        ({"host": "elsewhere", "elastic_run": "r7"}, "torchrun job r7 restarted its workers"),
        ({"boot_id": "another-boot"}, "rebooted"),
        ({"pid": "self"}, "earlier training of this process"),
        ({"garbage": True}, "unreadable"),
    ],
)
def test_stale_lock_is_taken_over(fields: dict, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, warned = RunDir(tmp_path / "run"), []
    if fields.get("pid") == "dead":
        fields["pid"] = _dead_pid()
    if fields.get("pid") == "self":
        fields["pid"] = os.getpid()
    if "slurm_job" in fields:
        monkeypatch.setenv("SLURM_JOB_ID", fields["slurm_job"])
    if "elastic_run" in fields:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", fields["elastic_run"])
    if "boot_id" in fields and lock.Holder.this_process().boot_id is None:
        pytest.skip("no /proc boot id here")
    if "garbage" in fields:
        run_dir.root.mkdir(parents=True)
        run_dir.lock_file.write_text("not json{")
    else:
        _write_lock(run_dir, **fields)
    held = lock.take(run_dir, warned.append)
    try:
        assert len(warned) == 1 and why in warned[0] and str(run_dir.lock_file) in warned[0], warned
        assert json.loads(run_dir.lock_file.read_text())["token"] == held.holder.token
    finally:
        held.release()


@pytest.mark.parametrize("fields", [{"host": "elsewhere"}, {"pid": "parent"}])
def test_live_holder_keeps_the_lock(fields: dict, tmp_path: Path) -> None:
    """Another host within its lease, or a live process here: refused, and the lock left as it was."""
    run_dir = RunDir(tmp_path / "run")
    if fields.get("pid") == "parent":
        fields["pid"] = os.getppid()
    _write_lock(run_dir, slurm_job="77", **fields)
    before = run_dir.lock_file.read_text()
    with pytest.raises(MtlError, match=r"in use by pid \d+ on host .*SLURM job 77"):
        lock.take(run_dir, print)
    assert run_dir.lock_file.read_text() == before


def test_a_lock_taken_over_is_not_renewed_nor_removed_by_its_old_owner(tmp_path: Path) -> None:
    run_dir, warned = RunDir(tmp_path / "run"), []
    held = lock.take(run_dir, warned.append)
    _write_lock(run_dir, host="elsewhere")  # taken over from another host (say this process froze past its lease)
    assert not held.renew() and held.lost and "taken over" in warned[0]
    held.release()
    assert json.loads(run_dir.lock_file.read_text())["host"] == "elsewhere"


# ------------------------------------------------------------------------------------------ the resume policy


def test_every_config_key_has_a_policy() -> None:
    keys = flatten(Config())
    kinds = {key: kind_of(key) for key in keys}
    assert {kinds["optim.lr"], kinds["model.temporal.dim"], kinds["data.batch_size"], kinds["train.seed"]} == {
        EXPERIMENT
    }
    assert {kinds["train.max_steps"], kinds["train.zero_stage"], kinds["train.eval_every"], kinds["slurm.nodes"]} == {
        SETTING
    }
    assert kinds["train.resume"] == UNCOMPARED
    assert kind_of("loss.tasks.au.alpha") == EXPERIMENT, "loss keys by their section, whatever their names"
    for prefix in POLICY:  # no entry that names nothing
        assert any(k == prefix or k.startswith(prefix + ".") for k in keys), prefix


def test_changes_are_classified_and_paths_compared_resolved(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    saved = flatten_to_nested(load_config(SMOKE, ["data.shards=shards/x", "train.output_dir=runs/a"]))
    now = load_config(SMOKE, [f"data.shards={tmp_path}/shards/x", "train.output_dir=runs/a", "train.max_steps=9"])
    found = compare(saved, now, "step_00000002")
    assert [(c.key, c.kind) for c in found.changes] == [("train.max_steps", SETTING)]
    changed = load_config(SMOKE, ["optim.lr=5e-3", "model.mask.prob=0.5", "data.shards=shards/x"])
    with pytest.raises(MtlError) as err:
        check(saved, changed, tmp_path / "ckpt", "step_00000002")
    line = str(err.value)
    assert "\n" not in line and "optim.lr 0.001 -> 0.005" in line and "model.mask.prob 0.25 -> 0.5" in line
    assert "train.resume=force" in line
    forced = check(saved, load_config(SMOKE, ["optim.lr=5e-3", "train.resume=force", "data.shards=shards/x",
                                              "train.output_dir=runs/a"]), tmp_path, "step_00000002")  # fmt: skip
    assert forced.tags() == {"config_change/step_00000002": "optim.lr 0.001 -> 0.005",
                             "config_change/step_00000002/forced": "true"}  # fmt: skip


def flatten_to_nested(cfg: Config) -> dict:
    from mtl.config import to_dict

    return to_dict(cfg)


# ------------------------------------------------------------------------------------------ real trainings


def _popen(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "mtl.cli", "train", "--config", str(SMOKE), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, proc.stderr[-4000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _run_of(db: Path):
    client = MlflowClient(f"sqlite:///{db}")
    (r,) = client.search_runs([client.get_experiment_by_name("mtl-smoke").experiment_id])
    return client, r


@pytest.mark.slow
def test_concurrent_train_is_refused_and_a_killed_owner_taken_over(tiny_shards: Path, tmp_path: Path) -> None:
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    args = smoke_overrides(tiny_shards, out, db, "train.max_steps=400", "train.ckpt_every=2")
    first = _popen(args)
    try:
        end = time.time() + 120
        while layout.latest_complete(out / "checkpoints") is None:  # training, and a checkpoint written
            assert first.poll() is None and time.time() < end, "the first training ended early"
            time.sleep(0.2)
        held = RunDir(out).lock_file.read_text()
        other_db = tmp_path / "second.db"  # where the second start would open its MLflow run
        second = mtl("train", "--config", str(SMOKE), *smoke_overrides(tiny_shards, out, other_db))
        _one_line_error(second, f"in use by pid {first.pid} on host {socket.gethostname()}", str(out))
        assert first.poll() is None, "the first training was disturbed"
        assert not other_db.exists() and RunDir(out).lock_file.read_text() == held, "the refused start wrote"
        first.send_signal(signal.SIGKILL)  # the owner dies without releasing its lock
        first.wait(60)
    finally:
        first.kill()
    assert RunDir(out).lock_file.is_file()
    resumed = ok(mtl("train", "--config", str(SMOKE), *args[:-2], "train.max_steps=1"))
    assert f"taking over {out / layout.LOCK_FILE} from pid {first.pid}" in resumed.stderr, resumed.stderr[-3000:]
    assert f"pid {first.pid} has ended" in resumed.stderr and "completed at step" in resumed.stdout
    assert not RunDir(out).lock_file.exists(), "released at the end"


@pytest.mark.slow
def test_resume_takes_settings_refuses_another_experiment_unless_forced(tiny_shards: Path, tmp_path: Path) -> None:
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    ok(mtl("train", "--config", str(SMOKE), *smoke_overrides(tiny_shards, out, db, "train.max_steps=2")))
    ckpts, before = out / "checkpoints", _snapshot(out)

    refused = mtl(
        "train",
        "--config",
        str(SMOKE),
        *smoke_overrides(tiny_shards, out, db, "train.max_steps=4", "optim.lr=5e-3", "model.mask.prob=0.5"),
    )
    _one_line_error(refused, "optim.lr 0.001 -> 0.005", "model.mask.prob 0.25 -> 0.5", "train.resume=force")
    assert "train.max_steps" not in refused.stderr.splitlines()[-1], "a setting is no reason to refuse"
    assert _snapshot(out) == before, "the refused resume wrote into the run folder"
    assert not out.joinpath(layout.LOCK_FILE).exists(), "a refused start releases the folder"

    # settings taken and said; with force, the other experiment too
    forced = ok(mtl("train", "--config", str(SMOKE), *smoke_overrides(
        tiny_shards, out, db, "train.max_steps=4", "optim.lr=5e-3", "train.resume=force")))  # fmt: skip
    said = forced.stderr
    assert "resuming step_00000002 with changed settings: train.max_steps 2 -> 4" in said, said[-3000:]
    assert "train.resume=force: step_00000002 continues with changed experiment settings: optim.lr 0.001 -> 0.005" \
        in said, said[-3000:]  # fmt: skip
    (line,) = [json.loads(x) for x in (out / layout.CHANGES_FILE).read_text().splitlines() if '"forced": true' in x]
    assert line["resumed_from"] == "step_00000002"
    assert [(c["key"], c["before"], c["after"]) for c in line["changes"] if c["kind"] == EXPERIMENT] == [
        ("optim.lr", 0.001, 0.005)
    ]
    client, r = _run_of(db)
    assert r.data.tags["config_change/step_00000002/forced"] == "true"
    assert r.data.tags["config_change/step_00000002"] == "optim.lr 0.001 -> 0.005; train.max_steps 2 -> 4"
    lrs = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "train/lr")}
    o = load_config(SMOKE, []).optim

    def factor(step: int, total: int) -> float:
        return lr_factor(step, o.warmup_steps, total, o.min_lr_ratio)

    # steps 1-2 at 1e-3 on a 2-step schedule, steps 3-4 at 5e-3 on the 4-step one
    assert lrs[2] == pytest.approx(1e-3 * factor(2, 2), rel=1e-6)
    assert lrs[3] == pytest.approx(5e-3 * factor(3, 4), rel=1e-6), "the forced lr was not taken"
    assert read_state(ckpts / "step_00000004").config["optim"]["lr"] == 0.005, "the next resume compares with it"


@pytest.mark.slow
def test_two_ranks_share_one_owner(tiny_shards: Path, tmp_path: Path) -> None:
    """Under torchrun, rank 0 holds the folder and a refusal stops both ranks with one line each, no hang."""
    from helpers import torchrun

    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    _write_lock(RunDir(out), host="elsewhere", slurm_job="99")
    args = smoke_overrides(tiny_shards, out, db, "train.max_steps=1")
    refused = torchrun(2, ["-m", "mtl.cli", "train", "--config", str(SMOKE), *args], timeout=300)
    assert refused.returncode != 0
    assert refused.stderr.count("in use by pid 1 on host elsewhere, SLURM job 99") == 2, refused.stderr[-3000:]
    assert not (out / "checkpoints").exists()  # (a 2-rank training that owns its folder: tests/test_resume.py)


def test_submit_refuses_on_the_login_node_what_the_job_would_refuse(tmp_path: Path) -> None:
    """`mtl submit` checks the resume (it takes no lock: the job does), so a changed experiment is not queued."""
    from mtl.config import to_dict
    from mtl.engine.checkpoint import TrainState
    from mtl.launch.prepare import absolutize, check_inputs

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    keys = [f"data.shards={tmp_path / 'shards'}", f"train.output_dir={tmp_path / 'run'}"]
    tag_dir = tmp_path / "run" / layout.CHECKPOINTS / layout.tag_for(2)
    tag_dir.mkdir(parents=True)
    layout.write_marker(tag_dir, TrainState(step=2, config=to_dict(load_config(SMOKE, keys))).to_dict())
    with pytest.raises(MtlError, match=r"optim.lr 0.001 -> 0.005; .*train.resume=force"):
        check_inputs(absolutize(load_config(SMOKE, [*keys, "optim.lr=5e-3", "train.max_steps=9"])))
    check_inputs(absolutize(load_config(SMOKE, [*keys, "optim.lr=5e-3", "train.resume=force"])))
    assert not RunDir(tmp_path / "run").lock_file.exists()
