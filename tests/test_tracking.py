"""What a run leaves in MLflow, read back with MLflow's own client: its name, its plots over the evaluation steps,
the data it trained and validated on, and what `mtl eval` wrote afterwards."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import SMOKE, mtl, ok, run, smoke_overrides
from mlflow.tracking import MlflowClient

from mtl.config import TrackingConfig, load_config
from mtl.data.manifest import read_manifest
from mtl.errors import MtlError
from mtl.launch.slurm_request import load_for_submit
from mtl.launch.sweep import element_name
from mtl.naming import MAX_CHARS
from mtl.tracking.inputs import split_digest
from mtl.tracking.mlflow_run import create_run
from mtl.tracking.runs import attach, open_run

# `mtl submit`'s flags reach the config as slurm.* overrides, after the user's
FLAGS = {"partition": "gpu", "nodes": 2, "time": 30}


def test_runs_are_named_after_the_config_and_what_was_overridden(tmp_path: Path) -> None:
    noise = [f"data.shards={tmp_path}/shards", f"train.output_dir={tmp_path}/out", "tracking.uri=sqlite:///x.db",
             "tracking.experiment=e", "train.resume=never", f"model.pretrained_file={tmp_path}/w"]  # fmt: skip
    overrides = ["train.zero_stage=3", *noise, "optim.lr=3e-4", "train.zero_stage=1"]
    name = "smoke train.zero_stage=1,optim.lr=3e-4"  # a key set twice: once, its last value where it first stood
    assert load_config(SMOKE, overrides).tracking.run_name == name
    assert load_for_submit(SMOKE, overrides, FLAGS).tracking.run_name == name  # what `mtl submit` creates the run as
    assert load_config(SMOKE, [*overrides, "tracking.run_name=mine"]).tracking.run_name == "mine"
    assert load_config(None, ["optim.lr=0.1"]).tracking.run_name == "defaults optim.lr=0.1"
    assert load_config(SMOKE).tracking.run_name == "smoke"
    long = load_config(SMOKE, [f"train.seed={10**200}"]).tracking.run_name
    assert len(long) == MAX_CHARS and long.startswith("smoke train.seed=1000") and long.endswith("…")
    # A sweep element is named by the same code: its own overrides, paths left out.
    assert element_name({"model.mask.prob": 0.1, "train.output_dir": "/x/y"}) == "model.mask.prob=0.1"


def test_eval_logs_nothing_where_no_run_is_recorded(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text("{}")
    message = attach(TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}"), [tmp_path / "metrics.json"], "eval/val")
    assert message == "no MLflow run is recorded with these weights: nothing logged to MLflow"
    assert not (tmp_path / "m.db").exists()


def _one_line(stderr: str, *words: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in stderr, stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.fixture()
def read_only_store(tmp_path: Path):
    """A real MLflow store on a file system mounted read-only (root only, as CI runs: root ignores chmod)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if os.geteuid() != 0 or run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        uri = f"sqlite:///{mount / 'mlflow.db'}"
        make = f"from mlflow.tracking import MlflowClient; MlflowClient({uri!r}).search_experiments()"
        ok(run([sys.executable, "-c", make]))  # the store's tables (another process: this one keeps no handle)
        ok(run(["mount", "-o", "remount,ro", str(mount)]))
        yield uri
    finally:
        run(["umount", str(mount)])


def test_a_broken_store_is_one_line_before_training(tmp_path: Path, read_only_store: str, capsys) -> None:
    """Garbage in the store's file, or a store in a read-only folder: `mtl train` (and `mtl submit`, which makes
    the run) name it in one line before a process group, a model or the output directory exists."""
    from mtl.cli import main

    garbage = tmp_path / "mlflow.db"
    garbage.write_bytes(b"not an MLflow store\n" * 200)
    out = tmp_path / "run"
    for uri, why in ((f"sqlite:///{garbage}", f"{garbage} is not an SQLite database"),
                     (read_only_store, "is not writable")):  # fmt: skip
        args = ["train", "--config", str(SMOKE), f"data.shards={tmp_path}", f"train.output_dir={out}",
                f"tracking.uri={uri}"]  # fmt: skip
        assert main(args) == 2
        _one_line(capsys.readouterr().err, f"mtl train: error: MLflow store {uri}: ", why)
        assert not out.exists()
        with pytest.raises(MtlError, match=f"MLflow store {re.escape(uri)}: "):
            open_run(TrackingConfig(uri=uri), "x", {})
    assert garbage.read_bytes() == b"not an MLflow store\n" * 200  # left as it was


def _image_steps(client: MlflowClient, run_id: str) -> dict[str, set[int]]:
    """key -> steps, from the file names MLflow gives step-wise images (``images/<key, / as ~>+step+<N>+...``)."""
    steps: dict[str, set[int]] = defaultdict(set)
    for a in client.list_artifacts(run_id, "images"):
        m = re.fullmatch(r"images/(.+)\+step\+(\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png", a.path)
        if m:
            steps[m.group(1).replace("~", "/")].add(int(m.group(2)))
    return dict(steps)


