"""Where a run's inputs come from: pixels (``data.shards``) or cached features (``data.features``).

The one place that decides; training, `mtl eval` and the benchmarks ask it for the network and the loaders, and
everything after the batch (losses, ZeRO, checkpoints, metrics, submissions) is the same for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mtl.config import Config
from mtl.data.legs import Leg
from mtl.data.loader import TrainLoader, make_eval_loader, make_train_loader
from mtl.errors import DataError
from mtl.features.loader import (
    FeatureEvalLoader,
    FeatureSplit,
    FeatureTrainLoader,
    check_sources,
    extractor_params,
)
from mtl.model import MultiTaskNet, build_model
from mtl.runs.model_io import Norm, input_norm


class DataSource:
    """Network and loaders for ``cfg``; feature splits are read once per process and kept."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.features = list(cfg.data.features)
        self.manifests = check_sources(self.features, cfg.data.shards) if self.features else []
        self._splits: dict[str, FeatureSplit] = {}
        self.norm: Norm | None = None
        self._pixels: tuple[tuple[int, int, int], TrainLoader] | None = None  # kept: its workers serve each epoch

    @property
    def uses_features(self) -> bool:
        return bool(self.features)

    @property
    def feature_dim(self) -> int | None:
        return sum(m.dim for m in self.manifests) if self.features else None

    def params(self) -> dict[str, Any]:
        """What to log beside the config: the extractors' identity, when training on features."""
        return extractor_params(self.features, self.manifests) if self.features else {}

    def split(self, name: str) -> FeatureSplit:
        if name not in self._splits:
            self._splits[name] = FeatureSplit.load(self.features, self.manifests, name)
        return self._splits[name]

    def build_model(self) -> MultiTaskNet:
        """The network for these inputs; for pixels, also the normalisation the loaders use."""
        model = build_model(self.cfg.model, image_size=self.cfg.data.image_size, feature_dim=self.feature_dim)
        if not self.uses_features:
            self.norm = input_norm(self.cfg.data, model)
        return model

    def train_loader(
        self, *, rank: int, world_size: int, epoch: int, seed: int, skip_batches: int = 0, legs: Sequence[Leg] = ()
    ):
        """This rank's training batches of ``epoch`` (see the two loaders for what an epoch is); ``legs``: parts of
        the epoch read earlier under another set-up (a resume on another world size)."""
        d = self.cfg.data
        if not self.uses_features:
            key = (rank, world_size, seed)
            if self._pixels is not None and self._pixels[0] == key:  # the same workers, on to the next epoch
                self._pixels[1].set_epoch(epoch, skip_batches, legs)
                return self._pixels[1]
            self.close()
            mean, std = self._norm()
            loader = make_train_loader(d, mean=mean, std=std, rank=rank, world_size=world_size, epoch=epoch,
                                       seed=seed, skip_batches=skip_batches, legs=legs)  # fmt: skip
            self._pixels = (key, loader)
            return loader
        loader = FeatureTrainLoader(self.split(d.train_split), d, rank=rank, world_size=world_size, epoch=epoch,
                                    seed=seed, skip_batches=skip_batches, legs=legs)  # fmt: skip
        if len(loader) == 0 and not legs:  # (the last leg of an epoch may have no whole batch left)
            raise DataError(
                f"{self.features[0]}: split {d.train_split!r} gives fewer windows of {d.clip_len} frames than "
                f"world_size x data.batch_size = {world_size * d.batch_size}; use a smaller batch or data.clip_len"
            )
        return loader

    def eval_loader(self, split: str, *, rank: int, world_size: int, device: torch.device | None = None):
        """Every frame of ``split`` once across ranks, in order."""
        if not self.uses_features:
            mean, std = self._norm()
            return make_eval_loader(self.cfg.data, split, mean=mean, std=std, rank=rank, world_size=world_size,
                                    device=device)  # fmt: skip
        return FeatureEvalLoader(self.split(split), self.cfg.data, rank=rank, world_size=world_size)

    def close(self) -> None:
        """Stop the training loader's workers (kept across epochs until then)."""
        if self._pixels is not None:
            self._pixels[1].close()
            self._pixels = None

    def _norm(self) -> Norm:
        if self.norm is None:
            raise RuntimeError("DataSource.build_model() (or set .norm) before asking for pixel loaders")
        return self.norm
