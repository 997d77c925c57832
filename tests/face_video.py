"""Short videos of a real face (scikit-image's astronaut photo) for `mtl predict`: the head moves across a plain
background, and may be covered or absent for given frames. Frames are known exactly, so tests know where the face
is and can write the same frames as a lossless video and as a folder of PNGs."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np

# The astronaut's head in skimage.data.astronaut() (512x512): this square holds it with a margin, and the face
# (brows to chin, as OpenCV's Haar cascade boxes it) sits at FACE_IN_HEAD inside it (x, y, w, h).
HEAD = (0, 96, 256, 256)  # top, left, height, width in the photo
FACE_IN_HEAD = (79.0, 66.0, 97.0, 97.0)


def head_patch() -> np.ndarray:
    from skimage import data

    top, left, h, w = HEAD
    return np.ascontiguousarray(data.astronaut()[top : top + h, left : left + w])


def background(height: int, width: int) -> np.ndarray:
    """A smooth grey-blue gradient: nothing a face detector could take for a face."""
    ys = np.linspace(0, 1, height)[:, None, None]
    xs = np.linspace(0, 1, width)[None, :, None]
    base = np.array([90, 100, 120])[None, None, :]
    return np.clip(base + 40 * ys + 30 * xs, 0, 255).astype(np.uint8)


def face_frames(
    n: int, width: int = 400, height: int = 272, covered: set[int] = frozenset(), absent: set[int] = frozenset()
) -> tuple[list[np.ndarray], list[tuple[float, float, float, float] | None]]:
    """Frames (RGB uint8) with the head moving left to right and back, and each frame's true face box (None where
    the face is covered by a grey card or absent)."""
    head = head_patch()
    bg = background(height, width)
    span_x, span_y = width - head.shape[1], height - head.shape[0]
    frames, boxes = [], []
    for i in range(n):
        phase = i / max(1, n - 1)
        x = round(span_x * (1 - abs(2 * phase - 1)))
        y = round(span_y * phase)
        frame = bg.copy()
        box = None
        if i not in absent:
            frame[y : y + head.shape[0], x : x + head.shape[1]] = head
            fx, fy, fw, fh = FACE_IN_HEAD
            box = (x + fx, y + fy, fw, fh)
            if i in covered:
                cv2.rectangle(frame, (x + 40, y + 20), (x + 220, y + 200), (128, 128, 128), -1)
                box = None
        frames.append(frame)
        boxes.append(box)
    return frames, boxes


def write_video(path: Path, frames: list[np.ndarray], fps: int = 25, lossless: bool = False) -> Path:
    """H.264 (yuv420p), as phones and cameras write; ``lossless``: FFV1 in RGB, the exact pixels back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1" if lossless else "libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "bgr0" if lossless else "yuv420p"
        if not lossless:
            stream.options = {"crf": "20", "preset": "veryfast"}
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_folder(path: Path, frames: list[np.ndarray]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, rgb in enumerate(frames):
        cv2.imwrite(str(path / f"frame{i + 1}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path
