"""Scale (issue 21): a rank reads only its windows of a feature cache, a start checks sizes and structure but hashes
nothing, a bad cache is one error naming the file, checkpoints are hashed by the ranks that wrote them and checked
byte for byte only when asked, and tools/bench_scale.py runs (at toy size)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from feature_fixtures import make_features
from helpers import DRIVER, REPO, SMOKE, mtl, ok, run, smoke_overrides, torchrun

from mtl.config import from_dict
from mtl.data.manifest import MANIFEST
from mtl.errors import DataError
from mtl.features.index import index_feature_shard
from mtl.features.verify import verify_features
from mtl.runs import layout
from mtl.runs.inputs import DataSource


@pytest.fixture(scope="module")
def feats(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("scale_feats")
    return make_features(tiny_shards, base / "f1"), make_features(tiny_shards, base / "f2", pool="flatten")


def _source(shards: Path, features: list[Path], **data) -> DataSource:
    return DataSource(from_dict({"data": {"shards": str(shards), "features": [str(f) for f in features], **data}}))


def test_a_rank_reads_only_the_rows_of_its_windows(tiny_shards: Path, feats) -> None:
    src = _source(tiny_shards, list(feats), clip_len=8, batch_size=2)
    split = src.split("train")
    assert split.bytes_read == 0  # indexed from headers and metadata: no feature read at start
    row = split.dim * 2  # fp16
    cache = sum(len(v) for v in split.videos) * row
    seen = 0
    for rank in (0, 1):
        before = split.bytes_read
        loader = src.train_loader(rank=rank, world_size=2, epoch=0, seed=0)
        mine = loader.windows[: len(loader) * loader.b]
        want = sum(min(a + loader.t, len(split.videos[vi])) - a for vi, a in mine) * row
        for _ in loader:
            pass
        assert split.bytes_read - before == want, "a rank read rows outside its windows"
        assert want < cache
        seen += want
    assert seen <= cache + 2 * 8 * row * len(split.videos)  # the ranks' windows tile the cache about once
    ev = src.eval_loader("val", rank=1, world_size=2)
    before, val = src.split("val").bytes_read, src.split("val")
    next(iter(ev))
    assert 0 < val.bytes_read - before <= 8 * ev.b * val.dim * 2  # one batch of clips, not the split


def test_the_unlabelled_test_split_is_indexed_and_read_by_windows_too(tmp_path: Path) -> None:
    """`mtl eval --split test` on a features run reads the organisers' test split through the same index: every
    frame of every listed video once, a batch reading only its clips' rows, and no labels."""
    from mtl.data.pack import PackOptions, pack
    from mtl.data.synth import make_synth

    root = make_synth(tmp_path / "synth", videos=2, frames=16, seed=0, workers=1, test_videos=2)
    lists = [str(p) for p in sorted((root / "test_set").glob("*.txt"))]
    pack(PackOptions(root / "cropped_aligned", root / "annotations", tmp_path / "shards", segment_len=16,
                     test_lists=lists, videos_dir=root / "videos", progress=False))  # fmt: skip
    cache = make_features(tmp_path / "shards", tmp_path / "f")
    src = _source(tmp_path / "shards", [cache], clip_len=8, eval_batch_size=2)
    test = src.split("test")
    assert test.bytes_read == 0 and sum(test.lengths) > 0
    assert not any(v.labels[k].any() for v in test.videos for k in v.labels if k.endswith("_valid"))
    loader = src.eval_loader("test", rank=0, world_size=1)
    first = next(iter(loader))
    assert 0 < test.bytes_read <= 8 * 2 * test.dim * 2
    batches = [first, *list(loader)[1:]]
    assert sum(int((~b["pad"]).sum()) for b in batches) == sum(test.lengths)  # every frame once
    assert not any(b[k].any() for b in batches for k in b if k.endswith("_valid"))


def test_start_checks_sizes_not_bytes_and_verify_checks_every_byte(tiny_shards: Path, feats, tmp_path: Path) -> None:
    cache = shutil.copytree(feats[0], tmp_path / "f1")
    shard = cache / "val" / "000000.tar"
    rows = index_feature_shard(shard)[0].rows
    data = bytearray(shard.read_bytes())
    data[rows.offset + 3] ^= 0xFF  # a flipped bit in a feature value: same size, same structure
    shard.write_bytes(bytes(data))
    split = _source(tiny_shards, [cache]).split("val")  # starts: nothing hashed
    assert len(split.videos) > 0
    reports = {r.path: r for r in verify_features(cache, progress=False)}
    assert any("sha256" in p for p in reports["val/000000.tar"].problems)
    proc = mtl("shards", "verify", str(cache))
    assert proc.returncode != 0 and "val/000000.tar" in proc.stdout + proc.stderr


