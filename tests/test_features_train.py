"""Training the temporal trunk on cached features: the loader, the checks on its inputs, DeepSpeed, resume,
`mtl eval`, and that the demo-sized recipe learns."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from feature_fixtures import make_features
from helpers import DRIVER, REPO, SMOKE, mtl, ok, run, smoke_overrides, torchrun
from mlflow.tracking import MlflowClient

from mtl.config import from_dict, load_config
from mtl.data.manifest import MANIFEST, file_sha256
from mtl.errors import DataError
from mtl.features.loader import check_sources
from mtl.features.shards import FORMAT, FeatureSample, read_feature_shard, write_feature_shard
from mtl.runs import layout
from mtl.runs.inputs import DataSource

FEATURES_DEMO = REPO / "configs" / "features-demo.yaml"
DEMO_BACKBONE = {"backbone": "vit_tiny_patch16_224",
                 "backbone_kwargs": {"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4}}  # fmt: skip


@pytest.fixture(scope="session")
def feats(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two extractions of tiny_shards: tiny ViT avg-pooled (dim 32) and another one, flattened (dim 4 x 32)."""
    base = tmp_path_factory.mktemp("feats")
    return make_features(tiny_shards, base / "f1"), make_features(tiny_shards, base / "f2", pool="flatten")


def _cfg(shards: Path, features: list[Path], **data) -> object:
    return from_dict({"data": {"shards": str(shards), "features": [str(f) for f in features], **data}})


def _raw(root: Path, split: str) -> dict[str, FeatureSample]:
    m = json.loads((root / MANIFEST).read_text())
    return {s.video: s for sh in m["splits"][split]["shards"] for s in read_feature_shard(root / sh["path"])}


def test_two_extractions_concatenate_and_eval_sees_every_frame_once(tiny_shards: Path, feats) -> None:
    f1, f2 = feats
    src = DataSource(_cfg(tiny_shards, [f1, f2], clip_len=8, eval_batch_size=3))
    assert src.feature_dim == 32 + 128 and src.params()["features.dim"] == 160
    assert src.params()["features.1.pool"] == "flatten" and len(src.params()["features.0.weights_sha256"]) == 64
    raw1, raw2 = _raw(f1, "val"), _raw(f2, "val")
    seen: dict[str, list] = {}
    for batch in src.eval_loader("val", rank=0, world_size=1):
        assert batch["features"].shape[1:] == (8, 160) and "frames" not in batch
        for b, video in enumerate(batch["video"]):
            keep = ~batch["pad"][b]
            if not video:
                assert not keep.any()
                continue
            frames = batch["frame"][b][keep].numpy()
            idx = np.searchsorted(raw1[video].frames, frames)
            want = np.concatenate([raw1[video].features[idx], raw2[video].features[idx]], axis=1).astype(np.float32)
            assert np.array_equal(batch["features"][b][keep].numpy(), want)
            assert np.array_equal(batch["va"][b][keep].numpy(), raw1[video].labels["va"][idx])
            seen.setdefault(video, []).extend(frames.tolist())
    assert seen == {v: s.frames.tolist() for v, s in raw1.items()}  # every frame once, in order
    manifest = json.loads((tiny_shards / MANIFEST).read_text())
    assert sum(len(f) for f in seen.values()) == manifest["splits"]["val"]["frames"]


