"""Training objectives: CCC loss for VA, focal losses for EXPR and AU, each masked by label validity.

Masks are applied as weights (no boolean indexing), so a batch without a valid label for a task yields a term of
exactly 0.0 with zero gradients instead of NaN, and nothing waits on the GPU to learn how many frames are valid.

Class weights ("auto", from the training split's counts in the manifest) follow the balanced formula
(scikit-learn's ``class_weight="balanced"``), so the average weight per labelled frame is 1 and the loss scale
stays that of the unweighted loss:

- EXPR, class c with n_c of N labelled frames, K classes present in the training split (8 normally):
  ``alpha_c = N / (K * n_c)``; a class absent from the training split gets the largest alpha of the present ones.
- AU j with P_j positives of N labelled frames: positives weigh ``N / (2 * P_j)``, negatives ``N / (2 * (N - P_j))``
  (counts clamped to at least 1). A list ``loss.au_alpha`` uses the RetinaNet form instead: positives ``a_j``,
  negatives ``1 - a_j``. ``"none"``: every weight 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtl.config import ConfigError, LossConfig
from mtl.constants import NUM_AU, NUM_EXPR
from mtl.errors import MtlError

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


def expr_alpha(spec: str | list[float], stats: dict[str, Any] | None) -> torch.Tensor | None:
    """Per-class alpha [8] from ``loss.expr_alpha`` and the training split's ``tasks`` stats (see module doc)."""
    if spec == "none":
        return None
    if isinstance(spec, list):
        return _as_vector(spec, NUM_EXPR, "loss.expr_alpha")
    counts = _counts(stats, "expr", "class_counts", NUM_EXPR, "loss.expr_alpha")
    total = counts.sum()
    present = counts > 0
    alpha = torch.zeros(NUM_EXPR, dtype=torch.float64)
    alpha[present] = total / (present.sum() * counts[present])
    alpha[~present] = alpha[present].max()
    return alpha.float()


def au_weights(spec: str | list[float], stats: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(positive, negative) weights [12] from ``loss.au_alpha`` and the training split's stats (see module doc)."""
    if spec == "none":
        return None
    if isinstance(spec, list):
        a = _as_vector(spec, NUM_AU, "loss.au_alpha")
        if (a > 1).any():
            raise ConfigError(f"loss.au_alpha: expected values in [0, 1] (weight of positives), got {spec}")
        return a, 1 - a
    pos = _counts(stats, "au", "positive_counts", NUM_AU, "loss.au_alpha")
    total = float((stats or {})["au"].get("labeled_frames", 0))
    if total <= 0 or (pos > total).any():
        raise MtlError(f"loss.au_alpha='auto': the manifest's au stats are inconsistent (labeled_frames={total})")
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


class MultiTaskLoss(nn.Module):
    """``loss_fn(outputs, batch, use_imageless=False) -> (total, parts)``; parts are detached per-task terms."""

    def __init__(self, cfg: LossConfig, train_stats: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.gamma = cfg.focal_gamma
        self.weights = dict(cfg.weights)
        alpha = expr_alpha(cfg.expr_alpha, train_stats)
        self.register_buffer("expr_alpha", alpha, persistent=False)
        au = au_weights(cfg.au_alpha, train_stats)
        self.register_buffer("au_pos_weight", None if au is None else au[0], persistent=False)
        self.register_buffer("au_neg_weight", None if au is None else au[1], persistent=False)

    def forward(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, Any], use_imageless: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        frame_ok = ~batch["pad"]
        if not use_imageless:
            frame_ok = frame_ok & batch["has_image"]

        def valid(task: str) -> torch.Tensor:
            return (batch[f"{task}_valid"] & frame_ok).reshape(-1)

        va_pred = outputs["va"].float().reshape(-1, 2)
        va = ccc_loss(va_pred, batch["va"].float().reshape(-1, 2), valid("va")).mean()
        expr = softmax_focal_loss(
            outputs["expr"].float().reshape(-1, NUM_EXPR),
            batch["expr"].reshape(-1),
            valid("expr"),
            self.gamma,
            self.expr_alpha,
        )
        au = sigmoid_focal_loss(
            outputs["au"].float().reshape(-1, NUM_AU),
            batch["au"].float().reshape(-1, NUM_AU),
            valid("au"),
            self.gamma,
            self.au_pos_weight,
            self.au_neg_weight,
        )
        parts = {"va": va, "expr": expr, "au": au}
        total = sum(self.weights[k] * v for k, v in parts.items())
        return total, {k: v.detach() for k, v in parts.items()}