def _edit_manifest(cache: Path, edit) -> None:
    m = json.loads((cache / MANIFEST).read_text())
    edit(m)
    (cache / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("case", ["truncated", "cut_and_resized", "missing", "samples", "frames", "dim"])
def test_a_bad_cache_is_one_error_naming_the_file(case: str, tiny_shards: Path, feats, tmp_path: Path) -> None:
    cache = shutil.copytree(feats[0], tmp_path / "f1")
    shard = cache / "val" / "000000.tar"
    bad, want = shard, {"truncated": "its manifest says", "cut_and_resized": "cut short", "missing": "missing",
                        "samples": "samples, its manifest", "frames": "frames, its manifest",
                        "dim": "its manifest"}[case]  # fmt: skip

    def first(m: dict) -> dict:
        return m["splits"]["val"]["shards"][0]

    if case in ("truncated", "cut_and_resized"):  # cut inside the last sample's features
        cut = index_feature_shard(shard)[-1].rows.offset + 100
        shard.write_bytes(shard.read_bytes()[:cut])
        if case == "cut_and_resized":  # and a manifest that agrees on the size
            _edit_manifest(cache, lambda m: first(m).update(bytes=cut))
    elif case == "missing":
        shard.unlink()
    elif case == "samples":
        _edit_manifest(cache, lambda m: first(m).update(samples=first(m)["samples"] + 1, sample_frames=None))
    elif case == "frames":
        _edit_manifest(cache, lambda m: first(m)["sample_frames"].__setitem__(0, first(m)["sample_frames"][0] + 1))
    else:
        _edit_manifest(cache, lambda m: m.update(dim=m["dim"] + 1))
    with pytest.raises(DataError) as err:
        _source(tiny_shards, [cache]).split("val")
    text = str(err.value)
    assert "\n" not in text and str(bad) in text and want in text, text


def test_checkpoints_hashed_by_their_writers_and_verified_when_asked(tiny_shards: Path, feats, tmp_path: Path) -> None:
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    base = smoke_overrides(tiny_shards, out, db, f"data.features=[{feats[0]}]", "data.clip_len=8",
                           "train.ckpt_every=2", "train.keep_last=3")  # fmt: skip
    ok(torchrun(2, [str(DRIVER), "plain", str(SMOKE), *base, "train.max_steps=4"]))
    ckpts = out / "checkpoints"
    assert layout.complete_tags(ckpts) == ["step_00000002", "step_00000004"]
    for tag in layout.complete_tags(ckpts):
        recorded = json.loads((ckpts / tag / layout.COMPLETE).read_text())["files"]
        by_rank = [json.loads((ckpts / tag / f"{layout.HASHES}{r:05d}.json").read_text()) for r in (0, 1)]
        assert set(by_rank[0]) | set(by_rank[1]) == set(recorded) and not set(by_rank[0]) & set(by_rank[1])
        assert all(layout.owner(f) == 1 for f in by_rank[1]) and any("optim_states" in f for f in by_rank[1])
    good = ok(mtl("runs", "verify", str(out)))
    assert good.stdout.split() == ["step_00000002:", "ok", "step_00000004:", "ok"]
    # a writer killed between its save and its hashing: that checkpoint is still good, by its sizes
    (ckpts / "step_00000002" / f"{layout.HASHES}00001.json").unlink()
    sizes_only = ok(mtl("runs", "verify", str(out))).stdout.splitlines()
    assert sizes_only[0].startswith("step_00000002: ok (") and "never hashed" in sizes_only[0], sizes_only
    assert layout.damage(ckpts / "step_00000002", full=True) is None

    victim = next((ckpts / "step_00000004").glob("zero_pp_rank_1_*optim_states.pt"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    assert layout.damage(ckpts / "step_00000004") is None  # sizes agree: a plain resume would not read every byte
    bad = mtl("runs", "verify", str(out))
    assert bad.returncode == 1 and f"step_00000004: {victim.name} does not match the sha256" in bad.stdout, bad.stdout

    resumed = ok(torchrun(2, [str(DRIVER), "plain", str(SMOKE), *base, "train.max_steps=5",
                              "train.verify_checkpoint=true"]))  # fmt: skip
    warning = [line for line in resumed.stderr.splitlines() if "damaged" in line]
    assert warning and "step_00000004" in warning[0] and victim.name in warning[0], resumed.stderr[-3000:]
    assert {line.split()[2] for line in resumed.stdout.splitlines() if line.startswith("LOADED")} == {"2"}
    assert ok(mtl("runs", "verify", str(out))).returncode == 0  # the damaged tag was marked, step 4 saved anew


def test_bench_scale_runs_at_toy_size(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    proc = run([sys.executable, str(REPO / "tools" / "bench_scale.py"), "--out", str(out), "--big-mb", "6",
                "--small-mb", "2", "--dim", "128", "--width", "32", "--steps", "2", "--saves", "1",
                "--work", str(tmp_path / "w")], timeout=300)  # fmt: skip
    ok(proc)
    r = json.loads(out.read_text())
    assert r["cache_mb"]["big"] > r["cache_mb"]["small"] > 1
    assert len(r["peak_rss_growth_mb"]) == 2 and r["growth_goal_mb"] > 200
    assert r["save_over_bare"] > 0 and r["resume_load_s"] > 0 and r["runs"]["resume"][0]["resumed_from_step"] == 3