def test_windows_of_512_frames(tmp_path: Path) -> None:
    """A long video: training windows of 512 frames through the network, evaluation covering every frame."""
    src = tmp_path / "src"
    src.mkdir()
    (src / MANIFEST).write_text('{"format": "mtl-shards/1"}\n')
    rng = np.random.default_rng(0)
    videos = []
    for name, n in (("long", 700), ("short", 100)):
        has = rng.random(n) > 0.1
        feats = (rng.normal(size=(n, 24)) * has[:, None]).astype(np.float16)
        labels = {"va": rng.uniform(-1, 1, (n, 2)).astype(np.float32), "va_valid": np.ones(n, bool),
                  "expr": rng.integers(0, 8, n), "expr_valid": np.ones(n, bool),
                  "au": rng.integers(0, 2, (n, 12)).astype(np.float32), "au_valid": np.ones(n, bool)}  # fmt: skip
        videos.append(FeatureSample(name, np.arange(1, n + 1), has, feats, labels))
    root = tmp_path / "f"
    root.mkdir()
    write_feature_shard(root / "train-00000.tar", videos)
    entry = {"path": "train-00000.tar", "bytes": (root / "train-00000.tar").stat().st_size,
             "sha256": file_sha256(root / "train-00000.tar"), "samples": 2}  # fmt: skip
    manifest = {"format": FORMAT, "source": {"shards": str(src), "manifest_sha256": file_sha256(src / MANIFEST)},
                "extractor": {"backbone": "none", "weights_sha256": "0" * 64, "checkpoint": None, "pool": "avg",
                              "image_size": 112, "mean": [0.5] * 3, "std": [0.5] * 3, "hflip_tta": False},
                "dim": 24, "dtype": "float16",
                "splits": {"train": {"videos": 2, "frames": 800, "frames_with_image": 0,
                                     "shards": [entry]}}}  # fmt: skip
    (root / MANIFEST).write_text(json.dumps(manifest))
    cfg = from_dict({"data": {"shards": str(src), "features": [str(root)], "clip_len": 512, "batch_size": 2,
                              "eval_batch_size": 2},
                     "model": {"temporal": {"dim": 16, "heads": 2, "layers": 1, "max_len": 512}}})  # fmt: skip
    source = DataSource(cfg)
    loader = source.train_loader(rank=0, world_size=1, epoch=0, seed=0)
    assert len(loader) == 1  # windows: 2 cover the long video, 1 the short one; batches of 2
    batch = next(iter(loader))
    assert batch["features"].shape == (2, 512, 24)
    net = source.build_model().train()
    out = net(batch["features"], batch["has_image"], batch["pad"])
    assert out["au"].shape == (2, 512, 12)
    out["va"].sum().backward()
    assert net.temporal.proj.weight.grad is not None and net.temporal.proj.weight.shape == (16, 24)
    covered = {}
    for b in source.eval_loader("train", rank=0, world_size=1):
        for k, video in enumerate(b["video"]):
            if video:
                covered.setdefault(video, []).extend(b["frame"][k][~b["pad"][k]].tolist())
    assert covered == {"long": list(range(1, 701)), "short": list(range(1, 101))}


def test_feature_dropout_and_jitter_only_in_training(tiny_shards: Path, feats) -> None:
    f1, _ = feats
    plain = DataSource(_cfg(tiny_shards, [f1], clip_len=8, batch_size=2))
    aug = DataSource(_cfg(tiny_shards, [f1], clip_len=8, batch_size=2, feature_augment={"dropout": 0.5, "jitter": 2}))
    kw = {"rank": 0, "world_size": 1, "epoch": 3, "seed": 7}
    a, b = next(iter(plain.train_loader(**kw))), next(iter(aug.train_loader(**kw)))
    assert torch.equal(a["frame"], b["frame"]) and torch.equal(a["va"], b["va"])  # the same windows and labels
    img = a["has_image"] & ~a["pad"]
    x, y = a["features"][img], b["features"][img]
    zero = y == 0
    assert 0.35 < zero.float().mean() < 0.65  # about half of the elements dropped
    assert not torch.allclose(y[~zero], 2 * x[~zero])  # jitter: some frames read a neighbour's feature
    again = next(iter(aug.train_loader(**kw)))
    assert torch.equal(again["features"], b["features"])  # resume-exact: the same draw for the same window
    ev_plain = next(iter(plain.eval_loader("val", rank=0, world_size=1)))
    ev_aug = next(iter(aug.eval_loader("val", rank=0, world_size=1)))
    assert torch.equal(ev_plain["features"], ev_aug["features"])  # evaluation reads features as stored


def _copy_with(root: Path, dest: Path, edit) -> Path:
    """A copy of extraction ``root`` with ``edit(samples)`` applied to its first val shard (manifest updated)."""
    shutil.copytree(root, dest)
    m = json.loads((dest / MANIFEST).read_text())
    entry = m["splits"]["val"]["shards"][0]
    path = dest / entry["path"]
    samples = edit(list(read_feature_shard(path)))
    write_feature_shard(path, samples)
    entry.update(bytes=path.stat().st_size, sha256=file_sha256(path))
    if entry.get("sample_frames") is not None:  # a consistent cache: the manifest agrees with its shard
        entry["sample_frames"] = [len(s) for s in samples]
    (dest / MANIFEST).write_text(json.dumps(m))
    return dest


def _drop_last_frame(samples: list[FeatureSample]) -> list[FeatureSample]:
    s = samples[0]
    samples[0] = FeatureSample(s.video, s.frames[:-1], s.has_image[:-1], s.features[:-1],
                               {k: v[:-1] for k, v in s.labels.items()})  # fmt: skip
    return samples


