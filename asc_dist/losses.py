"""Focal loss and cross-entropy on hard labels ``[B]`` or soft (mixup) targets ``[B, C]``.

Soft-target focal loss is ``FL = -sum_c y_c alpha_c (1 - p_c)^gamma log p_c``, averaged over
the batch. It is linear in ``y``, so a mixup target ``lam*y_a + (1-lam)*y_b`` gives exactly
``lam*FL(y_a) + (1-lam)*FL(y_b)``; the "p_t = sum_c y_c p_c" form is not. With hard labels it
is the usual ``-alpha_t (1 - p_t)^gamma log p_t``.

Numerics: log_softmax runs in float32 with autocast off (bf16 logits lose too much near
p = 1); ``1 - p`` is computed as ``-expm1(log p)``, exact for p near 1 where ``1 - exp(log p)``
rounds to 0, and floored at a tiny positive value so ``pow`` never sees 0 (whose gradient is
inf for gamma < 1, and inf * 0 = NaN). gamma == 0 skips the power entirely: the loss is then
exactly alpha-weighted cross-entropy, gradients included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asc_dist.config import LossConfig

_TINY = 1e-30  # floor for (1 - p): well above float32's smallest normal (1.2e-38)


def _soft_targets(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Hard ``[B]`` int labels -> one-hot float32; soft ``[B, C]`` -> float32, shapes checked."""
    b, c = logits.shape
    if target.dim() == 1 and not target.is_floating_point():
        if target.shape[0] != b:
            raise ValueError(f"labels have {target.shape[0]} entries for {b} logits rows")
        # On CUDA one_hot checks the range itself; an explicit check here would sync every step.
        if target.device.type == "cpu" and target.numel() and (
            int(target.min()) < 0 or int(target.max()) >= c
        ):
            raise ValueError(
                f"labels out of range [0, {c}): min {int(target.min())}, max {int(target.max())}"
            )
        return F.one_hot(target, c).float()
    if target.shape != logits.shape:
        raise ValueError(
            f"soft targets must have the logits' shape {list(logits.shape)}; got "
            f"{list(target.shape)} ({target.dtype})"
        )
    return target.float()


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C]; got shape {list(logits.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.log_softmax(logits.float(), dim=-1)


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al.) with per-class alpha, for hard or soft targets."""

    def __init__(self, num_classes: int, gamma: float = 2.0, alpha: float | list[float] = 1.0):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"loss.gamma={gamma}: must be >= 0")
        alpha_t = torch.as_tensor(list(alpha) if not isinstance(alpha, (int, float)) else alpha,
                                  dtype=torch.float32)
        if alpha_t.dim() == 0:
            alpha_t = alpha_t.expand(num_classes).clone()
        if alpha_t.shape != (num_classes,):
            raise ValueError(f"loss.alpha has {alpha_t.numel()} entries but num_classes={num_classes}")
        if (alpha_t < 0).any():
            raise ValueError(f"loss.alpha={alpha_t.tolist()}: weights must be >= 0")
        self.num_classes = num_classes
        self.gamma = float(gamma)
        # A buffer, not a parameter: moves with .to(device), is saved, and no optimiser touches it.
        self.register_buffer("alpha", alpha_t)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = _log_probs(logits)
        y = _soft_targets(target, logits)
        weight = self.alpha
        if self.gamma != 0:
            one_minus_p = (-torch.expm1(logp)).clamp_min(_TINY)
            weight = weight * one_minus_p.pow(self.gamma)
        return -(y * weight * logp).sum(dim=-1).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, gamma={self.gamma}"


class SoftCrossEntropy(nn.Module):
    """Cross-entropy (NLL of log_softmax) for hard labels or soft targets, in float32."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = _log_probs(logits)
        return -(_soft_targets(target, logits) * logp).sum(dim=-1).mean()


def build_loss(cfg_loss: LossConfig, num_classes: int) -> nn.Module:
    """``cfg.loss``: focal (gamma, alpha) | ce (gamma and alpha unused)."""
    if cfg_loss.name == "ce":
        return SoftCrossEntropy()
    alpha = cfg_loss.alpha
    if not isinstance(alpha, (int, float)):
        alpha = [float(a) for a in alpha]  # ListConfig -> list
    return FocalLoss(num_classes, gamma=float(cfg_loss.gamma), alpha=alpha)
