"""Pretrained backbone weights from a local file: resized to the face-crop size, or refused naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from mtl.config import from_dict
from mtl.errors import MtlError
from mtl.model import build_model

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 3}


def source_vit(**kwargs: object) -> torch.nn.Module:
    """A 'pretrained' ViT at timm's 224 input, classifier included, as a hub checkpoint would be."""
    torch.manual_seed(3)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **kwargs})


def model_cfg(file: Path | None, **model: object) -> object:
    section = {
        "backbone": "vit_tiny_patch16_224",
        "backbone_kwargs": dict(TINY),
        "pretrained_file": None if file is None else str(file),
        "temporal": {"dim": 32, "heads": 4, "layers": 1},
        **model,
    }
    return from_dict({"model": section}).model


def test_safetensors_at_224_loads_at_112_with_resized_positions(tmp_path: Path) -> None:
    src = source_vit()
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    assert "head.weight" in sd and sd["pos_embed"].shape == (1, 1 + 14 * 14, 48)
    file = tmp_path / "vit.safetensors"
    save_file(sd, str(file))

    net = build_model(model_cfg(file), image_size=112)
    bb = net.encoder.backbone
    assert bb.pos_embed.shape == (1, 1 + 7 * 7, 48)
    want = resample_abs_pos_embed(sd["pos_embed"], new_size=(7, 7), num_prefix_tokens=1)
    assert torch.allclose(bb.pos_embed, want, atol=1e-6)
    assert not torch.allclose(bb.pos_embed[:, 1:], sd["pos_embed"][:, 1:50])  # really resampled, not cropped
    for k, v in bb.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(v, sd[k]), k

    # same weights, fresh init elsewhere: two builds agree on the backbone, differ from a random one
    scratch = build_model(model_cfg(None), image_size=112).encoder.backbone
    assert not torch.equal(scratch.blocks[0].attn.qkv.weight, bb.blocks[0].attn.qkv.weight)


def test_torch_state_dict_file_loads(tmp_path: Path) -> None:
    src = source_vit()
    file = tmp_path / "vit.pth"
    torch.save({"state_dict": src.state_dict()}, file)  # the usual training-script wrapper
    net = build_model(model_cfg(file), image_size=224)
    assert torch.equal(net.encoder.backbone.pos_embed, src.pos_embed)
    assert torch.equal(net.encoder.backbone.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)


def test_wrong_shapes_fail_naming_file_and_keys(tmp_path: Path) -> None:
    file = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in source_vit(embed_dim=64, num_heads=4).state_dict().items()}, str(file))
    with pytest.raises(MtlError) as err:
        build_model(model_cfg(file), image_size=112)
    msg = str(err.value)
    assert str(file) in msg and "model.pretrained_file" in msg and "vit_tiny_patch16_224" in msg
    assert "shape mismatch" in msg and "patch_embed.proj.weight: file (64, 3, 16, 16) vs model (48, 3, 16, 16)" in msg


def test_shape_mismatch_lists_the_keys(tmp_path: Path) -> None:
    sd = {k: v.contiguous() for k, v in source_vit().state_dict().items()}
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 48)
    file = tmp_path / "bad_fc1.safetensors"
    save_file(sd, str(file))
    with pytest.raises(MtlError, match=r"shape mismatch: blocks\.1\.mlp\.fc1\.weight: file \(100, 48\) vs model"):
        build_model(model_cfg(file), image_size=112)


def test_deeper_checkpoint_fails_with_unexpected_keys(tmp_path: Path) -> None:
    file = tmp_path / "deep.safetensors"
    save_file({k: v.contiguous() for k, v in source_vit(depth=3).state_dict().items()}, str(file))
    with pytest.raises(MtlError, match=r"unexpected: blocks\.2\."):
        build_model(model_cfg(file), image_size=112)


def test_missing_or_unsafe_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(MtlError, match="does not exist"):
        build_model(model_cfg(tmp_path / "nope.safetensors"), image_size=112)
    pickled = tmp_path / "object.pth"
    torch.save({"state_dict": source_vit().state_dict(), "extra": Path("x")}, pickled)  # needs full unpickling
    with pytest.raises(MtlError, match="cannot read"):
        build_model(model_cfg(pickled), image_size=112)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(MtlError, match="cannot read"):
        build_model(model_cfg(garbage), image_size=112)
