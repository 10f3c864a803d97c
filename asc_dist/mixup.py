"""In-batch mixup (Zhang et al.): x' = lam*x + (1-lam)*x[perm], y' likewise on one-hot targets.

lambda ~ Beta(alpha, alpha), one per batch (default, as in the paper) or one per sample; the
partner of sample i is ``perm[i]`` for a random permutation of the batch.

Reproducibility: everything random is drawn from the ``generator`` passed in (the global RNG
when it is None). ``torch.distributions.Beta`` cannot take a generator, so Beta is sampled as
G1 / (G1 + G2) from two ``torch._standard_gamma`` draws, in float64 (with alpha = 0.3 a float32
Gamma draw underflows to 0 often enough to matter). lambda and the permutation are drawn on the
generator's device (a CPU generator is the usual choice: its state is easy to checkpoint) and
moved to x's device; they are B numbers, the mixing itself runs on x's device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_beta(alpha: float, n: int, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` float64 samples of Beta(alpha, alpha) from ``generator``."""
    if not alpha > 0:
        raise ValueError(f"Beta(alpha, alpha) needs alpha > 0, not {alpha}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    conc = torch.full((2, n), float(alpha), dtype=torch.float64, device=device)
    g = torch._standard_gamma(conc, generator=generator)
    total = g[0] + g[1]
    # Both draws underflowing is astronomically rare in float64; never return NaN for it.
    return torch.where(total > 0, g[0] / total.clamp_min(1e-300), torch.full_like(total, 0.5))


def mix(x: torch.Tensor, y_soft: torch.Tensor, lam: torch.Tensor | float,
        perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix ``x [B, ...]`` and ``y_soft [B, C]`` with their ``perm`` partners; ``lam`` scalar or [B]."""
    lam = torch.as_tensor(lam, dtype=torch.float32, device=x.device)
    perm = perm.to(x.device)
    lam_x = lam.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype) if lam.dim() else lam.to(x.dtype)
    lam_y = lam.reshape(-1, 1) if lam.dim() else lam
    x_mixed = lam_x * x + (1 - lam_x) * x[perm]
    y_mixed = lam_y * y_soft + (1 - lam_y) * y_soft[perm]
    return x_mixed, y_mixed


class Mixup:
    """``Mixup(num_classes, alpha, enabled, per_sample)(x, y [B] int64, generator) -> (x', y' [B, C])``.

    Disabled, it returns ``(x, one_hot(y))`` so the loss always sees soft targets. The last
    lambda and permutation are kept in ``last_lam`` / ``last_perm`` (for tests and logging).
    """

    def __init__(self, num_classes: int, alpha: float = 0.3, enabled: bool = True,
                 per_sample: bool = False):
        if enabled and not alpha > 0:
            raise ValueError(f"augment.mixup.alpha={alpha}: must be > 0 when mixup is enabled")
        self.num_classes = num_classes
        self.alpha = float(alpha)
        self.enabled = enabled
        self.per_sample = per_sample
        self.last_lam: torch.Tensor | None = None
        self.last_perm: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg_mixup, num_classes: int) -> Mixup:
        return cls(num_classes, alpha=cfg_mixup.alpha, enabled=cfg_mixup.enabled,
                   per_sample=cfg_mixup.per_sample)

    def mix_targets(self, t: torch.Tensor) -> torch.Tensor:
        """Another ``[B, C]`` target (a teacher's probabilities) mixed exactly like the labels of
        the last call: the same permutation and weights; unchanged when mixup is off."""
        if not self.enabled:
            return t
        lam = torch.as_tensor(self.last_lam, dtype=torch.float32, device=t.device)
        lam = lam.reshape(-1, 1) if lam.dim() else lam
        return lam * t + (1 - lam) * t[self.last_perm.to(t.device)]

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"mixup needs labels [B] for inputs [B, ...]; got {list(y.shape)} for {list(x.shape)}"
            )
        y_soft = F.one_hot(y.to(x.device), self.num_classes).float()
        if not self.enabled:
            return x, y_soft
        b = x.shape[0]
        device = generator.device if generator is not None else x.device
        lam = sample_beta(self.alpha, b if self.per_sample else 1, generator, device)
        lam = lam if self.per_sample else lam[0]
        perm = torch.randperm(b, generator=generator, device=device)
        self.last_lam, self.last_perm = lam, perm
        return mix(x, y_soft, lam.float(), perm)
