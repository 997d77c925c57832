"""Per-kind streaming metrics, pooled over every valid frame of every video of a split as ABAW scores them.

Only sufficient statistics are kept, so a whole validation set never sits in memory and ranks combine by summing
(``summed()``); ``gather()`` then merges what does not sum (a regression task's random subsample for plots).

- regression: CCC (population statistics) per column, and their mean (``<task>_ccc``);
- single-label: macro F1 over all classes from a confusion matrix (a class absent from both labels and
  predictions scores 0), predicting the arg-max class;
- multi-label: macro F1 over the units at probability 0.5, and ``<task>_f1_tuned`` with per-unit thresholds
  fitted on the same data (an optimistic figure on the split it is fitted on; apply ``thresholds()`` to another).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from mtl.tasks.base import Task


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


def _dist_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class TaskStream:
    """``update()`` per batch; ``summed()`` tensors are all-reduced in place by the caller, then ``gather()``."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def update(self, output: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> None:
        raise NotImplementedError

    def summed(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def gather(self) -> None:
        """Merge across ranks what does not add up (called on every rank after the sums)."""

    def scores(self) -> dict[str, float]:
        """Headline and per-column scores (``<task>_...``), and ``<task>_frames``."""
        raise NotImplementedError


class RegressionStream(TaskStream):
    def __init__(self, task: Task, sample_size: int = 5000, seed: int = 0, **_: object) -> None:
        super().__init__(task)
        self.sample_size = sample_size
        self._gen = torch.Generator().manual_seed(seed)
        w = task.width
        self.sums = torch.zeros(w, 6, dtype=torch.float64)  # per column: n, sum x, sum y, sum x^2, sum y^2, sum xy
        self._sample_key = torch.empty(0, dtype=torch.float64)
        self._sample = torch.empty(0, 2 * w, dtype=torch.float64)  # predicted columns, then true columns

    def update(self, output: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> None:
        w = self.task.width
        dev = output.device
        valid = valid.to(dev)
        x = output.detach().reshape(-1, w)[valid].double()
        y = target.reshape(-1, w).to(dev)[valid].double()
        n = x.new_full((w,), float(x.shape[0]))
        sums = torch.stack([n, x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0)], dim=1)
        self.sums += sums.cpu()
        if self.sample_size > 0 and x.shape[0]:
            key = torch.rand(x.shape[0], generator=self._gen, dtype=torch.float64)
            self._merge_sample(key, torch.cat([x, y], dim=1).cpu())

    def _merge_sample(self, key: torch.Tensor, rows: torch.Tensor) -> None:
        """Keep the rows with the largest random keys: a uniform subsample that merges across batches and ranks."""
        key = torch.cat([self._sample_key, key])
        rows = torch.cat([self._sample, rows])
        if key.numel() > self.sample_size:
            key, idx = key.topk(self.sample_size)
            rows = rows[idx]
        self._sample_key, self._sample = key, rows

    def summed(self) -> list[torch.Tensor]:
        return [self.sums]

    def gather(self) -> None:
        if self.sample_size <= 0:
            return
        k, cols = self.sample_size, self._sample.shape[1]
        dev = _dist_device()
        mine = torch.full((k, 1 + cols), -1.0, dtype=torch.float64)  # key -1: an empty slot
        mine[: self._sample_key.numel(), 0] = self._sample_key
        mine[: self._sample_key.numel(), 1:] = self._sample
        gathered = [torch.empty_like(mine, device=dev) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine.to(dev))
        allrows = torch.cat(gathered).cpu()
        allrows = allrows[allrows[:, 0] >= 0]
        self._sample_key, self._sample = torch.empty(0, dtype=torch.float64), torch.empty(0, cols, dtype=torch.float64)
        self._merge_sample(allrows[:, 0], allrows[:, 1:])

    def ccc(self) -> list[float]:
        return [ccc_from_sums(*row.tolist()) for row in self.sums]

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """A uniform random subsample (at most ``sample_size``) of (pred [n,width], true [n,width]) pairs."""
        s, w = self._sample.numpy(), self.task.width
        return s[:, :w].copy(), s[:, w:].copy()

    def scores(self) -> dict[str, float]:
        name, ccc = self.task.name, self.ccc()
        out = {f"{name}_ccc_{col}": v for col, v in zip(self.task.columns, ccc)}
        out[f"{name}_ccc"] = float(np.mean(ccc))
        out[f"{name}_frames"] = float(self.sums[0, 0])
        return out


class ClassStream(TaskStream):
    def __init__(self, task: Task, **_: object) -> None:
        super().__init__(task)
        k = task.width
        self.cm = torch.zeros(k, k, dtype=torch.float64)  # rows: label, columns: prediction

    def update(self, output: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> None:
        k = self.task.width
        dev = output.device
        valid = valid.to(dev)
        pred = output.detach().reshape(-1, k).argmax(-1)[valid]
        t = target.reshape(-1).to(dev)[valid].long()
        cm = torch.bincount(t * k + pred, minlength=k * k)
        self.cm += cm.reshape(k, k).cpu().double()

    def summed(self) -> list[torch.Tensor]:
        return [self.cm]

    def f1_per_class(self) -> np.ndarray:
        cm = self.cm.numpy()
        tp = np.diag(cm)
        return _f1(tp, cm.sum(0) - tp, cm.sum(1) - tp)

    def confusion(self) -> np.ndarray:
        """Confusion matrix [K,K] (rows: label, columns: prediction), counts of frames."""
        return self.cm.numpy().astype(np.int64)

    def scores(self) -> dict[str, float]:
        name, f1 = self.task.name, self.f1_per_class()
        out = {f"{name}_f1": float(f1.mean())}
        out.update({f"{name}_f1/{c}": float(v) for c, v in zip(self.task.columns, f1)})
        out[f"{name}_frames"] = float(self.cm.sum())
        return out


class MultiLabelStream(TaskStream):
    def __init__(self, task: Task, bins: int = 1000, **_: object) -> None:
        super().__init__(task)
        self.bins = bins
        j = task.width
        self.counts = torch.zeros(3, j, dtype=torch.float64)  # TP, FP, FN at 0.5
        self.hist = torch.zeros(2, j, bins, dtype=torch.float64)  # [negatives, positives] by probability bin

    def update(self, output: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> None:
        j = self.task.width
        dev = output.device
        valid = valid.to(dev)
        prob = torch.sigmoid(output.detach().float().reshape(-1, j)[valid])
        y = target.reshape(-1, j).to(dev)[valid] > 0.5
        hit = prob >= 0.5
        counts = torch.stack([(hit & y).sum(0), (hit & ~y).sum(0), (~hit & y).sum(0)])
        self.counts += counts.cpu().double()
        b = (prob * self.bins).long().clamp_(0, self.bins - 1)
        unit = torch.arange(j, device=dev).expand_as(b)
        idx = (y.long() * j + unit) * self.bins + b
        hist = torch.bincount(idx.reshape(-1), minlength=2 * j * self.bins)
        self.hist += hist.reshape(2, j, self.bins).cpu().double()

    def summed(self) -> list[torch.Tensor]:
        return [self.counts, self.hist]

    def f1_per_unit(self) -> np.ndarray:
        tp, fp, fn = self.counts.numpy()
        return _f1(tp, fp, fn)

    def _threshold_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """F1 [J, bins+1] for thresholds k/bins, k = 0..bins (predict positive where prob >= threshold)."""
        neg, pos = self.hist.numpy()
        j = self.task.width
        # frames with prob >= k/bins are those in bins k.. (reverse cumulative sum), k = bins: none
        tp = np.concatenate([np.cumsum(pos[:, ::-1], axis=1)[:, ::-1], np.zeros((j, 1))], axis=1)
        fp = np.concatenate([np.cumsum(neg[:, ::-1], axis=1)[:, ::-1], np.zeros((j, 1))], axis=1)
        fn = pos.sum(1, keepdims=True) - tp
        return np.arange(self.bins + 1) / self.bins, _f1(tp, fp, fn)

    def thresholds(self) -> np.ndarray:
        """Per-unit probability threshold maximising F1 on the data seen (ties: the one nearest 0.5)."""
        thr, f1 = self._threshold_curve()
        best = f1.max(axis=1, keepdims=True)
        dist_to_half = np.where(np.isclose(f1, best), np.abs(thr - 0.5)[None, :], np.inf)
        return thr[dist_to_half.argmin(axis=1)]

    def f1_tuned_per_unit(self) -> np.ndarray:
        return self._threshold_curve()[1].max(axis=1)

    def scores(self) -> dict[str, float]:
        name, cols = self.task.name, self.task.columns
        f1, tuned = self.f1_per_unit(), self.f1_tuned_per_unit()
        out = {f"{name}_f1": float(f1.mean()), f"{name}_f1_tuned": float(tuned.mean())}
        out.update({f"{name}_f1/{c}": float(v) for c, v in zip(cols, f1)})
        out.update({f"{name}_f1_tuned/{c}": float(v) for c, v in zip(cols, tuned)})
        out[f"{name}_frames"] = float(self.hist[:, 0].sum())
        return out