@pytest.mark.parametrize("case", ["other_source", "frames_disagree", "damaged"])
def test_bad_feature_inputs_end_with_one_line(case: str, tiny_shards: Path, feats, tmp_path: Path) -> None:
    f1, f2 = feats
    if case == "other_source":
        from mtl.data.pack import PackOptions, pack
        from mtl.data.synth import make_synth

        synth = make_synth(tmp_path / "synth", videos=2, frames=16, seed=5)
        other = tmp_path / "shards"
        pack(PackOptions(synth / "cropped_aligned", synth / "annotations", other, workers=1))
        features, bad = [f1, make_features(other, tmp_path / "fo")], tmp_path / "fo" / MANIFEST
        want = "same source shards"
    elif case == "frames_disagree":
        features = [f1, _copy_with(f2, tmp_path / "f2", _drop_last_frame)]
        bad, want = tmp_path / "f2" / "val" / "000000.tar", "disagree on frames"
    else:
        damaged = shutil.copytree(f1, tmp_path / "f1")
        bad = damaged / "val" / "000000.tar"
        data = bytearray(bad.read_bytes())
        data[2000:2010] = b"\xff" * 10
        bad.write_bytes(bytes(data))
        features, want = [damaged, f2], "damaged feature shard"
    args = smoke_overrides(
        tiny_shards, tmp_path / "run", tmp_path / "m.db", f"data.features=[{','.join(map(str, features))}]"
    )
    proc = mtl("train", "--config", str(SMOKE), *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mtl train: error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(bad) in errors[0] and want in errors[0], errors[0]
    if case == "other_source":  # one extraction alone, from other shards than data.shards (`mtl submit` checks too)
        with pytest.raises(DataError, match=r"fo/manifest.json: extracted from .* not from data.shards="):
            check_sources([features[1]], tiny_shards)


def test_two_ranks_zero2_on_features_resume_and_eval(tiny_shards: Path, feats, tmp_path: Path) -> None:
    f1, f2 = feats
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    base = smoke_overrides(tiny_shards, out, db, f"data.features=[{f1},{f2}]", "data.clip_len=8",
                           "train.ckpt_every=2", "train.eval_every=2", "optim.lr=3e-3")  # fmt: skip
    first = ok(torchrun(2, [str(DRIVER), "plain", str(SMOKE), *base, "train.max_steps=4"]))
    digests = {line.split()[1]: line.split()[2] for line in first.stdout.splitlines() if line.startswith("DIGEST")}
    assert len(digests) == 2 and digests["0"] == digests["1"], "ranks ended with different weights"
    resumed = ok(torchrun(2, [str(DRIVER), "plain", str(SMOKE), *base, "train.max_steps=6"]))
    assert {line.split()[2] for line in resumed.stdout.splitlines() if line.startswith("RESULT")} == {"completed"}

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("mtl-smoke").experiment_id])
    assert len(runs) == 1, "the resumed run continues the same MLflow run"
    r = runs[0]
    assert r.data.tags["world_size"] == "2" and r.data.tags["resumed_from"] == "step_00000004"
    assert r.data.params["features.dim"] == "160" and r.data.params["features.0.pool"] == "avg"
    assert r.data.params["features.1.weights_sha256"] == json.loads((f2 / MANIFEST).read_text())["extractor"][
        "weights_sha256"]  # fmt: skip
    assert {m.step for m in client.get_metric_history(r.info.run_id, "train/loss")} == set(range(1, 7))
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val/mtl_score")] == [2, 4, 6]
    assert layout.complete_tags(out / "checkpoints")[-1] == "step_00000006"

    # `mtl eval` of the 2-rank ZeRO-2 checkpoint on one process: metrics and a row per frame.
    ev = ok(mtl("eval", "--checkpoint", str(out / "checkpoints" / "step_00000006"), "--out", str(tmp_path / "e")))
    scores = json.loads(ev.stdout.splitlines()[-1])
    assert set(scores) == {"va_ccc", "expr_f1", "au_f1", "mtl_score"}
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["va_ccc"] == pytest.approx(scores["va_ccc"], 1e-3)
    n_frames = json.loads((tiny_shards / MANIFEST).read_text())["splits"]["val"]["frames"]
    for task in ("VA", "EXPR", "AU"):
        lines = (tmp_path / "e" / "submission" / f"{task}.txt").read_text().splitlines()
        assert lines[0].startswith("image_location,") and len(lines) == n_frames + 1
        assert len(set(lines[1:])) == n_frames
    assert len((tmp_path / "e" / "predictions.csv").read_text().splitlines()) == n_frames + 1


def test_features_demo_config_learns(tmp_path: Path) -> None:
    """configs/features-demo.yaml on the demo backbone's features of a small synthetic set: well above chance.

    Measured (16 videos x 64 frames, 100 steps): val VA CCC 0.69, EXPR F1 0.18, AU F1 0.52; a constant
    prediction scores VA CCC 0."""
    from mtl.data.pack import PackOptions, pack
    from mtl.data.synth import make_synth

    synth = make_synth(tmp_path / "synth", videos=16, frames=64, seed=0)
    pack(PackOptions(synth / "cropped_aligned", synth / "annotations", tmp_path / "shards", segment_len=64, workers=1))
    f = make_features(tmp_path / "shards", tmp_path / "f", pool="flatten", image_size=64, model=DEMO_BACKBONE)
    load_config(FEATURES_DEMO)  # the config as shipped is valid
    proc = ok(mtl("train", "--config", str(FEATURES_DEMO), f"data.shards={tmp_path / 'shards'}",
                  f"data.features=[{f}]", f"train.output_dir={tmp_path / 'run'}",
                  f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "train.progress=false",
                  "train.max_steps=100", "train.eval_every=50"))  # fmt: skip
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scores["va_ccc"] > 0.4 and scores["mtl_score"] > 0.9, scores


