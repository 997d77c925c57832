"""A task registered from outside the package (tests/plugins/facs_intensity.py) goes through every stage: its files
are parsed, packed into real shards, counted in the manifest, trained (`mtl train`), scored, plotted and written
to predictions and a submission (`mtl eval`) with no edit anywhere else."""

from __future__ import annotations

import csv
import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SMOKE, ok, run
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from mtl.config import load_config
from mtl.data.abaw import parse_abaw
from mtl.data.labels import ParseLog
from mtl.data.pack import PackOptions, pack
from mtl.data.shardio import parse_sample, read_raw
from mtl.data.synth import SPLIT_FOLDERS, make_synth, plan_videos
from mtl.errors import ConfigError, DataError
from mtl.objectives import MultiTaskLoss
from mtl.tasks import task_names, unregister

PLUGINS = Path(__file__).parent / "plugins"
VIDEOS, FRAMES = 5, 32


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch):
    """The plugin imported in this process (for pack), unregistered afterwards so other tests see the 3 tasks."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    module = importlib.import_module("facs_intensity")
    yield module.TASK
    unregister(module.TASK.name)
    sys.modules.pop("facs_intensity", None)


def write_intensity_files(annotations: Path, task) -> dict[str, int]:
    """AU6 / AU12 intensities of the synthetic videos (C where the synthetic AU is on, else 0), a few -1 rows, and
    one video left out; returns labelled-row counts per split."""
    labelled = {"train": 0, "val": 0}
    for k, v in enumerate(plan_videos(VIDEOS, FRAMES, seed=0)):
        if k == 1:
            continue  # video sets differ per task
        values = v.au[:, [3, 6]] * 3
        valid = np.ones(v.n, bool)
        valid[5:8] = False
        folder = annotations / task.folders[0] / SPLIT_FOLDERS[v.split]
        folder.mkdir(parents=True, exist_ok=True)
        rows = [task.format_row(values[i], valid[i]) for i in range(v.n)]
        (folder / f"{v.name}.txt").write_text(",".join(task.columns) + "\n" + "\n".join(rows) + "\n")
        labelled[v.split] += int(valid.sum())
    return labelled


def test_registered_task_trains_and_evaluates_end_to_end(plugin, tmp_path: Path) -> None:
    task = plugin
    assert task_names() == ("va", "expr", "au", "auint")
    root = make_synth(tmp_path / "synth", videos=VIDEOS, frames=FRAMES, seed=0, workers=1)
    labelled = write_intensity_files(root / "annotations", task)

    # its parser: letters read as intensities, -1 as no label, anything else refused naming file and line
    labels = parse_abaw(root / "annotations", ParseLog())
    some = next(vl.tasks["auint"] for vl in labels["train"].values() if "auint" in vl.tasks)
    assert some.values.max() == 3.0 and not some.valid[5:8].any() and some.valid[:5].all()
    bad = root / "annotations" / task.folders[0] / "Train_Set" / f"{next(iter(labels['train']))}.txt"
    text = bad.read_text()
    bad.write_text(text.replace("\n0,0\n", "\nF,0\n", 1) if "\n0,0\n" in text else text + "F,0\n")
    with pytest.raises(DataError, match=r"AU_Intensity_Challenge/Train_Set/.*\.txt:\d+: AU6_int 'F' is not a FACS"):
        parse_abaw(root / "annotations", ParseLog())
    bad.write_text(text)

    # packed: counted in the manifest, stored in each sample
    shards = tmp_path / "shards"
    manifest = pack(PackOptions(root / "cropped_aligned", root / "annotations", shards, segment_len=8, shard_size=3,
                    progress=False))  # fmt: skip
    for split, n in labelled.items():
        st = manifest.splits[split].tasks["auint"]
        assert st.labeled_frames + st.labeled_missing_image == n
        videos = [v for k, v in enumerate(plan_videos(VIDEOS, FRAMES, 0)) if v.split == split and k != 1]
        assert st.videos == len(videos)
    sample = parse_sample(next(read_raw(shards / manifest.splits["train"].shards[0].path)), "shard")
    assert sample.labels["auint"].shape == (len(sample), 2) and sample.labels["auint"].dtype == np.float32

    # trained by `mtl train` in another process, which registers the task from the config
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    env = {"PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    args = [f"data.shards={shards}", f"train.output_dir={run_dir}", f"tracking.uri=sqlite:///{db}",
            "tasks.plugins=[facs_intensity]", "loss.weights.auint=2.0", "loss.tasks.auint.mse=0.5",
            "train.max_steps=3", "train.eval_every=3"]  # fmt: skip
    proc = ok(run([sys.executable, "-m", "mtl.cli", "train", "--config", str(SMOKE), *args], env=env))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary) == {"va_ccc", "expr_f1", "au_f1", "auint_ccc", "mtl_score"}
    assert summary["mtl_score"] == pytest.approx(
        summary["va_ccc"] + summary["expr_f1"] + summary["au_f1"] + summary["auint_ccc"], abs=1e-3
    )
    client = MlflowClient(f"sqlite:///{db}")
    mlrun = client.search_runs([client.get_experiment_by_name("mtl-smoke").experiment_id])[0]
    assert {"train/auint", "val/auint_ccc", "val/auint_ccc_AU6_int", "val/auint_frames", "val/au_f1"} <= set(
        mlrun.data.metrics
    )
    assert mlrun.data.metrics["val/auint_frames"] > 0 and mlrun.data.params["tasks.plugins"] == "['facs_intensity']"
    assert mlrun.data.params["loss.tasks.auint.mse"] == "0.5"  # the plugin's own loss option, logged like any key
    plots = {a.path for a in client.list_artifacts(mlrun.info.run_id, "plots/val/step_00000003")}
    assert "plots/val/step_00000003/auint_scatter.png" in plots
    with safe_open(str(run_dir / "export" / "best.safetensors"), "pt") as f:
        assert f.get_tensor("heads.auint.weight").shape[0] == 2 and "heads.va.weight" in f.keys()

    # evaluated by `mtl eval`: metrics, predictions and a submission file with its columns, a row per frame
    out = tmp_path / "eval"
    ok(run([sys.executable, "-m", "mtl.cli", "eval", "--checkpoint", str(run_dir), "--out", str(out)], env=env))
    scores = json.loads((out / "metrics.json").read_text())
    assert {"auint_ccc", "auint_ccc_AU6_int", "auint_ccc_AU12_int", "auint_frames", "au_f1_tuned"} <= set(scores)
    assert scores["auint_frames"] == manifest.splits["val"].tasks["auint"].labeled_frames + (
        manifest.splits["val"].tasks["auint"].labeled_missing_image
    )
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == manifest.splits["val"].frames
    assert all(0.0 <= float(r["AU6_int"]) <= 5.0 for r in rows) and "p_Neutral" in rows[0]
    lines = (out / "submission" / "AU_INT.txt").read_text().splitlines()
    assert lines[0] == "image_location,AU6_int,AU12_int" and len(lines) == len(rows) + 1
    assert (out / "submission" / "VA.txt").read_text().splitlines()[0] == "image_location,valence,arousal"


def test_loss_weights_name_registered_tasks(plugin) -> None:
    cfg = load_config(None, ["loss.weights.auint=0.5", "loss.weights.va=2"])
    assert cfg.loss.weights == {"va": 2.0, "expr": 1.0, "au": 1.0, "auint": 0.5}
    with pytest.raises(ConfigError, match=r"loss\.weights\.vaa.*valid keys in loss\.weights: au, auint, expr, va"):
        load_config(None, ["loss.weights.vaa=1"])
    with pytest.raises(ConfigError, match=r"tasks\.plugins\[0\]: cannot import 'no_such_plugin'"):
        load_config(None, ["tasks.plugins=[no_such_plugin]"])


def test_a_plugin_task_owns_its_loss_options(plugin) -> None:
    """``loss.tasks.auint.*`` is the plugin's options model: checked like any config key, used by its loss."""
    assert load_config(None).loss.tasks["auint"].mse == 0.0  # the plugin's default
    cfg = load_config(None, ["loss.tasks.auint.mse=0.5", "loss.tasks.expr.alpha=none"])
    assert cfg.loss.tasks["auint"].mse == 0.5 and cfg.loss.tasks["expr"].alpha == "none"
    with pytest.raises(ConfigError, match=r"'loss\.tasks\.auint\.mes'; did you mean mse\? \(valid keys in \S+: mse\)"):
        load_config(None, ["loss.tasks.auint.mes=1"])
    with pytest.raises(ConfigError, match=r"loss\.tasks\.auint\.mse: expected a value >= 0, got -1"):
        load_config(None, ["loss.tasks.auint.mse=-1"])
    with pytest.raises(ConfigError, match=r"valid keys in loss\.tasks: au, auint, expr, va"):
        load_config(None, ["loss.tasks.auin.mse=1"])

    # its loss: CCC alone by default, plus mse times the squared error in units of the 0..5 scale when set
    g = torch.Generator().manual_seed(0)
    out, target = torch.rand(3, 5, 2, generator=g) * 5, torch.rand(3, 5, 2, generator=g) * 5
    valid = torch.rand(3, 5, generator=g) > 0.3
    batch = {"auint": target, "auint_valid": valid, "pad": torch.zeros(3, 5, dtype=torch.bool),
             "has_image": torch.ones(3, 5, dtype=torch.bool)}  # fmt: skip
    stats = {"auint": {"labeled_frames": 10}}
    ccc = MultiTaskLoss(load_config(None).loss, stats)({"auint": out}, batch)[1]["auint"]
    both = MultiTaskLoss(cfg.loss, stats)({"auint": out}, batch)[1]["auint"]
    m = valid.numpy()
    want_mse = float((((out.numpy()[m] - target.numpy()[m]) / 5) ** 2).mean())
    assert both.item() == pytest.approx(ccc.item() + 0.5 * want_mse, rel=1e-5) and want_mse > 0.01
