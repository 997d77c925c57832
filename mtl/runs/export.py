"""Consolidated fp32 weights: one safetensors file that evaluates and infers on one process, any ZeRO stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mtl.errors import MtlError, writing
from mtl.runs.layout import COMPLETE, damage
from mtl.runs.safe_load import weights_only_loads

CONFIG_KEY = "mtl_config"


def consolidate(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a DeepSpeed checkpoint written by `mtl train` (any world size, any stage).

    DeepSpeed's files hold pickled objects besides tensors; they are read weights-only (see ``safe_load``).
    """
    tag_dir = ckpt_dir / tag
    problem = damage(tag_dir) if (tag_dir / COMPLETE).is_file() else None
    if problem:
        raise MtlError(f"{tag_dir}: damaged checkpoint ({problem})")
    try:
        with weights_only_loads(tag_dir):
            state = _read_module_state(ckpt_dir, tag)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise MtlError(f"{tag_dir}: not a readable DeepSpeed checkpoint ({exc})") from None
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def _read_module_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    tag_dir = ckpt_dir / tag
    if (
        any(tag_dir.glob("*optim_states.pt"))
        and any(tag_dir.glob("zero_pp_rank_*"))
        or any(tag_dir.glob("bf16_zero_pp_rank_*"))
    ):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    # ZeRO stage 0: rank 0's model file holds the whole module
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]


def save_weights(state: dict[str, torch.Tensor], path: Path, config: dict[str, Any]) -> None:
    """Atomic write, with the resolved config in the file's metadata so the model can be rebuilt from it alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        with writing(path):  # a full disk: `<path>: No space left on device`, not a SafetensorError
            save_file(state, str(tmp), metadata={CONFIG_KEY: json.dumps(config)})
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Weights and the config stored beside them; a truncated or foreign file is an error naming it."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        config = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise MtlError(f"{path}: not a readable safetensors file ({exc}); re-export it or use the checkpoint") from None
    return tensors, config
