"""ABAW metrics, as the challenge scores them: pooled over every valid frame of every video of a split.

Only sufficient statistics are kept (sums for CCC, a confusion matrix for EXPR, per-AU counts and probability
histograms for AU), so a whole validation set never sits in memory and ranks combine by summing:

- VA: CCC (population statistics) of valence and of arousal, and their mean.
- EXPR: macro F1 over all 8 classes (a class absent from both labels and predictions scores 0).
- AU: macro F1 over the 12 units at probability 0.5, and ``au_f1_tuned`` with per-AU thresholds fitted on the
  same data (an optimistic figure on the split it is fitted on; apply ``au_thresholds()`` to another split).
- MTL score: VA mean CCC + EXPR F1 + AU F1.

Predictions: VA as the network gives it, EXPR the arg-max class, AU ``sigmoid(logit) >= 0.5``. Frames count when
their label is valid and they are not padding, with or without an image.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mtl.constants import AU_NAMES, EXPR_NAMES, NUM_AU, NUM_EXPR


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros(np.broadcast(tp, denom).shape), where=denom > 0)


def ccc_from_sums(n: float, sx: float, sy: float, sxx: float, syy: float, sxy: float) -> float:
    """CCC from streamed sums; 0.0 where undefined (fewer than 2 frames, or no variance at all)."""
    if n < 2:
        return 0.0
    mx, my = sx / n, sy / n
    vx, vy = max(sxx / n - mx * mx, 0.0), max(syy / n - my * my, 0.0)
    cov = sxy / n - mx * my
    denom = vx + vy + (mx - my) ** 2
    return float(2 * cov / denom) if denom > 0 else 0.0


class ABAWMetrics:
    """Streaming ABAW metrics: ``update()`` per batch, ``all_reduce()`` once across ranks, then ``compute()``."""

    def __init__(self, bins: int = 1000, va_sample_size: int = 5000, seed: int = 0) -> None:
        self.bins = bins
        self.va_sample_size = va_sample_size
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._gen = torch.Generator().manual_seed(seed + 7919 * rank)  # independent sample priorities per rank
        self.reset()

    def reset(self) -> None:
        self.va_sums = torch.zeros(2, 6, dtype=torch.float64)  # per dim: n, sum x, sum y, sum x^2, sum y^2, sum xy
        self.expr_cm = torch.zeros(NUM_EXPR, NUM_EXPR, dtype=torch.float64)  # rows: label, columns: prediction
        self.au_counts = torch.zeros(3, NUM_AU, dtype=torch.float64)  # TP, FP, FN at 0.5
        self.au_hist = torch.zeros(2, NUM_AU, self.bins, dtype=torch.float64)  # [negatives, positives] by prob bin
        self._sample_key = torch.empty(0, dtype=torch.float64)
        self._sample = torch.empty(0, 4, dtype=torch.float64)  # pred valence, pred arousal, true valence, true arousal
        self._reduced = False

    # ------------------------------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        """Add a batch: ``outputs`` of the network, ``batch`` as the loaders give it (see the batch contract)."""
        if self._reduced:
            raise RuntimeError("ABAWMetrics.update() after all_reduce(); call reset() first")
        frame_ok = ~batch["pad"].reshape(-1)
        self._update_va(outputs["va"], batch["va"], batch["va_valid"].reshape(-1) & frame_ok)
        self._update_expr(outputs["expr"], batch["expr"], batch["expr_valid"].reshape(-1) & frame_ok)
        self._update_au(outputs["au"], batch["au"], batch["au_valid"].reshape(-1) & frame_ok)

    def _update_va(self, pred: torch.Tensor, true: torch.Tensor, valid: torch.Tensor) -> None:
        dev = pred.device
        valid = valid.to(dev)
        x = pred.detach().reshape(-1, 2)[valid].double()
        y = true.reshape(-1, 2).to(dev)[valid].double()
        n = x.new_full((2,), float(x.shape[0]))
        sums = torch.stack([n, x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0)], dim=1)
        self.va_sums += sums.cpu()
        if self.va_sample_size > 0 and x.shape[0]:
            key = torch.rand(x.shape[0], generator=self._gen, dtype=torch.float64)
            self._merge_sample(key, torch.cat([x, y], dim=1).cpu())

    def _merge_sample(self, key: torch.Tensor, rows: torch.Tensor) -> None:
        """Keep the rows with the largest random keys: a uniform subsample that merges across batches and ranks."""
        key = torch.cat([self._sample_key, key])
        rows = torch.cat([self._sample, rows])
        if key.numel() > self.va_sample_size:
            key, idx = key.topk(self.va_sample_size)
            rows = rows[idx]
        self._sample_key, self._sample = key, rows

    def _update_expr(self, logits: torch.Tensor, true: torch.Tensor, valid: torch.Tensor) -> None:
        dev = logits.device
        valid = valid.to(dev)
        pred = logits.detach().reshape(-1, NUM_EXPR).argmax(-1)[valid]
        t = true.reshape(-1).to(dev)[valid].long()
        cm = torch.bincount(t * NUM_EXPR + pred, minlength=NUM_EXPR * NUM_EXPR)
        self.expr_cm += cm.reshape(NUM_EXPR, NUM_EXPR).cpu().double()

    def _update_au(self, logits: torch.Tensor, true: torch.Tensor, valid: torch.Tensor) -> None:
        dev = logits.device
        valid = valid.to(dev)
        prob = torch.sigmoid(logits.detach().float().reshape(-1, NUM_AU)[valid])
        y = true.reshape(-1, NUM_AU).to(dev)[valid] > 0.5
        hit = prob >= 0.5
        counts = torch.stack([(hit & y).sum(0), (hit & ~y).sum(0), (~hit & y).sum(0)])
        self.au_counts += counts.cpu().double()
        b = (prob * self.bins).long().clamp_(0, self.bins - 1)
        unit = torch.arange(NUM_AU, device=dev).expand_as(b)
        idx = (y.long() * NUM_AU + unit) * self.bins + b
        hist = torch.bincount(idx.reshape(-1), minlength=2 * NUM_AU * self.bins)
        self.au_hist += hist.reshape(2, NUM_AU, self.bins).cpu().double()

    # ------------------------------------------------------------------------------------------ ranks

    def all_reduce(self) -> None:
        """Sum the state of every rank (no-op without an initialised process group). Call once, after updates."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        if self._reduced:
            raise RuntimeError("ABAWMetrics.all_reduce() called twice; the state would be counted twice")
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        parts = [self.va_sums, self.expr_cm, self.au_counts, self.au_hist]
        flat = torch.cat([p.reshape(-1) for p in parts]).to(dev)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.cpu()
        offset = 0
        for p in parts:
            p.copy_(flat[offset : offset + p.numel()].reshape(p.shape))
            offset += p.numel()
        if self.va_sample_size > 0:
            k = self.va_sample_size
            mine = torch.full((k, 5), -1.0, dtype=torch.float64)  # key -1: an empty slot
            mine[: self._sample_key.numel(), 0] = self._sample_key
            mine[: self._sample_key.numel(), 1:] = self._sample
            gathered = [torch.empty_like(mine, device=dev) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, mine.to(dev))
            allrows = torch.cat(gathered).cpu()
            allrows = allrows[allrows[:, 0] >= 0]
            self._sample_key, self._sample = torch.empty(0, dtype=torch.float64), torch.empty(0, 4, dtype=torch.float64)
            self._merge_sample(allrows[:, 0], allrows[:, 1:])
        self._reduced = True

    # ------------------------------------------------------------------------------------------ results

    def va_ccc(self) -> tuple[float, float]:
        return ccc_from_sums(*self.va_sums[0].tolist()), ccc_from_sums(*self.va_sums[1].tolist())

    def expr_f1_per_class(self) -> np.ndarray:
        cm = self.expr_cm.numpy()
        tp = np.diag(cm)
        return _f1(tp, cm.sum(0) - tp, cm.sum(1) - tp)

    def au_f1_per_unit(self) -> np.ndarray:
        tp, fp, fn = self.au_counts.numpy()
        return _f1(tp, fp, fn)

    def _au_threshold_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """F1 [12, bins+1] for thresholds k/bins, k = 0..bins (predict positive where prob >= threshold)."""
        neg, pos = self.au_hist.numpy()
        # frames with prob >= k/bins are those in bins k.. (reverse cumulative sum), k = bins: none
        tp = np.concatenate([np.cumsum(pos[:, ::-1], axis=1)[:, ::-1], np.zeros((NUM_AU, 1))], axis=1)
        fp = np.concatenate([np.cumsum(neg[:, ::-1], axis=1)[:, ::-1], np.zeros((NUM_AU, 1))], axis=1)
        fn = pos.sum(1, keepdims=True) - tp
        return np.arange(self.bins + 1) / self.bins, _f1(tp, fp, fn)

    def au_thresholds(self) -> np.ndarray:
        """Per-AU probability threshold maximising F1 on the data seen (ties: the one nearest 0.5)."""
        thr, f1 = self._au_threshold_curve()
        best = f1.max(axis=1, keepdims=True)
        dist_to_half = np.where(np.isclose(f1, best), np.abs(thr - 0.5)[None, :], np.inf)
        return thr[dist_to_half.argmin(axis=1)]

    def au_f1_tuned_per_unit(self) -> np.ndarray:
        return self._au_threshold_curve()[1].max(axis=1)

    def confusion(self) -> np.ndarray:
        """EXPR confusion matrix [8,8] (rows: label, columns: prediction), counts of frames."""
        return self.expr_cm.numpy().astype(np.int64)

    def va_sample(self) -> tuple[np.ndarray, np.ndarray]:
        """A uniform random subsample (at most ``va_sample_size``) of (pred [n,2], true [n,2]) VA pairs."""
        s = self._sample.numpy()
        return s[:, :2].copy(), s[:, 2:].copy()

    def compute(self) -> dict[str, float]:
        val, aro = self.va_ccc()
        expr = self.expr_f1_per_class()
        au = self.au_f1_per_unit()
        tuned = self.au_f1_tuned_per_unit()
        out: dict[str, float] = {
            "va_ccc_valence": val,
            "va_ccc_arousal": aro,
            "va_ccc": (val + aro) / 2,
            "expr_f1": float(expr.mean()),
            "au_f1": float(au.mean()),
            "au_f1_tuned": float(tuned.mean()),
        }
        out["mtl_score"] = out["va_ccc"] + out["expr_f1"] + out["au_f1"]
        out.update({f"expr_f1/{name}": float(v) for name, v in zip(EXPR_NAMES, expr)})
        out.update({f"au_f1/{name}": float(v) for name, v in zip(AU_NAMES, au)})
        out.update({f"au_f1_tuned/{name}": float(v) for name, v in zip(AU_NAMES, tuned)})
        out["va_frames"] = float(self.va_sums[0, 0])
        out["expr_frames"] = float(self.expr_cm.sum())
        out["au_frames"] = float(self.au_hist[:, 0].sum())
        return out


def summary_line(scores: dict[str, Any]) -> str:
    """The one-line JSON that `mtl demo`, `mtl train` and `mtl eval` end with."""
    keys = ("va_ccc", "expr_f1", "au_f1", "mtl_score")
    return json.dumps({k: round(float(scores[k]), 4) for k in keys if k in scores})
