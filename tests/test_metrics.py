"""Streaming ABAW metrics against scikit-learn's F1 and a NumPy CCC, in chunks and across 2 gloo ranks."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import confusion_matrix, f1_score

from mtl.metrics import ABAWMetrics
from mtl.tasks.abaw import AU_NAMES, EXPR_NAMES


def np_ccc(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    mx, my = x.mean(), y.mean()
    return float(2 * ((x - mx) * (y - my)).mean() / (x.var() + y.var() + (mx - my) ** 2))


def make_batches(n: int = 6, b: int = 4, t: int = 16, seed: int = 0) -> list[tuple[dict, dict]]:
    """Random outputs and labels with correlated predictions, invalid labels, imageless frames and padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        pad = torch.zeros(b, t, dtype=torch.bool)
        if i == n - 1:
            pad[1:, 5:] = True
            pad[3] = True  # an all-padding clip, as at the end of an eval set
        va = torch.rand(b, t, 2, generator=g) * 2 - 1
        expr = torch.randint(0, 8, (b, t), generator=g)
        expr[:, ::3] = 0  # an imbalanced class distribution
        au = (torch.rand(b, t, 12, generator=g) < torch.linspace(0.05, 0.6, 12)).float()
        batch = {
            "pad": pad,
            "has_image": ~pad & (torch.rand(b, t, generator=g) > 0.1),
            "va": va,
            "va_valid": ~pad & (torch.rand(b, t, generator=g) > 0.2),
            "expr": expr,
            "expr_valid": ~pad & (torch.rand(b, t, generator=g) > 0.2),
            "au": au,
            "au_valid": ~pad & (torch.rand(b, t, generator=g) > 0.2),
        }
        # labels where pad is set get random values too: they must never count
        outputs = {
            "va": torch.tanh(va + 0.7 * torch.randn(b, t, 2, generator=g)),
            "expr": torch.randn(b, t, 8, generator=g) + 2.0 * torch.nn.functional.one_hot(expr, 8),
            "au": torch.randn(b, t, 12, generator=g) + 1.5 * (2 * au - 1),
        }
        out.append((outputs, batch))
    return out


def reference(batches: list[tuple[dict, dict]]) -> dict[str, float]:
    def cat(key: str, src: int) -> np.ndarray:
        return np.concatenate([pair[src][key].reshape(-1, *pair[src][key].shape[2:]).numpy() for pair in batches])

    pad = cat("pad", 1)
    ref: dict[str, float] = {}
    m = cat("va_valid", 1) & ~pad
    pv, tv = cat("va", 0)[m], cat("va", 1)[m]
    ref["va_ccc_valence"], ref["va_ccc_arousal"] = np_ccc(pv[:, 0], tv[:, 0]), np_ccc(pv[:, 1], tv[:, 1])
    ref["va_ccc"] = (ref["va_ccc_valence"] + ref["va_ccc_arousal"]) / 2
    m = cat("expr_valid", 1) & ~pad
    yt, yp = cat("expr", 1)[m], cat("expr", 0)[m].argmax(-1)
    ref["expr_f1"] = f1_score(yt, yp, average="macro", labels=list(range(8)), zero_division=0)
    per = f1_score(yt, yp, average=None, labels=list(range(8)), zero_division=0)
    ref.update({f"expr_f1/{n}": float(v) for n, v in zip(EXPR_NAMES, per)})
    m = cat("au_valid", 1) & ~pad
    yt, prob = cat("au", 1)[m].astype(int), 1 / (1 + np.exp(-cat("au", 0)[m]))
    ref["au_f1"] = f1_score(yt, (prob >= 0.5).astype(int), average="macro", zero_division=0)
    per = f1_score(yt, (prob >= 0.5).astype(int), average=None, zero_division=0)
    ref.update({f"au_f1/{n}": float(v) for n, v in zip(AU_NAMES, per)})
    ref["mtl_score"] = ref["va_ccc"] + ref["expr_f1"] + ref["au_f1"]
    return ref


def test_streamed_metrics_match_sklearn_and_numpy() -> None:
    batches = make_batches()
    metrics = ABAWMetrics()
    for outputs, batch in batches:
        metrics.update(outputs, batch)
    got = metrics.compute()
    want = reference(batches)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    assert 0.2 < got["va_ccc"] < 0.9 and 0.2 < got["expr_f1"] < 0.95  # the data is neither trivial nor noise

    # confusion matrix as scikit-learn's, over the same frames
    m = np.concatenate([(b["expr_valid"] & ~b["pad"]).reshape(-1).numpy() for _, b in batches])
    yt = np.concatenate([b["expr"].reshape(-1).numpy() for _, b in batches])[m]
    yp = np.concatenate([o["expr"].reshape(-1, 8).argmax(-1).numpy() for o, _ in batches])[m]
    assert np.array_equal(metrics.confusion("expr"), confusion_matrix(yt, yp, labels=list(range(8))))
    assert got["expr_frames"] == m.sum()


