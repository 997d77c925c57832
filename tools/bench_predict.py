#!/usr/bin/env python
"""`mtl predict` speed: frames per second end to end (decode, detect, follow, crop, model, CSV) on a 640x480
H.264 video of a real face (scikit-image's astronaut, moving), with the demo model's architecture
(configs/demo.yaml, random weights: speed does not depend on them), on ``--threads`` cores (default 2).

End to end is the command's own figure for the input (its per-input summary line, model loading excluded), from
``python -m mtl.cli predict`` run as a user would. Beside it, each stage alone over the same frames, in process,
so a slow figure says where the time goes. Target: real time, 30 frames/s. Prints and writes JSON
(``--out``, default bench-results/predict.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test videos' maker (astronaut frames, PyAV writer)


def _stage_rates(checkpoint: Path, video: Path) -> dict[str, float]:
    import torch

    from mtl.predict.crop import FaceCropper
    from mtl.predict.decode import open_input
    from mtl.predict.detect import make_detector
    from mtl.predict.load import load_run
    from mtl.predict.track import FaceFollower
    from mtl.predict.windows import WindowedPredictor

    run = load_run(checkpoint, torch.device("cpu"))
    t = time.perf_counter()
    frames = [f.rgb for f in open_input(video)]
    rates = {"decode": len(frames) / (time.perf_counter() - t)}
    follower = FaceFollower(make_detector("auto"))
    t = time.perf_counter()
    found = [follower(rgb) for rgb in frames]
    rates["detect_and_follow"] = len(frames) / (time.perf_counter() - t)
    cropper = FaceCropper(run.image_size, run.mean, run.std, 1.25)
    t = time.perf_counter()
    crops = [None if f.crop is None else cropper(rgb, f.crop) for rgb, f in zip(frames, found)]
    rates["crop"] = len(frames) / (time.perf_counter() - t)
    pred = WindowedPredictor(
        run.model, run.tasks, cropper.normalise, run.clip_len, max(1, run.clip_len // 2), run.device
    )
    t = time.perf_counter()
    for c in crops:
        pred.push(c)
    pred.finish()
    rates["model"] = len(frames) / (time.perf_counter() - t)
    return {k: round(v, 1) for k, v in rates.items()}


def make_inputs(tmp: Path, model_cfg: Path, frames: int) -> tuple[Path, Path, list]:
    """A checkpoint of ``model_cfg``'s architecture (random weights) and a 640x480 H.264 video of a moving face:
    (checkpoint, video, the true face boxes)."""
    from face_video import face_frames, write_video

    from mtl.config import load_config, to_dict
    from mtl.model import build_model
    from mtl.runs.export import save_weights

    cfg = load_config(model_cfg)
    model = build_model(cfg.model, image_size=cfg.data.image_size)
    checkpoint = tmp / "model.safetensors"
    save_weights({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint, to_dict(cfg))
    images, truth = face_frames(frames, width=640, height=480)
    return checkpoint, write_video(tmp / "bench.mp4", images, fps=30), truth


def run_predict(checkpoint: Path, video: Path, out: Path, threads: int | None, *extra: str) -> dict:
    """``mtl predict`` as a user runs it (on ``threads`` cores where given): the command's own per-input figures
    (frames, with a face, seconds, frames/s), the detector it used and the command's wall time."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # a caller's own process group
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONPATH": str(REPO)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "mtl.cli", "predict", "--checkpoint", str(checkpoint), str(video),
           "--out", str(out), "--no-progress", *extra]  # fmt: skip
    if threads and os.cpu_count() and os.cpu_count() > threads and hasattr(os, "sched_setaffinity"):
        cmd = ["taskset", "-c", ",".join(str(i) for i in range(threads)), *cmd]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    command_s = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"mtl predict failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    m = re.search(r": (\d+) frames, (\d+) with a face, ([\d.]+) s, ([\d.]+) frames/s", proc.stdout)
    assert m, proc.stdout
    return {"frames": int(m.group(1)), "frames_with_face": int(m.group(2)), "input_seconds": float(m.group(3)),
            "frames_per_s": float(m.group(4)), "detector": re.search(r"detector: (\w+)", proc.stdout).group(1),
            "command_seconds_incl_start_and_model_load": round(command_s, 1)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=300, help="video length (default 300: 10 s at 30 frames/s)")
    ap.add_argument("--threads", type=int, default=2, help="cores for torch, OpenCV and FFmpeg (default 2)")
    ap.add_argument("--out", default="bench-results/predict.json")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    load = round(os.getloadavg()[0], 2)

    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint, video, truth = make_inputs(tmp, REPO / "configs" / "demo.yaml", args.frames)
        try:
            r = run_predict(checkpoint, video, tmp / "out", args.threads)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        stages = _stage_rates(checkpoint, video)

    result = {
        "frames_per_s": r["frames_per_s"],
        "target_frames_per_s": 30.0,
        "real_time": r["frames_per_s"] >= 30.0,
        "frames": r["frames"],
        "frames_with_face": r["frames_with_face"],
        "frames_with_face_true": sum(b is not None for b in truth),
        "input_seconds": r["input_seconds"],
        "command_seconds_incl_start_and_model_load": r["command_seconds_incl_start_and_model_load"],
        "stage_frames_per_s": stages,
        "video": "640x480 H.264 yuv420p, 30 frames/s, one moving face (astronaut)",
        "model": "configs/demo.yaml architecture (vit_tiny patch 8, 64x64, flatten pool, 2-layer trunk), random",
        "detector": r["detector"],
        "threads": args.threads,
        # a busy machine slows torch's OpenMP threads most (they spin for cores others hold): compare like with like
        "load_average_1min_before": load,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
