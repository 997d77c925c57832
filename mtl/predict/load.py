"""A trained run made ready for prediction: its model in eval mode, its crop size and normalisation, its clip
length (the window), and the AU decision thresholds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtl.config import Config, from_dict
from mtl.engine.offline_eval import load_trained
from mtl.errors import MtlError
from mtl.model import build_model
from mtl.model.network import MultiTaskNet
from mtl.predict.names import ACTION_UNITS

# `mtl eval` tunes per-AU thresholds on a split but writes them only into its submission files, not as numbers a
# later command can read, so predictions decide every AU at 0.5.
DEFAULT_AU_THRESHOLD = 0.5


@dataclass
class TrainedRun:
    model: MultiTaskNet
    cfg: Config
    mean: tuple[float, ...]
    std: tuple[float, ...]
    au_thresholds: np.ndarray
    device: torch.device

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size

    @property
    def clip_len(self) -> int:
        return self.cfg.data.clip_len


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise MtlError(f"--device: {exc}") from None


def load_run(checkpoint: Path, device: torch.device) -> TrainedRun:
    """Weights + resolved config from a run dir, checkpoint tag dir or .safetensors (as ``mtl eval`` reads them)."""
    state, config = load_trained(Path(checkpoint))
    cfg = from_dict(config)
    model = build_model(cfg.model, image_size=cfg.data.image_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MtlError(
            f"{checkpoint}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.eval().to(device)
    norm = model.data_config()
    mean, std = tuple(cfg.data.mean or norm["mean"]), tuple(cfg.data.std or norm["std"])
    thresholds = np.full(len(ACTION_UNITS), DEFAULT_AU_THRESHOLD)
    return TrainedRun(model, cfg, mean, std, thresholds, device)
