"""`mtl predict`: a trained run over raw videos or folders of frames. Each input is independent: one that cannot
be read is reported by name and the others still run; the exit status says whether any failed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MAX_WARNINGS = 10  # undecodable images named one by one per input; past that, counted


def _predict(args: argparse.Namespace) -> int:
    from mtl.device import pick_device
    from mtl.errors import MtlError
    from mtl.predict.detect import make_detector
    from mtl.predict.load import load_run
    from mtl.predict.pipeline import PredictOptions, output_name, predict_input

    names: dict[str, Path] = {}
    for path in args.inputs:
        other = names.setdefault(output_name(path), path)
        if other != path:
            raise MtlError(f"{other} and {path} would both write {output_name(path)}.csv; predict them separately")
    if args.window is not None and args.window < 1:
        raise MtlError(f"--window: expected a positive number of frames, got {args.window}")
    if args.stride is not None and not (1 <= args.stride <= (args.window or 10**9)):
        raise MtlError(f"--stride: expected 1..window frames, got {args.stride}")
    run = load_run(args.checkpoint, pick_device(args.device), args.postprocess)
    if args.window is not None and args.window > run.cfg.model.temporal.max_len:
        raise MtlError(f"--window {args.window} exceeds the run's model.temporal.max_len "
                       f"({run.cfg.model.temporal.max_len})")  # fmt: skip
    detector = make_detector(args.detector, args.detector_model)
    opts = PredictOptions(
        crop_scale=args.crop_scale, window=args.window, stride=args.stride, fps=args.fps,
        detect_size=args.detect_size, plot=args.plot, progress=not args.no_progress,
    )  # fmt: skip
    tuned = f"tuned ({run.thresholds_from})" if run.thresholds_from else "0.5 (no `mtl eval --split val` of this run)"
    if run.postprocess_from:
        tuned += f"; smoothing of {run.postprocess_from}"
    print(f"detector: {detector.name}; window {args.window or run.clip_len} frames; thresholds {tuned}")
    failed = 0
    for path in args.inputs:
        try:
            r = predict_input(path, args.out, run, detector, opts)
        except MtlError as exc:
            failed += 1
            print(f"mtl predict: error: {exc}", file=sys.stderr)
            continue
        for problem in r.undecoded[:MAX_WARNINGS]:
            print(f"mtl predict: warning: {problem}; its row has face=0", file=sys.stderr)
        if len(r.undecoded) > MAX_WARNINGS:
            print(f"mtl predict: warning: {path}: {len(r.undecoded) - MAX_WARNINGS} more images do not decode; "
                  "their rows have face=0", file=sys.stderr)  # fmt: skip
        if r.face_frames == 0:
            print(f"mtl predict: warning: {path}: no face found in any of its {r.frames} frames; every row has "
                  f"face=0 (predictions from the temporal trunk alone)", file=sys.stderr)  # fmt: skip
        plot = f", plot {r.plot}" if r.plot else ""
        print(f"{path}: {r.frames} frames, {r.face_frames} with a face, {r.seconds:.1f} s, "
              f"{r.frames_per_s:.1f} frames/s -> {r.csv}{plot}")  # fmt: skip
    if failed:
        print(f"mtl predict: {failed} of {len(args.inputs)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    from mtl.predict import DETECTORS

    p = sub.add_parser("predict", help="predict VA, expression and AUs for every frame of videos or frame folders")
    p.add_argument("--checkpoint", type=Path, required=True, help="run dir, checkpoint tag dir or .safetensors")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="video (mp4, mov, avi, mkv) or frame folder")
    p.add_argument("--out", type=Path, required=True, help="folder for <input name>.csv (and .png with --plot)")
    p.add_argument("--plot", action="store_true", help="also a PNG per input: VA over time, expressions, face")
    p.add_argument("--detector", choices=DETECTORS, default="auto",
                   help="auto: yunet given --detector-model, else dlib HOG where installed, else haar")  # fmt: skip
    p.add_argument("--detector-model", type=Path, default=None, help="a YuNet face detector .onnx file (OpenCV)")
    p.add_argument("--crop-scale", type=float, default=1.25, help="crop side / face box side (default 1.25)")
    p.add_argument("--window", type=int, default=None, help="frames per model window (default: the run's clip_len)")
    p.add_argument("--stride", type=int, default=None, help="frames between window starts (default: window/2)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of frame folders, for time_s (default 30)")
    p.add_argument("--detect-size", type=int, default=640, help="longest side for whole-frame face search")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA where torch sees a GPU), cuda (a GPU or stop saying why), cpu, cuda:N; "
                        "bf16 autocast on a GPU")  # fmt: skip
    p.add_argument("--postprocess", default=None, metavar="FILE|none",
                   help="smoothing and thresholds of `mtl postprocess fit` (default: <checkpoint>/postprocess.json "
                        "where there is one; none: without)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_predict)
