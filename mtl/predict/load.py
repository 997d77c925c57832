"""A trained run made ready for prediction: its model on the device, its crop size and normalisation, its clip
length (the window), the tasks it predicts and their decision thresholds (tuned by `mtl eval --split val` where it
ran on this run, else 0.5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mtl.config import Config
from mtl.errors import MtlError
from mtl.evaluation.offline import tuned_thresholds
from mtl.evaluation.postprocess import PostProcess, load_postprocess, postprocess_file
from mtl.model.network import MultiTaskNet
from mtl.runs.trained import load_model
from mtl.tasks import Task, tasks


@dataclass
class TrainedRun:
    model: MultiTaskNet
    cfg: Config
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tasks: tuple[Task, ...]
    device: torch.device
    thresholds: dict[str, np.ndarray] = field(default_factory=dict)  # multi-label task -> per-unit threshold
    thresholds_from: Path | None = None
    postprocess: PostProcess | None = None  # smoothing and thresholds fitted by `mtl postprocess fit`
    postprocess_from: Path | None = None

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size

    @property
    def clip_len(self) -> int:
        return self.cfg.data.clip_len


def load_run(checkpoint: Path, device: torch.device, postprocess: Path | str | None = None) -> TrainedRun:
    """The run as ``mtl eval`` loads it (run dir, checkpoint tag dir or .safetensors), on ``device``; with the
    post-processing file given (``none``: without), else the one beside the run where there is one, whose
    thresholds then replace the tuned ones."""
    trained = load_model(Path(checkpoint))
    if trained.norm is None:
        raise MtlError(f"{checkpoint}: trained on cached features (data.features), so it has no backbone to read "
                       f"video frames with; predict with a run trained on pixels")  # fmt: skip
    model = trained.model.to(device)
    mean, std = trained.norm
    heads = tuple(t for t in tasks() if t.name in model.heads.keys())
    thresholds, source = tuned_thresholds(Path(checkpoint))
    pp_path = postprocess_file([Path(checkpoint)], postprocess)
    pp = load_postprocess(pp_path, tuple(t.name for t in heads)) if pp_path else None
    if pp is not None:
        thresholds, source = {**thresholds, **pp.thresholds()}, pp_path
    return TrainedRun(model, trained.cfg, tuple(mean), tuple(std), heads, device, thresholds, source, pp, pp_path)
