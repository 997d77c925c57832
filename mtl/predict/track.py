"""Following the main face through a video: the largest face when none is followed, then the face that overlaps
the followed one, searched near it (a small, cheap region) and in the whole frame every ``full_every`` frames or
when it is not found near. A followed face unseen for ``max_missing`` frames is dropped and the largest taken anew.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from mtl.predict.detect import Box, Detector

ROI_SIDE = 2.4  # search region side, in followed-face sides
ROI_FACE_PX = 1.6  # the followed face is scaled to this many times the detector's smallest face in the region
MIN_IOU = 0.2


@dataclass
class Found:
    """One frame's result: the detector's box of the main face (None: no face) and the box to crop (smoothed)."""

    detected: Box | None
    crop: Box | None


class FaceFollower:
    def __init__(
        self,
        detector: Detector,
        detect_size: int = 640,
        full_every: int = 30,
        max_missing: int = 15,
        smooth: float = 0.6,
    ) -> None:
        self.detector = detector
        self.detect_size, self.full_every, self.max_missing, self.smooth = detect_size, full_every, max_missing, smooth
        self.track: Box | None = None
        self.missing = 0
        self.since_full = 0

    def _detect(self, rgb: np.ndarray, scale: float, x0: int = 0, y0: int = 0) -> list[Box]:
        if scale != 1.0:
            h, w = rgb.shape[:2]
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        return [b.mapped(scale, x0, y0) for b in self.detector.detect(np.ascontiguousarray(rgb))]

    def _full(self, rgb: np.ndarray) -> list[Box]:
        self.since_full = 0
        return self._detect(rgb, min(1.0, self.detect_size / max(rgb.shape[:2])))

    def _near(self, rgb: np.ndarray, track: Box) -> list[Box]:
        h, w = rgb.shape[:2]
        side = max(track.w, track.h)
        cx, cy = track.x + track.w / 2, track.y + track.h / 2
        x0, y0 = max(0, int(cx - side * ROI_SIDE / 2)), max(0, int(cy - side * ROI_SIDE / 2))
        x1, y1 = min(w, int(cx + side * ROI_SIDE / 2) + 1), min(h, int(cy + side * ROI_SIDE / 2) + 1)
        if x1 - x0 < 8 or y1 - y0 < 8:
            return []
        scale = min(2.0, ROI_FACE_PX * self.detector.min_face / side)
        return self._detect(rgb[y0:y1, x0:x1], scale, x0, y0)

    def __call__(self, rgb: np.ndarray) -> Found:
        self.since_full += 1
        if self.track is None or self.since_full >= self.full_every:
            boxes = self._full(rgb)
        else:
            boxes = self._near(rgb, self.track)
            if not any(b.iou(self.track) >= MIN_IOU for b in boxes):
                boxes = self._full(rgb)  # moved fast, or hidden: look everywhere
        if self.track is None:
            best = max(boxes, key=lambda b: b.area, default=None)
        else:
            best = max(boxes, key=lambda b: b.iou(self.track), default=None)
            if best is not None and best.iou(self.track) < MIN_IOU:
                best = None
        if best is None:
            self.missing += 1
            if self.track is not None and self.missing > self.max_missing:
                self.track = None
            return Found(None, None)
        self.missing = 0
        self.track = best if self.track is None else self.track.blend(best, self.smooth)
        return Found(best, self.track)
