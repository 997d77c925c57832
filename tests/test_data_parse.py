"""Annotation parsing: the ABAW tree's quirks, the MTL-track file, and bad input naming file and line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import (
    AU_DIR,
    AU_HEADER,
    EXPECTED,
    EXPR_DIR,
    TRAIN,
    VA_DIR,
    VA_HEADER,
    VAL,
    make_release,
    mtl_track_files,
    va_rows,
    write_text,
)

from mtl.data.abaw import parse_abaw
from mtl.data.labels import ParseLog
from mtl.data.mtl_track_file import parse_mtl
from mtl.data.pack import PackOptions, pack
from mtl.errors import DataError


@pytest.fixture()
def release(tmp_path: Path) -> tuple[Path, Path]:
    return make_release(tmp_path / "release")


def test_abaw_tree_quirks(release):
    images, ann = release
    labels = parse_abaw(ann, ParseLog())
    assert sorted(labels["train"]) == ["vidA", "vidB_left", "vidB_right", "vidS"]
    assert sorted(labels["val"]) == ["vidC"]
    a = labels["train"]["vidA"]
    assert set(a.tasks) == {"va", "expr", "au"}
    assert set(labels["train"]["vidB_left"].tasks) == {"va"}  # video sets differ per task
    assert set(labels["train"]["vidB_right"].tasks) == {"expr"}
    va = a.tasks["va"]
    assert len(va) == 10  # header skipped, CRLF and final newline not rows
    assert not va.valid[2] and va.valid[[0, 1, 3]].all()  # frame 3 is -5,-5
    assert va.values[0].tolist() == pytest.approx([-0.2, 0.1])
    assert a.tasks["expr"].valid.tolist() == [i != 5 for i in range(1, 11)]
    assert a.tasks["expr"].values[:4].tolist() == [1, 2, 3, 4]
    au = a.tasks["au"]
    assert au.valid.tolist() == [i != 2 for i in range(1, 11)]  # one -1 invalidates the frame
    assert au.values[0].tolist() == [(1 + j) % 2 for j in range(12)]
    dense = a.dense(12)  # frames past the labels (images 11, 12) have no label
    assert not dense["va_valid"][10:].any() and dense["va"].shape == (12, 2)


def test_pack_counts_of_the_quirky_release(release, tmp_path):
    images, ann = release
    m = pack(PackOptions(images, ann, tmp_path / "out", segment_len=4, shard_size=2, progress=False))
    for split, want in EXPECTED.items():
        s = m.splits[split]
        assert s.videos == want["videos"] and s.frames == want["frames"]
        for task in ("va", "expr", "au"):
            got = s.tasks[task]
            assert (got.labeled_frames, got.labeled_missing_image) == want[task], (split, task)
        assert sum(s.tasks["expr"].counts("class_counts")) == s.tasks["expr"].labeled_frames
    assert m.splits["train"].video_frames["vidA"] == 12  # images past the labels are frames too
    assert m.splits["train"].tasks["va"].videos == 3
    assert m.unlabeled_videos == ["vidD"]
    # expression class counts over valid frames with image: vidA frames 1..10 minus 4 (no image) and 5 (-1)
    want = np.bincount([f % 8 for f in range(1, 11) if f not in (4, 5)] + [f % 8 for f in range(1, 7)], minlength=8)
    assert m.splits["train"].tasks["expr"].counts("class_counts") == want.tolist()


def test_older_expr_folder_name_and_seven_class_header(tmp_path):
    images, ann = make_release(tmp_path / "r", expr_dir="EXPR_Classification_Challenge")
    old_header = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise"
    write_text(ann / "EXPR_Classification_Challenge" / VAL / "vidC.txt", [old_header, "0", "6", "-1"])
    labels = parse_abaw(ann, ParseLog())
    assert labels["val"]["vidC"].tasks["expr"].values.tolist() == [0, 6, 0]
    assert labels["train"]["vidB_right"].tasks["expr"].valid.all()


def test_both_expr_folder_names_is_an_error(release):
    images, ann = release
    shutil.copytree(ann / EXPR_DIR, ann / "EXPR_Classification_Challenge")
    with pytest.raises(DataError, match="both"):
        parse_abaw(ann, ParseLog())


@pytest.mark.parametrize(
    ("rows", "line", "reason"),
    [
        (["0.1,0.2", "0.3"], 3, "expected 2 comma-separated values, found 1"),
        (["0.1,0.2", "0.1,0.2,0.3"], 3, "expected 2 comma-separated values, found 3"),
        (["abc,0.2"], 2, "valence: expected a number, got 'abc'"),
        (["0.1,0.2", "1.7,0.0"], 3, "valence 1.7 is outside"),
        (["0.1,nan"], 2, "arousal: expected a finite number"),
        (["0.1,0.2", "", "0.1,0.2"], 3, "expected 2 comma-separated values"),
    ],
)
def test_bad_va_row_names_file_and_line(release, rows, line, reason):
    images, ann = release
    write_text(ann / VA_DIR / TRAIN / "vidA.txt", [VA_HEADER, *rows], crlf=True)
    with pytest.raises(DataError) as exc:
        parse_abaw(ann, ParseLog())
    assert f"{VA_DIR}/{TRAIN}/vidA.txt:{line}: " in str(exc.value)
    assert reason in str(exc.value)


def test_bad_expr_and_au_rows(release):
    images, ann = release
    path = ann / EXPR_DIR / VAL / "vidC.txt"
    write_text(path, ["Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other", "3", "9"])
    with pytest.raises(DataError, match=r"vidC.txt:3: expression 9 is not a class 0..7"):
        parse_abaw(ann, ParseLog())
    write_text(path, ["Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other", "x"])
    with pytest.raises(DataError, match=r"vidC.txt:2: expression: expected an integer, got 'x'"):
        parse_abaw(ann, ParseLog())
    write_text(path, ["Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other", "1"])
    write_text(ann / AU_DIR / TRAIN / "vidA.txt", [AU_HEADER, ",".join(["0"] * 11 + ["2"])])
    with pytest.raises(DataError, match=r"vidA.txt:2: AU26 2 is not 0, 1"):
        parse_abaw(ann, ParseLog())


def test_header_problems(release):
    images, ann = release
    path = ann / VA_DIR / TRAIN / "vidB_left.txt"
    write_text(path, va_rows(3))  # no header: frame 1 would silently become frame 0
    with pytest.raises(DataError, match=r"vidB_left.txt:1: expected the header line \(valence,arousal\)"):
        parse_abaw(ann, ParseLog())
    write_text(path, ["arousal,valence", *va_rows(3)])  # swapped columns are refused, not misread
    with pytest.raises(DataError, match=r"vidB_left.txt:1: header 'arousal,valence' does not match"):
        parse_abaw(ann, ParseLog())


def test_empty_file_and_missing_folders(release, tmp_path):
    images, ann = release
    path = ann / VA_DIR / TRAIN / "vidB_left.txt"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"vidB_left.txt:1: empty file"):
        parse_abaw(ann, ParseLog())
    write_text(path, [VA_HEADER])
    with pytest.raises(DataError, match=r"vidB_left.txt:1: no label rows after the header"):
        parse_abaw(ann, ParseLog())
    path.unlink()
    shutil.rmtree(ann / AU_DIR / VAL)
    with pytest.raises(DataError, match=rf"missing folder: .*{AU_DIR}/{VAL}"):
        parse_abaw(ann, ParseLog())
    with pytest.raises(DataError, match="annotations folder not found"):
        parse_abaw(tmp_path / "nowhere", ParseLog())
    with pytest.raises(DataError, match="no task folder found"):
        parse_abaw(images, ParseLog())
    with pytest.raises(DataError, match="images folder not found"):
        pack(PackOptions(tmp_path / "nowhere", ann, tmp_path / "out", progress=False))


def test_skip_bad_rows_counts_them_in_the_manifest(release, tmp_path):
    images, ann = release
    write_text(ann / VA_DIR / TRAIN / "vidS.txt", [VA_HEADER, *va_rows(18), "1.7,0.0", "oops"])
    (ann / EXPR_DIR / VAL / "vidC.txt").write_bytes(b"")
    with pytest.raises(DataError, match=r"vidS.txt:20: valence 1.7"):
        pack(PackOptions(images, ann, tmp_path / "strict", progress=False))
    assert not (tmp_path / "strict" / "manifest.json").exists()
    m = pack(PackOptions(images, ann, tmp_path / "out", skip_bad_rows=True, progress=False))
    train, val = m.splits["train"], m.splits["val"]
    assert train.bad_rows_skipped == 2
    assert train.bad_rows[0].startswith(f"{VA_DIR}/{TRAIN}/vidS.txt:20: valence 1.7")
    assert "vidS.txt:21: " in train.bad_rows[1]
    assert train.tasks["va"].labeled_frames == EXPECTED["train"]["va"][0] - 2  # skipped rows: no label
    assert train.video_frames["vidS"] == 20  # but they keep their frame numbers
    assert val.skipped_files and "vidC.txt:1: empty file" in val.skipped_files[0]
    assert val.tasks["expr"].labeled_frames == 0


def test_video_in_both_splits_is_an_error(release):
    images, ann = release
    write_text(ann / VA_DIR / VAL / "vidA.txt", [VA_HEADER, *va_rows(3)])
    with pytest.raises(DataError, match="vidA is also in the train split"):
        parse_abaw(ann, ParseLog())


def test_mtl_track_single_file(release, tmp_path):
    images, _ = release
    files = mtl_track_files(tmp_path, images)
    labels = parse_mtl(files, ParseLog())
    a = labels["train"]["vidA"]
    assert len(a.tasks["va"]) == 6  # up to the last listed frame
    assert a.tasks["va"].valid.tolist() == [True, False, True, False, True, True]  # 2: -5; 4: unlisted
    assert a.tasks["va"].values[2].tolist() == pytest.approx([0.3, -0.3])
    assert a.tasks["expr"].valid.tolist() == [True, True, True, False, False, True]  # 5: -1
    assert a.tasks["au"].valid.tolist() == [True, True, True, False, True, False]  # 6: all -1
    m = pack(PackOptions(images, None, tmp_path / "out", mtl_files=files, segment_len=4, progress=False))
    assert m.params.source == "mtl-track"
    t = m.splits["train"].tasks
    assert (t["va"].labeled_frames, t["expr"].labeled_frames, t["au"].labeled_frames) == (4, 4, 4)
    assert m.splits["train"].video_frames["vidA"] == 12  # the images go on past the listed rows
    assert m.splits["val"].tasks["expr"].labeled_frames == 8


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("vidA/00001.jpg,0.1,0.2,3", "expected 16 comma-separated values, found 4"),
        ("vidA/frame1.jpg,0.1,0.2,3," + ",".join(["0"] * 12), "is not <video>/<NNNNN>.jpg"),
        ("vidA/00002.jpg,0.1,0.2,8," + ",".join(["0"] * 12), "expression 8 is not a class"),
        ("vidA/00001.jpg,0.1,0.2,3," + ",".join(["0"] * 12), "vidA/00001.jpg is listed twice"),
    ],
)
def test_mtl_track_bad_rows(tmp_path, row, reason):
    path = write_text(
        tmp_path / "t.txt",
        ["image,valence,arousal,expression,aus", "vidA/00001.jpg,0.1,0.2,3," + ",".join(["0"] * 12), row],
    )
    with pytest.raises(DataError) as exc:
        parse_mtl({"train": path}, ParseLog())
    assert f"{path}:3: " in str(exc.value) and reason in str(exc.value)
    log = ParseLog(skip_bad_rows=True)
    assert parse_mtl({"train": path}, log)["train"]["vidA"].tasks["va"].valid[0]
    assert log.bad_rows == {"train": 1}
