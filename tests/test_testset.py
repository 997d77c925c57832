"""The ABAW test set: the organisers' lists packed as the unlabelled split `test` (frame counts from raw videos, a
CSV, or the crops with a warning), `mtl eval --split test` of a real trained run writing a row for every frame in
the organisers' order, and `mtl submission check` passing on it and naming file:line of what is wrong."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from helpers import mtl, ok, run

from mtl.data import testset
from mtl.data.manifest import UnlabelledSplit, read_manifest
from mtl.data.pack import PackOptions, pack
from mtl.data.shardio import parse_sample, read_raw
from mtl.data.submission import check_submission
from mtl.data.synth import make_synth, plan_test_videos
from mtl.errors import DataError
from mtl.tasks import get_task, tasks

TEST_VIDEOS, FRAMES, SEED = 3, 32, 0


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synth(tmp_path_factory.mktemp("testset") / "synth", videos=2, frames=FRAMES, seed=SEED, workers=1,
                      test_videos=TEST_VIDEOS)  # fmt: skip


def _lists(root: Path) -> list[str]:
    return [str(p) for p in sorted((root / "test_set").glob("*.txt"))]


def _truth(root: Path) -> dict[str, dict]:
    """Per test video: frames of its raw video, and which frames have a crop (from the files on disk)."""
    out = {}
    for t in plan_test_videos(TEST_VIDEOS, FRAMES, SEED):
        v = t.video
        crops = {int(p.stem) for p in (root / "cropped_aligned" / v.name).glob("*.jpg")}
        out[v.name] = {"n": v.n, "crops": crops}
    return out


def _pack(root: Path, out: Path, **kw) -> dict:
    return pack(PackOptions(root / "cropped_aligned", kw.pop("annotations", None), out, segment_len=16, shard_size=2,
                test_lists=kw.pop("test_lists", _lists(root)), progress=False, **kw))  # fmt: skip


@pytest.fixture(scope="module")
def test_pack(release: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("testpack") / "shards"
    _pack(release, out, videos_dir=release / "videos")
    return out


def _shard_frames(root: Path, split: str) -> dict[str, dict[int, bool]]:
    seen: dict[str, dict[int, bool]] = {}
    for sh in read_manifest(root).splits[split].shards:
        for raw in read_raw(root / sh.path):
            s = parse_sample(raw, sh.path)
            for t in tasks():
                assert not s.labels[t.valid_key].any()
            for f, has in zip(s.frames.tolist(), s.has_image.tolist()):
                assert f not in seen.setdefault(s.video, {}), f"{s.video}/{f} packed twice"
                seen[s.video][f] = has
    return seen


# ------------------------------------------------------------------------------------------------ pack


def test_pack_lists_with_raw_videos_beside_the_labelled_splits(release: Path, tmp_path: Path) -> None:
    truth = _truth(release)
    m = _pack(release, tmp_path / "both", annotations=release / "annotations", videos_dir=release / "videos")
    t = read_manifest(tmp_path / "both").splits["test"]  # the reader validates the unlabelled entry
    assert isinstance(t, UnlabelledSplit) and t.unlabeled is True and t.tasks == {}
    assert t.video_frames == {v: x["n"] for v, x in truth.items()}  # the raw videos', past the last crop
    assert t.frames == sum(x["n"] for x in truth.values())
    assert t.frames_without_image == sum(x["n"] - len(x["crops"]) for x in truth.values()) > 0
    assert t.frame_counts_from == {"videos": TEST_VIDEOS} and t.videos_skipped == 0
    # every frame of every test video exactly once, with an image exactly where a crop exists
    assert _shard_frames(tmp_path / "both", "test") == {
        v: {f: f in x["crops"] for f in range(1, x["n"] + 1)} for v, x in truth.items()
    }
    # the lists, copied into the pack in the organisers' order
    assert set(t.lists) == {"va", "expr", "au", "mtl"}
    for track, e in t.lists.items():
        src = Path(e.source).read_text().split()
        copy = (tmp_path / "both" / e.path).read_text().split()
        assert copy == (src[1:] if track == "mtl" else src)
    assert t.lists["va"].rows == t.frames
    assert not set(truth) & set(m.unlabeled_videos)

    # the labelled splits are the same shards as without the test lists; a rerun is byte-identical and resumes
    alone = pack(PackOptions(release / "cropped_aligned", release / "annotations", tmp_path / "alone", segment_len=16,
                 shard_size=2, progress=False))  # fmt: skip
    for split in ("train", "val"):
        assert m.splits[split].shards == alone.splits[split].shards
    before = {p.name: p.read_bytes() for p in (tmp_path / "both" / "test").glob("*.tar")}
    (tmp_path / "both" / "test" / "000001.tar").unlink()
    again = _pack(release, tmp_path / "both", annotations=release / "annotations", videos_dir=release / "videos")
    assert {p.name: p.read_bytes() for p in (tmp_path / "both" / "test").glob("*.tar")} == before
    assert again.splits == m.splits


def test_frame_counts_from_a_csv_or_the_crops_with_a_warning(release: Path, tmp_path: Path, capsys) -> None:
    truth = _truth(release)
    csv = tmp_path / "counts.csv"
    csv.write_text("video,frames\n" + "".join(f"{v},{x['n'] + 2}\n" for v, x in truth.items()))
    t = _pack(release, tmp_path / "csv", frame_counts=csv).splits["test"]
    assert t.video_frames == {v: x["n"] + 2 for v, x in truth.items()}
    assert t.frame_counts_from == {"frame_counts": TEST_VIDEOS}

    capsys.readouterr()
    m = _pack(release, tmp_path / "crops")
    mtl_listed: dict[str, int] = {}
    for line in Path(m.splits["test"].lists["mtl"].source).read_text().split()[1:]:
        video, frame = line.split("/")
        mtl_listed[video] = max(mtl_listed.get(video, 0), int(frame[:-4]))
    expected = {v: max(max(x["crops"]), mtl_listed.get(v, 0)) for v, x in truth.items()}
    assert m.splits["test"].video_frames == expected
    assert any(expected[v] < x["n"] for v, x in truth.items())  # the fallback misses frames; hence the warning
    err = capsys.readouterr().err
    assert "no --videos DIR or --frame-counts CSV given" in err and "highest cropped frame" in err
    assert any("highest cropped frame" in w for w in m.warnings)


def test_listed_video_without_frames_is_an_error_or_skipped_and_counted(release: Path, tmp_path: Path) -> None:
    gone = plan_test_videos(TEST_VIDEOS, FRAMES, SEED)[0].video.name
    images = tmp_path / "images"
    images.mkdir()
    for d in (release / "cropped_aligned").iterdir():
        if d.name != gone:
            os.symlink(d, images / d.name)
    kw = dict(segment_len=16, shard_size=2, test_lists=_lists(release), videos_dir=release / "videos", progress=False)
    with pytest.raises(DataError, match=f"no frames folder for test video {gone} .*--skip-bad-rows"):
        pack(PackOptions(images, None, tmp_path / "a", **kw))
    m = pack(PackOptions(images, None, tmp_path / "b", skip_bad_rows=True, **kw))
    t = m.splits["test"]
    assert t.videos_skipped == 1 and gone in t.skipped_videos[0] and gone not in t.video_frames
    assert t.videos == TEST_VIDEOS - 1


def test_the_commands_synth_prints_pack_and_verify(tmp_path: Path) -> None:
    """`mtl synth --test-videos`, then the `mtl pack` command it prints, as printed, then `mtl shards verify`:
    exit 0 and its JSON summary (verify used to stop with KeyError: 'tasks' on the unlabelled split)."""
    synth = ok(run([sys.executable, "-m", "mtl.cli", "synth", "--out", str(tmp_path / "synth"), "--videos", "3",
                    "--frames", "24", "--test-videos", "2", "--workers", "1"], cwd=tmp_path))  # fmt: skip
    printed = synth.stdout.strip().splitlines()[-1].split()
    assert printed[:2] == ["mtl", "pack"] and "--test-list" in printed and printed[-2:] == ["--out", "shards/synth"]
    ok(run([sys.executable, "-m", "mtl.cli", *printed[1:]], cwd=tmp_path))
    root = tmp_path / "shards" / "synth"
    proc = ok(mtl("shards", "verify", str(root), "--workers", "1"))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    manifest = read_manifest(root)
    assert isinstance(manifest.splits[testset.SPLIT], UnlabelledSplit) and {"train", "val"} <= set(manifest.splits)
    assert summary["bad"] == [] and summary["stats_mismatches"] == []
    assert summary["shards"] == len(manifest.shards()) and summary["samples"] == sum(
        s.samples for s in manifest.splits.values()
    )


def test_list_names_and_bad_lists(tmp_path: Path) -> None:
    for name, track in (("Valence_Arousal_Estimation_Challenge_test_set_release.txt", "va"),
                        ("Expression_Recognition_Challenge_test_set_release.txt", "expr"),
                        ("expression_classification_challenge_test_set_release.txt", "expr"),
                        ("Action_Unit_Detection_Challenge_test_set_release.txt", "au"),
                        ("MTL_Challenge_test_set_release.txt", "mtl")):  # fmt: skip
        assert testset.track_of(Path(name)) == track
    assert testset.parse_spec(f"au={tmp_path / 'x.txt'}") == ("au", tmp_path / "x.txt")
    with pytest.raises(DataError, match="cannot tell the track.*TRACK=FILE"):
        testset.track_of(Path("videos.txt"))
    bad = tmp_path / "VA_test_set_release.txt"
    bad.write_text("vid1\nvid2\r\nvid1\n")
    with pytest.raises(DataError, match=r"VA_test_set_release.txt:3: video vid1 is listed twice \(also line 1\)"):
        testset.read_test_lists([str(bad)])
    counts = tmp_path / "counts.csv"
    counts.write_text("video,frames\nvid1,12\nvid2,many\n")
    with pytest.raises(DataError, match=r"counts.csv:3: frames 'many'"):
        testset.read_frame_counts(counts)


def test_manifest_reader_checks_the_unlabelled_split(test_pack: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(test_pack, root)
    m = json.loads((root / "manifest.json").read_text())
    m["splits"]["test"]["frames_without_image"] += 1
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="splits.test.frames_without_image"):
        read_manifest(root)


# ------------------------------------------------------------------------------------------------ eval and check


def _rows(path: Path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_eval_test_writes_every_frame_in_order_and_check_catches_mistakes(
    trained_run: Path, test_pack: Path, release: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    proc = ok(mtl("eval", "--checkpoint", str(trained_run), "--split", "test", "--out", str(out),
                  f"data.shards={test_pack}"))  # fmt: skip
    assert "unlabelled: no metrics" in proc.stdout and not (out / "metrics.json").exists()
    sub = out / "submission"
    entry = read_manifest(test_pack).splits["test"]
    truth = _truth(release)
    listed = {track: (test_pack / e.path).read_text().split() for track, e in entry.lists.items()}
    without_crop = 0
    for t in tasks():
        rows = _rows(sub / t.submission)
        assert rows[0] == ["image_location", *t.columns]
        want = [f"{v}/{f:05d}.jpg" for v in listed[t.name] for f in range(1, truth[v]["n"] + 1)]
        assert [r[0] for r in rows[1:]] == want  # every frame of the raw video, videos in the list's order
        without_crop += sum(int(img[-9:-4]) not in truth[img.split("/")[0]]["crops"] for img in want)
        for r in rows[1:]:
            t.check_submission(r[1:])
    assert without_crop > 0
    mtl_rows = _rows(sub / "MTL.txt")
    assert mtl_rows[0] == ["image", "valence", "arousal", "expression", "aus"]
    assert [r[0] for r in mtl_rows[1:]] == listed["mtl"]
    va = {r[0]: r[1:] for r in _rows(sub / "VA.txt")[1:]}
    assert all(r[1:3] == va[r[0]] for r in mtl_rows[1:])  # one prediction per frame, whichever file holds it

    ok_run = ok(mtl("submission", "check", str(sub), "--shards", str(test_pack)))
    assert "ready to upload" in ok_run.stdout

    def broken(name: str, edit) -> str:
        """The one problem the check finds in a copy of the submission with ``edit`` applied to file ``name``."""
        bad = tmp_path / f"bad_{len(list(tmp_path.glob('bad_*')))}"
        shutil.copytree(sub, bad)
        lines = (bad / name).read_text().splitlines()
        edit(lines)
        (bad / name).write_text("\n".join(lines) + "\n")
        problems, _ = check_submission(bad, test_pack)
        assert problems.count == 1, problems.shown
        return problems.shown[0]

    def drop(lines):
        del lines[9]

    def swap(lines):
        lines[5], lines[6] = lines[6], lines[5]

    def header(lines):
        lines[0] = lines[0].replace("AU12", "AU13")

    def out_of_range(lines):
        lines[2] = lines[2].split(",")[0] + ",1.5,0.0"

    missing = broken("VA.txt", drop)
    assert "VA.txt: 1 row missing" in missing and "expected at line 10" in missing
    assert "EXPR.txt:7: " in broken("EXPR.txt", swap) and "out of order" in broken("EXPR.txt", swap)
    assert "AU.txt:1: header" in broken("AU.txt", header)
    assert "VA.txt:3: valence 1.5 is outside [-1, 1]" in broken("VA.txt", out_of_range)

    def bad_class(lines):
        lines[1] = _set_field(lines[1], 3, "8")

    assert f"MTL.txt:2: expression 8 is not a class 0..{get_task('expr').width - 1}" in broken("MTL.txt", bad_class)

    bad = tmp_path / "bad_cli"
    shutil.copytree(sub, bad)
    lines = (bad / "AU.txt").read_text().splitlines()
    lines[3] = _set_field(lines[3], 1, "2")
    (bad / "AU.txt").write_text("\n".join(lines) + "\n")
    (bad / "notes.txt").write_text("hi\n")
    proc = mtl("submission", "check", str(bad), "--shards", str(test_pack))
    assert proc.returncode == 1
    assert f"{bad / 'AU.txt'}:4: AU1 2 is not 0 or 1" in proc.stderr and "notes.txt: unexpected file" in proc.stderr


def _set_field(line: str, i: int, value: str) -> str:
    fields = line.split(",")
    fields[i] = value
    return ",".join(fields)
