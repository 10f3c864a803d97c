"""The throughput table of ``bench gpu``: what the model, a plain loop and the trainer reach.

At each per-GPU batch: our model + loss + AdaBound on one resident batch (the ceiling), a plain
PyTorch loop as a user would write it (torchvision ResNet-50, fused Adam, bf16, channels_last,
features resident), and the real trainer (a subprocess, its own metrics.jsonl) with each data
backend, cached and streamed. Step times come from CUDA events on a GPU; model FLOP utilisation
(MFU) from the forward's counted FLOPs x 3 against the device's dense bf16 peak.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from asc_dist.bench.train import run_trainer, summarize_train
from asc_dist.data import dali_available

# Dense bf16 peak of known accelerators, for the model FLOP utilisation (MFU).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def train_args(ck, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    bf16 = "bf16" if ck.device.type == "cuda" else "fp32"
    return [*ck.features, ck.model, "model.pretrained=none", f"data.shards={shards}",
            f"run_dir={run_dir}", f"train.device={ck.device.type}", f"train.precision={bf16}",
            "wandb.mode=disabled", *extra]


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


def _loop_record(ck, variant: str, batch: int, seconds: float, flops: float) -> dict:
    rec = {"variant": variant, "batch": batch, "clips_per_s": batch / seconds, "step_ms": 1000 * seconds,
           "data_wait_pct": 0.0, "mfu": _mfu(ck, batch / seconds, flops), "flops_per_clip": flops}
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


def model_only(ck, batch: int) -> dict:
    """Our model + loss + AdaBound on one resident batch: the ceiling any data path can reach."""
    from asc_dist import config
    from asc_dist.losses import build_loss
    from asc_dist.model import autocast, build_model, prepare_model
    from asc_dist.optim import build_optimizer

    cfg = config.load([*ck.features, ck.model, "model.pretrained=none"], world_size=1)
    shape = (1, cfg.features.n_mels, cfg.features.frames)
    model = prepare_model(build_model(cfg.model, 10), cfg.model, ck.device)
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

    return _loop_record(ck, "model only (resident batch)", batch,
                        _timed(ck, step, 3 if ck.quick else 30, 2 if ck.quick else 10), flops)


def plain_loop(ck, batch: int) -> dict:
    """What a user would write: torchvision ResNet-50, fused Adam, bf16, channels_last,
    the features resident on the device, a random batch per step."""
    import torchvision

    from asc_dist import config

    cfg = config.load([*ck.features], world_size=1)
    shape = (1, cfg.features.n_mels, cfg.features.frames)
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

    return _loop_record(ck, f"plain PyTorch loop ({arch})", batch,
                        _timed(ck, step, 3 if ck.quick else 30, 2 if ck.quick else 10), flops)


def trainer(ck, shards: Path, batch: int, backend: str, cache: str, flops: float) -> dict:
    steps, warmup = (4, 2) if ck.quick else (30, 10)
    run_dir = ck.out / "runs" / f"tput-{backend}-{cache}-{batch}"
    args = train_args(ck, shards, run_dir, f"data.backend={backend}", f"data.cache={cache}",
                       f"train.global_batch={batch}", f"train.max_iters={warmup + steps}",
                       f"train.log_every={2 if ck.quick else 10}", "train.eval_every=1000000",
                       "train.ckpt_every=1000000", "resume=never")
    records, wall = run_trainer(1, args, run_dir, timeout=600)
    r = summarize_train(records, warmup)
    return {"variant": f"trainer {backend}, {'cached' if cache == 'device' else 'streamed'}",
            "batch": batch, "clips_per_s": r["clips_per_s"], "step_ms": 1000 * r["step_time"],
            "data_wait_pct": 100 * r["data_wait_frac"], "peak_mem_gb": r.get("peak_mem_gb"),
            "mfu": _mfu(ck, r["clips_per_s"], flops), "run_s": wall}


def _trainer_variants(ck, batch: int, batches: tuple[int, ...]) -> list[tuple[str, str]]:
    """(backend, cache) pairs: every pair at the first batch, the first backend at the second
    (the 8-minute budget); at toy size one pair per backend and mode is enough."""
    backends = ["dali", "torch"] if dali_available() else ["torch"]
    pairs = [(b, c) for b in backends for c in ("device", "none")]
    if ck.quick:
        return [(b, c) for b, c in pairs if (b == backends[0]) == (c == "device")] or pairs
    return pairs if batch == batches[0] else [p for p in pairs if p[0] == backends[0]]


def throughput(ck, shards: Path) -> dict:
    batches = (4,) if ck.quick else (64, 256)
    rows = ck.results["throughput"]
    for batch in batches:
        rows.append(model_only(ck, batch))
        flops = rows[-1]["flops_per_clip"]  # the trainer's MFU counts our model's FLOPs
        rows.append(plain_loop(ck, batch))
        for backend, cache in _trainer_variants(ck, batch, batches):
            try:
                rows.append(trainer(ck, shards, batch, backend, cache, flops))
            except Exception as e:  # noqa: BLE001 - one failed variant is a row, not the end
                rows.append({"variant": f"trainer {backend}, {cache}", "batch": batch,
                             "error": f"{type(e).__name__}: {str(e)[-500:]}"})
            ck.write()
    out = {}
    for batch in batches:
        at = {r["variant"]: r for r in rows if r["batch"] == batch and "clips_per_s" in r}
        plain = next((r for v, r in at.items() if v.startswith("plain")), None)
        best = max((r for v, r in at.items() if v.startswith("trainer")), default=None,
                   key=lambda r: r["clips_per_s"])
        if plain and best:
            out[f"trainer_vs_plain_loop_batch{batch}"] = best["clips_per_s"] / plain["clips_per_s"]
        if best and batch == batches[0]:
            out["projected_5000_iterations_s"] = 5000 * best["step_ms"] / 1000
    return out
