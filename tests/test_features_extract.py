"""`mtl features`: a real pack through a real (tiny) timm ViT into feature shards, read back and checked against the
source samples and against the encoder run independently on the same JPEGs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms.v2.functional as TF
from helpers import REPO, run, torchrun
from safetensors.torch import save_file

from mtl.cli import main
from mtl.data.manifest import file_sha256, read_manifest
from mtl.data.shardio import parse_sample, read_raw
from mtl.data.transforms import decode_jpeg
from mtl.extraction.extract import ExtractSpec, Part, extract
from mtl.features.manifest import read_feature_manifest
from mtl.features.shards import FORMAT, read_feature_shard
from mtl.model.backbone import FrameEncoder

BACKBONE = "vit_tiny_patch16_224"
KWARGS = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 16}  # configs/smoke.yaml's backbone
SIZE = 32
SHARD_FRAMES = 1  # one video per output shard: 4 train + 2 val shards from tiny_shards


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    model = timm.create_model(BACKBONE, num_classes=0, img_size=SIZE, **KWARGS)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def _spec(weights: Path, **kw) -> ExtractSpec:
    kw.setdefault("device", "cpu")  # byte-identical caches compared: the same device (CPU, fp32) everywhere
    kw.setdefault("shard_frames", SHARD_FRAMES)
    return ExtractSpec(backbone=BACKBONE, weights=str(weights), image_size=SIZE, backbone_kwargs=KWARGS, **kw)


def _cli_args(weights: Path) -> list[str]:
    return ["--backbone", BACKBONE, "--weights", str(weights), "--backbone-kwargs", json.dumps(KWARGS),
            "--image-size", str(SIZE), "--shard-frames", str(SHARD_FRAMES), "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tiny_shards: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("features") / "cache"
    extract(tiny_shards, out, _spec(weights), progress=False)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*.tar"))}


def _encoder(weights: Path) -> FrameEncoder:
    model = timm.create_model(BACKBONE, num_classes=0, img_size=SIZE, **KWARGS)
    model.load_state_dict(timm.models.load_state_dict(str(weights)))
    return FrameEncoder(model, "avg").eval()


def _source_videos(shards: Path) -> dict[str, dict[str, dict]]:
    """split -> video -> per-frame arrays and JPEGs, joined from the source samples independently of extract."""
    out: dict[str, dict[str, dict]] = {}
    for split, entry in read_manifest(shards).splits.items():
        segs = defaultdict(list)
        for sh in entry.shards:
            for raw in read_raw(shards / sh.path):
                s = parse_sample(raw, sh.path)
                jpegs = [bytes(s.blob[s.offsets[i] : s.offsets[i + 1]]) for i in range(len(s))]
                segs[s.video].append((int(s.frames[0]), s, jpegs))
        out[split] = {}
        for video, parts in segs.items():
            parts.sort(key=lambda p: p[0])
            v = {"frames": np.concatenate([p[1].frames for p in parts]),
                 "has_image": np.concatenate([p[1].has_image for p in parts]),
                 "jpegs": [j for p in parts for j in p[2]]}  # fmt: skip
            for key in parts[0][1].labels:
                v[key] = np.concatenate([p[1].labels[key] for p in parts])
            out[split][video] = v
    return out


def _expected(encoder: FrameEncoder, jpegs: list[bytes], mean, std, flip: bool = False) -> np.ndarray:
    x = torch.stack([torch.from_numpy(decode_jpeg(j)).permute(2, 0, 1) for j in jpegs])
    x = TF.resize(x, [SIZE, SIZE], antialias=True).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return encoder(x.flip(-1) if flip else x).numpy()


def _cache_videos(root: Path) -> dict[str, dict[str, list]]:
    m = read_feature_manifest(root)
    out: dict[str, dict[str, list]] = {}
    for split, s in m.splits.items():
        out[split] = defaultdict(list)
        for sh in s.shards:
            for fs in read_feature_shard(root / sh.path):
                out[split][fs.video].append(fs)
    return out


def test_cache_holds_the_source_labels_and_the_encoders_features(cache: Path, tiny_shards: Path, weights: Path) -> None:
    m = read_feature_manifest(cache)
    src_manifest = read_manifest(tiny_shards)
    assert m.format == FORMAT and m.dim == KWARGS["embed_dim"] and m.dtype == "float16"
    assert m.source.model_dump() == {"shards": str(tiny_shards.resolve()),
                           "manifest_sha256": file_sha256(tiny_shards / "manifest.json")}  # fmt: skip
    ex = m.extractor
    assert ex.backbone == BACKBONE and ex.weights_sha256 == file_sha256(weights) and ex.checkpoint is None
    assert (ex.pool, ex.image_size, ex.hflip_tta) == ("avg", SIZE, False)
    encoder = _encoder(weights)
    norm = encoder.data_config()
    assert (tuple(ex.mean), tuple(ex.std)) == (norm["mean"], norm["std"])

    source, cached = _source_videos(tiny_shards), _cache_videos(cache)
    assert set(m.splits) == set(src_manifest.splits) == set(cached)
    for split, videos in source.items():
        s = m.splits[split]
        want = src_manifest.splits[split]
        assert (s.videos, s.frames, s.frames_with_image) == (want.videos, want.frames, want.images)
        assert sorted(cached[split]) == sorted(videos)
        assert sum(sh.samples for sh in s.shards) == sum(len(v) for v in cached[split].values())
        for video, v in videos.items():
            (fs,) = cached[split][video]  # a whole video per sample (none longer than max_frames here)
            assert np.array_equal(fs.frames, v["frames"]) and np.array_equal(fs.has_image, v["has_image"])
            for key, arr in fs.labels.items():
                assert np.array_equal(arr, v[key]), (video, key)
            rows = np.flatnonzero(v["has_image"])
            assert not fs.features[~v["has_image"]].any()  # frames without an image: zero rows
            got = fs.features[rows].astype(np.float32)
            want_feats = _expected(encoder, [v["jpegs"][i] for i in rows], ex.mean, ex.std)
            np.testing.assert_allclose(got, want_feats, rtol=2e-3, atol=2e-3)  # fp16 storage

    # `mtl shards verify` dispatches on the manifest's format
    assert main(["shards", "verify", str(cache)]) == 0


@pytest.mark.parametrize("workers", [None, 0, 2])
def test_same_input_gives_byte_identical_shards(
    cache: Path, tiny_shards: Path, weights: Path, tmp_path: Path, workers: int | None
) -> None:
    """Decoded in this process (0) or in DataLoader workers (None: the default; 2): the same shards."""
    again = tmp_path / "again"
    m = extract(tiny_shards, again, _spec(weights, workers=workers), progress=False)
    assert _files(again) == _files(cache) and len(_files(cache)) == 6
    assert m == read_feature_manifest(cache)


def test_verify_names_a_feature_shard_with_a_flipped_byte(cache: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    path = copy / "val" / "000001.tar"
    data = bytearray(path.read_bytes())
    data[len(data) // 4] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["shards", "verify", str(copy)]) == 1
    bad = [line for line in capsys.readouterr().err.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and bad[0].startswith("BAD val/000001.tar: sha256"), bad


def test_hflip_tta_is_the_mean_of_the_frame_and_its_mirror(
    cache: Path, tiny_shards: Path, weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tta"
    m = extract(tiny_shards, out, _spec(weights, hflip_tta=True), progress=False)
    assert m.extractor.hflip_tta is True
    encoder, ex = _encoder(weights), m.extractor
    plain, tta = _cache_videos(cache)["val"], _cache_videos(out)["val"]
    source = _source_videos(tiny_shards)["val"]
    for video, v in source.items():
        rows = np.flatnonzero(v["has_image"])
        jpegs = [v["jpegs"][i] for i in rows]
        mean = (_expected(encoder, jpegs, ex.mean, ex.std) + _expected(encoder, jpegs, ex.mean, ex.std,
                                                                              flip=True)) / 2  # fmt: skip
        got = tta[video][0].features[rows].astype(np.float32)
        np.testing.assert_allclose(got, mean, rtol=2e-3, atol=2e-3)
        assert np.abs(got - plain[video][0].features[rows].astype(np.float32)).max() > 1e-2


def test_resume_after_a_kill_keeps_finished_shards(
    cache: Path, tiny_shards: Path, weights: Path, tmp_path: Path
) -> None:
    """The run is killed while it writes its third shard (held there: that shard's .tmp is a FIFO nobody reads)."""
    out = tmp_path / "killed"
    (out / "train").mkdir(parents=True)
    fifo = out / "train" / "000002.tar.tmp"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mtl.cli", "features", "--shards", str(tiny_shards), "--out",
                             str(out), *_cli_args(weights)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (out / "train" / "000001.tar").is_file():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no shard written in time"
            time.sleep(0.1)
        time.sleep(0.5)
        assert proc.poll() is None  # blocked on the third shard
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    done = sorted(p.name for p in (out / "train").glob("*.tar"))
    assert done == ["000000.tar", "000001.tar"] and not (out / "manifest.json").exists()
    before = {n: (s.st_ino, s.st_mtime_ns) for n in done if (s := (out / "train" / n).stat())}
    fifo.unlink()

    m = extract(tiny_shards, out, _spec(weights), progress=False)
    after = {n: (s.st_ino, s.st_mtime_ns) for n in done if (s := (out / "train" / n).stat())}
    assert after == before  # finished shards untouched
    assert _files(out) == _files(cache) and m == read_feature_manifest(cache)


def test_a_finished_shard_damaged_before_a_rerun_is_extracted_again(
    cache: Path, tiny_shards: Path, weights: Path, tmp_path: Path, capsys
) -> None:
    """Finished shards are checked against what was recorded when they were written (a part's partial manifest
    while the extraction is unfinished, the manifest once it is): a changed one is rewritten, not trusted."""
    out = tmp_path / "out"
    assert extract(tiny_shards, out, _spec(weights), part=Part(0, 2), progress=False) is None  # half of the plan
    mine = sorted(_files(out))
    assert len(mine) == 3 and not (out / "manifest.json").exists()
    assert [p.name for p in out.glob(".features-done.*")] == [".features-done.0-of-2.json"]
    flipped, cut = out / mine[0], out / mine[2]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    full = cut.stat().st_size
    cut.write_bytes(cut.read_bytes()[:-512])
    kept = (out / mine[1]).stat().st_mtime_ns
    capsys.readouterr()

    m = extract(tiny_shards, out, _spec(weights), progress=False)  # the rest, and the two damaged ones again
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"mtl features: warning: {flipped}: does not match the sha256 recorded when it was written; "
        "extracting it again",
        f"mtl features: warning: {cut}: has {full - 512} bytes, {full} were written; extracting it again",
    ]
    assert _files(out) == _files(cache) and m == read_feature_manifest(cache)
    assert (out / mine[1]).stat().st_mtime_ns == kept  # an intact one is not written again
    assert not list(out.glob(".features-done.*"))  # the manifest holds the records now

    # Finished: the manifest's records are the reference.
    other = out / sorted(_files(out))[-1]
    other.write_bytes(other.read_bytes()[::-1])
    assert extract(tiny_shards, out, _spec(weights), progress=False) == m
    assert f"{other}: does not match the sha256" in capsys.readouterr().err
    assert _files(out) == _files(cache)


