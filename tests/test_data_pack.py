"""`mtl pack` output: real WebDataset tars, byte-identical reruns, resumable, and `mtl shards verify`."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from data_fixtures import make_release

import mtl.data.pack as pack_mod
from mtl.config import DataConfig
from mtl.data.loader import make_eval_loader
from mtl.data.manifest import read_manifest
from mtl.data.pack import PackOptions, pack
from mtl.data.shardio import parse_sample, read_raw
from mtl.data.verify import verify
from mtl.errors import DataError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def release(tmp_path: Path) -> tuple[Path, Path]:
    return make_release(tmp_path / "release")


def _shards(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*.tar"))}


def _mtl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtl.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)  # fmt: skip


def test_shards_hold_original_jpegs_labels_and_masks(release, tmp_path):
    images, ann = release
    m = pack(PackOptions(images, ann, tmp_path / "out", segment_len=5, shard_size=3, progress=False))
    root = tmp_path / "out"
    seen: dict[str, list[int]] = {}
    for split in ("train", "val"):
        for sh in m.splits[split].shards:
            with tarfile.open(root / sh.path) as tf:  # a plain tar any tool can read
                names = tf.getnames()
            assert all(n.endswith((".json", ".jpgs")) for n in names)
            for raw in read_raw(root / sh.path):
                s = parse_sample(raw, sh.path)
                seen.setdefault(s.video, []).extend(s.frames.tolist())
                for i, f in enumerate(s.frames.tolist()):
                    src = images / s.video / f"{f:05d}.jpg"
                    got = bytes(s.blob[s.offsets[i] : s.offsets[i + 1]])
                    assert got == (src.read_bytes() if src.exists() else b"")  # copied, never re-encoded
                    assert s.has_image[i] == src.exists()
                if s.video == "vidA":
                    i3 = list(s.frames).index(3) if 3 in s.frames else None
                    if i3 is not None:
                        assert not s.labels["va_valid"][i3] and s.labels["va"][i3].tolist() == [0, 0]
    # every frame of every labelled video exactly once, in segments of consecutive frames
    assert {v: sorted(f) for v, f in seen.items()} == {
        v: list(range(1, n + 1)) for s in m.splits.values() for v, n in s.video_frames.items()
    }
    # segments: 5 frames, a tail shorter than half a segment joins the previous one (vidA: 12 = 5 + 7)
    lengths = sorted(x for sh in m.splits["train"].shards for x in sh.sample_frames)
    assert lengths == sorted([5, 7, 6, 6, 5, 5, 5, 5])


def test_same_input_gives_byte_identical_shards(release, tmp_path):
    images, ann = release
    m1 = pack(PackOptions(images, ann, tmp_path / "a", segment_len=4, shard_size=2, workers=1, progress=False))
    m2 = pack(PackOptions(images, ann, tmp_path / "b", segment_len=4, shard_size=2, workers=2, progress=False))
    a, b = _shards(tmp_path / "a"), _shards(tmp_path / "b")
    assert len(a) > 4 and a == b
    assert m1.splits == m2.splits
    # rerun in place: nothing to do, same manifest
    assert (
        pack(PackOptions(images, ann, tmp_path / "a", segment_len=4, shard_size=2, progress=False)).splits == m1.splits
    )


def test_train_split_is_shuffled_across_videos_val_is_in_order(release, tmp_path):
    images, ann = release
    pack(PackOptions(images, ann, tmp_path / "out", segment_len=2, shard_size=100, progress=False))
    order = [(parse_sample(r, "").video, int(parse_sample(r, "").frames[0]))
             for r in read_raw(tmp_path / "out" / "train" / "000000.tar")]  # fmt: skip
    assert order != sorted(order)
    val = [int(parse_sample(r, "").frames[0]) for r in read_raw(tmp_path / "out" / "val" / "000000.tar")]
    assert val == sorted(val)


def test_interrupted_pack_resumes_without_redoing_finished_shards(release, tmp_path, monkeypatch):
    images, ann = release
    ref = pack(PackOptions(images, ann, tmp_path / "ref", segment_len=3, shard_size=2, progress=False))
    out = tmp_path / "out"
    calls = {"n": 0}
    real = pack_mod.write_shard_job

    def dies_on_third(job):
        calls["n"] += 1
        if calls["n"] == 3:
            # a crash mid-write: a partial .tmp is left behind, as a kill would leave it
            Path(job["path"] + ".tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(pack_mod, "write_shard_job", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        pack(PackOptions(images, ann, out, segment_len=3, shard_size=2, progress=False))
    monkeypatch.setattr(pack_mod, "write_shard_job", real)
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="not found"):
        read_manifest(out)
    done = sorted(out.glob("*/*.tar"))
    assert len(done) == 2 and list(out.glob("*/*.tmp"))
    before = {p: p.stat().st_mtime_ns for p in done}
    m = pack(PackOptions(images, ann, out, segment_len=3, shard_size=2, progress=False))
    assert {p: p.stat().st_mtime_ns for p in done} == before  # finished shards untouched
    assert not list(out.glob("*/*.tmp"))
    assert m.splits == ref.splits and _shards(out) == _shards(tmp_path / "ref")


def test_other_parameters_in_the_same_folder_are_refused(release, tmp_path):
    images, ann = release
    pack(PackOptions(images, ann, tmp_path / "out", segment_len=4, progress=False))
    with pytest.raises(DataError, match="--overwrite"):
        pack(PackOptions(images, ann, tmp_path / "out", segment_len=5, progress=False))
    m = pack(PackOptions(images, ann, tmp_path / "out", segment_len=5, overwrite=True, progress=False))
    assert m.params.segment_len == 5 and read_manifest(tmp_path / "out").params.segment_len == 5


def test_non_jpeg_image_is_named(release, tmp_path):
    images, ann = release
    (images / "vidC" / "00002.jpg").write_bytes(b"GIF89a not a jpeg")
    with pytest.raises(DataError, match=r"vidC/00002.jpg: not a JPEG"):
        pack(PackOptions(images, ann, tmp_path / "out", progress=False))


def test_verify_passes_good_shards_and_names_truncated_and_corrupted_ones(release, tmp_path):
    images, ann = release
    root = tmp_path / "out"
    m = pack(PackOptions(images, ann, root, segment_len=4, shard_size=2, progress=False))
    assert all(r.ok for r in verify(root, progress=False))
    ok = _mtl("shards", "verify", str(root), "--workers", "1")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.strip().splitlines()[-1])["bad"] == []

    shards = [sh.path for sh in m.splits["train"].shards]
    truncated, corrupted = root / shards[0], root / shards[1]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 4])  # as a copy cut short would look
    raw = bytearray(corrupted.read_bytes())
    start = raw.index(b"\xff\xd8\xff")  # inside the first JPEG, past its header
    raw[start + 200 : start + 260] = bytes(60)
    corrupted.write_bytes(bytes(raw))

    reports = {r.path: r for r in verify(root, progress=False)}
    assert not reports[shards[0]].ok and not reports[shards[1]].ok
    assert sum(not r.ok for r in reports.values()) == 2
    assert any("sha256" in p for p in reports[shards[1]].problems)
    problems = " ".join(reports[shards[0]].problems)
    assert "size" in problems and ("samples, manifest says" in problems or "unreadable" in problems)
    bad = _mtl("shards", "verify", str(root), "--workers", "1")
    assert bad.returncode == 1
    assert f"BAD {shards[0]}" in bad.stderr and f"BAD {shards[1]}" in bad.stderr


def test_verify_catches_a_jpeg_that_does_not_decode(release, tmp_path):
    images, ann = release
    root = tmp_path / "out"
    pack(PackOptions(images, ann, root, progress=False))  # (pack itself refuses such a file: tests/test_data_faults.py)
    # the shard's copy of vidC's frame 3 goes bad in place: starts like a JPEG, cut off, same length
    good = (images / "vidC" / "00003.jpg").read_bytes()
    shard = root / "val" / "000000.tar"
    raw = shard.read_bytes()
    assert raw.count(good) == 1
    shard.write_bytes(raw.replace(good, good[:40] + bytes(len(good) - 40)))
    reports = verify(root, progress=False)
    bad_reports = [r for r in reports if not r.ok]
    assert [r.path for r in bad_reports] == ["val/000000.tar"]
    assert "frame 3: JPEG does not decode" in " ".join(bad_reports[0].problems)
    cfg = DataConfig(shards=str(root), clip_len=4, eval_batch_size=1, num_workers=0, image_size=16)
    with pytest.raises(DataError, match=r"video vidC, frames 1-4: frame 2 of the clip: JPEG does not decode"):
        list(make_eval_loader(cfg, "val", mean=(0.5,) * 3, std=(0.5,) * 3, rank=0, world_size=1))


def test_cli_pack_reports_bad_input_as_one_line(release, tmp_path):
    images, ann = release
    (ann / "VA_Estimation_Challenge" / "Train_Set" / "vidS.txt").write_text("valence,arousal\n0.1,0.2\n0.5\n")
    proc = _mtl("pack", "--images", str(images), "--annotations", str(ann), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "vidS.txt:3: expected 2 comma-separated values, found 1" in proc.stderr
    assert "Traceback" not in proc.stderr