def test_tuned_au_thresholds_reproduce_their_f1() -> None:
    batches = make_batches(seed=5)
    metrics = ABAWMetrics()
    for outputs, batch in batches:
        metrics.update(outputs, batch)
    got = metrics.compute()
    thr = metrics.thresholds()["au"]
    assert thr.shape == (12,) and ((0 <= thr) & (thr <= 1)).all()
    assert got["au_f1_tuned"] >= got["au_f1"] - 1e-12
    assert not np.allclose(thr, 0.5)

    m = np.concatenate([(b["au_valid"] & ~b["pad"]).reshape(-1).numpy() for _, b in batches])
    yt = np.concatenate([b["au"].reshape(-1, 12).numpy() for _, b in batches])[m].astype(int)
    prob = torch.sigmoid(torch.cat([o["au"].reshape(-1, 12) for o, _ in batches])).numpy()[m]
    tuned = f1_score(yt, (prob >= thr).astype(int), average="macro", zero_division=0)
    assert got["au_f1_tuned"] == pytest.approx(tuned, abs=1e-9)
    per_tuned = f1_score(yt, (prob >= thr).astype(int), average=None, zero_division=0)
    assert [got[f"au_f1_tuned/{n}"] for n in AU_NAMES] == pytest.approx(per_tuned.tolist(), abs=1e-9)
    # no threshold on a 1/100 grid does better for any AU
    hit = prob[None] >= np.linspace(0, 1, 101)[:, None, None]  # [thresholds, frames, AUs]
    tp, fp, fn = (hit & (yt == 1)).sum(1), (hit & (yt == 0)).sum(1), (~hit & (yt == 1)).sum(1)
    grid_best = (2 * tp / np.maximum(2 * tp + fp + fn, 1)).max(0)
    per_au = f1_score(yt, (prob >= thr).astype(int), average=None, zero_division=0)
    assert (per_au >= grid_best - 1e-12).all()


def test_va_sample_is_a_bounded_subsample_of_valid_pairs() -> None:
    batches = make_batches()
    metrics = ABAWMetrics(sample_size=50)
    for outputs, batch in batches:
        metrics.update(outputs, batch)
    pred, true = metrics.sample("va")
    assert pred.shape == true.shape == (50, 2)
    pairs = {
        tuple(np.r_[o["va"].reshape(-1, 2)[i].numpy(), b["va"].reshape(-1, 2)[i].numpy()].tolist())
        for o, b in batches
        for i in np.flatnonzero((b["va_valid"] & ~b["pad"]).reshape(-1).numpy())
    }
    assert all(tuple(np.r_[p, t].astype(np.float32).tolist()) in pairs for p, t in zip(pred, true))
    small = ABAWMetrics(sample_size=10_000)
    small.update(*batches[0])
    assert small.sample("va")[0].shape[0] == int((batches[0][1]["va_valid"] & ~batches[0][1]["pad"]).sum())


def test_empty_metrics_are_zero_not_nan() -> None:
    metrics = ABAWMetrics()
    got = metrics.compute()
    assert all(np.isfinite(v) for v in got.values())
    assert got["mtl_score"] == 0.0 and got["va_frames"] == 0.0
    metrics.all_reduce()  # no process group: nothing to do
    assert metrics.compute() == got


# ------------------------------------------------------------------------------------------ two ranks


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        metrics = ABAWMetrics(sample_size=40)
        for i, (outputs, batch) in enumerate(make_batches()):
            if i % world == rank:
                metrics.update(outputs, batch)
        metrics.all_reduce()
        pred, _ = metrics.sample("va")
        result = {
            "metrics": metrics.compute(),
            "sample": pred.tolist(),
            "thresholds": metrics.thresholds()["au"].tolist(),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_over_two_gloo_ranks_equals_one_process(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, str(tmp_path)), nprocs=2, join=True)

    single = ABAWMetrics(sample_size=40)
    for outputs, batch in make_batches():
        single.update(outputs, batch)
    want = single.compute()
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0]["sample"] == results[1]["sample"]  # one merged sample, the same on every rank
    for rank, got in enumerate(results):
        assert len(got["sample"]) == 40
        assert np.allclose(got["thresholds"], single.thresholds()["au"])
        for k, v in want.items():
            assert got["metrics"][k] == pytest.approx(v, abs=1e-9), (rank, k)
