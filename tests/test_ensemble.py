"""Ensembles (`mtl eval --checkpoint A B ...`) and post-processing (`mtl postprocess fit`): smoothing and thresholds
fitted on held-out predictions, on arrays (fast), then end to end on a real tiny trained run and a second one made
from it (other weights, other clip length)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from mtl.errors import MtlError
from mtl.evaluation.ensemble import average, check_same_tasks, combine_folds, expand_runs
from mtl.evaluation.evaluate import FramePredictions, score_predictions
from mtl.evaluation.postprocess import (
    FittedOn,
    Smoothing,
    candidates,
    fit,
    load_postprocess,
    smooth,
    video_segments,
)
from mtl.runs.export import CONFIG_KEY, load_weights, save_weights
from mtl.tasks import get_task, tasks

# ------------------------------------------------------------------------------------------------ arrays


def _noisy(videos: int = 4, n: int = 300, seed: int = 0) -> FramePredictions:
    """Slowly varying labels of every task and noisy per-frame predictions of them, rows of the videos shuffled."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    video = [f"v{i}" for i in range(videos) for _ in range(n)]
    frame = [f for _ in range(videos) for f in t]
    va = np.concatenate([np.stack([np.sin(t / 20 + i), np.cos(t / 30 + i)], 1) * 0.6 for i in range(videos)])
    expr = np.concatenate([(t // 40 + i) % 8 for i in range(videos)])
    au = np.concatenate([np.stack([np.sin(t / 15 + j + i) for j in range(12)], 1) for i in range(videos)]) > 0.3
    p = np.eye(8)[expr] + rng.random((len(video), 8)) * 1.5
    outputs = {
        "va": np.clip(va + rng.normal(0, 0.4, va.shape), -1, 1),
        "expr": p / p.sum(1, keepdims=True),
        "au": np.clip(au * 0.3 + 0.2 + rng.normal(0, 0.25, au.shape), 0, 1),
    }
    labels = {"va": va, "expr": expr, "au": au.astype(np.float32)}
    order = rng.permutation(len(video))
    return FramePredictions.from_arrays(
        [video[i] for i in order], [frame[i] for i in order],
        {k: v[order].astype(np.float32) for k, v in outputs.items()}, {k: v[order] for k, v in labels.items()},
        {k: np.ones(len(order), bool) for k in labels},
    )  # fmt: skip


def test_smoothing_follows_frame_order_and_never_crosses_a_video() -> None:
    # two videos interleaved row by row; A is 0 everywhere, B is 1 except one spike of 0 at its frame 10
    video = ["A", "B"] * 20
    frame = [f for f in range(20) for _ in range(2)][::-1]  # frames in reverse order: smoothing must sort them
    x = np.array([[0.0] if v == "A" else [0.0 if f == 10 else 1.0] for v, f in zip(video, frame)])
    segments = video_segments(video, frame)
    assert sorted(len(s) for s in segments) == [20, 20]
    for kind in ("box", "gaussian", "median"):
        y = smooth(x, segments, Smoothing(kind=kind, width=5))
        a = np.array([v == "A" for v in video])
        assert np.all(y[a] == 0.0), kind  # A's zeros do not take anything from B, at any frame (ends included)
        b_frames = np.array(frame)[~a]
        b = y[~a, 0][np.argsort(b_frames)]
        assert np.all(b[:8] == 1.0) and np.all(b[13:] == 1.0), (kind, b)  # the spike spreads over its window only
        if kind == "median":
            assert np.all(b == 1.0)  # one outlier in 5 frames: gone
        else:
            assert 0.0 < b[10] < 1.0 and b[10] <= b[9] < 1.0
    box = smooth(x, segments, Smoothing(kind="box", width=5))[~a, 0][np.argsort(b_frames)]
    assert box[10] == pytest.approx(0.8) and box[0] == 1.0  # a plain mean of 5; cut (and renormalised) at the end
    assert smooth(x, segments, Smoothing()) is x
    with pytest.raises(ValueError, match="odd"):
        Smoothing(kind="box", width=4)
    with pytest.raises(MtlError, match="--widths 4 1: expected odd numbers of frames, at least 3"):
        candidates(widths=(5, 4, 1))


def test_fit_on_noisy_predictions_gains_and_its_file_scores_as_it_says(tmp_path: Path) -> None:
    preds = _noisy()
    before = score_predictions(preds).compute()
    pp = fit(preds, FittedOn(runs=["r"], weights=[1.0], split="val", frames=len(preds.frame), videos=4))
    for t in tasks():
        f = pp.tasks[t.name]
        assert f.metric == t.headline() and f.before == pytest.approx(before[t.headline()], abs=1e-9)
        assert f.smoothing.kind != "none" and f.gain > 0.1 and f.after == pytest.approx(f.before + f.gain)
    assert len(pp.tasks["au"].thresholds or []) == 12 and pp.tasks["va"].thresholds is None
    # saved, read back for the tasks it was fitted on, applied: the scores are the file's "after"
    path = pp.save(tmp_path / "postprocess.json")
    back = load_postprocess(path, ("va", "expr", "au"))
    after = score_predictions(back.apply(preds), back.thresholds()).compute()
    for t in tasks():
        assert after[t.headline()] == pytest.approx(pp.tasks[t.name].after, abs=2e-3)
    assert back.metrics()["postprocess/au_gain"] == pytest.approx(pp.tasks["au"].gain)


def test_a_postprocess_file_for_other_tasks_or_broken_is_one_line_naming_it(tmp_path: Path) -> None:
    preds = _noisy(videos=2, n=60)
    path = fit(preds, FittedOn(runs=["r"], weights=[1.0], split="val", frames=120, videos=2), widths=(5,)).save(
        tmp_path / "pp.json"
    )
    with pytest.raises(MtlError, match=r"pp\.json: fitted for tasks va, expr, au but the model predicts va, expr;"):
        load_postprocess(path, ("va", "expr"))
    data = json.loads(path.read_text())
    data["tasks"]["va"]["smoothing"]["width"] = 4
    path.write_text(json.dumps(data))
    with pytest.raises(MtlError, match=r"pp\.json: not a post-processing file .*tasks\.va\.smoothing.*odd"):
        load_postprocess(path, ("va", "expr", "au"))


def test_average_aligns_by_frame_and_weights_and_folds_expand(tmp_path: Path) -> None:
    a = _noisy(videos=2, n=30, seed=1)
    b = _noisy(videos=2, n=30, seed=2)  # the same frames in another row order, other values
    mean = average([a, b], np.array([0.25, 0.75]), [Path("a"), Path("b")])
    bi = {vf: i for i, vf in enumerate(zip(b.video, b.frame))}
    order = [bi[vf] for vf in zip(a.video, a.frame)]
    for name, va in mean.arrays().items():
        want = 0.25 * a.arrays()[name] + 0.75 * b.arrays()[name][order]
        np.testing.assert_allclose(va, want, rtol=1e-6, atol=1e-7)
    short = FramePredictions.from_arrays(b.video[1:], b.frame[1:], {k: v[1:] for k, v in b.arrays().items()})
    with pytest.raises(MtlError, match=r"^b predicted other frames than a \(1 of its frames missing, 0 others\)"):
        average([a, short], np.array([0.5, 0.5]), [Path("a"), Path("b")])

    # a folds directory stands for its folds (in fold order), sharing its weight
    cv = tmp_path / "cv"
    for k in (10, 2, 0):
        (cv / f"fold_{k}").mkdir(parents=True)
    (cv / "other").mkdir()
    (cv / "folds.json").write_text("{}")
    folds, single = expand_runs([cv, tmp_path / "single"], [3, 1])
    assert folds.runs == (cv / "fold_0", cv / "fold_2", cv / "fold_10") and single.runs == (tmp_path / "single",)
    assert (folds.weight, single.weight) == (0.75, 0.25)
    # their predictions: on each fold's held-out videos, the union (out-of-fold); on the same frames, the mean
    halves = [FramePredictions.from_arrays([v] * 30, list(range(30)), {k: x[:30] for k, x in a.arrays().items()},
                                           *(dict.fromkeys(a.label_arrays()[i], np.zeros(30)) for i in (0, 1)))
              for v in ("x", "y")]  # fmt: skip
    oof, how = combine_folds(halves, cv)
    assert how == "out-of-fold" and oof.video == ["x"] * 30 + ["y"] * 30 and len(oof.label_arrays()[0]["au"]) == 60
    assert combine_folds([a, b], cv)[1] == "mean"
    with pytest.raises(MtlError, match="overlapping but different frames"):
        combine_folds([a, halves[0], short], cv)
    with pytest.raises(MtlError, match="--weights: 1 weights for 2 --checkpoint paths"):
        expand_runs([cv, tmp_path], [1])
    with pytest.raises(MtlError, match="non-negative"):
        expand_runs([tmp_path], [-1])
    with pytest.raises(MtlError, match=r"^r1 predicts tasks va, expr, au but r2 predicts va, expr: "):
        check_same_tasks([(Path("r1"), ("va", "expr", "au")), (Path("r2"), ("va", "expr"))])


# ------------------------------------------------------------------------------------------------ end to end


def _variant(src: Path, dst: Path, *, seed: int | None = None, drop: str | None = None, clip_len: int = 8) -> Path:
    """Another trained run made from ``src``'s export: its weights moved by noise (another model), a task's head
    dropped, its clip length changed; not tracked (it is no MLflow run's)."""
    weights, config = load_weights(src)
    assert config is not None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        weights = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in weights.items()}
    if drop:
        weights = {k: v for k, v in weights.items() if not k.startswith(f"heads.{drop}.")}
    config["data"]["clip_len"] = clip_len
    config["tracking"]["enabled"] = False
    save_weights(weights, dst, config)
    with safe_open(str(dst), "pt") as f:
        assert CONFIG_KEY in (f.metadata() or {})
    return dst


def _eval(capsys: pytest.CaptureFixture, *args: str) -> str:
    from mtl.cli import main

    code = main(["eval", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out


def _predictions(path: Path) -> tuple[list[tuple[str, str]], dict[str, np.ndarray]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c not in ("video", "frame")]
    return [(r["video"], r["frame"]) for r in rows], {c: np.array([float(r[c]) for r in rows]) for c in cols}


def _headlines(path: Path) -> dict[str, float]:
    scores = json.loads(path.read_text())
    return {k: scores[k] for k in [t.headline() for t in tasks()] + ["mtl_score"]}


@pytest.mark.slow
def test_ensembles_and_postprocessing_end_to_end(trained_run: Path, tmp_path: Path, capsys) -> None:
    from mtl.cli import main

    a = trained_run
    b = _variant(a / "export" / "best.safetensors", tmp_path / "b" / "best.safetensors", seed=1)
    single = tmp_path / "a_alone"
    _eval(capsys, "--checkpoint", str(a), "--out", str(single))

    # A with itself: the single run's scores; outputs in --out, nothing logged to MLflow, the members recorded
    printed = _eval(capsys, "--checkpoint", str(a), str(a), "--out", str(tmp_path / "aa"))
    assert "an ensemble of 2 runs" in printed and "nothing logged to MLflow" in printed
    assert _headlines(tmp_path / "aa" / "metrics.json") == pytest.approx(_headlines(single / "metrics.json"), abs=1e-6)
    assert [m["weight"] for m in json.loads((tmp_path / "aa" / "ensemble.json").read_text())["members"]] == [0.5, 0.5]

    # A and B (other weights, clip length 8 instead of 4), weights 1:3: each frame's outputs are the weighted mean
    _eval(capsys, "--checkpoint", str(b), "--out", str(tmp_path / "b_alone"))
    _eval(capsys, "--checkpoint", str(a), str(b), "--weights", "1", "3", "--out", str(tmp_path / "ab"))
    keys_a, pa = _predictions(single / "predictions.csv")
    keys_b, pb = _predictions(tmp_path / "b_alone" / "predictions.csv")
    keys_ab, pab = _predictions(tmp_path / "ab" / "predictions.csv")
    assert keys_ab == keys_a and sorted(keys_b) == sorted(keys_a) and len(set(keys_a)) == len(keys_a)
    order = [dict(zip(keys_b, range(len(keys_b))))[k] for k in keys_a]
    values = [c for t in tasks() if t.kind == "regression" for c in t.columns]
    soft = [c for c in pab if c.startswith("p_")] + values  # probabilities and regressed values
    assert len(soft) == 8 + 12 + 2
    for c in soft:
        np.testing.assert_allclose(pab[c], 0.25 * pa[c] + 0.75 * pb[c][order], atol=2e-5, err_msg=c)
    assert not np.allclose(pa["p_Neutral"], pb["p_Neutral"][order], atol=1e-3)  # B is another model
    assert (tmp_path / "ab" / "submission" / "AU.txt").is_file()
    # a folds directory of the two (both predict every frame of this split): their mean, written beside it
    cv = tmp_path / "cv"
    for k, src in enumerate((a / "export" / "best.safetensors", b)):
        (cv / f"fold_{k}").mkdir(parents=True)
        shutil.copy(src, cv / f"fold_{k}" / "best.safetensors")
    (cv / "folds.json").write_text("{}")
    _eval(capsys, "--checkpoint", str(cv))
    _, pcv = _predictions(cv / "eval_val" / "predictions.csv")
    np.testing.assert_allclose(pcv["valence"], 0.5 * pa["valence"] + 0.5 * pb["valence"][order], atol=2e-5)
    assert json.loads((cv / "eval_val" / "ensemble.json").read_text())["members"][0]["combined"] == "mean"

    # several paths without --out; runs that predict other tasks: one line, exit 2, nothing evaluated
    assert main(["eval", "--checkpoint", str(a), str(b)]) == 2
    assert "--out: an ensemble of 2 paths" in capsys.readouterr().err
    c = _variant(a / "export" / "best.safetensors", tmp_path / "c" / "best.safetensors", drop="au")
    assert main(["eval", "--checkpoint", str(a), str(c), "--out", str(tmp_path / "ac")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("mtl eval: error: ") and "predicts tasks va, expr, au but" in err[0]
    assert str(c) in err[0] and err[0].endswith("predicts va, expr: an ensemble needs runs that predict the same tasks")
    assert not (tmp_path / "ac").exists()

    # post-processing fitted on a copy of A (its validation split), written beside it, logged to A's MLflow run
    run = tmp_path / "a_copy"
    shutil.copytree(a, run, ignore=shutil.ignore_patterns("eval_*", "checkpoints"))
    assert main(["postprocess", "fit", "--checkpoint", str(run), "--widths", "3", "9"]) == 0
    printed = capsys.readouterr().out
    pp_file = run / "postprocess.json"
    pp = load_postprocess(pp_file, ("va", "expr", "au"))
    assert pp.fitted_on.split == "val" and pp.fitted_on.runs == [str(run)] and "logged to MLflow run" in printed
    assert all(f.after >= f.before - 1e-12 for f in pp.tasks.values())
    run_id = (a / "mlflow_run_id").read_text().strip()
    client = MlflowClient(f"sqlite:///{a.parent / 'mlflow.db'}")
    logged = client.get_run(run_id).data.metrics
    assert logged["postprocess/au_gain"] == pytest.approx(pp.tasks["au"].gain)
    assert [x.path for x in client.list_artifacts(run_id, "postprocess/val/best")] == [
        "postprocess/val/best/postprocess.json"
    ]
    # `mtl eval` of that run applies it: its scores are the file's, decisions at its thresholds; `none` skips it
    printed = _eval(capsys, "--checkpoint", str(run))
    assert f"post-processing of {pp_file} applied" in printed
    got = json.loads((run / "eval_val" / "metrics.json").read_text())
    raw = json.loads((single / "metrics.json").read_text())
    assert any(f.gain > 1e-3 for f in pp.tasks.values())  # tuned thresholds alone lift an AU F1 at 0.5
    for name, f in pp.tasks.items():
        assert got[f.metric] == pytest.approx(f.after, abs=2e-3) and raw[f.metric] == pytest.approx(
            f.before, abs=1e-4
        ), name
    assert (run / "eval_val" / "postprocess.json").is_file() and not (run / "eval_val" / "thresholds.json").exists()
    _eval(capsys, "--checkpoint", str(run), "--postprocess", "none", "--out", str(tmp_path / "raw"))
    assert _headlines(tmp_path / "raw" / "metrics.json") == pytest.approx(_headlines(single / "metrics.json"))
    # a file fitted for other tasks than the model predicts: one line naming it and both task lists
    bad = json.loads(pp_file.read_text())
    bad["tasks"].pop("au")
    (tmp_path / "other.json").write_text(json.dumps(bad))
    assert main(["eval", "--checkpoint", str(a), "--postprocess", str(tmp_path / "other.json"), "--out",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "other.json: fitted for tasks va, expr but the model predicts va, expr, au" in err and "\n" not in err


def test_predict_csv_smooths_each_input_and_decides_at_the_files_thresholds(tmp_path: Path) -> None:
    from mtl.predict.windows import FrameOutput
    from mtl.predict.write import PredictionCsv

    preds = _noisy(videos=2, n=60)
    pp = fit(preds, FittedOn(runs=["r"], weights=[1.0], split="val", frames=120, videos=2), kinds=("box",), widths=(3,))
    for f in pp.tasks.values():
        f.smoothing = Smoothing(kind="box", width=3)
    pp.tasks["au"].thresholds = [0.9] * 12
    rng = np.random.default_rng(0)
    values = [{t.name: rng.random(t.width).astype(np.float32) for t in tasks()} for _ in range(10)]
    writer = PredictionCsv(tmp_path / "clip.csv", tasks(), pp.thresholds(), pp)
    for i in (2, 0, 1, *range(3, 10)):  # out of order: held, then written in frame order
        writer.row(i / 30, None, FrameOutput(i, values[i]))
    assert not (tmp_path / "clip.csv").exists()
    writer.commit()
    with open(tmp_path / "clip.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["frame"]) for r in rows] == list(range(10)) == [o.index for o in writer.smoothed]
    valence = np.array([v["va"][0] for v in values])
    assert float(rows[4]["valence"]) == pytest.approx(valence[3:6].mean(), abs=1e-5)
    assert float(rows[0]["valence"]) == pytest.approx(valence[:2].mean(), abs=1e-5)  # cut at the input's start
    au = get_task("au")
    for r in rows:
        assert all(int(r[c]) == int(float(r[f"p_{c}"]) >= 0.9) for c in au.columns)


def test_overrides_after_several_checkpoints_stay_overrides_as_typed(tmp_path: Path) -> None:
    from mtl.commands.train import split_overrides

    uri = "tracking.uri=sqlite:////abs/mlflow.db"  # a Path would fold the four slashes
    paths, overrides = split_overrides([str(tmp_path), "runs/b", uri], ["data.shards=x"])
    assert paths == [tmp_path, Path("runs/b")] and overrides == [uri, "data.shards=x"]


def _untrained(shards: Path, dst: Path, *overrides: str) -> Path:
    """An exported run of another architecture, made here (random weights, seed 0): its config rebuilds it."""
    from helpers import SMOKE

    from mtl.config import load_config, to_dict
    from mtl.runs.inputs import DataSource

    cfg = load_config(SMOKE, [f"data.shards={shards}", "tracking.enabled=false", *overrides])
    torch.manual_seed(0)
    save_weights(DataSource(cfg).build_model().state_dict(), dst, to_dict(cfg))
    return dst


@pytest.mark.slow
def test_an_ensemble_mixes_backbones_inputs_and_window_lengths(
    trained_run: Path, tiny_shards: Path, tmp_path: Path, capsys
) -> None:
    """A pixel run (the trained one, clip 4), a run of another backbone (clip 6) and a run on cached features
    (clip 8): each evaluated as it was trained, their frames aligned, each frame's outputs the mean of the three."""
    from feature_fixtures import make_features

    cache = make_features(tiny_shards, tmp_path / "feats")
    wide = _untrained(tiny_shards, tmp_path / "wide" / "best.safetensors", "data.clip_len=6",
                      "model.backbone_kwargs.embed_dim=48")  # fmt: skip
    feat = _untrained(tiny_shards, tmp_path / "feat" / "best.safetensors", f"data.features=[{cache}]",
                      "data.clip_len=8")  # fmt: skip
    members = [trained_run, wide, feat]
    alone = []
    for i, m in enumerate(members):
        _eval(capsys, "--checkpoint", str(m), "--postprocess", "none", "--out", str(tmp_path / f"alone{i}"))
        alone.append(_predictions(tmp_path / f"alone{i}" / "predictions.csv"))
    _eval(capsys, "--checkpoint", *map(str, members), "--postprocess", "none", "--out", str(tmp_path / "mix"))
    keys, mixed = _predictions(tmp_path / "mix" / "predictions.csv")
    assert len(keys) == len(set(keys)) > 0
    for k, _ in alone:
        assert sorted(k) == sorted(keys)  # every member predicted every frame of the split
    orders = [[dict(zip(k, range(len(k))))[key] for key in keys] for k, _ in alone]
    for c in ("valence", "arousal", "p_Neutral", "p_AU12"):
        want = np.mean([p[c][o] for (_, p), o in zip(alone, orders)], axis=0)
        np.testing.assert_allclose(mixed[c], want, atol=3e-5, err_msg=c)
    assert not np.allclose(alone[0][1]["valence"], alone[2][1]["valence"][orders[2]], atol=1e-3)  # other models
