"""The per-frame image encoder: a timm ViT that turns each face crop into one feature vector.

Weights come from a local file (the cluster has no hub) through timm's own checkpoint filter, so position
embeddings trained at 224 are resampled to the 112x112 face crops; anything that still does not fit is refused
with the file and the keys named, instead of silently training from a half-loaded model.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import global_pool_nlc
from torch import nn

from mtl.config import ModelConfig
from mtl.errors import MtlError

_LIST_MAX = 8  # keys named in an error message, per kind


def create_backbone(cfg: ModelConfig, image_size: int) -> nn.Module:
    """A timm model without classifier, for ``image_size`` inputs, with weights as configured."""
    kwargs: dict[str, Any] = {"num_classes": 0, "img_size": image_size, **cfg.backbone_kwargs}
    try:
        if cfg.pretrained and not cfg.pretrained_file:
            return _from_hub(cfg.backbone, kwargs)
        model = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    except MtlError:
        raise
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        raise MtlError(
            f"model.backbone '{cfg.backbone}' with model.backbone_kwargs {cfg.backbone_kwargs}: {exc}"
        ) from exc
    if cfg.pretrained_file:
        load_pretrained_file(model, cfg.pretrained_file, cfg.backbone)
    return model


def _from_hub(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # network, missing cache, no weights for the name: all end the same way for the user
        raise MtlError(
            f"model.pretrained: could not get pretrained weights for '{name}' from the timm hub "
            f"({type(exc).__name__}: {str(exc)[:200]}); set model.pretrained_file to a local .safetensors or "
            f"state-dict file instead"
        ) from exc


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch state dict (never unpickling arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise MtlError(f"model.pretrained_file: {path} does not exist")
    try:
        # timm unwraps {"state_dict": ...} / {"model": ...} and strips a DDP "module." prefix.
        sd = timm.models.load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as exc:  # corrupt file, pickled objects refused by weights_only, ...
        raise MtlError(f"model.pretrained_file: cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MtlError(f"model.pretrained_file: {path} does not hold a state dict of tensors")
    return dict(sd)


def _filter_fn(model: nn.Module) -> Any:
    """The checkpoint filter timm ships beside the model class (pos-embed resampling, format conversions)."""
    return getattr(inspect.getmodule(type(model)), "checkpoint_filter_fn", None)


def load_pretrained_file(model: nn.Module, path: str | Path, name: str | None = None) -> None:
    """Load ``path`` into ``model`` strictly (after timm's filter), or raise naming what does not fit."""
    name = name or type(model).__name__
    sd = read_state_dict(path)
    filt = _filter_fn(model)
    if filt is not None:
        try:
            sd = filt(sd, model)
        except Exception as exc:  # the filter reshapes tensors and fails on foreign checkpoints
            raise MtlError(
                f"model.pretrained_file: {path} does not fit '{name}' ({type(exc).__name__}: {exc})"
            ) from exc
    own = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    # num_classes=0: the file's classifier has no place in the model, as in timm's own loader.
    sd = {k: v for k, v in sd.items() if k in own or not any(k.startswith(h + ".") for h in heads)}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected)):
            if items:
                more = f", ... ({len(items)} in all)" if len(items) > _LIST_MAX else ""
                parts.append(f"{label}: {', '.join(items[:_LIST_MAX])}{more}")
        raise MtlError(
            f"model.pretrained_file: {path} does not match backbone '{name}' "
            f"({'; '.join(parts)}); check model.backbone and model.backbone_kwargs"
        )
    model.load_state_dict(sd, strict=True)


class FrameEncoder(nn.Module):
    """Images [N,3,H,W] -> features [N,D]: last-layer patch tokens averaged, the CLS token, or all patch tokens
    concatenated in order (``flatten``: D = patches x width, for aligned crops where position carries meaning).

    Prefix tokens (CLS, DINOv2/DINOv3 registers) never enter ``avg`` or ``flatten``. A backbone's attention-pool
    head (SigLIP, Perception Encoder) is not how these poolings read the tokens, so it is dropped rather than kept
    as untrained, gradient-less parameters.
    """

    def __init__(self, backbone: nn.Module, pool: str = "avg") -> None:
        super().__init__()
        if pool not in ("avg", "cls", "flatten"):
            raise MtlError(f"model.pool: expected 'avg', 'cls' or 'flatten', got {pool!r}")
        self.prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        has_cls = getattr(backbone, "has_class_token", getattr(backbone, "cls_token", None) is not None)
        if pool == "cls" and not has_cls:
            raise MtlError("model.pool='cls' but the backbone has no class token; use model.pool='avg'")
        if getattr(backbone, "attn_pool", None) is not None:
            backbone.reset_classifier(0, global_pool="token" if pool == "cls" else "avg")
        self.backbone = backbone
        self.pool = pool
        self.num_features = int(backbone.num_features)
        if pool == "flatten":
            patches = getattr(getattr(backbone, "patch_embed", None), "num_patches", None)
            if not patches:
                raise MtlError("model.pool='flatten' needs a ViT with a fixed number of patches; use model.pool='avg'")
            self.num_features *= int(patches)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)  # [N, prefix + patches, D], final norm applied
        if tokens.ndim != 3:
            raise MtlError(f"backbone forward_features gave shape {tuple(tokens.shape)}; expected a ViT's [N, L, D]")
        if self.pool == "flatten":
            return tokens[:, self.prefix :].flatten(1)
        # 'avg' leaves out the first num_prefix_tokens (CLS and registers); 'token' is token 0, the CLS token.
        feats = global_pool_nlc(
            tokens, pool_type="avg" if self.pool == "avg" else "token", num_prefix_tokens=self.prefix
        )
        fc_norm = getattr(self.backbone, "fc_norm", None)  # models built with global_pool='avg' norm after pooling
        return fc_norm(feats) if fc_norm is not None else feats

    def data_config(self) -> dict[str, tuple[float, float, float]]:
        """The backbone's own input normalisation (what its pretrained weights expect)."""
        dc = timm.data.resolve_model_data_config(self.backbone)
        return {"mean": tuple(float(x) for x in dc["mean"]), "std": tuple(float(x) for x in dc["std"])}
