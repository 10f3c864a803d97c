"""The throughput rows of ``bench gpu``: what the model, a plain loop and the trainer reach.

Each row is a :class:`~asc_dist.bench.plan.Variant` of the plan (its batch, warm-up and timed
steps). At each per-GPU batch: our model + loss + AdaBound on one resident batch (the ceiling), a
plain PyTorch loop as a user would write it (torchvision ResNet-50, fused Adam, bf16,
channels_last, features resident), and the real trainer (its own process, run by
:mod:`asc_dist.bench.probe`) with each data backend, cached and streamed. Step times come from
CUDA events on a GPU (wall clock on a CPU); peak memory is reset after the warm-up; model FLOP
utilisation (MFU) from the forward's FLOPs (counted on the meta device) x 3 against the device's
dense bf16 peak. Beside the rows, per step of the loops: what Frequency-MixStyle, the masks and
the KD lookup cost, and the host-to-device bandwidth.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from asc_dist.bench import probe
from asc_dist.bench.plan import Variant, step_name
from asc_dist.bench.procs import run_child

# Dense bf16 peak of known accelerators, for the model FLOP utilisation (MFU).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
# The settings every throughput row asks for: at its fastest (cuDNN autotuning, TF32 where
# float32 remains); precision and compile travel as the trainer's own options.
ROW_SETTINGS = {"cudnn_benchmark": True, "tf32": True}


def precision(ctx) -> str:
    return "bf16" if ctx.device.type == "cuda" else "fp32"


def train_args(ctx, run_dir: Path, *extra: str) -> list[str]:
    return [*ctx.features, ctx.model, "model.pretrained=none", f"data.shards={ctx.shards}",
            f"run_dir={run_dir}", f"train.device={ctx.device.type}",
            f"train.precision={precision(ctx)}", "wandb.mode=disabled", *extra]


def measure(ctx, v: Variant) -> dict:
    """One row of the loops step (the model alone, a plain loop)."""
    row = {"model": model_only, "plain": plain_loop}[v.kind](ctx, v)
    return {"variant": v.variant, "batch": v.batch, "steps_per_epoch": v.steps_per_epoch,
            "timed_steps": v.timed_steps, "status": "ok", **row}


def flops_per_clip(build, shape: tuple[int, ...]) -> float:
    """Training FLOPs per clip: the forward's x 3, counted on the meta device (no memory, no
    kernels: the count is the same)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build()
        x = torch.zeros(1, *shape)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return 3.0 * counter.get_total_flops()


