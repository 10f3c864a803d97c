"""Optimisers (AdaBound, Adam, SGD) and the step-decay schedule with optional linear warmup.

The schedule is stepped once per iteration and is closed form, so it is exact at any
iteration and after a resume:  lr(it) = lr0 * warmup(it) * decay_factor ** (it // decay_every),
warmup(it) = min(1, (it + 1) / warmup_iters) (1 when warmup_iters = 0).

AdaBound (Luo et al.) clips Adam's per-element step size to [lower(t), upper(t)], bounds that
both converge to final_lr * lr / base_lr; base_lr is the lr the optimiser was built with, so an
lr schedule (warmup included) scales the SGD bound too, as the package intends. The package
(adabound 0.0.5) uses overloads torch deprecates (a UserWarning per process) and keeps base_lr
outside the state dict. :class:`AdaBound` below is the same update written with keyword-form
ops (bit-identical) and keeps base_lr in each param group, so it round-trips through
state_dict; rebuilding the optimiser with the original lr before load_state_dict (what the
trainer does anyway) also works with state dicts written by the package.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import adabound
import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

_BASE_LR = "bound_base_lr"


class AdaBound(adabound.AdaBound):
    """adabound.AdaBound without deprecated torch calls; base_lr stored per param group."""

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        # The package zips groups with base_lrs captured in __init__, silently skipping groups
        # added later; a per-group value has no such gap and is saved with the group.
        self.param_groups[-1].setdefault(_BASE_LR, self.param_groups[-1]["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            base_lr = group.get(_BASE_LR)
            if base_lr is None:  # a group loaded from the package's own state dict
                base_lr = group[_BASE_LR] = self.base_lrs[i]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("AdaBound does not support sparse gradients")
                amsbound = group["amsbound"]
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if amsbound:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                step = state["step"]

                if group["weight_decay"] != 0:
                    grad = grad.add(p, alpha=group["weight_decay"])
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if amsbound:
                    max_exp_avg_sq = state["max_exp_avg_sq"]
                    torch.max(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
                    denom = max_exp_avg_sq.sqrt().add_(group["eps"])
                else:
                    denom = exp_avg_sq.sqrt().add_(group["eps"])

                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1
                final_lr = group["final_lr"] * group["lr"] / base_lr
                lower, upper = bounds(final_lr, group["gamma"], step)
                step_size = torch.full_like(denom, step_size)
                step_size.div_(denom).clamp_(lower, upper).mul_(exp_avg)
                p.add_(-step_size)
        return loss


def bounds(final_lr: float, gamma: float, step: int) -> tuple[float, float]:
    """AdaBound's step-size bounds at ``step`` (>= 1); both tend to final_lr."""
    return final_lr * (1 - 1 / (gamma * step + 1)), final_lr * (1 + 1 / (gamma * step))


def build_optimizer(cfg_optim: Any, params: Iterable) -> torch.optim.Optimizer:
    """``cfg.optim``: name adabound (lr, final_lr, gamma, weight_decay) | adam | sgd (momentum)."""
    name = getattr(cfg_optim, "name", "adabound")
    lr = float(cfg_optim.lr)
    wd = float(getattr(cfg_optim, "weight_decay", 0.0))
    if name == "adabound":
        return AdaBound(params, lr=lr, final_lr=float(getattr(cfg_optim, "final_lr", 0.1)),
                        gamma=float(getattr(cfg_optim, "gamma", 1e-3)), weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(getattr(cfg_optim, "momentum", 0.9)),
                               weight_decay=wd)
    raise ValueError(f"optim.name={name!r}: must be one of adabound, adam, sgd")


def lr_factor(it: int, decay_every: int = 200, decay_factor: float = 0.9,
              warmup_iters: int = 0) -> float:
    """Multiplier of the base lr at iteration ``it`` (0-based)."""
    factor = decay_factor ** (it // decay_every)
    if warmup_iters > 0:
        factor *= min(1.0, (it + 1) / warmup_iters)
    return factor


def build_scheduler(cfg_optim: Any, optimizer: torch.optim.Optimizer) -> LRScheduler:
    """Per-iteration step decay (+ warmup). Call ``scheduler.step()`` after each optimizer step.

    A LambdaLR over a plain function: its state_dict holds only counters (weights_only-safe),
    and the schedule itself always comes from the current config.
    """
    decay_every = int(getattr(cfg_optim, "decay_every", 200))
    decay_factor = float(getattr(cfg_optim, "decay_factor", 0.9))
    warmup_iters = int(getattr(cfg_optim, "warmup_iters", 0) or 0)
    if decay_every <= 0:
        raise ValueError(f"optim.decay_every={decay_every}: must be > 0")
    if not decay_factor > 0:
        raise ValueError(f"optim.decay_factor={decay_factor}: must be > 0")
    if warmup_iters < 0:
        raise ValueError(f"optim.warmup_iters={warmup_iters}: must be >= 0")

    def factor(it: int) -> float:
        return lr_factor(it, decay_every, decay_factor, warmup_iters)

    return LambdaLR(optimizer, factor)
