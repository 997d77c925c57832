"""Per-kind loss terms: CCC for regression, softmax focal for single-label, sigmoid focal for multi-label tasks.

Every term is masked by label validity through weights (no boolean indexing), so a batch without a valid label for
a task yields a term of exactly 0.0 with zero gradients instead of NaN, and nothing waits on the GPU to learn how
many frames are valid.

Class weights (a task's ``loss.tasks.<name>.alpha``, checked by its options model in `mtl.tasks.options`; "auto":
from the training split's counts in the manifest) follow the balanced formula
(scikit-learn's ``class_weight="balanced"``), so the average weight per labelled frame is 1 and the loss scale
stays that of the unweighted loss:

- single-label, class c with n_c of N labelled frames, K classes present in the training split:
  ``alpha_c = N / (K * n_c)``; a class absent from the training split gets the largest alpha of the present ones.
- multi-label, unit j with P_j positives of N labelled frames: positives weigh ``N / (2 * P_j)``, negatives
  ``N / (2 * (N - P_j))`` (counts clamped to at least 1). A list uses the RetinaNet form instead: positives
  ``a_j``, negatives ``1 - a_j``. ``"none"``: every weight 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtl.errors import ConfigError, MtlError
from mtl.tasks.base import Task

_EPS = 1e-8


def ccc_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``1 - CCC`` per column of [N,D] ``pred``/``target``, pooled over rows with 0/1 ``weight`` [N] -> [D].

    Population statistics (ddof 0) as ABAW scores CCC. Fewer than 2 valid rows: 0 (no signal, no NaN); zero
    variance in both and equal means: CCC taken as 0, so the loss is 1 and finite.
    """
    w = weight.to(pred.dtype).unsqueeze(-1)
    n = w.sum(0)
    n_safe = n.clamp_min(1.0)
    mx = (w * pred).sum(0) / n_safe
    my = (w * target).sum(0) / n_safe
    dx, dy = pred - mx, target - my
    vx = (w * dx * dx).sum(0) / n_safe
    vy = (w * dy * dy).sum(0) / n_safe
    cov = (w * dx * dy).sum(0) / n_safe
    ccc = 2 * cov / (vx + vy + (mx - my) ** 2).clamp_min(_EPS)
    return torch.where(n >= 2, 1.0 - ccc, torch.zeros_like(ccc))


def softmax_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, gamma: float, alpha: torch.Tensor | None
) -> torch.Tensor:
    """Mean over valid rows of ``-alpha_t (1 - p_t)^gamma log p_t``; logits [N,K], target [N], weight [N]."""
    logp = F.log_softmax(logits, dim=-1).gather(-1, target.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    loss = -((1 - logp.exp()) ** gamma) * logp
    if alpha is not None:
        loss = loss * alpha.to(loss)[target.clamp(0, logits.shape[-1] - 1)]
    w = weight.to(loss.dtype)
    return (loss * w).sum() / w.sum().clamp_min(1.0)


def sigmoid_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    gamma: float,
    pos_weight: torch.Tensor | None,
    neg_weight: torch.Tensor | None,
) -> torch.Tensor:
    """Mean over valid rows and the J units of the binary focal loss; logits/target [N,J], weight [N]."""
    p = torch.sigmoid(logits)
    log_p = F.logsigmoid(logits)
    log_1mp = F.logsigmoid(-logits)
    pos = -((1 - p) ** gamma) * log_p
    neg = -(p**gamma) * log_1mp
    if pos_weight is not None and neg_weight is not None:
        pos = pos * pos_weight.to(pos)
        neg = neg * neg_weight.to(neg)
    loss = target * pos + (1 - target) * neg
    w = weight.to(loss.dtype).unsqueeze(-1)
    return (loss * w).sum() / (w.sum() * logits.shape[-1]).clamp_min(1.0)


# ------------------------------------------------------------------------------------------------ class weights


