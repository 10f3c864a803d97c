"""The throughput rows of ``bench gpu``: what the model, a plain loop and the trainer reach.

Each row is a :class:`~asc_dist.bench.plan.Variant` of the plan (its batch, warm-up and timed
steps). At each per-GPU batch: our model + loss + AdaBound on one resident batch (the ceiling), a plain
PyTorch loop as a user would write it (torchvision ResNet-50, fused Adam, bf16, channels_last,
features resident), and the real trainer (a subprocess, its own metrics.jsonl) with each data
backend, cached and streamed. Step times come from CUDA events on a GPU; model FLOP utilisation
(MFU) from the forward's counted FLOPs x 3 against the device's dense bf16 peak.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from asc_dist.bench.plan import Variant
from asc_dist.bench.train import run_trainer, summarize_train

# Dense bf16 peak of known accelerators, for the model FLOP utilisation (MFU).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def train_args(ctx, run_dir: Path, *extra: str) -> list[str]:
    bf16 = "bf16" if ctx.device.type == "cuda" else "fp32"
    return [*ctx.features, ctx.model, "model.pretrained=none", f"data.shards={ctx.shards}",
            f"run_dir={run_dir}", f"train.device={ctx.device.type}", f"train.precision={bf16}",
            "wandb.mode=disabled", *extra]


def measure(ctx, v: Variant) -> dict:
    """One throughput row of the plan."""
    row = {"model": model_only, "plain": plain_loop, "trainer": trainer}[v.kind](ctx, v)
    return {"variant": v.variant, "batch": v.batch, "steps_per_epoch": v.steps_per_epoch,
            "timed_steps": v.timed_steps, **row}


def _flops_per_clip(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Training FLOPs per clip: the forward's (counted) x 3 for forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *shape, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return 3.0 * counter.get_total_flops()


def _timed(ck, step, iters: int, warmup: int) -> float:
    """Seconds per call of ``step``, from CUDA events on a GPU (wall clock on a CPU)."""
    for _ in range(warmup):
        step()
    if ck.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) / iters


def _loop_record(ck, batch: int, seconds: float, flops: float) -> dict:
    rec = {"clips_per_s": batch / seconds, "step_ms": 1000 * seconds, "data_wait_pct": 0.0,
           "mfu": _mfu(ck, batch / seconds, flops), "flops_per_clip": flops}
    if ck.device.type == "cuda":
        rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(ck.device) / 2**30
        torch.cuda.reset_peak_memory_stats(ck.device)
    return rec


def _mfu(ck, clips_per_s: float, flops: float) -> float | None:
    if ck.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(ck.device)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return None if peak is None else clips_per_s * flops / (peak * 1e12)


def _our_model(ck):
    from asc_dist import config
    from asc_dist.models import build_model, prepare_model

    cfg = config.load([*ck.features, ck.model, "model.pretrained=none"], world_size=1)
    shape = (1, cfg.features.n_mels, cfg.features.frames)
    model = prepare_model(build_model(cfg.model, 10), cfg.model, ck.device)
    return cfg, shape, model


def model_only(ck, v: Variant) -> dict:
    """Our model + loss + AdaBound on one resident batch: the ceiling any data path can reach."""
    from asc_dist.losses import build_loss
    from asc_dist.models import autocast
    from asc_dist.optim import build_optimizer

    cfg, shape, model = _our_model(ck)
    batch = v.batch
    flops = _flops_per_clip(model, shape)
    opt, loss_fn = build_optimizer(cfg.optim, model.parameters()), build_loss(cfg.loss, 10).to(ck.device)
    x = torch.randn(batch, *shape, device=ck.device)
    y = torch.randint(0, 10, (batch,), device=ck.device)
    precision = "bf16" if ck.device.type == "cuda" else "fp32"

    def step():
        with autocast(precision, ck.device):
            logits = model(x)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _loop_record(ck, batch, _timed(ck, step, v.timed_steps, v.warmup_steps), flops)


def plain_loop(ck, v: Variant) -> dict:
    """What a user would write: torchvision ResNet-50, fused Adam, bf16, channels_last,
    the features resident on the device, a random batch per step."""
    import torchvision

    from asc_dist import config

    cfg = config.load([*ck.features], world_size=1)
    shape = (1, cfg.features.n_mels, cfg.features.frames)
    batch = v.batch
    arch = "resnet18" if ck.quick else "resnet50"
    model = getattr(torchvision.models, arch)(num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    cuda = ck.device.type == "cuda"
    model = model.to(ck.device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    flops = _flops_per_clip(model, shape)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=cuda)
    feats = torch.randn(4 * batch, *shape, device=ck.device)
    labels = torch.randint(0, 10, (4 * batch,), device=ck.device)

    def step():
        idx = torch.randint(0, feats.shape[0], (batch,), device=ck.device)
        x = feats[idx].contiguous(memory_format=torch.channels_last) if cuda else feats[idx]
        with torch.autocast(ck.device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(x), labels[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _loop_record(ck, batch, _timed(ck, step, v.timed_steps, v.warmup_steps), flops)


def trainer(ck, v: Variant) -> dict:
    """The real trainer as a user runs it (its own process, its own metrics.jsonl)."""
    _, shape, model = _our_model(ck)
    flops = _flops_per_clip(model, shape)  # the MFU counts our model's FLOPs
    del model
    log_every = 1 if ck.quick else 10  # >= 3 logged windows after the warm-up
    run_dir = ck.work / "runs" / f"tput-{v.backend}-{v.cache}-{v.batch}"
    args = train_args(ck, run_dir, f"data.backend={v.backend}", f"data.cache={v.cache}",
                      f"train.global_batch={v.batch}", f"train.max_iters={v.warmup_steps + v.timed_steps}",
                      f"train.log_every={log_every}", "train.eval_every=1000000",
                      "train.ckpt_every=1000000")
    records, wall = run_trainer(1, args, run_dir, timeout=None)
    r = summarize_train(records, v.warmup_steps)
    return {"clips_per_s": r["clips_per_s"], "step_ms": 1000 * r["step_time"],
            "data_wait_pct": 100 * r["data_wait_frac"], "peak_mem_gb": r.get("peak_mem_gb"),
            "mfu": _mfu(ck, r["clips_per_s"], flops), "run_s": wall}