def test_torchrun_two_ranks_write_the_same_cache(cache: Path, tiny_shards: Path, weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "ranks"
    proc = torchrun(2, ["-m", "mtl.cli", "features", "--shards", str(tiny_shards), "--out", str(out),
                        *_cli_args(weights), "--no-progress"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _files(out) == _files(cache)
    assert read_feature_manifest(out) == read_feature_manifest(cache)
    assert proc.stdout.count("wrote ") == 1  # rank 0 reports the manifest


def test_checkpoint_of_a_trained_run(trained_run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    from mtl.runs.trained import load_model

    out = tmp_path / "from_run"
    assert main(["features", "--shards", str(tiny_shards), "--out", str(out), "--checkpoint", str(trained_run),
                 "--no-progress"]) == 0  # fmt: skip
    m = read_feature_manifest(out)
    tm = load_model(trained_run)
    ex = m.extractor
    assert ex.checkpoint == str(trained_run.resolve())
    assert ex.weights_sha256 == file_sha256(trained_run / "export" / "best.safetensors")
    assert (ex.backbone, ex.pool, ex.image_size) == (tm.cfg.model.backbone, tm.cfg.model.pool,
                                                              tm.cfg.data.image_size)  # fmt: skip
    assert (tuple(ex.mean), tuple(ex.std)) == tm.norm
    v = _source_videos(tiny_shards)["val"]
    video = sorted(v)[0]
    rows = np.flatnonzero(v[video]["has_image"])[:8]
    (fs,) = _cache_videos(out)["val"][video]
    want = _expected(tm.model.encoder, [v[video]["jpegs"][i] for i in rows], ex.mean, ex.std)
    np.testing.assert_allclose(fs.features[rows].astype(np.float32), want, rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------------------------ bad input


def _one_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_a_run_that_is_not_one_and_missing_weights(tiny_shards: Path, tmp_path: Path, capsys) -> None:
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    args = ["features", "--shards", str(tiny_shards), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*args, "--checkpoint", str(not_a_run)]) == 2
    _one_line(capsys, str(not_a_run), "no exported weights and no complete checkpoint")
    missing = tmp_path / "nope.safetensors"
    assert main([*args, "--backbone", BACKBONE, "--weights", str(missing)]) == 2
    _one_line(capsys, str(missing), "not found")
    assert not (tmp_path / "o").exists()


def _break_first_jpeg(shard: Path) -> None:
    """Overwrite the JPEG start marker of the shard's first sample: that frame no longer decodes."""
    with tarfile.open(shard) as tf:
        info = next(i for i in tf.getmembers() if i.name.endswith(".jpgs"))
    with open(shard, "r+b") as f:
        f.seek(info.offset_data)
        assert f.read(2) == b"\xff\xd8"
        f.seek(info.offset_data)
        f.write(b"\x00\x00")


def test_damaged_source_shard_names_it_and_keeps_finished_shards(
    cache: Path, tiny_shards: Path, weights: Path, tmp_path: Path, capsys
) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_shards, src)
    last_val = src / read_manifest(src).splits["val"].shards[-1].path
    _break_first_jpeg(last_val)
    out = tmp_path / "out"
    assert main(["features", "--shards", str(src), "--out", str(out), *_cli_args(weights), "--no-progress"]) == 2
    _one_line(capsys, str(last_val), "JPEG does not decode")
    kept = _files(out)
    assert len(kept) >= 4 and all(kept[k] == v for k, v in _files(cache).items() if k in kept)  # train: all done
    assert not (out / "manifest.json").exists()


def test_disk_full_names_the_shard_and_keeps_finished_ones(
    cache: Path, tiny_shards: Path, weights: Path, tmp_path: Path, capsys
) -> None:
    """A real full file system: a 48 KiB tmpfs (root only, as CI runs) holds two of the six shards."""
    out = tmp_path / "small"
    out.mkdir()
    if os.geteuid() != 0 or run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(out)]).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        assert main(["features", "--shards", str(tiny_shards), "--out", str(out), *_cli_args(weights),
                     "--no-progress"]) == 2  # fmt: skip
        line = _one_line(capsys, str(out), "disk full", "kept")
        kept = _files(out)
        assert 1 <= len(kept) < 6 and all(kept[k] == _files(cache)[k] for k in kept), line
        assert not list(out.glob("*/*.tmp"))  # the half-written shard is removed
    finally:
        run(["umount", str(out)])


def test_a_long_video_goes_on_over_shards_and_parts_get_equal_frames(
    cache: Path, tiny_shards: Path, weights: Path, tmp_path: Path
) -> None:
    """Samples of at most 13 frames (cutting across the source's 16-frame segments) in shards that close at 30
    frames: a video goes on in the next shard, no shard outgrows 30 + 13 frames, two array tasks (run one after
    the other: the last writes the manifest) get about equal frames and write what one process writes, and the
    loader joins each video again, fused with a cache cut the other way."""
    from mtl.extraction.extract import plan_shards, scan_source, share
    from mtl.features.loader import FeatureSplit

    spec = _spec(weights, max_frames=13, shard_frames=30, workers=0)
    plan = plan_shards(scan_source(tiny_shards, read_manifest(tiny_shards)), 13, 30)
    assert max(s.frames for s in plan) <= 30 + 13
    shards_of = defaultdict(set)
    for s in plan:
        for p in s.pieces:
            shards_of[p.video].add(s.path)
    assert any(len(paths) > 1 for paths in shards_of.values())  # a video goes on in the next shard
    loads = [sum(s.frames for s in share(plan, Part(i, 2))) for i in (0, 1)]
    assert abs(loads[0] - loads[1]) <= max(s.frames for s in plan), loads
    assert sorted(s.path for i in (0, 1) for s in share(plan, Part(i, 2))) == sorted(s.path for s in plan)

    one = extract(tiny_shards, tmp_path / "one", spec, progress=False)
    two = tmp_path / "two"
    assert extract(tiny_shards, two, spec, part=Part(0, 2), progress=False) is None
    assert extract(tiny_shards, two, spec, part=Part(1, 2), progress=False) == one
    assert _files(two) == _files(tmp_path / "one")

    got, want = _cache_videos(tmp_path / "one"), _cache_videos(cache)
    for split in want:
        assert set(got[split]) == set(want[split])
        for video, samples in want[split].items():
            assert all(len(s) <= 13 for s in got[split][video])
            frames = np.concatenate([s.frames for s in got[split][video]])
            assert np.array_equal(frames, np.concatenate([s.frames for s in samples]))
            np.testing.assert_allclose(np.concatenate([s.features for s in got[split][video]], dtype=np.float32),
                                       np.concatenate([s.features for s in samples], dtype=np.float32),
                                       atol=2e-3)  # fmt: skip
    fused = FeatureSplit.load([tmp_path / "one", cache], [one, read_feature_manifest(cache)], "train")
    v = fused.videos[0]
    whole = np.concatenate([s.features for s in want["train"][v.name]], dtype=np.float32)
    assert np.array_equal(np.asarray(v.features[:], np.float32)[:, one.dim :], whole)
    assert np.allclose(np.asarray(v.features[:], np.float32)[:, : one.dim], whole, atol=2e-3)