def class_alpha(spec: str | list[float], stats: dict[str, Any] | None, task: Task) -> torch.Tensor | None:
    """Per-class alpha [K] of a single-label task from its ``alpha`` option and the training split's stats."""
    if spec == "none":
        return None
    key = f"{task.options_key}.alpha"
    k = task.width
    if isinstance(spec, list):
        return _as_vector(spec, k, key)
    counts = _counts(stats, task.name, "class_counts", k, key)
    total = counts.sum()
    present = counts > 0
    alpha = torch.zeros(k, dtype=torch.float64)
    alpha[present] = total / (present.sum() * counts[present])
    alpha[~present] = alpha[present].max()
    return alpha.float()


def pos_neg_weights(
    spec: str | list[float], stats: dict[str, Any] | None, task: Task
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(positive, negative) weights [J] of a multi-label task from its ``alpha`` option and the training stats."""
    if spec == "none":
        return None
    key = f"{task.options_key}.alpha"
    j = task.width
    if isinstance(spec, list):
        a = _as_vector(spec, j, key)
        if (a > 1).any():
            raise ConfigError(f"{key}: expected values in [0, 1] (weight of positives), got {spec}")
        return a, 1 - a
    pos = _counts(stats, task.name, "positive_counts", j, key)
    total = float((stats or {})[task.name].get("labeled_frames", 0))
    if total <= 0 or (pos > total).any():
        raise MtlError(f"{key}='auto': the manifest's {task.name} stats are inconsistent (labeled_frames={total})")
    neg = total - pos
    return (total / (2 * pos.clamp_min(1))).float(), (total / (2 * neg.clamp_min(1))).float()


def _as_vector(values: list[float], n: int, key: str) -> torch.Tensor:
    if len(values) != n or any(v < 0 for v in values):
        raise ConfigError(f"{key}: expected 'auto', 'none' or a list of {n} non-negative numbers, got {values}")
    return torch.tensor(values, dtype=torch.float32)


def _counts(stats: dict[str, Any] | None, task: str, field: str, n: int, key: str) -> torch.Tensor:
    try:
        counts = torch.tensor([float(c) for c in (stats or {})[task][field]], dtype=torch.float64)
    except (KeyError, TypeError, ValueError):
        raise MtlError(
            f"{key}='auto' needs the training split's {task}.{field} from the manifest; none given "
            f"(set {key} to 'none' or a list)"
        ) from None
    if counts.numel() != n or (counts < 0).any():
        raise MtlError(f"{key}='auto': manifest {task}.{field} should be {n} counts >= 0, got {counts.tolist()}")
    if counts.sum() <= 0:
        raise MtlError(f"{key}='auto': the training split has no {task} labels; set {key} to 'none' or a list")
    return counts


# ------------------------------------------------------------------------------------------------ terms


class CCCTerm(nn.Module):
    """Mean over the columns of ``1 - CCC``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        w = self.width
        return ccc_loss(output.float().reshape(-1, w), target.float().reshape(-1, w), weight).mean()


class SoftmaxFocalTerm(nn.Module):
    def __init__(self, width: int, gamma: float, alpha: torch.Tensor | None) -> None:
        super().__init__()
        self.width, self.gamma = width, gamma
        self.register_buffer("alpha", alpha, persistent=False)

    def forward(self, output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        logits = output.float().reshape(-1, self.width)
        return softmax_focal_loss(logits, target.reshape(-1), weight, self.gamma, self.alpha)


class SigmoidFocalTerm(nn.Module):
    def __init__(self, width: int, gamma: float, weights: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        super().__init__()
        self.width, self.gamma = width, gamma
        self.register_buffer("pos_weight", None if weights is None else weights[0], persistent=False)
        self.register_buffer("neg_weight", None if weights is None else weights[1], persistent=False)

    def forward(self, output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        w = self.width
        logits, y = output.float().reshape(-1, w), target.float().reshape(-1, w)
        return sigmoid_focal_loss(logits, y, weight, self.gamma, self.pos_weight, self.neg_weight)
