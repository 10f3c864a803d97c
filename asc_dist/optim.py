"""Optimisers (AdaBound, Adam, AdamW, SGD) and the learning-rate schedules.

Schedules are stepped once per iteration and are closed form, so they are exact at any
iteration and after a resume:

* ``step`` (the 2018 paper): lr(it) = lr0 * warmup(it) * decay_factor ** (it // decay_every),
  warmup(it) = min(1, (it + 1) / warmup_iters) (1 when warmup_iters = 0).
* ``cosine`` (the DCASE 2024 baseline's ``transformers.get_cosine_schedule_with_warmup``, as
  written there): it / warmup_iters during the warm-up (0 at the first step), then
  0.5 * (1 + cos(pi * progress)) with progress = (it - warmup) / (max_iters - warmup): 0 at
  it = max_iters, so the last update (it = max_iters - 1) still takes a small step.
* ``exp_warmup_linear_down`` (CP-JKU's PaSST teacher, cpjku_dcase23 helpers/lr_schedule.py):
  a factor per *epoch* e = it // steps_per_epoch (their LambdaLR is stepped once per epoch by
  Lightning, so every step of epoch e runs at factor(e)): exp(-5 (1 - e'/W)^2) with e' = e
  clipped to [0.5, W] while e < W (epoch 0 thus starts at exp(-5 (1 - 0.5/W)^2), 0.031 for
  W = 3, not exp(-5)), times 1 up to epoch S, then last + (1 - last) (R - e + S) / R while
  e - S < R, then ``last`` (``optim.ramp``: W warmup, S rampdown_start, R rampdown).

AdaBound (Luo et al.) clips Adam's per-element step size to [lower(t), upper(t)], bounds that
both converge to final_lr * lr / base_lr; base_lr is the lr the optimiser was built with, so an
lr schedule (warmup included) scales the SGD bound too, as the package intends. The package
(adabound 0.0.5) uses overloads torch deprecates (a UserWarning per process) and keeps base_lr
outside the state dict. :class:`AdaBound` below is the same update written as multi-tensor
ops (bit-identical on the CPU) and keeps base_lr in each param group, so it round-trips through
state_dict; rebuilding the optimiser with the original lr before load_state_dict (what the
trainer does anyway) also works with state dicts written by the package.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import adabound
import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from asc_dist.config import OptimConfig

_BASE_LR = "bound_base_lr"


class AdaBound(adabound.AdaBound):
    """adabound.AdaBound as multi-tensor ops; base_lr stored per param group.

    The update is the package's, op for op, but each op runs once for all parameters of a group
    (``torch._foreach_*``) instead of once per tensor: ~14 launches per step for ResNet-50's 161
    parameter tensors instead of ~1,900 (measured in tests/test_optim.py), which on a GPU is the
    difference between a host-bound and a device-bound step. On the CPU the results are
    bit-identical to the package's; the state dict has the package's layout.
    """

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
            if group.get(_BASE_LR) is None:  # a group loaded from the package's own state dict
                group[_BASE_LR] = self.base_lrs[i]
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("AdaBound does not support sparse gradients")
            # Parameters that missed a step (no gradient) count steps of their own; they are
            # updated in their own batch. Normally there is one batch per group.
            by_step: dict[int, list[torch.Tensor]] = {}
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsbound"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                by_step.setdefault(state["step"], []).append(p)
            for step, ps in by_step.items():
                self._update(group, ps, step)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor], step: int) -> None:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        grads = [p.grad for p in params]
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        if group["amsbound"]:
            max_sqs = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(max_sqs, exp_avg_sqs)
            denom = torch._foreach_sqrt(max_sqs)
        else:
            denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, group["eps"])

        step_size = group["lr"] * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
        final_lr = group["final_lr"] * group["lr"] / group[_BASE_LR]
        lower, upper = bounds(final_lr, group["gamma"], step)
        # The package divides a tensor full of step_size by denom: the same rounding as here.
        steps = torch._foreach_mul(denom, 0.0)
        torch._foreach_add_(steps, step_size)
        torch._foreach_div_(steps, denom)
        torch._foreach_clamp_min_(steps, lower)
        torch._foreach_clamp_max_(steps, upper)
        torch._foreach_mul_(steps, exp_avgs)
        torch._foreach_sub_(params, steps)


def bounds(final_lr: float, gamma: float, step: int) -> tuple[float, float]:
    """AdaBound's step-size bounds at ``step`` (>= 1); both tend to final_lr."""
    return final_lr * (1 - 1 / (gamma * step + 1)), final_lr * (1 + 1 / (gamma * step))


