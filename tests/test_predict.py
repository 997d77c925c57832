"""`mtl predict` on real faces (scikit-image's astronaut) made into short videos, with a model from a real tiny
training run: rows, face flags, boxes, frames folder = same frames as a video, bad inputs, no face, plots."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from face_video import face_frames, write_folder, write_video
from helpers import mtl, ok

from mtl.predict.detect import Box, HaarDetector, HogDetector, make_detector
from mtl.predict.names import csv_header
from mtl.tasks import get_task, tasks

EXPRESSIONS, ACTION_UNITS = get_task("expr").columns, get_task("au").columns

pytestmark = pytest.mark.slow


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return Box(*a).iou(Box(*b))


def test_video_rows_faces_boxes_and_plot(trained_run: Path, tmp_path: Path) -> None:
    covered, absent = set(range(14, 20)), set(range(28, 34))
    frames, truth = face_frames(40, covered=covered, absent=absent)
    video = write_video(tmp_path / "talk.mp4", frames, fps=25)
    proc = ok(mtl("predict", "--checkpoint", str(trained_run), str(video), "--out", str(tmp_path / "out"), "--plot"))
    assert "talk.mp4: 40 frames, 28 with a face" in proc.stdout and "frames/s" in proc.stdout

    header, rows = _rows(tmp_path / "out" / "talk.csv")
    assert header == csv_header(tasks())
    assert header[:11] == ["frame", "time_s", "face", "face_x", "face_y", "face_w", "face_h", "face_score",
                           "valence", "arousal", "expression"]  # fmt: skip
    assert len(rows) == 40 and [int(r["frame"]) for r in rows] == list(range(40))
    assert np.allclose([float(r["time_s"]) for r in rows], np.arange(40) / 25, atol=1e-3)
    for r, box in zip(rows, truth):
        assert r["face"] == ("0" if box is None else "1"), f"frame {r['frame']}"
        if box is None:
            assert r["face_x"] == r["face_w"] == r["face_score"] == ""
        else:
            found = tuple(float(r[k]) for k in ("face_x", "face_y", "face_w", "face_h"))
            assert _iou(found, box) > 0.6, f"frame {r['frame']}: box {found} vs true {box}"
        # every frame has predictions, faceless ones from the trunk
        va = [float(r["valence"]), float(r["arousal"])]
        assert all(-1 <= v <= 1 for v in va)
        p_expr = np.array([float(r[f"p_{n}"]) for n in EXPRESSIONS])
        assert abs(p_expr.sum() - 1) < 1e-3 and int(r["expression"]) == int(p_expr.argmax())
        for n in ACTION_UNITS:
            assert r[n] == str(int(float(r[f"p_{n}"]) >= 0.5))
    png = tmp_path / "out" / "talk.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_frames_folder_equals_same_frames_as_video(trained_run: Path, tmp_path: Path) -> None:
    frames, _ = face_frames(18, covered={7, 8})
    video = write_video(tmp_path / "clip.mkv", frames, fps=10, lossless=True)
    folder = write_folder(tmp_path / "clip_frames", frames)
    ok(mtl("predict", "--checkpoint", str(trained_run / "export" / "best.safetensors"), str(video), str(folder),
           "--fps", "10", "--out", str(tmp_path / "out"), "--no-progress"))  # fmt: skip
    _, from_video = _rows(tmp_path / "out" / "clip.csv")
    _, from_folder = _rows(tmp_path / "out" / "clip_frames.csv")
    assert len(from_video) == len(from_folder) == 18
    assert from_video == from_folder
    assert [r["face"] for r in from_video].count("0") == 2


def test_bad_inputs_are_named_and_the_rest_still_run(trained_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.mov"
    garbage.write_text("not a video\n" * 50)
    no_images = tmp_path / "no_images"
    no_images.mkdir()
    blank, _ = face_frames(12, absent=set(range(12)))
    faceless = write_video(tmp_path / "faceless.avi", blank, fps=12)
    out = tmp_path / "out"
    proc = mtl("predict", "--checkpoint", str(trained_run), str(empty), str(garbage), str(no_images), str(faceless),
               "--out", str(out), "--no-progress")  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    for path in (empty, garbage, no_images):
        assert f"error: {path}" in proc.stderr
    assert "3 of 4 inputs failed" in proc.stderr and "Traceback" not in proc.stderr
    assert f"warning: {faceless}: no face found" in proc.stderr
    _, rows = _rows(out / "faceless.csv")
    assert len(rows) == 12 and {r["face"] for r in rows} == {"0"}
    assert all(r["valence"] != "" for r in rows)
    assert sorted(p.name for p in out.iterdir()) == ["faceless.csv"]  # nothing half-written left behind


def test_an_undecodable_jpeg_is_a_row_without_a_face_and_the_rest_is_predicted(
    trained_run: Path, tmp_path: Path
) -> None:
    frames, _ = face_frames(12)
    folder, broken_only = tmp_path / "jpegs", tmp_path / "broken_only"
    for where, n in ((folder, 12), (broken_only, 2)):
        where.mkdir()
        for i, rgb in enumerate(frames[:n]):
            cv2.imwrite(str(where / f"{i + 1:04d}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    intact = tmp_path / "intact"
    shutil.copytree(folder, intact)
    broken = folder / "0006.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 no longer a JPEG" * 20)
    for f in broken_only.iterdir():
        f.write_bytes(f.read_bytes()[:2] + b"garbage" * 30)
    out = tmp_path / "out"
    proc = mtl("predict", "--checkpoint", str(trained_run), str(folder), str(intact), str(broken_only), "--fps", "10",
               "--out", str(out), "--no-progress")  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert warnings == [f"mtl predict: warning: {broken}: image does not decode; its row has face=0"], proc.stderr
    assert f"error: {broken_only}: none of its 2 images decodes ({broken_only}/0001.jpg" in proc.stderr
    assert "1 of 3 inputs failed" in proc.stderr
    assert f"{folder}: 12 frames, 11 with a face" in proc.stdout
    _, rows = _rows(out / "jpegs.csv")
    _, rows_intact = _rows(out / "intact.csv")
    assert len(rows) == 12 and [r["face"] for r in rows] == ["1"] * 5 + ["0"] + ["1"] * 6
    assert rows[5]["face_x"] == "" and rows[5]["valence"] != "" and rows[5]["time_s"] == rows_intact[5]["time_s"]

    def box(r: dict[str, str]) -> tuple[float, ...]:
        return tuple(float(r[k]) for k in ("face_x", "face_y", "face_w", "face_h"))

    assert [box(r) for r in rows[:5]] == [box(r) for r in rows_intact[:5]]  # the others: the same faces (after
    assert all(_iou(box(a), box(b)) > 0.6 for a, b in zip(rows[6:], rows_intact[6:]))  # the gap, re-found)
    assert not (out / "broken_only.csv").exists()


def test_user_mistakes_are_one_line_errors(trained_run: Path, tmp_path: Path) -> None:
    frames, _ = face_frames(4)
    video = write_video(tmp_path / "a.mp4", frames)
    proc = mtl("predict", "--checkpoint", str(trained_run), str(video), "--out", str(tmp_path / "o"),
               "--detector-model", str(tmp_path / "missing.onnx"))  # fmt: skip
    assert proc.returncode == 2 and "missing.onnx does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = mtl("predict", "--checkpoint", str(trained_run), str(video), "--out", str(tmp_path / "o"), "--window", "999")
    assert proc.returncode == 2 and "max_len" in proc.stderr


@pytest.mark.parametrize("detector", [HogDetector, HaarDetector])
def test_detectors_box_the_face_alike(detector) -> None:
    frames, truth = face_frames(5, width=480, height=320)
    for rgb, box in zip(frames, truth):
        found = detector().detect(rgb)
        assert len(found) == 1 and _iou((found[0].x, found[0].y, found[0].w, found[0].h), box) > 0.7


def test_auto_detector_is_dlib_hog_here() -> None:
    assert make_detector("auto").name == "hog"


def test_windows_match_the_model_on_one_clip(trained_run: Path) -> None:
    """Frames through the backbone once, then trunk and heads per window: the same as the model's own forward."""
    from mtl.predict.crop import FaceCropper
    from mtl.predict.load import load_run
    from mtl.predict.windows import WindowedPredictor

    run = load_run(trained_run, torch.device("cpu"))
    t = run.clip_len
    g = torch.Generator().manual_seed(0)
    crops = torch.randint(0, 256, (t, 3, run.image_size, run.image_size), dtype=torch.uint8, generator=g)
    has = torch.tensor([i % 3 != 1 for i in range(t)])
    cropper = FaceCropper(run.image_size, run.mean, run.std, 1.25)
    pred = WindowedPredictor(run.model, run.tasks, cropper.normalise, window=t, stride=t, device=torch.device("cpu"))
    outs = []
    for i in range(t):
        outs += pred.push(crops[i] if has[i] else None)
    outs += pred.finish()
    with torch.no_grad():
        ref = run.model(cropper.normalise(crops)[None], has[None], torch.zeros(1, t, dtype=torch.bool))
    assert [o.index for o in outs] == list(range(t))
    np.testing.assert_allclose(np.stack([o.values["va"] for o in outs]), ref["va"][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.stack([o.values["au"] for o in outs]), ref["au"][0].sigmoid().numpy(), atol=1e-5)
    np.testing.assert_allclose(
        np.stack([o.values["expr"] for o in outs]), ref["expr"][0].softmax(-1).numpy(), atol=1e-5
    )


def test_overlapping_windows_cover_every_frame_once_finished(trained_run: Path) -> None:
    from mtl.predict.load import load_run
    from mtl.predict.windows import WindowedPredictor

    run = load_run(trained_run, torch.device("cpu"))
    crop = torch.zeros(3, run.image_size, run.image_size, dtype=torch.uint8)
    for n in (1, 3, 4, 5, 11):
        pred = WindowedPredictor(run.model, run.tasks, lambda x: x.float(), window=4, stride=2,
                                 device=torch.device("cpu"), encode_batch=3)  # fmt: skip
        outs = []
        for i in range(n):
            outs += pred.push(crop if i % 2 else None)
        outs += pred.finish()
        assert [o.index for o in outs] == list(range(n))


def test_au_decisions_follow_the_runs_tuned_thresholds(trained_run: Path, tmp_path: Path) -> None:
    """Where `mtl eval --split val` left thresholds.json beside the weights, predict decides the AUs with them."""
    import json
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "export" / "best.safetensors", run / "best.safetensors")
    thresholds = [0.0] * 6 + [1.01] * 6  # first six always on, last six never
    (run / "eval_val").mkdir()
    (run / "eval_val" / "thresholds.json").write_text(json.dumps({"au": thresholds}))
    frames, _ = face_frames(6)
    folder = write_folder(tmp_path / "clip", frames)
    proc = ok(mtl("predict", "--checkpoint", str(run / "best.safetensors"), str(folder), "--out", str(tmp_path / "o")))
    assert "thresholds tuned" in proc.stdout
    _, rows = _rows(tmp_path / "o" / "clip.csv")
    assert len(rows) == 6
    for r in rows:
        assert [r[n] for n in ACTION_UNITS] == ["1"] * 6 + ["0"] * 6
