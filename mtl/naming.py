"""Run names a person tells runs apart by in MLflow: the config file's stem and the overrides that made the run.

One format for every run: `mtl train` / `mtl submit` (``smoke train.max_steps=4,optim.lr=3e-3``, set by
``load_config`` when tracking.run_name is not given) and a sweep's children (``model.mask.prob=0.1``, under a
parent named after the sweep). Where a run reads and writes and how it is launched are not part of it.
Imports neither torch nor MLflow: the config and the login node name runs before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

# Paths, the MLflow store and the SLURM request (`mtl submit`'s flags arrive as slurm.* overrides) say nothing
# about what was trained, so they are left out of names.
NOT_IN_NAME = (
    "data.shards",
    "train.output_dir",
    "train.resume",
    "train.progress",
    "model.pretrained_file",
    "tracking.",
    "slurm.",
)
MAX_CHARS = 120  # MLflow shows about this much in its runs table; its own limit is 250
NO_CONFIG = "defaults"  # the stem of a run configured by overrides alone


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def to_overrides(mapping: Mapping[str, Any]) -> list[str]:
    """``{"model.mask.prob": 0.1}`` -> ``["model.mask.prob=0.1"]``: values written as YAML, so they parse back."""
    return [f"{k}={_yaml_value(v)}" for k, v in mapping.items()]


def _in_name(key: str) -> bool:
    return not any(key == n or (n.endswith(".") and key.startswith(n)) for n in NOT_IN_NAME)


def overrides_name(overrides: Iterable[str]) -> str:
    """``key=value`` overrides as a name: ``train.zero_stage=3,optim.lr=3e-4``, values as written, a key set twice
    once (its last value, where it was first set), NOT_IN_NAME left out; "" when nothing is left."""
    kept: dict[str, str] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip()
        if _in_name(key):
            kept[key] = value.strip()
    return ",".join(f"{k}={v}" for k, v in kept.items())


def run_name(config: str | Path | None, overrides: Sequence[str]) -> str:
    """The config file's stem, then its overrides: ``paper train.zero_stage=3,optim.lr=3e-4`` (at most
    MAX_CHARS, the end cut with an ellipsis)."""
    stem = Path(config).stem if config is not None else NO_CONFIG
    name = f"{stem} {overrides_name(overrides)}".strip()
    return name if len(name) <= MAX_CHARS else name[: MAX_CHARS - 1] + "…"
