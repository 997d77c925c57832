"""Faults a user or an operator meets: each ends with one clear line or recovers, and nothing finished is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import DRIVER, SMOKE, ctrl_c_as_in_a_terminal, free_port, mtl, ok, run, smoke_overrides
from mlflow.tracking import MlflowClient

from mtl.config import from_dict, to_dict
from mtl.engine import checkpoint as ckpt
from mtl.errors import MtlError
from mtl.runs import layout
from mtl.runs.export import save_weights


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, no traceback, and one `mtl ...: error:` line that holds every word."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, proc.stderr[-4000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_truncated_export_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "export" / "best.safetensors"
    save_weights({"w": torch.zeros(256, 256)}, path, to_dict(from_dict({})))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _one_line_error(mtl("eval", "--checkpoint", str(path)), str(path), "not a readable safetensors file")
    _one_line_error(mtl("eval", "--checkpoint", str(tmp_path)), str(path))  # the run dir resolves to it


class _Payload:
    """Unpickling this would create ``marker``: the code a crafted checkpoint file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


_ZERO2_CHECKPOINT = """
import os, sys, torch, deepspeed
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
model = torch.nn.Linear(4, 4)
cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
engine.backward(engine(torch.randn(2, 4)).sum())
engine.step()
engine.save_checkpoint(sys.argv[1], tag="step_00000001", save_latest=False)
"""


@pytest.fixture(scope="module")
def zero2_checkpoint(tmp_path_factory) -> Path:
    """A real 1-rank ZeRO-2 checkpoint (``<root>/step_00000001``), written once; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("zero2") / "checkpoints"
    ok(run([sys.executable, "-c", _ZERO2_CHECKPOINT, str(root), str(free_port())]))
    return root


@pytest.mark.parametrize("stage", [0, 2])
def test_crafted_checkpoint_is_refused_not_run(stage: int, zero2_checkpoint: Path, tmp_path: Path) -> None:
    """A checkpoint tag holding a pickle that runs code: `mtl eval` refuses it and the code never runs."""
    tag_dir = tmp_path / "checkpoints" / layout.tag_for(1)
    marker = tmp_path / "pwned"
    if stage == 0:
        tag_dir.mkdir(parents=True)
        victim = tag_dir / "mp_rank_00_model_states.pt"
        torch.save({"module": {"w": torch.zeros(2)}, "x": _Payload(marker)}, victim)
    else:  # a real ZeRO-2 checkpoint, its optimizer file rewritten with the payload
        shutil.copytree(zero2_checkpoint, tag_dir.parent)
        victim = next(tag_dir.glob("*optim_states.pt"))
        content = torch.load(victim, weights_only=False)  # written by this test just now
        torch.save({**content, "x": _Payload(marker)}, victim)
    state = ckpt.TrainState(step=1, config=to_dict(from_dict({})))
    (tag_dir / layout.COMPLETE).write_text(json.dumps({"tag": tag_dir.name, "state": state.to_dict()}))
    _one_line_error(mtl("eval", "--checkpoint", str(tag_dir)), str(tag_dir), "refused to unpickle")
    assert not marker.exists(), "a checkpoint file ran code while being loaded"


def test_universal_conversion_reads_weights_only(zero2_checkpoint: Path, tmp_path: Path) -> None:
    """Converting for another world size unpickles every file of the tag: DeepSpeed's own types pass, a crafted
    pickle is refused naming the tag, runs nothing, and leaves no universal directory behind."""
    root = tmp_path / "checkpoints"
    shutil.copytree(zero2_checkpoint, root)
    tag_dir = root / layout.tag_for(1)
    crafted = tmp_path / "crafted" / tag_dir.name
    shutil.copytree(tag_dir, crafted)

    uc = ckpt.convert_to_universal(tag_dir)
    assert uc == tag_dir / ckpt.UNIVERSAL and (uc / "zero" / "weight" / "exp_avg.pt").is_file()
    assert (uc / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()  # a ZeRO-3 engine can open it too

    marker = tmp_path / "pwned"
    victim = next(crafted.glob("*optim_states.pt"))
    content = torch.load(victim, weights_only=False)  # written by this test just now
    torch.save({**content, "x": _Payload(marker)}, victim)
    with pytest.raises(MtlError, match="refused to unpickle"):
        ckpt.convert_to_universal(crafted)
    assert not marker.exists(), "a checkpoint file ran code while being converted"
    assert not (crafted / ckpt.UNIVERSAL).exists()


def _runs(db: Path):
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("mtl-smoke")
    return client, client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_damaged_newest_checkpoints_fall_back(tiny_shards: Path, tmp_path: Path) -> None:
    """The newest checkpoint has a truncated file, the one before a missing file: the resume warns about each, marks
    both, and goes on from the newest intact one (one run, both kinds of damage)."""
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    ckpts = out / "checkpoints"
    keep = ("train.ckpt_every=2", "train.keep_last=3")
    ok(mtl("train", "--config", str(SMOKE), *smoke_overrides(tiny_shards, out, db, "train.max_steps=6", *keep)))
    assert layout.complete_tags(ckpts) == ["step_00000002", "step_00000004", "step_00000006"]
    truncated = sorted((ckpts / "step_00000006").glob("*optim_states.pt"))[0]
    truncated.write_bytes(truncated.read_bytes()[:100])
    missing = sorted((ckpts / "step_00000004").glob("*optim_states.pt"))[0]
    missing.unlink()

    args = smoke_overrides(tiny_shards, out, db, "train.max_steps=8", *keep)
    resumed = ok(mtl("train", "--config", str(SMOKE), *args))
    warnings = [line for line in resumed.stderr.splitlines() if "damaged" in line]
    assert len(warnings) == 2, resumed.stderr[-3000:]
    for line, tag, victim in zip(warnings, ("step_00000006", "step_00000004"), (truncated, missing)):
        assert str(ckpts / tag) in line and victim.name in line, line
    assert "completed at step 8" in resumed.stdout
    _, runs = _runs(db)
    assert len(runs) == 1 and runs[0].data.tags["resumed_from"] == "step_00000002"
    # the damaged tags were never complete again: steps 4 and 6 were trained anew and saved intact
    assert layout.complete_tags(ckpts)[-1] == "step_00000008"
    for tag in layout.complete_tags(ckpts):
        assert layout.damage(ckpts / tag) is None


def _popen_train(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "mtl.cli", "train", "--config", str(SMOKE), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=ctrl_c_as_in_a_terminal)  # fmt: skip


def _logged_steps(db: Path) -> list[int]:
    """Steps of train/loss in the store, read straight from its SQLite file (quick enough to poll)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return [r[0] for r in con.execute("SELECT step FROM metrics WHERE key = 'train/loss'")]
    except sqlite3.Error:  # the store is being created
        return []