@pytest.mark.parametrize("legs", [[(2, 2, 1)], [(2, 2, 3), (1, 3, 2)], [(3, 1, 2)]])
def test_resumed_on_another_world_size_no_window_is_read_twice(legs: list[tuple[int, int, int]]) -> None:
    """An epoch read by earlier set-ups (world size, batch, batches per rank), then finished on 2 ranks x 2:
    every window once at most, only a remainder under 2 x 2 left out, and each keeps its augmentation."""
    from mtl.data.legs import Leg
    from mtl.features.loader import FeatureSplit, FeatureTrainLoader, Video

    rng = np.random.default_rng(0)
    videos = []
    for i, n in enumerate([37, 50, 9, 64, 23]):
        labels = {"va": rng.uniform(-1, 1, (n, 2)).astype(np.float32), "expr": rng.integers(0, 8, n),
                  "au": rng.integers(0, 2, (n, 12)).astype(np.int8)}  # fmt: skip
        videos.append(Video(f"v{i}", np.arange(n), np.ones(n, bool), rng.normal(size=(n, 6)).astype(np.float16),
                            labels))  # fmt: skip
    split = FeatureSplit(videos, 6)
    data = from_dict({"data": {"clip_len": 8, "batch_size": 2, "feature_augment": {"dropout": 0.3}}}).data
    kw = {"epoch": 1, "seed": 5}

    def loader(world: int, batch: int, rank: int, done=()):
        d = from_dict({"data": {"clip_len": 8, "batch_size": batch, "feature_augment": {"dropout": 0.3}}}).data
        return FeatureTrainLoader(split, d, rank=rank, world_size=world, legs=done, **kw)

    read: list[int] = []
    done: list[Leg] = []
    for world, batch, batches in legs:
        for r in range(world):
            read += loader(world, batch, r, done).index[: batches * batch]
        done.append(Leg(world_size=world, batch_size=batch, workers=1, shuffle_buffer=0, batches=batches))
    last = [loader(2, 2, r, done) for r in range(2)]
    assert len(last[0]) == len(last[1]) > 0
    read += last[0].index + last[1].index
    n_windows = len(FeatureTrainLoader(split, data, rank=0, world_size=1, **kw).windows)
    assert len(read) == len(set(read)), "a window was read twice in the epoch"
    assert n_windows - 2 * 2 < len(read) <= n_windows
    # a window keeps its augmentation whichever rank and leg read it
    plain = FeatureTrainLoader(split, data, rank=0, world_size=1, **kw)
    i = last[1].index[0]
    j = plain.index.index(i)
    assert torch.equal(last[1].batch(0)["features"][0], plain.batch(j // 2)["features"][j % 2])


@pytest.mark.slow
def test_features_run_stopped_on_two_ranks_finishes_its_epoch_on_one(tiny_shards: Path, feats, tmp_path: Path) -> None:
    """Mid-epoch on 2 ranks (ZeRO-2), resumed on 1 (universal checkpoint): every window of epoch 0 once."""
    f1, _ = feats
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    args = smoke_overrides(tiny_shards, out, db, f"data.features=[{f1}]", "data.clip_len=8", "data.batch_size=1",
                           "train.ckpt_every=100")  # fmt: skip
    cfg = load_config(SMOKE, args)
    n = len(DataSource(cfg).train_loader(rank=0, world_size=1, epoch=0, seed=cfg.train.seed).windows)
    assert n >= 6
    steps = 2 + (n - 4)  # 2 steps of 2 windows on 2 ranks, then the rest of the epoch one window a step
    first = torchrun(2, [str(DRIVER), "stop_at_step=2", str(SMOKE), *args, f"train.max_steps={steps}"])
    results = {tuple(line.split()[2:4]) for line in first.stdout.splitlines() if line.startswith("RESULT ")}
    assert results == {("preempted", "2")}, first.stderr[-3000:]
    second = ok(run([sys.executable, str(DRIVER), "plain", str(SMOKE), *args, f"train.max_steps={steps}"]))
    assert "resuming from DeepSpeed's universal checkpoint" in second.stderr
    ids = [int(i) for launch in (first, second) for line in launch.stdout.splitlines()
           if line.startswith("SAMPLES ") and line.split()[2] == "0" for i in line.split()[3:]]  # fmt: skip
    assert sorted(ids) == list(range(n)), f"epoch 0 read {sorted(ids)} of {n} windows"
