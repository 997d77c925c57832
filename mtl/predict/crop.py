"""The face crop the model sees: a square around the followed box, grown by a margin, resized and normalised by
the training data's own ``ClipTransform`` (its evaluation path: no augmentation)."""

from __future__ import annotations

import numpy as np
import torch

from mtl.data.transforms import ClipTransform
from mtl.predict.detect import Box


def square_crop(rgb: np.ndarray, box: Box, scale: float) -> np.ndarray:
    """uint8 [s, s, 3]: a square of side ``scale`` x the box's longer side about its centre; outside the frame is
    black, as a face at the frame's edge keeps its place in the crop."""
    side = max(2, round(max(box.w, box.h) * scale))
    x0 = round(box.x + box.w / 2 - side / 2)
    y0 = round(box.y + box.h / 2 - side / 2)
    h, w = rgb.shape[:2]
    out = np.zeros((side, side, 3), np.uint8)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x0 + side), min(h, y0 + side)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return out


class FaceCropper:
    """Frame + box -> uint8 [3, size, size] (the training resize); ``normalise`` turns a stack into model input."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], scale: float) -> None:
        self.transform = ClipTransform(size, mean, std)
        self.scale = scale

    def __call__(self, rgb: np.ndarray, box: Box) -> torch.Tensor:
        square = torch.from_numpy(square_crop(rgb, box, self.scale)).permute(2, 0, 1).unsqueeze(0)
        return self.transform.geometry(square, None)[0]

    def normalise(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, size, size] -> the float input the model was trained on."""
        return self.transform.finish(crops, *self.transform.affine(crops, None))
