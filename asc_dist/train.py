"""Train the recipe: ``torchrun --nproc_per_node=N -m asc_dist.train [conf/x.yaml ...] [key=value ...]``.

Also runs as a single plain process (``python -m asc_dist.train``). Iteration-based like the paper:
pipeline -> standardise -> mixup -> model (DDP) -> loss -> optimizer step -> lr schedule, with
evaluation every ``train.eval_every`` iterations and checkpoints every ``train.ckpt_every``, at the
end, and when a stop signal arrives. ``resume=auto`` continues from the run dir's latest checkpoint.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from asc_dist import atomic, dist
from asc_dist import config as config_lib
from asc_dist.checkpoint import Checkpointer, check_compatible, rng_state, set_rng_state
from asc_dist.data import build_source
from asc_dist.evaluate import evaluate, sample_groups, write_report
from asc_dist.features import Standardize, load_or_compute_stats
from asc_dist.losses import build_loss
from asc_dist.metrics import format_report
from asc_dist.mixup import Mixup
from asc_dist.model import build_model, prepare_model
from asc_dist.optim import build_optimizer, build_scheduler
from asc_dist.tracking import ProgressLogger, Tracker


def timed_batches(source, start_step: int):
    """Endless (batch, seconds waited) over epochs, starting at global step ``start_step``."""
    epoch, skip = divmod(start_step, source.steps_per_epoch)
    while True:
        it = iter(source.epoch(epoch, start_step=skip))
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            yield batch, time.perf_counter() - t0
        epoch, skip = epoch + 1, 0


@dataclass
class Parts:
    """Everything a run is built from; see :func:`build`."""

    train_src: Any
    test_src: Any
    classes: list[str]
    stats: tuple[torch.Tensor, torch.Tensor] | None
    standardize: torch.nn.Module
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    mixup: Mixup
    optimizer: torch.optim.Optimizer
    scheduler: Any
    autocast: Any


def build(cfg: DictConfig, env: dist.DistEnv) -> Parts:
    per_rank = cfg.train.global_batch // env.world_size
    sources = [build_source(cfg, split, train=is_train, rank=env.rank, world_size=env.world_size,
                            device=env.device, batch_size=per_rank, seed=cfg.train.seed)
               for split, is_train in ((cfg.data.train_split, True), (cfg.data.test_split, False))]
    classes = sources[0].classes
    if len(classes) != cfg.num_classes:
        raise config_lib.ConfigError(
            f"num_classes={cfg.num_classes} but the shards in {cfg.data.shards} have {len(classes)} classes")
    stats = None
    if cfg.data.standardize:  # rank 0 computes the training-split statistics once; the rest read them
        if env.is_main:
            stats = load_or_compute_stats(cfg, device=env.device)
        dist.barrier()
        if not env.is_main:
            stats = load_or_compute_stats(cfg, device=env.device, progress=False)
    # Seeded here, after the data work (loaders draw from the global RNG): identical initial
    # weights on every rank, whether or not this run had to compute the feature statistics.
    torch.manual_seed(cfg.train.seed)
    model = prepare_model(build_model(cfg.model, len(classes)), cfg.model, env.device)
    model = dist.wrap_model(model, env, sync_bn=cfg.train.sync_bn)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and env.device.type == "cuda")
    return Parts(
        *sources, classes, stats,
        standardize=Standardize(*stats).to(env.device) if stats is not None else torch.nn.Identity(),
        model=model,
        loss_fn=build_loss(cfg.loss, len(classes)).to(env.device),
        mixup=Mixup.from_config(cfg.mixup, len(classes)),
        optimizer=optimizer,
        scheduler=build_scheduler(cfg.optim, optimizer),
        autocast=torch.autocast(env.device.type, dtype=torch.bfloat16) if bf16 else nullcontext(),
    )


def checkpoint_state(cfg: DictConfig, p: Parts, step: int, best: float, wandb_id: str | None) -> dict:
    return {
        "step": step, "model": dist.unwrap(p.model).state_dict(), "optimizer": p.optimizer.state_dict(),
        "scheduler": p.scheduler.state_dict(), "rng": rng_state(), "config": config_lib.to_dict(cfg),
        "classes": list(p.classes), "model_name": cfg.model.name, "wandb_id": wandb_id,
        "best_metric": best, "data": {"steps_per_epoch": p.train_src.steps_per_epoch, "next_step": step},
        # So evaluate/predict/export need no training shards to reproduce the model's input.
        "feature_stats": None if p.stats is None else {"mean": p.stats[0].cpu(), "std": p.stats[1].cpu()},
    }


def resume(cfg: DictConfig, p: Parts, ckpt: Checkpointer, is_main: bool) -> tuple[int, float, str | None]:
    """Load the checkpoint ``resume`` points at (if any); return (step, best metric, W&B run id)."""
    path = None if cfg.resume == "never" else (ckpt.latest() if cfg.resume == "auto" else Path(cfg.resume))
    if path is None:
        return 0, -1.0, None
    state = ckpt.load(path)
    check_compatible(state, model_name=cfg.model.name, classes=p.classes)
    dist.unwrap(p.model).load_state_dict(state["model"])
    p.optimizer.load_state_dict(state["optimizer"])
    p.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    saved = state.get("data", {}).get("steps_per_epoch")
    if is_main and saved not in (None, p.train_src.steps_per_epoch):
        print(f"warning: {path} was trained with {saved} steps per epoch, this run has "
              f"{p.train_src.steps_per_epoch} (world size or train.global_batch changed): training "
              f"continues, but its data order is no longer the uninterrupted run's", file=sys.stderr, flush=True)
    if is_main:
        print(f"resumed from {path} at step {state['step']}", flush=True)
    return state["step"], state["best_metric"], state.get("wandb_id")


def train_step(p: Parts, batch, step: int, mix_gen: torch.Generator, grad_clip: float) -> float:
    with p.autocast:
        x, y = p.mixup(p.standardize(batch.features), batch.labels, generator=mix_gen)
        loss = p.loss_fn(p.model(x), y)
    p.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # queued before the host reads the loss, so the GPU is not left idle
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"non-finite loss ({loss_value}) at step {step}; stopping. "
                                 f"Try a lower optim.lr or train.grad_clip > 0.")
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(p.model.parameters(), grad_clip)
    p.optimizer.step()
    p.scheduler.step()
    return loss_value


def train(cfg: DictConfig, env: dist.DistEnv) -> dict:
    run_dir, tc = Path(cfg.run_dir), cfg.train
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run_dir / "config.yaml", config_lib.to_yaml(cfg))
    p = build(cfg, env)
    ckpt = Checkpointer(run_dir, keep_last=tc.keep_last, is_writer=env.is_main)
    start, best, wandb_id = resume(cfg, p, ckpt, env.is_main)
    tracker = Tracker(cfg, run_dir, enabled=env.is_main, resume_id=wandb_id)
    progress = ProgressLogger(tc.max_iters, every=tc.log_every, enabled=env.is_main)
    groups = sample_groups(cfg, cfg.data.test_split)
    stop = dist.StopSignal()
    mix_gen = torch.Generator(device=env.device)
    step, report = start, {}
    try:
        batches = timed_batches(p.train_src, start) if start < tc.max_iters else iter(())
        for step, (batch, wait) in enumerate(batches, start=start + 1):
            t0 = time.perf_counter()
            if step == 1:
                n = cfg.wandb.log_images
                tracker.log_images(step, batch.features[:n], [p.classes[i] for i in batch.labels[:n].tolist()])
            mix_gen.manual_seed(tc.seed * 1_000_003 + env.rank * 100_003 + step)  # reproducible on resume
            loss = train_step(p, batch, step, mix_gen, tc.grad_clip)
            logged = progress.update(step, loss, p.optimizer.param_groups[0]["lr"], clips=tc.global_batch,
                                     data_wait_s=wait, step_s=time.perf_counter() - t0 + wait)
            if logged:
                tracker.log(step, {f"train/{k}": v for k, v in logged.items()})
            is_best = False
            if step % tc.eval_every == 0 or step == tc.max_iters:
                report = evaluate(p.model, p.test_src, p.standardize, groups, p.autocast)
                tracker.log_eval(step, report, p.classes)
                is_best, best = report["classwise_accuracy"] > best, max(best, report["classwise_accuracy"])
                if env.is_main:
                    print(f"step {step}: class-wise accuracy {report['classwise_accuracy']:.4f} "
                          f"(best {best:.4f})", flush=True)
            stopping = dist.any_rank(stop.requested, env.device)  # all ranks stop at the same step
            if step % tc.ckpt_every == 0 or step == tc.max_iters or stopping or is_best:
                ckpt.save(step, checkpoint_state(cfg, p, step, best, tracker.run_id), best=is_best)
            if stopping and env.is_main:
                print(f"stop signal received: checkpointed at step {step}; rerun to resume", flush=True)
            if stopping or step >= tc.max_iters:
                break
        finish(cfg, env, p, run_dir, start, step, report)
        tracker.summary({"best_classwise_accuracy": best, "step": step})
    finally:
        stop.restore()
        tracker.close()
        p.train_src.close()
        p.test_src.close()
    return {"step": step, "best": best, "report": report, "stopped": stop.requested}


def finish(cfg: DictConfig, env: dist.DistEnv, p: Parts, run_dir: Path, start: int, step: int,
           report: dict) -> None:
    if not dist.replicas_in_sync(dist.unwrap(p.model)):
        raise RuntimeError(f"DDP replicas diverged: parameters differ across ranks at step {step}")
    if not env.is_main:
        return
    if env.distributed:
        print(f"replicas in sync: parameters identical on all {env.world_size} ranks", flush=True)
    if start >= cfg.train.max_iters:
        print(f"run {run_dir} already finished at step {start}; nothing to do "
              f"(resume=never or a new name= starts over)", flush=True)
    elif step >= cfg.train.max_iters and report:
        write_report(run_dir, report, p.classes, step)
        print(format_report(report, p.classes), flush=True)


USAGE = """usage: [torchrun --nproc_per_node=N] python -m asc_dist.train [conf/extra.yaml ...] [key=value ...]

Trains per conf/config.yaml (the paper) merged with the given YAML files and omegaconf dotlist
overrides, e.g.  python -m asc_dist.train conf/demo.yaml train.max_iters=100 wandb.mode=offline
Print the resolved config with: python -m asc_dist.config [same arguments]
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:  # all config errors surface before any process group or data work starts
        cfg = config_lib.load(argv, world_size=dist.env_world_size())
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    env = dist.init(cfg.train.device)
    try:
        result = train(cfg, env)
    finally:
        dist.teardown()
    # 3 = stopped early by a signal with a checkpoint written: not done, rerun (or requeue) to resume.
    return 0 if result["step"] >= cfg.train.max_iters else 3


if __name__ == "__main__":
    raise SystemExit(main())
