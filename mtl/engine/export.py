"""Consolidated fp32 weights: one safetensors file that evaluates and infers on one process, any ZeRO stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_KEY = "mtl_config"


def consolidate(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a DeepSpeed checkpoint written by `mtl train` (any world size, any stage).

    DeepSpeed's files hold pickled objects besides tensors; only checkpoints this project wrote are read here.
    """
    tag_dir = ckpt_dir / tag
    if (
        any(tag_dir.glob("*optim_states.pt"))
        and any(tag_dir.glob("zero_pp_rank_*"))
        or any(tag_dir.glob("bf16_zero_pp_rank_*"))
    ):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # ZeRO stage 0: rank 0's model file holds the whole module
        state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def save_weights(state: dict[str, torch.Tensor], path: Path, config: dict[str, Any]) -> None:
    """Atomic write, with the resolved config in the file's metadata so the model can be rebuilt from it alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={CONFIG_KEY: json.dumps(config)})
    tmp.replace(path)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    config = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
    return tensors, config
