"""`mtl eval`: score a trained model on one process, from its exported weights or a DeepSpeed checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mtl.config import Config, deep_merge, from_dict, parse_overrides
from mtl.data.loader import make_eval_loader
from mtl.engine import checkpoint as ckpt
from mtl.engine.evaluate import TUNED_SUBMISSION, evaluate, write_predictions, write_submission
from mtl.engine.export import consolidate, load_weights
from mtl.errors import MtlError
from mtl.model import build_model


def load_trained(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and resolved config from: a .safetensors export, a run directory, or a checkpoint tag directory."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        state, config = load_weights(path)
        if config is None:
            raise MtlError(f"{path}: no mtl config in its metadata; was it written by `mtl train`?")
        return state, config
    for candidate in (path / "export" / "best.safetensors", path / "best.safetensors"):
        if candidate.is_file():
            return load_trained(candidate)
    if (path / ckpt.COMPLETE).is_file():
        root, tag = path.parent, path.name
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        state = ckpt.read_state(root / tag) if (tag := ckpt.latest_complete(root)) else None
        if state is not None and state.best_tag and (root / state.best_tag / ckpt.COMPLETE).is_file():
            tag = state.best_tag
        if tag is None:
            raise MtlError(f"{path}: no exported weights and no complete checkpoint found")
    return consolidate(root, tag), ckpt.read_state(root / tag).config


def run_eval(checkpoint: Path, split: str, out_dir: Path | None, overrides: list[str]) -> dict[str, float]:
    state, config = load_trained(checkpoint)
    cfg: Config = from_dict(deep_merge(config, parse_overrides(overrides)))
    model = build_model(cfg.model, image_size=cfg.data.image_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MtlError(
            f"{checkpoint}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.eval()
    norm = model.data_config()
    mean, std = tuple(cfg.data.mean or norm["mean"]), tuple(cfg.data.std or norm["std"])
    loader = make_eval_loader(cfg.data, split, mean=mean, std=std, rank=0, world_size=1)

    def forward(batch: dict) -> dict[str, torch.Tensor]:
        return model(batch["frames"], batch["has_image"], batch["pad"])

    metrics, preds = evaluate(forward, loader, torch.device("cpu"), collect=True, progress=True, desc=f"eval {split}")
    scores = metrics.compute()
    if out_dir is None:
        base = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        out_dir = base / f"eval_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    assert preds is not None
    write_predictions(preds, out_dir / "predictions.csv")
    write_submission(preds, out_dir / "submission")
    write_submission(preds, out_dir / TUNED_SUBMISSION, thresholds=metrics.thresholds())
    (out_dir / "metrics.json").write_text(json.dumps(scores, indent=2))
    print(f"predictions, metrics and ABAW submission files written to {out_dir}")
    return scores
