"""One input end to end: frames -> main face -> crops -> model windows -> CSV rows (and the arrays for a plot)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mtl.errors import DataError
from mtl.predict.crop import FaceCropper
from mtl.predict.decode import open_input
from mtl.predict.detect import Box, Detector
from mtl.predict.load import TrainedRun
from mtl.predict.plot import plot_timeline
from mtl.predict.track import FaceFollower
from mtl.predict.windows import FrameOutput, WindowedPredictor
from mtl.predict.write import PredictionCsv


@dataclass
class PredictOptions:
    crop_scale: float = 1.25  # crop side / face box side (the box in the Haar-extent convention of detect.py)
    window: int | None = None  # None: the run's clip length
    stride: int | None = None  # None: half the window
    fps: float = 30.0  # frame rate of folders of frames
    detect_size: int = 640  # whole-frame detection on frames scaled to at most this long side
    full_every: int = 30
    plot: bool = False
    progress: bool = True


@dataclass
class InputResult:
    name: str
    csv: Path
    frames: int
    face_frames: int
    seconds: float
    plot: Path | None = None
    time_s: list[float] = field(default_factory=list, repr=False)
    undecoded: list[str] = field(default_factory=list)  # frames whose image did not decode: rows without a face

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def output_name(path: Path) -> str:
    """``clip.mp4`` -> ``clip``; a folder keeps its name."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem


def predict_input(path: Path, out_dir: Path, run: TrainedRun, detector: Detector, opts: PredictOptions) -> InputResult:
    """Predict every frame of ``path`` into ``out_dir/<name>.csv``; DataError naming it if it cannot be read."""
    t0 = time.perf_counter()
    source = open_input(path, opts.fps)
    name = output_name(path)
    window = opts.window or run.clip_len
    stride = opts.stride or max(1, window // 2)
    follower = FaceFollower(detector, detect_size=opts.detect_size, full_every=opts.full_every)
    cropper = FaceCropper(run.image_size, run.mean, run.std, opts.crop_scale)
    predictor = WindowedPredictor(run.model, run.tasks, cropper.normalise, window, stride, run.device)
    writer = PredictionCsv(Path(out_dir) / f"{name}.csv", run.tasks, run.thresholds, run.postprocess)
    held: dict[int, tuple[float, Box | None]] = {}
    undecoded: list[str] = []
    times, vas, exprs, faces = [], [], [], []

    def emit(outputs: list[FrameOutput]) -> None:
        for out in outputs:
            t, box = held.pop(out.index)
            writer.row(t, box, out)
            times.append(t)
            vas.append(out.values.get("va", np.zeros(2)))
            exprs.append(int(out.values["expr"].argmax()) if "expr" in out.values else -1)
            faces.append(box is not None)

    bar = tqdm(total=source.total, desc=name, unit="frame", disable=not opts.progress, leave=False)
    try:
        n = 0
        for frame in source:
            if frame.rgb is None:  # an image that does not decode: a row without a face
                undecoded.append(frame.problem or f"{path}: frame {frame.index} does not decode")
                held[frame.index], crop = (frame.time_s, None), None
            else:
                found = follower(frame.rgb)
                held[frame.index] = (frame.time_s, found.detected)
                crop = None if found.crop is None else cropper(frame.rgb, found.crop)
            emit(predictor.push(crop))
            n += 1
            bar.update()
        emit(predictor.finish())
        if n == 0:
            raise DataError(f"{path}: no frames decoded")
        if len(undecoded) == n:
            raise DataError(f"{path}: none of its {n} images decodes ({undecoded[0]})")
        csv_path = writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    result = InputResult(name, csv_path, n, int(sum(faces)), time.perf_counter() - t0, time_s=times,
                         undecoded=undecoded)  # fmt: skip
    if opts.plot and writer.smoothed:  # the plot shows what the CSV holds: the smoothed values
        vas = [o.values.get("va", np.zeros(2)) for o in writer.smoothed]
        exprs = [int(o.values["expr"].argmax()) if "expr" in o.values else -1 for o in writer.smoothed]
    if opts.plot:
        result.plot = plot_timeline(
            Path(out_dir) / f"{name}.png", name, np.array(times), np.array(vas), np.array(exprs), np.array(faces)
        )
    return result
