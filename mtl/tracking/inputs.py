"""The shards a run trains and validates on, as MLflow datasets: compared across runs by name and digest.

A dataset is one split of a packed data root (``<root name>/<split>``); its source is the root's manifest.json and
its digest is taken over the split's shard hashes that `mtl pack` recorded, so two runs on the same packed data show
the same digest and a re-pack with other contents shows another. The frames themselves are never read here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource  # registered by mlflow.data for local paths

from mtl.config import DataConfig
from mtl.data.manifest import MANIFEST, PackManifest

DIGEST_CHARS = 16  # MLflow stores at most 36


def split_digest(manifest: PackManifest, split: str) -> str:
    """Over each shard's path and sha256 (as recorded), in order: the split's contents, not its location."""
    h = hashlib.sha256()
    for shard in manifest.splits[split].shards:
        h.update(f"{shard.path}\t{shard.sha256}\n".encode())
    return h.hexdigest()[:DIGEST_CHARS]


def shard_datasets(data: DataConfig, manifest: PackManifest) -> list[tuple[MetaDataset, str]]:
    """(dataset, context) for the training split and the validation split (when the manifest has it)."""
    root = Path(data.shards).resolve()
    source = LocalArtifactDatasetSource(str(root / MANIFEST))
    out = []
    for split, context in ((data.train_split, "training"), (data.val_split, "validation")):
        if split in manifest.splits:
            dataset = MetaDataset(source, name=f"{root.name}/{split}", digest=split_digest(manifest, split))
            out.append((dataset, context))
    return out
