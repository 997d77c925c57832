"""Face detectors whose weights ship inside installed packages (nothing is downloaded), behind one interface.

- ``hog``: dlib's HOG + linear SVM frontal detector, compiled into dlib (the ``dlib-bin`` wheel); the default where
  dlib imports: far fewer false detections than Haar cascades, finds faces rolled by 30 degrees, and gives a margin
  score. Smallest face: about 80 px at its input scale.
- ``haar``: OpenCV 4.x's bundled frontal-face Haar cascade (``cv2.data``), the floor when dlib is missing.
- ``yunet``: a local ONNX face detector file (OpenCV's YuNet) through ``cv2.FaceDetectorYN``, for users who have one.

Detectors draw boxes of different extent around the same face (dlib's is tighter and lower than Haar's); each
maps its own to one convention, the extent of OpenCV's Haar box (brows-to-chin, about square), so the crop
margin means the same whichever detector found the face.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mtl.errors import MtlError
from mtl.predict import DETECTORS


@dataclass(frozen=True)
class Box:
    """A face box in pixels of the frame (x, y: top-left) and the detector's score (scale depends on detector)."""

    x: float
    y: float
    w: float
    h: float
    score: float = 0.0

    @property
    def area(self) -> float:
        return self.w * self.h

    def iou(self, other: Box) -> float:
        ix = max(0.0, min(self.x + self.w, other.x + other.w) - max(self.x, other.x))
        iy = max(0.0, min(self.y + self.h, other.y + other.h) - max(self.y, other.y))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def mapped(self, scale: float, dx: float = 0.0, dy: float = 0.0) -> Box:
        """From detector-input pixels back to frame pixels: divide by ``scale``, then offset."""
        return Box(self.x / scale + dx, self.y / scale + dy, self.w / scale, self.h / scale, self.score)

    def blend(self, new: Box, alpha: float) -> Box:
        """``alpha`` of ``new`` and the rest of this box (centre and size), the new score."""
        cx = (1 - alpha) * (self.x + self.w / 2) + alpha * (new.x + new.w / 2)
        cy = (1 - alpha) * (self.y + self.h / 2) + alpha * (new.y + new.h / 2)
        w = (1 - alpha) * self.w + alpha * new.w
        h = (1 - alpha) * self.h + alpha * new.h
        return Box(cx - w / 2, cy - h / 2, w, h, new.score)


def _to_convention(x: float, y: float, w: float, h: float, scale: float, dy: float, score: float) -> Box:
    """Grow a detector's box about its centre by ``scale`` and move it by ``dy`` of its height."""
    cx, cy = x + w / 2, y + h / 2 + dy * h
    return Box(cx - w * scale / 2, cy - h * scale / 2, w * scale, h * scale, score)


class Detector:
    """``detect(rgb uint8 [h, w, 3]) -> boxes`` in that image's pixels, in the shared box convention."""

    name = "detector"
    min_face = 40  # smallest face side (pixels of its input) it finds

    def detect(self, rgb: np.ndarray) -> list[Box]:
        raise NotImplementedError


class HogDetector(Detector):
    name = "hog"
    min_face = 80
    # dlib's box against Haar's on the same faces: 0.92 of its side, centre 0.11 of a side lower
    SCALE, DY = 1.09, -0.11

    def __init__(self) -> None:
        import dlib

        self._det = dlib.get_frontal_face_detector()

    def detect(self, rgb: np.ndarray) -> list[Box]:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        rects, scores, _ = self._det.run(gray, 0, 0.0)
        return [
            _to_convention(r.left(), r.top(), r.width(), r.height(), self.SCALE, self.DY, float(s))
            for r, s in zip(rects, scores)
        ]


class HaarDetector(Detector):
    name = "haar"
    min_face = 40

    def __init__(self) -> None:
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self._det = cv2.CascadeClassifier(str(path))
        if self._det.empty():
            raise MtlError(f"OpenCV's Haar cascade {path} did not load; is opencv-python-headless<5 installed?")

    def detect(self, rgb: np.ndarray) -> list[Box]:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        boxes, _, weights = self._det.detectMultiScale3(
            gray, scaleFactor=1.1, minNeighbors=5, minSize=(self.min_face, self.min_face), outputRejectLevels=True
        )
        return [Box(float(x), float(y), float(w), float(h), float(s)) for (x, y, w, h), s in zip(boxes, weights)]


class YuNetDetector(Detector):
    name = "yunet"
    min_face = 24
    SCALE, DY = 1.0, 0.0

    def __init__(self, model: Path, score_threshold: float = 0.6) -> None:
        model = Path(model)
        if not model.is_file():
            raise MtlError(f"--detector-model: {model} does not exist")
        try:
            self._det = cv2.FaceDetectorYN.create(str(model), "", (320, 320), score_threshold, 0.3, 50)
        except cv2.error as exc:
            raise MtlError(f"--detector-model: {model} is not a face detector OpenCV can load ({exc})") from None
        self.model = model

    def detect(self, rgb: np.ndarray) -> list[Box]:
        h, w = rgb.shape[:2]
        self._det.setInputSize((w, h))
        try:
            _, faces = self._det.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        except cv2.error as exc:
            raise MtlError(f"--detector-model: {self.model} failed on a frame ({exc})") from None
        if faces is None:
            return []
        return [_to_convention(*map(float, f[:4]), self.SCALE, self.DY, float(f[-1])) for f in faces]


def make_detector(kind: str = "auto", model: Path | None = None) -> Detector:
    """``auto``: YuNet when a model file is given, else dlib's HOG where dlib imports, else the Haar cascade."""
    if kind not in DETECTORS:
        raise MtlError(f"--detector: expected one of {DETECTORS}, got {kind!r}")
    if kind == "yunet" or (kind == "auto" and model is not None):
        if model is None:
            raise MtlError("--detector yunet needs --detector-model FILE (an ONNX YuNet face detector)")
        return YuNetDetector(model)
    if kind in ("auto", "hog"):
        try:
            return HogDetector()
        except ImportError:
            if kind == "hog":
                raise MtlError("--detector hog needs dlib (pip install dlib-bin)") from None
    return HaarDetector()