def _eval(capsys: pytest.CaptureFixture, *args: str) -> str:
    from mtl.cli import main

    assert main(["eval", *args]) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_a_run_reads_back_by_name_with_step_images_inputs_and_eval_outputs(
    tiny_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    args = smoke_overrides(tiny_shards, out, db, "train.max_steps=4", "train.eval_every=2", "optim.lr=3e-3")
    ok(mtl("train", "--config", str(SMOKE), *args))
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("mtl-smoke").experiment_id])
    run_id = run.info.run_id
    assert run.info.run_name == "smoke train.max_steps=4,train.eval_every=2,optim.lr=3e-3"
    assert run.info.status == "FINISHED"

    # One image per plot and evaluation step, under a key the UI pages through; the PNG files stay too.
    plots = ("expr_confusion", "au_f1", "va_scatter")
    assert _image_steps(client, run_id) == {f"val/{p}": {2, 4} for p in plots}
    for step in ("00000002", "00000004"):
        files = {a.path for a in client.list_artifacts(run_id, f"plots/val/step_{step}")}
        assert files == {f"plots/val/step_{step}/{p}.png" for p in plots}

    # The training and validation splits as dataset inputs: name, the manifest as source, a digest of its shards.
    manifest = read_manifest(tiny_shards)
    inputs = {}
    for di in run.inputs.dataset_inputs:
        (context,) = [t.value for t in di.tags if t.key == "mlflow.data.context"]
        inputs[context] = di.dataset
    assert set(inputs) == {"training", "validation"}
    for context, split in (("training", "train"), ("validation", "val")):
        ds = inputs[context]
        assert ds.name == f"{tiny_shards.name}/{split}" and ds.digest == split_digest(manifest, split)
        assert ds.source_type == "local" and json.loads(ds.source)["uri"] == str(tiny_shards / "manifest.json")
    assert inputs["training"].digest != inputs["validation"].digest and len(inputs["training"].digest) == 16

    # `mtl eval` of the run dir (its best export) and of one checkpoint: outputs on the run, which stays FINISHED.
    printed = _eval(capsys, "--checkpoint", str(out))
    assert f"logged to MLflow run {run_id}" in printed and "eval/val/best/" in printed
    printed = _eval(capsys, "--checkpoint", str(out / "checkpoints" / "step_00000004"), "--out", str(tmp_path / "e4"))
    assert "eval/val/step_00000004/" in printed
    for where, local in (("eval/val/best", out / "eval_val"), ("eval/val/step_00000004", tmp_path / "e4")):
        logged = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run_id, where)}
        assert logged == {"predictions.csv", "submission", "submission_tuned_au", "thresholds.json", "metrics.json"}
        subs = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run_id, f"{where}/submission")}
        assert subs == {"VA.txt", "EXPR.txt", "AU.txt"}
        got = Path(client.download_artifacts(run_id, f"{where}/metrics.json", str(tmp_path / "dl" / where)))
        assert json.loads(got.read_text()) == json.loads((local / "metrics.json").read_text())
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == run.info.end_time

    # An export carried elsewhere still names its run, but its store is not reachable: nothing logged, said so.
    moved = tmp_path / "elsewhere" / "best.safetensors"
    moved.parent.mkdir()
    shutil.copy(out / "export" / "best.safetensors", moved)
    gone = tmp_path / "gone.db"
    printed = _eval(capsys, "--checkpoint", str(moved), f"tracking.uri=sqlite:///{gone}")
    assert f"MLflow store sqlite:///{gone} not found: nothing logged to MLflow (set tracking.uri=" in printed
    assert not gone.exists()
    assert {a.path for a in client.list_artifacts(run_id, "eval/val")} == {"eval/val/best", "eval/val/step_00000004"}

    # A store that is there but holds garbage: one line naming it before anything is evaluated or written.
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not an MLflow store\n" * 200)
    from mtl.cli import main

    capsys.readouterr()
    args = ["--checkpoint", str(moved), "--out", str(tmp_path / "e5"), f"tracking.uri=sqlite:///{garbage}"]
    assert main(["eval", *args]) == 2
    _one_line(capsys.readouterr().err, f"MLflow store sqlite:///{garbage}", "not an SQLite database")
    assert not (tmp_path / "e5").exists()


def test_experiments_mtl_creates_open_on_their_runs_table(tmp_path: Path) -> None:
    """MLflow 3's UI shows a GenAI overview unless the experiment says it is model development."""
    uri = f"sqlite:///{tmp_path}/m.db"
    run_id = create_run(TrackingConfig(uri=uri, experiment="kind"), run_name="r")
    client = MlflowClient(uri)
    exp = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # one made without the tag (an older mtl, or by hand) gets it at its next run; one tagged otherwise keeps its kind
    client.create_experiment("old")
    client.create_experiment("mine", tags={"mlflow.experimentKind": "finetuning"})
    for name in ("old", "mine"):
        create_run(TrackingConfig(uri=uri, experiment=name), run_name="r")
    assert client.get_experiment_by_name("old").tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment_by_name("mine").tags["mlflow.experimentKind"] == "finetuning"


def test_ui_addresses_lead_to_the_store_that_serves_them() -> None:
    """A local store needs `mlflow ui` on localhost; a tracking server is its own UI (no command to run)."""
    from mtl.tracking.ui import compare_address, run_address, ui_lines

    local = ui_lines("sqlite:////w/m.db", [("run", run_address("sqlite:////w/m.db", "3", "abc"))])
    assert local == ["MLflow: mlflow ui --backend-store-uri sqlite:////w/m.db --host 127.0.0.1 --port 5000",
                     "  run: http://127.0.0.1:5000/#/experiments/3/runs/abc"]  # fmt: skip
    served = "http://tracking.example:8080/"
    assert ui_lines(served, [])[0] == f"MLflow: {served}"
    assert compare_address(served, "3", ["a", "b"]) == (
        "http://tracking.example:8080/#/compare-runs?runs=%5B%22a%22%2C%22b%22%5D&experiments=%5B%223%22%5D"
    )
