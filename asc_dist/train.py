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
from pathlib import Path

import torch
from omegaconf import DictConfig

from asc_dist import config as config_lib
from asc_dist import dist
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


def train(cfg: DictConfig, env: dist.DistEnv) -> dict:
    run_dir = Path(cfg.run_dir)
    tc = cfg.train
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    per_rank = tc.global_batch // env.world_size
    train_src = build_source(cfg, cfg.data.train_split, train=True, rank=env.rank,
                             world_size=env.world_size, device=env.device, batch_size=per_rank, seed=tc.seed)
    test_src = build_source(cfg, cfg.data.test_split, train=False, rank=env.rank,
                            world_size=env.world_size, device=env.device, batch_size=per_rank, seed=tc.seed)
    classes = train_src.classes
    if len(classes) != cfg.num_classes:
        raise config_lib.ConfigError(
            f"num_classes={cfg.num_classes} but the shards in {cfg.data.shards} have {len(classes)} classes")
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))
        stats = load_or_compute_stats(cfg, device=env.device) if cfg.data.standardize else None
    dist.barrier()  # rank 0 computed the training-split statistics; everyone else now reads them
    if not env.is_main:
        stats = load_or_compute_stats(cfg, device=env.device, progress=False) if cfg.data.standardize else None
    standardize = Standardize(*stats).to(env.device) if stats is not None else torch.nn.Identity()

    model = prepare_model(build_model(cfg.model, len(classes)), cfg.model, env.device)
    model = dist.wrap_model(model, env, sync_bn=tc.sync_bn)
    loss_fn = build_loss(cfg.loss, len(classes)).to(env.device)
    mixup = Mixup(len(classes), alpha=cfg.mixup.alpha, enabled=cfg.mixup.enabled, per_sample=cfg.mixup.per_sample)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    scheduler = build_scheduler(cfg.optim, optimizer)
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and env.device.type == "cuda")
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    ckpt = Checkpointer(run_dir, keep_last=tc.keep_last, is_writer=env.is_main)
    start, best, wandb_id = 0, -1.0, None
    resume_path = None if cfg.resume == "never" else (ckpt.latest() if cfg.resume == "auto" else Path(cfg.resume))
    if resume_path is not None:
        state = ckpt.load(resume_path)
        check_compatible(state, model_name=cfg.model.name, classes=classes)
        dist.unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, best, wandb_id = state["step"], state["best_metric"], state.get("wandb_id")
        if env.is_main:
            print(f"resumed from {resume_path} at step {start}", flush=True)

    tracker = Tracker(cfg, run_dir, enabled=env.is_main, resume_id=wandb_id)
    progress = ProgressLogger(tc.max_iters, every=tc.log_every, enabled=env.is_main, start_step=start)
    groups = sample_groups(cfg, cfg.data.test_split)
    stop = dist.StopSignal()
    mix_gen = torch.Generator(device=env.device)
    report: dict = {}

    def save(step: int, is_best: bool = False) -> None:
        ckpt.save(step, {
            "step": step, "model": dist.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(), "config": config_lib.to_dict(cfg),
            "classes": list(classes), "model_name": cfg.model.name, "wandb_id": tracker.run_id,
            "best_metric": best, "data": {"steps_per_epoch": train_src.steps_per_epoch, "next_step": step},
            # So evaluate/predict/export need no training shards to reproduce the model's input.
            "feature_stats": None if stats is None else {"mean": stats[0].cpu(), "std": stats[1].cpu()},
        }, best=is_best)

    batches = timed_batches(train_src, start) if start < tc.max_iters else iter(())
    try:
        step = start
        for step, (batch, wait) in enumerate(batches, start=start + 1):
            t0 = time.perf_counter()
            if step == 1:
                n = cfg.wandb.log_images
                tracker.log_images(step, batch.features[:n], [classes[i] for i in batch.labels[:n].tolist()])
            # Seeded by (seed, rank, step): mixup draws are reproducible after a resume.
            mix_gen.manual_seed(tc.seed * 1_000_003 + env.rank * 100_003 + step)
            with autocast:
                x, y = mixup(standardize(batch.features), batch.labels, generator=mix_gen)
                loss = loss_fn(model(x), y)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"non-finite loss ({loss_value}) at step {step}; stopping. "
                                         f"Try a lower optim.lr or train.grad_clip > 0.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            logged = progress.update(step, loss_value, optimizer.param_groups[0]["lr"],
                                     clips=tc.global_batch, data_wait_s=wait, step_s=time.perf_counter() - t0 + wait)
            if logged:
                tracker.log(step, {f"train/{k}": v for k, v in logged.items()})
            is_best = False
            if step % tc.eval_every == 0 or step == tc.max_iters:
                report = evaluate(model, test_src, standardize, groups, autocast)
                tracker.log_eval(step, report, classes)
                is_best = report["classwise_accuracy"] > best
                best = max(best, report["classwise_accuracy"])
                if env.is_main:
                    print(f"step {step}: class-wise accuracy {report['classwise_accuracy']:.4f} "
                          f"(best {best:.4f})", flush=True)
            stopping = dist.any_rank(stop.requested, env.device)
            if step % tc.ckpt_every == 0 or step == tc.max_iters or stopping or is_best:
                save(step, is_best)
            if stopping:
                if env.is_main:
                    print(f"stop signal received: checkpointed at step {step}; rerun to resume", flush=True)
                break
            if step >= tc.max_iters:
                break
        if not dist.replicas_in_sync(dist.unwrap(model)):
            raise RuntimeError(f"DDP replicas diverged: parameters differ across ranks at step {step}")
        if env.is_main and env.distributed:
            print(f"replicas in sync: parameters identical on all {env.world_size} ranks", flush=True)
        if start >= tc.max_iters and env.is_main:
            print(f"run {run_dir} already finished at step {start}; nothing to do "
                  f"(resume=never or a new name= starts over)", flush=True)
        if step >= tc.max_iters and env.is_main and report:
            write_report(run_dir, report, classes, step)
            print(format_report(report, classes), flush=True)
        tracker.summary({"best_classwise_accuracy": best, "step": step})
    finally:
        stop.restore()
        tracker.close()
        train_src.close()
        test_src.close()
    return {"step": step, "best": best, "report": report, "stopped": stop.requested}


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
