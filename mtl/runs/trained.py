"""Load a trained run: its weights and resolved config, from a run dir, a checkpoint tag dir or an export.

What a path means is :func:`mtl.runs.layout.resolve_trained`'s decision; this is the torch side of it
(reading safetensors, consolidating a DeepSpeed checkpoint of any world size and ZeRO stage). `mtl eval` uses it,
and so will every command that runs a trained model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtl.config import Config, deep_merge, from_dict, parse_overrides
from mtl.errors import MtlError
from mtl.model import MultiTaskNet
from mtl.runs.export import consolidate, load_weights
from mtl.runs.inputs import DataSource
from mtl.runs.layout import Checkpoint, resolve_trained, trained_run_id
from mtl.runs.model_io import Norm
from mtl.tasks import task_names


def load_trained(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full fp32 weights and the resolved config (as a dict) that trained them, tracking.run_id the MLflow run
    that did where one is recorded."""
    source = resolve_trained(path)
    if isinstance(source, Checkpoint):
        weights, config = consolidate(source.root, source.tag), source.state()["config"]
    else:
        weights, config = load_weights(source)
        if config is None:
            raise MtlError(f"{source}: no mtl config in its metadata; was it written by `mtl train`?")
    run_id = trained_run_id(source, config)
    if run_id:
        config = deep_merge(config, {"tracking": {"run_id": run_id}})
    return weights, config


def weights_mismatch(exc: RuntimeError) -> str | None:
    """The first lines of what torch's ``load_state_dict`` says does not fit (sizes, else missing or unexpected
    keys, shortened), or None when ``exc`` is another error."""
    text = str(exc)
    if "Error(s) in loading state_dict" not in text:
        return None
    lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    sizes = [line for line in lines if line.startswith("size mismatch")]
    return "; ".join(line if len(line) <= 200 else line[:200] + "…" for line in (sizes or lines)[:3]) or None


@dataclass
class TrainedModel:
    model: MultiTaskNet  # in eval mode, on the CPU
    cfg: Config  # the run's config with the caller's overrides (e.g. data.shards=...)
    norm: Norm | None  # (mean, std) the loaders normalise with; None for a network trained on cached features
    source: DataSource  # where its evaluation batches come from (pixels or the features it trained on)


def predicted_tasks(weights: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """The tasks a trained network predicts: those it has a head for (``heads.<task>.*``), registered ones in the
    registry's order, then any other by name."""
    heads = {k.split(".")[1] for k in weights if k.startswith("heads.")}
    known = tuple(n for n in task_names() if n in heads)
    return known + tuple(sorted(heads - set(known)))


def load_model(path: Path, overrides: list[str] | None = None) -> TrainedModel:
    """The trained network rebuilt from its own config, weights loaded strictly enough to catch a mismatch."""
    weights, config = load_trained(path)
    return build_model(path, weights, config, overrides)


def build_model(
    path: Path, weights: dict[str, torch.Tensor], config: dict[str, Any], overrides: list[str] | None = None
) -> TrainedModel:
    """``load_model`` from what ``load_trained`` read (``path`` names it in errors)."""
    cfg = from_dict(deep_merge(config, parse_overrides(overrides or [])))
    source = DataSource(cfg)
    model = source.build_model()
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shapes differ: an override changed the architecture
        raise MtlError(f"{path}: weights do not fit the model ({weights_mismatch(exc) or exc})") from None
    if missing or unexpected:
        raise MtlError(f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()
    return TrainedModel(model, cfg, source.norm, source)
