"""AdamW parameter groups: a pretrained backbone learns slower than the fresh trunk, and its lower blocks
slower still (layer-wise lr decay, as in BEiT); norms, biases, position embeddings and tokens get no decay."""

from __future__ import annotations

import re
from typing import Any

from timm.models import group_parameters
from torch import nn

from mtl.config import OptimConfig

_NO_DECAY_NAMES = ("pos", "mask_token", "cls_token", "reg_token", "dist_token", "pos_embed")


# What comes before block 0 in timm's ViT and Eva (DINOv3, PE): patch and position embeddings, CLS, register,
# distillation and mask tokens, CLIP/PE's pre-norm. Joined to group_matcher()'s own stem, so that the lowest
# group does not depend on what one timm release lists there.
_STEM = r"^(cls_token|reg_token|dist_token|mask_token|pos_embed|patch_embed|norm_pre)\b"


def backbone_layer_ids(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """Parameter name -> layer id (0: embeddings and prefix tokens, i+1: block i, depth+1: final norms), depth+1.

    timm's ViT and Eva both keep their transformer blocks in ``blocks``; other families use their own
    ``group_matcher`` grouping.
    """
    names = [n for n, _ in backbone.named_parameters()]
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        depth = len(blocks)
        stems = [_STEM]
        timm_stem = backbone.group_matcher().get("stem") if hasattr(backbone, "group_matcher") else None
        if isinstance(timm_stem, str):
            stems.append(timm_stem)
        stem_res = [re.compile(s) for s in stems]
        ids: dict[str, int] = {}
        for n in names:
            m = re.match(r"^blocks\.(\d+)\.", n)
            if m:
                ids[n] = int(m.group(1)) + 1
            elif any(r.match(n) for r in stem_res):
                ids[n] = 0
            else:
                ids[n] = depth + 1  # final norm, fc_norm, attention pool: the top of the network
        return ids, depth + 1
    if hasattr(backbone, "group_matcher"):  # other timm families: their own grouping
        ids = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
        return ids, max(ids.values(), default=0)
    return {n: 0 for n in names}, 0


def _no_decay(name: str, param: nn.Parameter, extra: set[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or name.endswith(".bias") or leaf in _NO_DECAY_NAMES or name in extra


def param_groups(net: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Groups for torch.optim.AdamW, each with ``params``, ``lr`` (already scaled), ``weight_decay``, ``name``.

    Backbone block i (of depth) gets ``lr * backbone_lr_scale * layer_decay ** (depth - i)``; embeddings
    ``... ** (depth + 1)``; the backbone's final norm ``lr * backbone_lr_scale``. Frozen parameters are left out.
    """
    groups: dict[str, dict[str, Any]] = {}

    def add(name: str, param: nn.Parameter, lr: float, decay: bool) -> None:
        key = f"{name}/{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = {"name": key, "params": [], "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0}
        groups[key]["params"].append(param)

    backbone = getattr(getattr(net, "encoder", None), "backbone", None)
    bb_params: set[int] = set()
    if backbone is not None:
        ids, top = backbone_layer_ids(backbone)
        extra = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
        for n, p in backbone.named_parameters():
            bb_params.add(id(p))
            if not p.requires_grad:
                continue
            layer = ids.get(n, top)
            lr = cfg.lr * cfg.backbone_lr_scale * cfg.layer_decay ** (top - layer)
            add(f"backbone.layer{layer:02d}", p, lr, not _no_decay(n, p, extra))
    for n, p in net.named_parameters():
        if id(p) in bb_params or not p.requires_grad:
            continue
        add("trunk", p, cfg.lr, not _no_decay(n, p, set()))
    return list(groups.values())
