"""The network end to end on a tiny timm ViT: shapes, masks, masking modes, gradients, pooling, parameter groups."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from mtl.config import from_dict
from mtl.errors import MtlError
from mtl.model import MultiTaskNet, build_model, param_groups
from mtl.model.masking import FrameMasker

IMG = 32
TINY = {"depth": 2, "embed_dim": 48, "num_heads": 3, "patch_size": 16}


def tiny_cfg(**model: object) -> object:
    section = {
        "backbone": "vit_tiny_patch16_224",
        "backbone_kwargs": dict(TINY),
        "temporal": {"dim": 32, "heads": 4, "layers": 2, "dropout": 0.0, "max_len": 16},
        "mask": {"mode": "token", "prob": 0.5},
    }
    for k, v in model.items():
        if isinstance(v, dict) and isinstance(section.get(k), dict):
            section[k] = {**section[k], **v}
        else:
            section[k] = v
    return from_dict({"model": section})


def tiny_net(**model: object) -> MultiTaskNet:
    torch.manual_seed(0)
    return build_model(tiny_cfg(**model).model, IMG)


def inputs(b: int = 2, t: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(b, t, 3, IMG, IMG, generator=g)
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[1, t - 2 :] = True
    has_image = ~pad
    has_image[0, 1] = False
    return frames, has_image, pad


def test_shapes_end_to_end_and_va_range() -> None:
    net = tiny_net()
    frames, has_image, pad = inputs()
    for mode in (True, False):
        net.train(mode)
        out = net(frames, has_image, pad)
        assert out["va"].shape == (2, 6, 2)
        assert out["expr"].shape == (2, 6, 8)
        assert out["au"].shape == (2, 6, 12)
        assert all(torch.isfinite(v).all() for v in out.values())
        assert out["va"].abs().max() <= 1.0


def test_all_padding_rows_give_no_nan() -> None:
    net = tiny_net()
    frames, _, _ = inputs()
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[0, :3] = False  # row 1 is padding only, as at the end of an evaluation set
    for mode in (True, False):
        net.train(mode)
        out = net(frames, ~pad, pad)
        assert all(torch.isfinite(v).all() for v in out.values())
    out = net(frames, torch.zeros_like(pad), torch.ones_like(pad))  # nothing at all
    assert all(torch.isfinite(v).all() for v in out.values())


def test_eval_is_deterministic_and_training_masks() -> None:
    net = tiny_net(mask={"mode": "token", "prob": 0.5})
    frames, has_image, pad = inputs(t=12)
    net.eval()
    a, b = net(frames, has_image, pad), net(frames, has_image, pad)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same weights without masking give the same eval output: masking is off in eval
    unmasked = tiny_net(mask={"mode": "none", "prob": 0.0})
    unmasked.load_state_dict(net.state_dict())
    unmasked.eval()
    c = unmasked(frames, has_image, pad)
    assert all(torch.allclose(a[k], c[k]) for k in a)
    net.train()  # temporal dropout is 0 here: any difference comes from the masking
    torch.manual_seed(1)
    d = net(frames, has_image, pad)
    torch.manual_seed(2)
    e = net(frames, has_image, pad)
    assert not torch.allclose(d["expr"], e["expr"])
    assert not torch.allclose(d["expr"], a["expr"])


@pytest.mark.parametrize("mode", ["token", "feature"])
def test_frame_masker_modes(mode: str) -> None:
    torch.manual_seed(0)
    masker = FrameMasker(16, mode=mode, prob=0.4)
    feats = torch.randn(8, 50, 16) + 5.0  # no element is 0 or equal to the token by chance
    has_image = torch.ones(8, 50, dtype=torch.bool)
    has_image[:, ::10] = False
    token = masker.mask_token.detach()

    masker.eval()
    out = masker(feats, has_image)
    is_token = (out == token).all(-1)
    assert torch.equal(is_token, ~has_image)  # eval: imageless frames only
    assert torch.equal(out[has_image], feats[has_image])

    masker.train()
    out = masker(feats, has_image)
    is_token = (out == token).all(-1)
    assert is_token[~has_image].all()
    real = out[has_image]
    if mode == "token":
        frac = is_token[has_image].float().mean().item()
        assert 0.3 < frac < 0.5
        kept = ~is_token & has_image
        assert torch.equal(out[kept], feats[kept])
    else:
        frac = (real == 0).float().mean().item()
        assert 0.3 < frac < 0.5
        nz = real != 0
        assert torch.allclose(real[nz], feats[has_image][nz] / 0.6)


def test_imageless_and_padded_frames_do_not_read_their_pixels() -> None:
    net = tiny_net().eval()
    frames, has_image, pad = inputs()
    out = net(frames, has_image, pad)
    changed = frames.clone()
    changed[0, 1] = 100.0  # imageless frame
    changed[1, -2:] = -100.0  # padding
    out2 = net(changed, has_image, pad)
    assert all(torch.equal(out[k], out2[k]) for k in out)
    # the padding may even claim an image: it is never a key for the real frames
    out3 = net(changed, has_image | pad, pad)
    real = ~pad
    assert all(torch.allclose(out[k][real], out3[k][real], atol=1e-6) for k in out)


def _loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    return out["va"].sum() + out["expr"].logsumexp(-1).sum() + out["au"].sigmoid().sum()


def test_gradients_reach_the_backbone() -> None:
    net = tiny_net().train()
    frames, has_image, pad = inputs()
    _loss(net(frames, has_image, pad)).backward()
    bb = net.encoder.backbone
    assert bb.patch_embed.proj.weight.grad is not None and bb.patch_embed.proj.weight.grad.abs().sum() > 0
    assert bb.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert net.masker.mask_token.grad.abs().sum() > 0  # the imageless frame uses it
    assert net.temporal.proj.weight.grad.abs().sum() > 0


def test_frozen_backbone_gets_no_gradient_and_stays_in_eval() -> None:
    net = tiny_net(freeze_backbone=True)
    net.train()
    assert not net.encoder.training and net.temporal.training
    frames, has_image, pad = inputs()
    _loss(net(frames, has_image, pad)).backward()
    assert all(p.grad is None for p in net.encoder.parameters())
    assert net.temporal.proj.weight.grad.abs().sum() > 0
    names = [g["name"] for g in param_groups(net, tiny_cfg().optim)]
    assert names and not any(n.startswith("backbone") for n in names)


def test_batch_without_images_still_trains_the_trunk() -> None:
    net = tiny_net().train()
    frames, _, pad = inputs()
    none = torch.zeros_like(pad)
    _loss(net(frames, none, pad)).backward()
    assert net.masker.mask_token.grad.abs().sum() > 0
    grad = net.encoder.backbone.patch_embed.proj.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0  # ran once on a blank frame, weight 0


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    frames, has_image, pad = inputs()
    grads = []
    for ckpt in (False, True):
        net = tiny_net(grad_checkpointing=ckpt, mask={"mode": "none"}).train()
        _loss(net(frames, has_image, pad)).backward()
        grads.append(net.encoder.backbone.blocks[0].mlp.fc1.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_cls_and_avg_pooling_differ_and_avg_skips_the_cls_token() -> None:
    avg = tiny_net(pool="avg").eval()
    cls = tiny_net(pool="cls").eval()
    cls.load_state_dict(avg.state_dict())
    images = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        tokens = avg.encoder.backbone.forward_features(images)
        fa, fc = avg.encoder(images), cls.encoder(images)
    assert fa.shape == fc.shape == (3, 48)
    assert torch.allclose(fa, tokens[:, 1:].mean(1), atol=1e-6)
    assert torch.allclose(fc, tokens[:, 0], atol=1e-6)
    assert not torch.allclose(fa, fc)


def test_flatten_pooling_keeps_every_patch_token_in_order() -> None:
    # 32x32 frames with 16x16 patches: 4 patch tokens of width 48 -> a 192-wide feature, the CLS token left out
    net = tiny_net(pool="flatten").eval()
    assert net.encoder.num_features == 4 * 48
    images = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        tokens = net.encoder.backbone.forward_features(images)
        feats = net.encoder(images)
        out = net(*inputs(b=2, t=5))
    assert feats.shape == (3, 192)
    assert torch.equal(feats, tokens[:, 1:].reshape(3, -1))
    assert out["expr"].shape == (2, 5, 8) and torch.isfinite(out["va"]).all()


def test_data_config_is_the_backbones() -> None:
    dc = tiny_net().data_config()
    assert dc == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # augreg ViT normalisation in timm


def test_clip_longer_than_max_len_fails_clearly() -> None:
    net = tiny_net()
    frames, has_image, pad = inputs(t=17)
    with pytest.raises(MtlError, match="max_len"):
        net(frames, has_image, pad)


def test_unknown_backbone_fails_clearly() -> None:
    with pytest.raises(MtlError, match="model.backbone 'no_such_vit'"):
        build_model(tiny_cfg(backbone="no_such_vit").model, IMG)


def test_hub_unreachable_points_to_pretrained_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # as on a compute node: no network at all
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MtlError, match="model.pretrained_file"):
        build_model(tiny_cfg(pretrained=True).model, IMG)


def test_param_groups_follow_layer_decay() -> None:
    net = tiny_net()
    optim = copy.deepcopy(tiny_cfg().optim)
    optim.lr, optim.backbone_lr_scale, optim.layer_decay, optim.weight_decay = 1e-3, 0.5, 0.8, 0.05
    groups = param_groups(net, optim)
    by_param = {id(p): g for g in groups for p in g["params"]}
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len(set(map(id, all_params))) == sum(1 for _ in net.parameters())
    assert all({"params", "lr", "weight_decay", "name"} <= set(g) for g in groups)

    bb = net.encoder.backbone
    base = 1e-3 * 0.5
    depth = len(bb.blocks)
    for name, p in bb.named_parameters():
        m = re.match(r"blocks\.(\d+)\.", name)
        if m:
            want = base * 0.8 ** (depth - int(m.group(1)))
        elif name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            want = base * 0.8 ** (depth + 1)
        else:
            want = base  # final norm
        assert by_param[id(p)]["lr"] == pytest.approx(want), name
        no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
        assert by_param[id(p)]["weight_decay"] == (0.0 if no_decay else 0.05), name
    for name, p in net.named_parameters():
        if name.startswith("encoder."):
            continue
        assert by_param[id(p)]["lr"] == pytest.approx(1e-3), name
        no_decay = p.ndim <= 1 or name in ("masker.mask_token", "temporal.pos")
        assert by_param[id(p)]["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert torch.optim.AdamW(groups)  # the groups are what AdamW takes


@pytest.mark.parametrize("mode", ["token", "feature"])
def test_masking_before_or_after_the_trunk_projection_is_the_same(mode: str) -> None:
    """The masker embeds frames and token apart (cheaper backward on wide features); outputs and every gradient
    equal embedding the masked sequence, and an imageless row holding NaN reaches neither."""
    proj = torch.nn.Linear(64, 8)
    masker = FrameMasker(64, mode=mode, prob=0.4)
    feats = torch.randn(4, 20, 64)
    has_image = torch.rand(4, 20) > 0.2
    feats[~has_image] = float("nan")  # a row nobody should read
    grads = []
    for embed in (False, True):
        torch.manual_seed(3)
        for p in (*proj.parameters(), masker.mask_token):
            p.grad = None
        x = feats.clone().requires_grad_(True)
        out = masker(x, has_image, embed=proj) if embed else proj(masker(x.nan_to_num(0.0), has_image))
        assert torch.isfinite(out).all()
        out.square().sum().backward()
        grads.append([out.detach(), proj.weight.grad, proj.bias.grad, masker.mask_token.grad, x.grad[has_image]])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 sums in another order
    assert grads[1][3].abs().sum() > 0  # the token was used and learns