def _timed(ck, step, iters: int, warmup: int) -> tuple[float, float]:
    """(seconds per call of ``step`` from CUDA events on a GPU, wall clock on a CPU; host
    seconds per call). The peak memory counts from after the warm-up (autotuning's workspaces
    are not the run's)."""
    for _ in range(warmup):
        step()
    if ck.device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        s = (time.perf_counter() - t0) / iters
        return s, s
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(ck.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    host = (time.perf_counter() - t0) / iters
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / iters, host


def _loop_record(ck, batch: int, seconds: float, host: float, flops: float) -> dict:
    cuda = ck.device.type == "cuda"
    return {"clips_per_s": batch / seconds, "step_ms": 1000 * seconds,
            "step_ms_from": "cuda events" if cuda else "wall clock", "host_ms": 1000 * host,
            "data_wait_pct": 0.0, "mfu": _mfu(ck, batch / seconds, flops),
            "flops_per_clip": flops,
            "peak_mem_gb": torch.cuda.max_memory_allocated(ck.device) / 2**30 if cuda else None}


def _mfu(ck, clips_per_s: float, flops: float) -> float | None:
    if ck.device.type != "cuda" or not clips_per_s:
        return None
    name = torch.cuda.get_device_name(ck.device)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return None if peak is None else clips_per_s * flops / (peak * 1e12)


def _cfg(ck, *extra: str):
    from asc_dist import config

    return config.load([*ck.features, ck.model, "model.pretrained=none", *extra], world_size=1)


def _our_model_flops(ck) -> float:
    from asc_dist.models import build_model

    cfg = _cfg(ck)
    return flops_per_clip(lambda: build_model(cfg.model, 10),
                          (1, cfg.features.n_mels, cfg.features.frames))


def model_only(ck, v: Variant) -> dict:
    """Our model + loss + AdaBound on one resident batch: the ceiling any data path can reach."""
    from asc_dist.losses import build_loss
    from asc_dist.models import autocast, build_model, prepare_model
    from asc_dist.optim import build_optimizer

    cfg = _cfg(ck)
    shape = (1, cfg.features.n_mels, cfg.features.frames)
    flops = flops_per_clip(lambda: build_model(cfg.model, 10), shape)
    model = prepare_model(build_model(cfg.model, 10), cfg.model, ck.device)
    opt = build_optimizer(cfg.optim, model.parameters())
    loss_fn = build_loss(cfg.loss, 10).to(ck.device)
    x = torch.randn(v.batch, *shape, device=ck.device)
    y = torch.randint(0, 10, (v.batch,), device=ck.device)
    ac = autocast(precision(ck), ck.device)

    def step():
        with ac:
            logits = model(x)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _loop_record(ck, v.batch, *_timed(ck, step, v.timed_steps, v.warmup_steps), flops)


def plain_loop(ck, v: Variant) -> dict:
    """What a user would write: torchvision ResNet-50, fused Adam, bf16, channels_last,
    the features resident on the device, a random batch per step."""
    import torchvision

    cfg = _cfg(ck)
    shape = (1, cfg.features.n_mels, cfg.features.frames)
    arch = "resnet18" if ck.quick else "resnet50"

    def build():
        m = getattr(torchvision.models, arch)(num_classes=10)
        m.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        return m

    cuda = ck.device.type == "cuda"
    flops = flops_per_clip(build, shape)
    model = build().to(ck.device,
                       memory_format=torch.channels_last if cuda else torch.preserve_format)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=cuda)
    feats = torch.randn(4 * v.batch, *shape, device=ck.device)
    labels = torch.randint(0, 10, (4 * v.batch,), device=ck.device)

    def step():
        idx = torch.randint(0, feats.shape[0], (v.batch,), device=ck.device)
        x = feats[idx].contiguous(memory_format=torch.channels_last) if cuda else feats[idx]
        with torch.autocast(ck.device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(x), labels[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _loop_record(ck, v.batch, *_timed(ck, step, v.timed_steps, v.warmup_steps), flops)


def augment_kd_cost(ck, batch: int, iters: int = 20, warmup: int = 3) -> dict:
    """ms per training step of Frequency-MixStyle + masks + time roll (always applied, as
    conf/experiment/dcase2024_baseline.yaml has them) and of the KD targets (the teacher-logit
    lookup by key, softmax, KD loss), on the device: CUDA-event ms and the host's ms to issue
    them (on a CPU the wall clock, the device figures null)."""
    from types import SimpleNamespace

    from asc_dist.augment import Augment
    from asc_dist.distill import TeacherLogits, TeacherTargets, kd_loss, teacher_probs

    cfg = _cfg(ck, "augment.mixstyle.p=1.0", "augment.freq_mask.count=1",
               "augment.freq_mask.width=16", "augment.roll_seconds=0.1")
    aug = Augment.from_config(cfg)
    x = torch.randn(batch, 1, cfg.features.n_mels, cfg.features.frames, device=ck.device)
    g = torch.Generator(device=ck.device).manual_seed(0)
    n = 8 * batch  # a split's keys, looked up per batch as the trainer does
    keys = [f"clip{i:06d}" for i in range(n)]
    classes = [str(c) for c in range(10)]
    index = SimpleNamespace(classes=classes, samples=[SimpleNamespace(key=k) for k in keys],
                            num_samples=n, dir="synthetic")
    teacher = TeacherTargets(TeacherLogits(keys, torch.randn(n, 10), classes), index, ck.device)
    logits = torch.randn(batch, 10, device=ck.device)
    perm = torch.randperm(n).tolist()
    batch_keys = [[keys[i] for i in perm[(j * batch) % n:(j * batch) % n + batch]]
                  for j in range(iters + warmup)]

    def augment(j):
        aug.after_standardize(aug.before_standardize(x, g), g)

    def kd(j):
        kd_loss(logits, teacher_probs(teacher(batch_keys[j]), 2.0), 2.0, "mean")

    out = {"batch": batch}
    for name, fn in (("augment", augment), ("kd", kd)):
        it = iter(range(iters + warmup))
        device_s, host_s = _timed(ck, lambda fn=fn, it=it: fn(next(it)), iters, warmup)
        cuda = ck.device.type == "cuda"
        out[f"{name}_device_ms"] = 1000 * device_s if cuda else None
        out[f"{name}_host_ms"] = 1000 * host_s
    return out


def h2d_bandwidth(ck, batch: int, samples: int, repeats: int = 3) -> dict:
    """GB/s of one streamed batch of waveforms (batch x samples float32) copied to the device
    from pinned and from pageable memory, and of the copy into pinned memory that a DataLoader's
    pin-memory thread makes for every batch. CUDA only (None on a CPU)."""
    nbytes = batch * samples * 4
    out = {"batch": batch, "batch_mb": nbytes / 2**20, "pinned_gbps": None, "pageable_gbps": None,
           "pin_copy_gbps": None}
    if ck.device.type != "cuda":
        return out
    host = torch.randn(batch, samples)
    pinned = host.pin_memory()
    dev = torch.empty_like(host, device=ck.device)

    def best(copy) -> float:
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            copy()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        return nbytes / min(times) / 1e9

    out["pinned_gbps"] = best(lambda: dev.copy_(pinned, non_blocking=True))
    out["pageable_gbps"] = best(lambda: dev.copy_(host))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        host.pin_memory()
        times.append(time.perf_counter() - t0)
    out["pin_copy_gbps"] = nbytes / min(times) / 1e9
    return out


# --- the trainer -------------------------------------------------------------------------------


def trainer(ck, v: Variant, timeout: float | None) -> dict:
    """The real trainer as a user runs it (its own process, its own metrics.jsonl), measured
    from inside by :mod:`asc_dist.bench.probe`; killed after ``timeout`` s, its row then made
    from the windows it had logged (``partial``)."""
    flops = _our_model_flops(ck)
    name = step_name(v)
    run_dir = ck.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun in the same --work starts over
    probe_out = ck.work / "runs" / f"{name}.probe.jsonl"
    probe_out.unlink(missing_ok=True)
    log_every = 1 if ck.quick else 5  # >= 2 windows after the warm-up, even when cut short
    args = train_args(ck, run_dir, f"data.backend={v.backend}", f"data.cache={v.cache}",
                      f"train.global_batch={v.batch}",
                      f"train.max_iters={v.warmup_steps + v.timed_steps}",
                      f"train.log_every={log_every}", "train.eval_every=1000000",
                      "train.ckpt_every=1000000", f"data.num_threads={v.workers or 0}",
                      f"data.prefetch={v.prefetch or 2}", f"model.compile={v.compile}",
                      "resume=never")
    cmd = [sys.executable, "-m", "asc_dist.bench.probe", str(probe_out), "--warmup",
           str(v.warmup_steps), "--settings", json.dumps(ROW_SETTINGS), "--launched",
           str(time.time()), "--device", ck.device.type, "--", *args]
    t0 = time.perf_counter()
    rc, tail = run_child(cmd, timeout)
    wall = time.perf_counter() - t0
    from asc_dist.tracking import read_metrics

    metrics = run_dir / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.is_file() else []
    requested = {**ROW_SETTINGS, "precision": precision(ck), "compile": v.compile,
                 "workers": v.workers, "prefetch": v.prefetch}
    row = summarize(v, records, probe.read(probe_out), requested, flops, ck)
    row["run_s"] = round(wall, 1)
    if rc is None:
        if row["windows"] < 2:
            raise TimeoutError(f"the trainer passed its {timeout:.0f} s with {row['windows']} "
                               f"logged window(s) after the warm-up (need 2 for a partial row)")
        row.update(status="partial", why=f"the trainer passed its {timeout:.0f} s: summarised "
                                         f"from the {row['windows']} windows it had logged")
    elif rc != 0:
        raise RuntimeError(f"the trainer exited {rc}: {''.join(tail[-5:]).strip()}")
    return row


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(v: Variant, records: list[dict], measured: dict, requested: dict, flops: float,
              ck) -> dict:
    """A trainer row from its metrics.jsonl windows after the warm-up (clips/s, data wait) and
    what the probe measured inside the process (steps, memory, phases, settings)."""
    windows = [r for r in records if "train/clips_per_s" in r and r["step"] > v.warmup_steps]
    mean = (lambda k: sum(r[f"train/{k}"] for r in windows) / len(windows)) if windows else None
    clips = mean("clips_per_s") if windows else None
    steps = measured.get("steps", [])
    device = _median([s["device_ms"] for s in steps])
    # Queued right after a sync (the trainer reads the loss at its log steps), a step's host
    # time is the time to issue it, not the wait for a full launch queue.
    host = _median([s["host_ms"] for s in steps if s.get("after_sync")]) or _median(
        [s["host_ms"] for s in steps])
    gaps = [s["gap_ms"] for s in steps if s.get("gap_ms") is not None]
    busy = sum(s["device_ms"] for s in steps if s["device_ms"] is not None)
    idle = 100 * sum(gaps) / (sum(gaps) + busy) if gaps and busy else None
    used = measured.get("settings", {})
    differ = sorted(k for k, want in requested.items()
                    if k in used and want is not None and used[k] != want
                    and not (k == "workers" and want == 0))
    cuda = ck.device.type == "cuda"
    clip_bytes = 4 * round(ck.clip_samples)
    row = {
        "variant": v.variant, "batch": v.batch, "steps_per_epoch": v.steps_per_epoch,
        "warmup_steps": v.warmup_steps, "timed_steps": v.timed_steps, "status": "ok",
        "windows": len(windows), "steps_done": max((r["step"] for r in records if "step" in r),
                                                   default=0),
        "clips_per_s": clips, "data_wait_pct": 100 * mean("data_wait_frac") if windows else None,
        "step_ms": device if cuda else _median([s["host_ms"] for s in steps]) or (
            1000 * mean("step_time") if windows else None),
        "step_ms_from": "cuda events" if cuda else "wall clock",
        "host_ms": host, "device_ms": device, "gpu_idle_pct": idle,
        "launch_bound": (host >= 0.9 * device) if host is not None and device else None,
        "peak_mem_gb": measured.get("peak_device_gb"),
        "peak_pinned_gb": measured.get("peak_pinned_gb"),
        "peak_host_gb": measured.get("peak_host_gb"),
        "peak_shared_gb": measured.get("peak_shared_gb"),
        "outside_torch_gb": measured.get("outside_torch_gb"),
        "mfu": _mfu(ck, clips, flops) if clips else None,
        "h2d_needed_gbps": (clips * clip_bytes / 1e9 if clips and v.cache == "none" and cuda
                            else None),
        "workers": used.get("workers", v.workers), "prefetch": used.get("prefetch", v.prefetch),
        "pin_memory": used.get("pin_memory"), "settings": used,
        "settings_requested": requested, "settings_differ": differ,
    }
    phases = ("python_torch_s", "asc_imports_s", "dali_init_s", "cuda_init_s",
              "build_s", "model_build_s", "first_step_s", "time_to_first_step_s", "eval_s",
              "eval_clips", "checkpoint_s", "report_s", "wall_s")
    row["phases"] = {k: measured[k] for k in phases if k in measured}
    if measured.get("eval_s"):
        row["eval_clips_per_s"] = measured.get("eval_clips", 0) / measured["eval_s"]
    return row