def _wait(pred, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        assert time.time() < end, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_ctrl_c_saves_and_resumed_history_has_each_step_once(tiny_shards: Path, tmp_path: Path) -> None:
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    args = smoke_overrides(tiny_shards, out, db, "train.max_steps=120", "train.ckpt_every=30")
    ckpts = out / "checkpoints"

    # SIGKILL with steps 1-12 logged and no checkpoint yet: the resumed run trains them again and must not log
    # them a second time
    died = run([sys.executable, str(DRIVER), "kill_after_log=12", str(SMOKE), *args])
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert sorted(_logged_steps(db)) == list(range(1, 13)) and layout.latest_complete(ckpts) is None

    # Ctrl-C after the checkpoint at step 30: the step ends, a checkpoint is saved, the run stops cleanly as
    # KILLED (exit 3, as preempted)
    proc = _popen_train(args)
    try:
        _wait(lambda: layout.latest_complete(ckpts) is not None, proc)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, stderr[-3000:]
    assert "Traceback" not in stderr
    stopped = int(stdout.split("preempted at step ")[1].split(";")[0])
    assert 30 <= stopped < 120 and layout.latest_complete(ckpts) == layout.tag_for(stopped)
    _, runs = _runs(db)
    assert runs[0].info.status == "KILLED"

    final = ok(mtl("train", "--config", str(SMOKE), *args))
    assert "completed at step 120" in final.stdout
    steps = _logged_steps(db)
    assert sorted(steps) == list(range(1, 121)), f"steps logged more than once or missing: {sorted(steps)}"


# ------------------------------------------------------------------------------------------------ full disk


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A real 4 MiB file system (tmpfs, root only as CI runs), so writes end in ENOSPC."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mount
    finally:
        run(["umount", str(mount)])


def _fill(disk: Path, leave: int) -> Path:
    st = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(bytes(st.f_bavail * st.f_frsize - leave))
    return filler


def test_torch_and_safetensors_writes_to_a_full_disk_name_the_path(small_disk: Path) -> None:
    from mtl.errors import os_error_line, writing

    (small_disk / "out").mkdir()
    _fill(small_disk, 64 * 1024)
    for name, write in [("w.pt", lambda p: torch.save({"w": torch.zeros(256, 256)}, p)),
                        ("w.safetensors", lambda p: save_weights({"w": torch.zeros(256, 256)}, p, {}))]:  # fmt: skip
        path = small_disk / "out" / name
        with pytest.raises(OSError) as caught, writing(path):
            write(path)
        assert os_error_line(caught.value) == f"{path}: No space left on device"
    assert not list((small_disk / "out").glob("*.tmp"))  # the export's partial file is gone


@pytest.mark.slow
def test_disk_full_while_saving_is_one_line_and_a_rerun_finishes(
    tiny_shards: Path, small_disk: Path, tmp_path: Path
) -> None:
    """Space for the run's configs but not its checkpoint (~1 MB here), then for the checkpoint but not the exports
    (~220 KB each): each time one line naming the folder or file, the half-written files removed; once space is
    freed the same command finishes the same MLflow run."""
    out, db = small_disk / "run", tmp_path / "mlflow.db"
    args = ["train", "--config", str(SMOKE), *smoke_overrides(tiny_shards, out, db, "train.max_steps=3")]
    tag_dir = out / "checkpoints" / layout.tag_for(3)
    for where, leave_kb in (("checkpoint", 400), ("export", 1100)):
        filler = _fill(small_disk, leave_kb * 1024)
        proc = mtl(*args)
        assert proc.returncode == 1, f"{where}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
        assert "Traceback" not in proc.stderr and "unexpected pos" not in proc.stderr, proc.stderr[-4000:]
        lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
        named = tag_dir if where == "checkpoint" else out / "export" / "last.safetensors"
        assert lines == [f"mtl train: error: {named}: No space left on device"], proc.stderr[-4000:]
        if where == "checkpoint":
            assert not tag_dir.exists()  # half-written: removed, its space back
        else:
            assert layout.complete_tags(out / "checkpoints") == [tag_dir.name]
            assert not list((out / "export").glob("*.tmp"))
        filler.unlink()

    assert "completed at step 3" in ok(mtl(*args)).stdout
    assert all((out / "export" / f"{name}.safetensors").is_file() for name in ("last", "best"))
    _, runs = _runs(db)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_rendezvous_port_in_use_is_one_line(tiny_shards: Path, tmp_path: Path) -> None:
    """MASTER_PORT held by another program (a real bound socket): one line naming the port and MASTER_PORT."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        args = smoke_overrides(tiny_shards, tmp_path / "run", tmp_path / "mlflow.db")
        proc = run([sys.executable, "-m", "mtl.cli", "train", "--config", str(SMOKE), *args],
                   env={"MASTER_PORT": str(port)})  # fmt: skip
    _one_line_error(proc, f"rendezvous port {port} on 127.0.0.1", f"MASTER_PORT={port}", "already in use")
    assert not (tmp_path / "run").exists()  # before anything was written


_RESUME = """
import json, os, sys, torch, deepspeed
from pathlib import Path
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
from mtl.engine import checkpoint as ckpt
from mtl.errors import MtlError

def engine(width):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, 2))
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}
    return deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)[0]

