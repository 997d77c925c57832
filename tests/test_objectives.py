"""Losses against hand-computed NumPy references, their masks, class weights, and the all-invalid batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl.config import LossConfig, from_dict
from mtl.errors import ConfigError, MtlError
from mtl.objectives import (
    MultiTaskLoss,
    ccc_loss,
    class_alpha,
    pos_neg_weights,
    sigmoid_focal_loss,
    softmax_focal_loss,
)
from mtl.tasks import get_task


def expr_alpha(spec, stats):
    return class_alpha(spec, stats, get_task("expr"))


def au_weights(spec, stats):
    return pos_neg_weights(spec, stats, get_task("au"))


B, T = 3, 7
STATS = {
    "va": {"labeled_frames": 100, "labeled_missing_image": 0},
    "expr": {"labeled_frames": 100, "labeled_missing_image": 0, "class_counts": [40, 10, 5, 0, 20, 10, 10, 5]},
    "au": {"labeled_frames": 200, "labeled_missing_image": 0, "positive_counts": [20, 10, 50, 100, 0, 200] + [40] * 6},
}


def np_ccc(x: np.ndarray, y: np.ndarray) -> float:
    mx, my = x.mean(), y.mean()
    cov = ((x - mx) * (y - my)).mean()
    return 2 * cov / (x.var() + y.var() + (mx - my) ** 2)


def np_softmax_focal(logits: np.ndarray, target: np.ndarray, gamma: float, alpha: np.ndarray | None) -> float:
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    pt = p[np.arange(len(target)), target]
    a = 1.0 if alpha is None else alpha[target]
    return float(np.mean(-a * (1 - pt) ** gamma * np.log(pt)))


def np_sigmoid_focal(logits: np.ndarray, y: np.ndarray, gamma: float, pw: np.ndarray, nw: np.ndarray) -> float:
    p = 1 / (1 + np.exp(-logits))
    loss = -y * pw * (1 - p) ** gamma * np.log(p) - (1 - y) * nw * p**gamma * np.log(1 - p)
    return float(loss.mean())


def random_case(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "va": torch.tanh(torch.randn(B, T, 2, generator=g)).requires_grad_(),
        "expr": torch.randn(B, T, 8, generator=g).requires_grad_(),
        "au": torch.randn(B, T, 12, generator=g).requires_grad_(),
    }
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[2, 5:] = True
    has_image = ~pad & (torch.rand(B, T, generator=g) > 0.2)
    batch = {
        "pad": pad,
        "has_image": has_image,
        "va": torch.rand(B, T, 2, generator=g) * 2 - 1,
        "va_valid": ~pad & (torch.rand(B, T, generator=g) > 0.3),
        "expr": torch.randint(0, 8, (B, T), generator=g),
        "expr_valid": ~pad & (torch.rand(B, T, generator=g) > 0.3),
        "au": (torch.rand(B, T, 12, generator=g) > 0.6).float(),
        "au_valid": ~pad & (torch.rand(B, T, generator=g) > 0.3),
    }
    return outputs, batch


def test_ccc_loss_matches_numpy() -> None:
    g = torch.Generator().manual_seed(1)
    pred, true = torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g) * 0.5 + 0.3 * torch.randn(50, 2)
    w = torch.rand(50, generator=g) > 0.4
    got = ccc_loss(pred, true, w)
    p, t, m = pred.numpy(), true.numpy(), w.numpy()
    for d in range(2):
        assert got[d].item() == pytest.approx(1 - np_ccc(p[m, d], t[m, d]), abs=1e-5)


def test_ccc_loss_degenerate_cases_are_finite() -> None:
    x = torch.randn(5, 2, requires_grad=True)
    y = torch.randn(5, 2)
    one = torch.tensor([True, False, False, False, False])
    loss = ccc_loss(x, y, one)
    assert torch.equal(loss, torch.zeros(2))
    loss.sum().backward()
    assert torch.count_nonzero(x.grad) == 0
    const = torch.ones(5, 2, requires_grad=True)
    loss = ccc_loss(const, torch.ones(5, 2), torch.ones(5, dtype=torch.bool))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(const.grad).all()
    assert torch.allclose(ccc_loss(y, y, torch.ones(5, dtype=torch.bool)), torch.zeros(2), atol=1e-6)  # perfect


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_softmax_focal_matches_numpy(gamma: float) -> None:
    g = torch.Generator().manual_seed(2)
    logits, target = torch.randn(40, 8, generator=g) * 2, torch.randint(0, 8, (40,), generator=g)
    w = torch.rand(40, generator=g) > 0.3
    alpha = torch.rand(8, generator=g) + 0.5
    m = w.numpy()
    for a in (None, alpha):
        got = softmax_focal_loss(logits, target, w, gamma, a).item()
        want = np_softmax_focal(logits.numpy()[m], target.numpy()[m], gamma, None if a is None else a.numpy())
        assert got == pytest.approx(want, rel=1e-5)
    if gamma == 0.0:  # gamma 0, no alpha: plain cross-entropy
        ce = torch.nn.functional.cross_entropy(logits[w], target[w]).item()
        assert softmax_focal_loss(logits, target, w, 0.0, None).item() == pytest.approx(ce, rel=1e-5)


def test_sigmoid_focal_matches_numpy() -> None:
    g = torch.Generator().manual_seed(3)
    logits, y = torch.randn(30, 12, generator=g) * 2, (torch.rand(30, 12, generator=g) > 0.7).float()
    w = torch.rand(30, generator=g) > 0.3
    pw, nw = torch.rand(12, generator=g) * 3, torch.rand(12, generator=g)
    m = w.numpy()
    got = sigmoid_focal_loss(logits, y, w, 2.0, pw, nw).item()
    assert got == pytest.approx(
        np_sigmoid_focal(logits.numpy()[m], y.numpy()[m], 2.0, pw.numpy(), nw.numpy()), rel=1e-5
    )
    ones = torch.ones(12)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[w], y[w]).item()
    assert sigmoid_focal_loss(logits, y, w, 0.0, ones, ones).item() == pytest.approx(bce, rel=1e-5)


def test_auto_alpha_formulas() -> None:
    a = expr_alpha("auto", STATS).numpy()
    counts = np.array(STATS["expr"]["class_counts"], dtype=float)
    present = counts > 0
    want = counts.sum() / (7 * counts[present])  # 7 classes present
    assert np.allclose(a[present], want)
    assert a[3] == pytest.approx(want.max())  # absent class: the largest weight
    assert (counts * a).sum() / counts.sum() == pytest.approx(1.0)  # the mean weight per labelled frame is 1

    pos, neg = (t.numpy() for t in au_weights("auto", STATS))
    p = np.array(STATS["au"]["positive_counts"], dtype=float)
    assert np.allclose(pos, 200 / (2 * np.maximum(p, 1)))
    assert np.allclose(neg, 200 / (2 * np.maximum(200 - p, 1)))
    assert np.allclose((p * pos + (200 - p) * neg)[p % 200 > 0] / 200, 1.0)

    assert expr_alpha("none", None) is None and au_weights("none", None) is None
    lst = [0.25] * 12
    pos, neg = au_weights(lst, None)
    assert torch.allclose(pos, torch.full((12,), 0.25)) and torch.allclose(neg, torch.full((12,), 0.75))
    with pytest.raises(ConfigError, match=r"loss\.tasks\.au\.alpha"):
        au_weights([2.0] * 12, None)
    with pytest.raises(MtlError, match=r"loss\.tasks\.expr\.alpha='auto' needs"):
        expr_alpha("auto", None)
    with pytest.raises(MtlError, match="no au labels"):
        au_weights("auto", {"au": {"labeled_frames": 0, "positive_counts": [0] * 12}})


def test_multitask_loss_is_the_weighted_masked_sum() -> None:
    outputs, batch = random_case()
    weights = {"va": 0.5, "expr": 2.0, "au": 3.0}
    cfg = from_dict({"loss": {"weights": weights, "tasks": {"expr": {"gamma": 1.5}, "au": {"gamma": 0.5}}}}).loss
    loss_fn = MultiTaskLoss(cfg, STATS)
    total, parts = loss_fn(outputs, batch)
    assert set(parts) >= {"va", "expr", "au"} and all(not v.requires_grad for v in parts.values())
    assert total.item() == pytest.approx((0.5 * parts["va"] + 2 * parts["expr"] + 3 * parts["au"]).item(), rel=1e-6)

    ok = (~batch["pad"] & batch["has_image"]).numpy()
    va_m = batch["va_valid"].numpy() & ok
    x, y = outputs["va"].detach().numpy()[va_m], batch["va"].numpy()[va_m]
    want_va = np.mean([1 - np_ccc(x[:, d], y[:, d]) for d in range(2)])
    assert parts["va"].item() == pytest.approx(want_va, abs=1e-5)
    e_m = batch["expr_valid"].numpy() & ok
    alpha = expr_alpha("auto", STATS).numpy()
    want_e = np_softmax_focal(outputs["expr"].detach().numpy()[e_m], batch["expr"].numpy()[e_m], 1.5, alpha)
    assert parts["expr"].item() == pytest.approx(want_e, rel=1e-5)
    a_m = batch["au_valid"].numpy() & ok
    pw, nw = (t.numpy() for t in au_weights("auto", STATS))
    want_a = np_sigmoid_focal(outputs["au"].detach().numpy()[a_m], batch["au"].numpy()[a_m], 0.5, pw, nw)
    assert parts["au"].item() == pytest.approx(want_a, rel=1e-5)

    total.backward()
    pad = batch["pad"]
    for k in ("va", "expr", "au"):  # padding and imageless frames get no gradient
        g = outputs[k].grad
        assert torch.count_nonzero(g[pad | ~batch["has_image"]]) == 0
        assert torch.count_nonzero(g) > 0


def test_use_imageless_counts_frames_without_image() -> None:
    outputs, batch = random_case(seed=4)
    loss_fn = MultiTaskLoss(LossConfig(tasks={"expr": {"alpha": "none"}, "au": {"alpha": "none"}}))
    _, with_img = loss_fn(outputs, batch)
    _, all_frames = loss_fn(outputs, batch, use_imageless=True)
    assert not torch.isclose(with_img["expr"], all_frames["expr"])
    ok = ~batch["pad"].numpy()
    e_m = batch["expr_valid"].numpy() & ok
    want = np_softmax_focal(outputs["expr"].detach().numpy()[e_m], batch["expr"].numpy()[e_m], 2.0, None)
    assert all_frames["expr"].item() == pytest.approx(want, rel=1e-5)


def test_all_invalid_batch_is_exactly_zero_without_nan() -> None:
    outputs, batch = random_case()
    for k in ("va_valid", "expr_valid", "au_valid"):
        batch[k] = torch.zeros_like(batch[k])
    loss_fn = MultiTaskLoss(LossConfig(), STATS)
    total, parts = loss_fn(outputs, batch)
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in parts.values())
    assert total.requires_grad
    total.backward()
    for v in outputs.values():
        assert v.grad is None or (torch.isfinite(v.grad).all() and torch.count_nonzero(v.grad) == 0)

    # one task without labels adds nothing, the others train
    outputs, batch = random_case()
    batch["au_valid"] = torch.zeros_like(batch["au_valid"])
    total, parts = loss_fn(outputs, batch)
    assert parts["au"].item() == 0.0 and total.item() == pytest.approx((parts["va"] + parts["expr"]).item(), rel=1e-6)
    total.backward()
    assert torch.count_nonzero(outputs["au"].grad) == 0 and torch.count_nonzero(outputs["expr"].grad) > 0


def test_all_invalid_batch_through_the_model() -> None:
    from mtl.model import build_model

    cfg = from_dict(
        {
            "model": {
                "backbone": "vit_tiny_patch16_224",
                "backbone_kwargs": {"depth": 1, "embed_dim": 24, "num_heads": 2},
                "temporal": {"dim": 16, "heads": 2, "layers": 1},
            }
        }
    )
    net = build_model(cfg.model, 32).train()
    _, batch = random_case()
    for k in ("va_valid", "expr_valid", "au_valid"):
        batch[k] = torch.zeros_like(batch[k])
    outputs = net(torch.randn(B, T, 3, 32, 32), batch["has_image"], batch["pad"])
    total, _ = MultiTaskLoss(cfg.loss, STATS)(outputs, batch)
    assert total.item() == 0.0
    total.backward()
    for p in net.parameters():
        assert p.grad is None or (torch.isfinite(p.grad).all() and torch.count_nonzero(p.grad) == 0)