def build_optimizer(cfg_optim: OptimConfig, params: Iterable) -> torch.optim.Optimizer:
    """``cfg.optim``: adabound (lr, final_lr, gamma, weight_decay) | adam | adamw (decoupled
    weight decay) | sgd (momentum)."""
    o = cfg_optim
    if o.name == "adabound":
        return AdaBound(params, lr=o.lr, final_lr=o.final_lr, gamma=o.gamma, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def lr_factor(it: int, decay_every: int = 200, decay_factor: float = 0.9,
              warmup_iters: int = 0) -> float:
    """Multiplier of the base lr at iteration ``it`` (0-based)."""
    factor = decay_factor ** (it // decay_every)
    if warmup_iters > 0:
        factor *= min(1.0, (it + 1) / warmup_iters)
    return factor


def cosine_factor(it: int, max_iters: int, warmup_iters: int = 0) -> float:
    """transformers' get_cosine_schedule_with_warmup (num_cycles 0.5) at iteration ``it``."""
    if it < warmup_iters:
        return it / max(1, warmup_iters)
    progress = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def exp_warmup_linear_down(epoch: int, warmup: int, rampdown_start: int, rampdown: int,
                           last_value: float) -> float:
    """CP-JKU's factor at ``epoch`` (0-based): their exp_rampup times their linear_rampdown."""
    up = 1.0
    if epoch < warmup:
        phase = 1.0 - min(max(epoch, 0.5), warmup) / warmup
        up = math.exp(-5.0 * phase * phase)
    if epoch <= rampdown_start:
        down = 1.0
    elif epoch - rampdown_start < rampdown:
        down = last_value + (1.0 - last_value) * (rampdown - epoch + rampdown_start) / rampdown
    else:
        down = last_value
    return up * down


def build_scheduler(cfg_optim: OptimConfig, optimizer: torch.optim.Optimizer,
                    max_iters: int | None = None, steps_per_epoch: int | None = None
                    ) -> LRScheduler:
    """Per-iteration schedule (``optim.schedule``). Call ``scheduler.step()`` after each
    optimizer step; ``max_iters`` is the run's length (the cosine's end), ``steps_per_epoch``
    the training split's (exp_warmup_linear_down's epochs).

    A LambdaLR over a plain function: its state_dict holds only counters (weights_only-safe),
    and the schedule itself always comes from the current config.
    """
    o = cfg_optim
    if o.schedule == "cosine" and not max_iters:
        raise ValueError("optim.schedule=cosine needs the run's length (max_iters)")
    if o.schedule == "exp_warmup_linear_down" and not steps_per_epoch:
        raise ValueError("optim.schedule=exp_warmup_linear_down needs the steps per epoch")

    def factor(it: int) -> float:
        if o.schedule == "cosine":
            return cosine_factor(it, max_iters, o.warmup_iters)
        if o.schedule == "exp_warmup_linear_down":
            r = o.ramp
            return exp_warmup_linear_down(it // steps_per_epoch, r.warmup, r.rampdown_start,
                                          r.rampdown, r.last_value)
        return lr_factor(it, o.decay_every, o.decay_factor, o.warmup_iters)

    return LambdaLR(optimizer, factor)