root = Path(sys.argv[1])
for width in sys.argv[3:]:
    if width == "save":
        e = engine(4)
        e.backward(e(torch.randn(2, 4)).sum())
        e.step()
        ckpt.save(e, root, ckpt.TrainState(step=1), rank=0, keep_last=2)
        continue
    width, _, rng = width.partition(":")  # 4:FILE: that file as the tag's RNG state
    if rng:
        (root / "step_00000001" / "rng_rank00000.pt").write_bytes(Path(rng).read_bytes())
    try:
        ckpt.load(engine(int(width)), root, "step_00000001", rank=0)
        print(json.dumps("loaded"))
    except MtlError as exc:
        print(json.dumps(str(exc)))
"""


@pytest.mark.slow
def test_resume_refuses_a_bad_rng_file_and_another_model_width(tmp_path: Path) -> None:
    """Where a checkpoint is loaded (every resume): a crafted `rng_rank*.pt` is refused without running it, a
    truncated or foreign one is named, and weights of another width are one line, as `mtl eval` says it."""
    root = tmp_path / "checkpoints"
    tag_dir = root / layout.tag_for(1)

    def resume(*widths: str) -> list[str]:
        proc = ok(run([sys.executable, "-c", _RESUME, str(root), str(free_port()), *widths]))
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('"')]

    assert resume("save", "4", "8") == [
        "loaded",
        f"{tag_dir}: weights do not fit the model (size mismatch for 0.weight: copying a param with shape "
        "torch.Size([4, 4]) from checkpoint, the shape in current model is torch.Size([8, 4]).; size mismatch for "
        "0.bias: copying a param with shape torch.Size([4]) from checkpoint, the shape in current model is "
        "torch.Size([8]).; size mismatch for 1.weight: copying a param with shape torch.Size([2, 4]) from "
        "checkpoint, the shape in current model is torch.Size([2, 8]).); resume with the model settings it was "
        "saved with, or train in another train.output_dir",
    ]
    rng = tag_dir / "rng_rank00000.pt"
    marker = tmp_path / "pwned"
    crafted, truncated, foreign = tmp_path / "crafted.pt", tmp_path / "truncated.pt", tmp_path / "foreign.pt"
    torch.save({**torch.load(rng, weights_only=True), "x": _Payload(marker)}, crafted)
    truncated.write_bytes(rng.read_bytes()[:200])
    torch.save({"torch": torch.zeros(3)}, foreign)
    got = resume(f"4:{crafted}", f"4:{truncated}", f"4:{foreign}")
    assert not marker.exists(), "an RNG file ran code while being loaded"
    assert got[0].startswith(f"{rng}: refused to unpickle a checkpoint file ("), got[0]
    assert got[1].startswith(f"{rng}: not an RNG state written by `mtl train` (PytorchStreamReader"), got[1]
    assert got[2] == f"{rng}: not an RNG state written by `mtl train` (RNG state must be a torch.ByteTensor)"
