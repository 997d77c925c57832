"""The timm families behind recent ABAW entries, as tiny random instances (no download): standard ViT (CLIP,
SigLIP), DINOv2 (patch 14, registers), and the Eva-based DINOv3 and Perception Encoder (rotary positions).

Each loads a local checkpoint saved at another image size, pools without its prefix tokens, gets layer-wise
lr decay over its blocks, and trains a step through the real trainer.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers import SMOKE, ok, run, smoke_overrides
from safetensors import safe_open
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from mtl.config import from_dict
from mtl.errors import MtlError
from mtl.model import build_model, param_groups

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 3}

# name -> (patch size, prefix tokens: CLS + registers, has a CLS token, built with an attention-pool head)
FAMILIES = {
    "vit_base_patch16_clip_224": (16, 1, True, False),
    "vit_base_patch16_siglip_224": (16, 0, False, True),
    "vit_base_patch14_dinov2": (14, 1, True, False),
    "vit_base_patch14_reg4_dinov2": (14, 5, True, False),
    "vit_base_patch16_dinov3": (16, 5, True, False),  # Eva: rotary only, no absolute position embedding
    "vit_pe_core_base_patch16_224": (16, 1, True, True),  # Eva: rotary and absolute positions
}
NAMES = list(FAMILIES)


GRID = 4  # patches per side in the unit tests: 64x64 frames for patch 16, 56x56 for patch 14


def img_size(name: str) -> int:
    return FAMILIES[name][0] * GRID


def model_cfg(name: str, file: Path | None = None, **model: object) -> object:
    section = {
        "backbone": name,
        "backbone_kwargs": dict(TINY),
        "pretrained_file": None if file is None else str(file),
        "temporal": {"dim": 32, "heads": 4, "layers": 1, "dropout": 0.0},
        "mask": {"mode": "none"},
        **model,
    }
    return from_dict({"model": section})


def save_source(name: str, path: Path, **kwargs: object) -> torch.nn.Module:
    """A 'pretrained' model at 224 with its classifier (and attention pool), as a hub checkpoint would be; it also
    runs at other sizes (timm's dynamic_img_size), which gives what a correctly resized model must compute."""
    torch.manual_seed(3)
    src = timm.create_model(name, pretrained=False, img_size=224, dynamic_img_size=True, **{**TINY, **kwargs})
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    return src.eval()


def test_installed_timm_knows_every_family() -> None:
    assert set(NAMES) <= set(timm.list_models()), sorted(set(NAMES) - set(timm.list_models()))


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_at_224_loads_at_face_size_and_matches_timm(name: str, tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    src = save_source(name, file)
    size = img_size(name)
    net = build_model(model_cfg(name, file).model, size).eval()
    bb = net.encoder.backbone
    assert bb.patch_embed.grid_size == (GRID, GRID)

    sd = {k: v for k, v in src.state_dict().items() if k in bb.state_dict()}
    if getattr(bb, "pos_embed", None) is not None:
        prefix = 0 if getattr(bb, "no_embed_class", False) else bb.num_prefix_tokens
        want = resample_abs_pos_embed(sd["pos_embed"], new_size=(GRID, GRID), num_prefix_tokens=prefix)
        assert bb.pos_embed.shape == want.shape and torch.allclose(bb.pos_embed, want, atol=1e-6)
    for k, v in bb.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(v, sd[k]), k
    rope = getattr(bb, "rope", None)
    if rope is not None and getattr(rope, "feat_shape", None) is not None:  # PE: a rope grid fixed at build time
        assert tuple(rope.feat_shape) == (GRID, GRID)

    # at the face size the loaded model computes what the 224 model computes when timm resizes on the fly
    # (positions resampled, rotary grid of the actual input): nothing half-loaded, nothing left at 224
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(bb.forward_features(x), src.forward_features(x), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_pooling_leaves_out_cls_and_register_tokens(name: str) -> None:
    _, prefix, has_cls, _ = FAMILIES[name]
    torch.manual_seed(0)
    avg = build_model(model_cfg(name).model, img_size(name)).eval()
    flat = build_model(model_cfg(name, pool="flatten").model, img_size(name)).eval()
    flat.encoder.load_state_dict(avg.encoder.state_dict())
    bb = avg.encoder.backbone
    assert avg.encoder.prefix == bb.num_prefix_tokens == prefix
    assert getattr(bb, "attn_pool", None) is None  # SigLIP/PE's attention pool is not what 'avg' reads
    x = torch.randn(3, 3, img_size(name), img_size(name))
    with torch.no_grad():
        tokens = bb.forward_features(x)
        assert tokens.shape == (3, prefix + GRID**2, 48)
        assert torch.allclose(avg.encoder(x), tokens[:, prefix:].mean(1), atol=1e-6)
        assert torch.equal(flat.encoder(x), tokens[:, prefix:].reshape(3, -1))
    assert flat.encoder.num_features == GRID**2 * 48
    if has_cls:
        cls = build_model(model_cfg(name, pool="cls").model, img_size(name)).eval()
        cls.encoder.load_state_dict(avg.encoder.state_dict())
        with torch.no_grad():
            assert torch.equal(cls.encoder(x), tokens[:, 0])
    else:
        with pytest.raises(MtlError, match="no class token"):
            build_model(model_cfg(name, pool="cls").model, img_size(name))


@pytest.mark.parametrize("name", NAMES)
def test_layer_decay_groups_follow_the_blocks(name: str) -> None:
    cfg = model_cfg(name)
    net = build_model(cfg.model, img_size(name))
    optim = copy.deepcopy(cfg.optim)
    optim.lr, optim.backbone_lr_scale, optim.layer_decay, optim.weight_decay = 1e-3, 0.5, 0.8, 0.05
    groups = param_groups(net, optim)
    group_of = {id(p): g for g in groups for p in g["params"]}
    assert len(group_of) == sum(1 for _ in net.parameters())

    bb = net.encoder.backbone
    depth = len(bb.blocks)
    stem = ("cls_token", "reg_token", "pos_embed", "patch_embed.", "norm_pre.")
    seen_stem = set()
    for n, p in bb.named_parameters():
        m = re.match(r"blocks\.(\d+)\.", n)
        if m:
            layer = int(m.group(1)) + 1
        elif n.startswith(stem):
            layer = 0
            seen_stem.add(next(s for s in stem if n.startswith(s)))
        else:
            assert n.startswith("norm."), n  # final norm; the attention pool is gone
            layer = depth + 1
        g = group_of[id(p)]
        assert g["name"].startswith(f"backbone.layer{layer:02d}/"), (n, g["name"])
        assert g["lr"] == pytest.approx(1e-3 * 0.5 * 0.8 ** (depth + 1 - layer)), n
        no_decay = p.ndim <= 1 or n in ("cls_token", "reg_token", "pos_embed")
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), n
    # the prefix tokens and embeddings each family has are all in the lowest group
    want = {"patch_embed."} | {s for s in ("cls_token", "reg_token", "pos_embed") if getattr(bb, s, None) is not None}
    want |= {"norm_pre."} if any(n.startswith("norm_pre.") for n, _ in bb.named_parameters()) else set()
    assert seen_stem == want
    assert ("reg_token" in seen_stem) == (FAMILIES[name][1] > 1)


# Each family trains through the real trainer (one process, one step), its backbone loaded from a local
# checkpoint saved at 224 and resized to the run's frames. One subprocess per family: the slow part of the suite.
TRAIN_FAMILIES = [
    "vit_base_patch16_clip_224",
    "vit_base_patch16_siglip_224",
    "vit_base_patch14_reg4_dinov2",
    "vit_base_patch16_dinov3",
    "vit_pe_core_base_patch16_224",
]
TRAIN_KWARGS = {"depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAIN_FAMILIES)
def test_family_trains_a_step_end_to_end(name: str, tiny_shards: Path, tmp_path: Path) -> None:
    file = tmp_path / "pretrained.safetensors"
    save_source(name, file, **TRAIN_KWARGS)
    with safe_open(str(file), "pt") as f:
        source = {k: f.get_tensor(k) for k in f.keys()}
    size = 2 * FAMILIES[name][0]  # 2x2 patches: 32x32 frames, 28x28 for patch 14
    out = tmp_path / "run"
    kwargs = json.dumps({**TRAIN_KWARGS, "patch_size": FAMILIES[name][0]})  # smoke.yaml's patch_size would merge in
    args = smoke_overrides(tiny_shards, out, tmp_path / "mlflow.db", f"model.backbone={name}",
                           f"model.backbone_kwargs={kwargs}", f"model.pretrained_file={file}",
                           f"data.image_size={size}", "train.max_steps=1")  # fmt: skip
    proc = ok(run([sys.executable, "-m", "mtl.cli", "train", "--config", str(SMOKE), *args]))
    assert "completed at step 1" in proc.stdout + proc.stderr
    assert "mtl_score" in json.loads(proc.stdout.strip().splitlines()[-1])

    with safe_open(str(out / "export" / "last.safetensors"), "pt") as f:
        trained = {k.removeprefix("encoder.backbone."): f.get_tensor(k) for k in f.keys()}
    assert not any(k.startswith("attn_pool.") for k in trained)
    for key in ("blocks.0.mlp.fc1.weight", "blocks.1.attn.proj.weight", "patch_embed.proj.weight"):
        # loaded from the file, then moved by the step (at its layer's decayed lr)
        assert trained[key].shape == source[key].shape, key
        assert not torch.equal(trained[key], source[key]), key
        assert torch.allclose(trained[key], source[key], atol=1e-2), key
    if FAMILIES[name][1] > 1:
        assert trained["reg_token"].shape == source["reg_token"].shape
