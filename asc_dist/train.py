"""Train the recipe: ``torchrun --nproc_per_node=N -m asc_dist.train [conf/x.yaml ...] [key=value ...]``.

Also runs as a single plain process (``python -m asc_dist.train``). Iteration-based like the paper
(or ``train.epochs`` of the training split): batches -> augment (roll, masks) -> standardise ->
augment (Frequency-MixStyle) -> mixup -> model (DDP) -> loss (+ distillation from cached
teacher logits) -> optimizer step -> lr schedule, with
evaluation every ``train.eval_every`` iterations and checkpoints every ``train.ckpt_every``, at the
end, and when a stop signal arrives. ``resume=auto`` continues from the run dir's latest checkpoint.

Before any process group starts, everything that can be checked is (config, shards, weights, W&B
credentials, a live run in the same dir), so a mistake costs seconds and prints one line. A step
never waits for the device: the loss is summed on the device and read, averaged over the ranks
and with the non-finite check (so a NaN on one rank stops all at the same step), every
``train.log_every`` steps; the stop-signal agreement is asynchronous.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from asc_dist import atomic, complexity, dist, plots
from asc_dist import config as config_lib
from asc_dist.augment import Augment
from asc_dist.checkpoint import Checkpointer, check_compatible, rng_state, set_rng_state
from asc_dist.checkpoint import file_sha256
from asc_dist.checkpoint import load as load_checkpoint
from asc_dist.cli import EXIT_ERROR, EXIT_STOPPED, command
from asc_dist.data import build_source
from asc_dist.data.manifest import load_split
from asc_dist.data.sharding import derive_seed, train_steps
from asc_dist.data.stats import load_or_compute_stats
from asc_dist.data.waveform import preflight as waveform_preflight
from asc_dist.distill import TeacherTargets, kd_loss, targets_for_run, teacher_probs
from asc_dist.errors import ConfigError, RunLockedError, TrainingDiverged, UserError
from asc_dist.frontend import Standardize
from asc_dist.losses import build_loss
from asc_dist.metrics import format_report
from asc_dist.mixup import Mixup
from asc_dist.models import (
    autocast,
    build_model,
    check_grad_checkpointing,
    prepare_model,
    pretrained_file,
    set_grad_checkpointing,
    use_generator,
)
from asc_dist.optim import build_optimizer, build_scheduler
from asc_dist.progress import Progress
from asc_dist.restore import (
    checkpoint_config,
    eval_autocast,
    feature_standardizer,
    frozen_differences,
    resolve_checkpoint,
)
from asc_dist.runlock import RunLock
from asc_dist.tracking import Tracker, check_credentials, read_metrics
from asc_dist.validate import evaluate, sample_groups, write_report

log = logging.getLogger(__name__)

AUGMENT_STREAM = 0xA46  # the augmentations' draws: a stream of their own, apart from mixup's


def epochs_from(source, start_step: int):
    """Endless batches over epochs, starting at global step ``start_step``."""
    epoch, skip = divmod(start_step, source.steps_per_epoch)
    while True:
        yield from source.epoch(epoch, start_step=skip)
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
    augment: Augment
    teacher: TeacherTargets | None  # distill.teachers' logits by sample key
    optimizer: torch.optim.Optimizer
    scheduler: Any
    autocast: Any
    eval_autocast: Any  # train.eval_precision's (auto: the training autocast)
    complexity: dict | None  # report.json's entry (rank 0)
    kd_sum: torch.Tensor | None = None  # the distillation term summed over the log window
    init_from: dict | None = None  # train.init_from's file and sha256 (checkpoints record it)


def preflight(cfg: DictConfig) -> None:
    """What can fail before any process group starts: shards, weights, W&B, a live run."""
    # an unknown data.devices entry fails here, naming the devices the split has
    index = load_split(cfg.data.shards, cfg.data.train_split)
    index.device_ids(cfg.data.devices)
    waveform_preflight(cfg, index)  # augment.dir's folder
    if cfg.data.test_split is not None:  # data.test_split=null: no test split
        load_split(cfg.data.shards, cfg.data.test_split)
    if cfg.train.init_from is not None:
        resolve_checkpoint(cfg.train.init_from)
    else:
        pretrained_file(cfg.model)
    check_grad_checkpointing(cfg)
    for teacher in cfg.distill.teachers:  # a typo in a path fails now, not after the data work
        resolve_checkpoint(teacher)
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_file():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint file")
    check_credentials(cfg)
    if dist.env_rank() == 0:  # the rank that takes the lock; others may start after it did
        RunLock(cfg.run_dir).check()


def lock_run_dir(cfg: DictConfig, env: dist.DistEnv) -> RunLock | None:
    """Rank 0 takes the run-dir lock; every rank learns the outcome before any work."""
    lock, error = None, None
    if env.is_main:
        lock = RunLock(cfg.run_dir)
        try:
            lock.acquire()
        except RunLockedError as e:
            lock, error = None, e
    if dist.any_rank(error is not None, env.device):
        raise error or RunLockedError(f"run dir {cfg.run_dir} is in use (rank 0 names the holder)")
    return lock


def build(cfg: DictConfig, env: dist.DistEnv, resuming: bool = False) -> Parts:
    """The run's parts; ``resuming``: its own checkpoint will replace the weights (so
    ``train.init_from``'s are not loaded, while its feature statistics still are)."""
    per_rank = cfg.train.global_batch // env.world_size
    sources = [build_source(cfg, split, train=is_train, rank=env.rank, world_size=env.world_size,
                            device=env.device, batch_size=per_rank, seed=cfg.train.seed)
               if split is not None else None
               for split, is_train in ((cfg.data.train_split, True), (cfg.data.test_split, False))]
    classes = sources[0].classes
    if len(classes) != cfg.num_classes:
        raise ConfigError(
            f"num_classes={cfg.num_classes} but the shards in {cfg.data.shards} have {len(classes)} classes")
    init = InitFrom(cfg, classes) if cfg.train.init_from is not None else None
    stats = None
    if init is not None:  # the statistics the weights were trained with, not this split's
        stats = init.stats
    elif cfg.data.standardize:  # rank 0 computes the training-split statistics once; the rest read them
        resident = sources[0].table.features if sources[0].cached else None
        if env.is_main:
            stats = load_or_compute_stats(cfg, device=env.device, features=resident)
        dist.barrier()
        if not env.is_main:
            stats = load_or_compute_stats(cfg, device=env.device, progress=False, features=resident)
    teacher = targets_for_run(cfg, env, per_rank)
    # Seeded here, after the data work (loaders draw from the global RNG): identical initial
    # weights on every rank, whether or not this run had to compute the feature statistics.
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, len(classes), load_weights=init is None)
    if init is not None and not resuming:
        init.load_into(model, announce=env.is_main)
    if cfg.train.grad_checkpointing:
        set_grad_checkpointing(model)
    # every rank counts (a model that cannot take the configured input fails on all of them, not
    # on rank 0 alone while the others wait in DDP's first collective); rank 0 says it
    counts = log_complexity(cfg, model, announce=env.is_main)
    model = prepare_model(model, cfg.model, env.device)
    model = dist.wrap_model(model, env, sync_bn=cfg.train.sync_bn,
                            grad_compress=cfg.train.grad_compress)
    if cfg.model.compile:  # after the DDP wrap, so DDP's hooks see the compiled graph's breaks
        model.compile(mode=cfg.model.compile_mode)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    return Parts(
        *sources, classes, stats,
        standardize=Standardize(*stats).to(env.device) if stats is not None else torch.nn.Identity(),
        model=model,
        loss_fn=build_loss(cfg.loss, len(classes)).to(env.device),
        mixup=Mixup.from_config(cfg.augment.mixup, len(classes)),
        augment=Augment.from_config(cfg),
        teacher=teacher,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg.optim, optimizer, cfg.train.max_iters,
                                  steps_per_epoch=sources[0].steps_per_epoch),
        autocast=autocast(cfg.train.precision, env.device),
        eval_autocast=eval_autocast(cfg.train.eval_precision, cfg.train.precision, env.device),
        complexity=counts,
        kd_sum=torch.zeros((), device=env.device) if teacher is not None else None,
        init_from=None if init is None else {"path": str(init.path), "sha256": init.sha256},
    )


class InitFrom:
    """``train.init_from``: a trained checkpoint this run starts from (device-specific
    fine-tuning): the whole model loaded strictly, its feature statistics, refused when its
    front end, architecture or classes are not this run's."""

    def __init__(self, cfg: DictConfig, classes: list[str]):
        self.path = resolve_checkpoint(cfg.train.init_from)
        self.state = load_checkpoint(self.path)
        self.sha256 = file_sha256(self.path)
        trained = checkpoint_config(self.state, path=self.path)
        where = f"train.init_from={cfg.train.init_from}"
        differ = frozen_differences(trained, cfg)
        if differ:
            raise ConfigError(f"{where}: the checkpoint was trained with other settings that fix "
                              f"what its weights expect: {'; '.join(differ)}")
        if list(self.state.get("classes") or []) != list(classes):
            raise ConfigError(f"{where}: the checkpoint's classes {self.state.get('classes')} are "
                              f"not this run's {list(classes)} (the head would name others)")
        self.stats = None
        if cfg.data.standardize:
            s = feature_standardizer(self.state, trained, path=self.path)
            self.stats = (s.mean.flatten(), s.std.flatten())

    def load_into(self, model: torch.nn.Module, announce: bool) -> None:
        try:
            model.load_state_dict(self.state["model"], strict=True)
        except (RuntimeError, KeyError) as e:
            raise ConfigError(f"train.init_from={self.path}: its weights do not fit this model: "
                              f"{str(e).splitlines()[0]}") from None
        if announce:
            log.info(f"initialised from {self.path} (step {self.state.get('step')}): every weight, "
                     f"head included, and its feature statistics")


def log_complexity(cfg: DictConfig, model: torch.nn.Module, announce: bool = True) -> dict:
    """The model's parameters, memory and MACs per clip in the log's first lines (and a warning
    over ``complexity.limits``); returns report.json's entry."""
    c, entry, problems = complexity.for_run(model, cfg)
    if not announce:
        return entry
    b = c.param_bytes
    log.info(f"model {cfg.model.name}: {c.params:,} parameters ({b['fp32']:,} B fp32, "
             f"{b['fp16']:,} B fp16, {b['int8']:,} B int8), {c.macs:,} MACs per clip {c.input}")
    for problem in problems:
        log.warning(f"complexity.limits={cfg.complexity.limits}: {problem}")
    return entry


def checkpoint_state(cfg: DictConfig, p: Parts, step: int, best: float, wandb_id: str | None) -> dict:
    return {
        "step": step, "model": dist.unwrap(p.model).state_dict(), "optimizer": p.optimizer.state_dict(),
        "scheduler": p.scheduler.state_dict(), "rng": rng_state(), "config": config_lib.to_dict(cfg),
        "classes": list(p.classes), "model_name": cfg.model.name, "wandb_id": wandb_id,
        "best_metric": best, "data": {"steps_per_epoch": p.train_src.steps_per_epoch, "next_step": step},
        # So evaluate/predict/export need no training shards to reproduce the model's input.
        "feature_stats": None if p.stats is None else {"mean": p.stats[0].cpu(), "std": p.stats[1].cpu()},
        # How the training audio was resampled (predict and export treat raw files alike) and
        # which recording devices it came from (known vs unknown devices in reports).
        "resampler": p.train_src.index.resampler,
        "train_devices": train_devices(p.train_src),
        "init_from": p.init_from,
    }


def train_devices(source) -> list[str]:
    """The recording devices of the clips ``source`` trains on (data.devices' subset or all)."""
    samples = source.index.samples
    picked = samples if source.ids is None else [samples[i] for i in source.ids]
    return sorted({str(s.device) for s in picked if s.device is not None})


def resume_path(cfg: DictConfig, ckpt: Checkpointer) -> Path | None:
    """The checkpoint ``resume`` points at, if any."""
    return None if cfg.resume == "never" else (ckpt.latest() if cfg.resume == "auto" else Path(cfg.resume))


def resume(path: Path | None, cfg: DictConfig, p: Parts, ckpt: Checkpointer,
           is_main: bool) -> tuple[int, float, str | None]:
    """Load checkpoint ``path`` (if any); return (step, best metric, W&B run id)."""
    if path is None:
        return 0, -1.0, None
    state = ckpt.load(path)
    check_compatible(state, model_name=cfg.model.name, classes=p.classes, path=path)
    dist.unwrap(p.model).load_state_dict(state["model"])
    p.optimizer.load_state_dict(state["optimizer"])
    p.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    saved = state.get("data", {}).get("steps_per_epoch")
    if is_main and saved not in (None, p.train_src.steps_per_epoch):
        log.warning(f"{path} was trained with {saved} steps per epoch, this run has "
                    f"{p.train_src.steps_per_epoch} (world size or train.global_batch changed): "
                    f"training continues, but its data order is no longer the uninterrupted run's")
    log.info(f"resumed from {path} at step {state['step']}"
             + (" (train.init_from is not read again)" if cfg.train.init_from else ""))
    return state["step"], state["best_metric"], state.get("wandb_id")


def train_step(p: Parts, batch, mix_gen: torch.Generator, aug_gen: torch.Generator,
               cfg: DictConfig) -> torch.Tensor:
    """One optimizer step; returns the loss as a device tensor (reading it would synchronise)."""
    # features stay float32: only the network runs in bf16
    x = p.augment.before_standardize(batch.features, aug_gen)
    x = p.augment.after_standardize(p.standardize(x), aug_gen)
    x, y = p.mixup(x, batch.labels, generator=mix_gen)
    with p.autocast:
        logits = p.model(x)
    loss = p.loss_fn(logits, y)
    if p.teacher is not None:
        d = cfg.distill
        target = p.mixup.mix_targets(teacher_probs(p.teacher(batch.keys), d.temperature))
        kd = kd_loss(logits, target, d.temperature, d.class_reduction)
        loss = (1 - d.weight) * loss + d.weight * kd
        p.kd_sum += kd.detach()
    if batch.weight != 1.0:  # a partial last batch (train.drop_last=false): see asc_dist.data
        loss = loss * batch.weight
    grad_clip = cfg.train.grad_clip
    p.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(p.model.parameters(), grad_clip)
    p.optimizer.step()
    p.scheduler.step()
    return loss.detach()


def mean_loss(loss_sum: torch.Tensor, first: int, last: int) -> float:
    """The window's mean loss over every rank; stop on a non-finite one, naming the steps.

    Every rank calls this at the same log step: one all-reduce of the window's loss sum (NaN or
    infinite on every rank when it is on any) and one read. So all ranks raise at the same step
    and none is left waiting in a collective the others never enter.
    """
    value = (dist.all_reduce_mean(loss_sum.clone()) / (last - first + 1)).item()
    if not math.isfinite(value):
        steps = f"step {last}" if first == last else f"steps {first}-{last}"
        raise TrainingDiverged(f"non-finite loss ({value}) in {steps}; stopping. Try a lower "
                               f"optim.lr or train.grad_clip > 0.")
    return value


def train(cfg: DictConfig, env: dist.DistEnv) -> dict:
    run_dir, tc = Path(cfg.run_dir), cfg.train
    lock = lock_run_dir(cfg, env)
    stop = None
    tracker = None
    p = None
    try:
        if env.is_main:
            atomic.write_text(run_dir / "config.yaml", config_lib.to_yaml(cfg))
        ckpt = Checkpointer(run_dir, keep_last=tc.keep_last, is_writer=env.is_main)
        restart = resume_path(cfg, ckpt)
        p = build(cfg, env, resuming=restart is not None)
        start, best, wandb_id = resume(restart, cfg, p, ckpt, env.is_main)
        tracker = Tracker(cfg, run_dir, enabled=env.is_main, resume_id=wandb_id)
        progress = Progress(tc.max_iters, every=tc.log_every, clips_per_step=tc.global_batch,
                            enabled=env.is_main)
        evaluates = p.test_src is not None
        groups = sample_groups(cfg, cfg.data.test_split) if evaluates else None
        known = train_devices(p.train_src)  # the report's known vs unknown devices
        if not evaluates and env.is_main:
            log.info("data.test_split=null: no test split, so no evaluation; the checkpoints are "
                     "this run's result (score or predict them with asc_dist.evaluate/predict)")
        stop = dist.StopSignal(env)
        mix_gen = torch.Generator(device=env.device)
        aug_gen = torch.Generator(device=env.device)
        use_generator(dist.unwrap(p.model), aug_gen)  # PaSST's patchout and embedding offset
        loss_sum, since = torch.zeros((), device=env.device), start + 1
        step, report, preds, stopping = start, {}, None, False
        batches = epochs_from(p.train_src, start) if start < tc.max_iters else iter(())
        for step, batch in progress.iterate(batches, start):
            if step == start + 1 and tracker.wants_images:
                n = cfg.wandb.log_images
                tracker.log_images(step, batch.features[:n],
                                   [p.classes[i] for i in batch.labels[:n].tolist()])
            # per step, so a resumed run draws what the uninterrupted one drew
            mix_gen.manual_seed(tc.seed * 1_000_003 + env.rank * 100_003 + step)
            aug_gen.manual_seed(derive_seed(tc.seed, env.rank, step, AUGMENT_STREAM))
            loss_sum += train_step(p, batch, mix_gen, aug_gen, cfg)
            stopping = stop.agreed()  # the same step on every rank
            if progress.due(step) or stopping:  # a stop logs its partial window too
                window = progress.window(step, loss=mean_loss(loss_sum, since, step),
                                         lr=p.optimizer.param_groups[0]["lr"])
                if p.kd_sum is not None:  # the unweighted KD term, for its own curve
                    kd_sum = dist.all_reduce_mean(p.kd_sum.clone())
                    window["kd_loss"] = (kd_sum / (step - since + 1)).item()
                    p.kd_sum.zero_()
                if env.device.type == "cuda":  # the allocator's own counter: no synchronisation
                    window["peak_mem_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
                tracker.log(step, {f"train/{k}": v for k, v in window.items()})
                loss_sum.zero_()
                since = step + 1
            with progress.paused():
                is_best = False
                if evaluates and (step % tc.eval_every == 0 or step == tc.max_iters):
                    report, preds = evaluate(p.model, p.test_src, p.standardize, groups,
                                             p.eval_autocast, keep=step == tc.max_iters,
                                             half=tc.eval_precision == "fp16", known=known)
                    tracker.log_eval(step, report, p.classes)
                    is_best, best = report["classwise_accuracy"] > best, max(best, report["classwise_accuracy"])
                    log.info(f"step {step}: class-wise accuracy {report['classwise_accuracy']:.4f} "
                             f"(best {best:.4f})")
                if step % tc.ckpt_every == 0 or step == tc.max_iters or stopping or is_best:
                    ckpt.save(step, checkpoint_state(cfg, p, step, best, tracker.run_id), best=is_best)
            if stopping or step >= tc.max_iters:
                break
        if stopping:
            log.info(f"stop signal received: checkpointed at step {step}; rerun to resume")
        finish(cfg, env, p, run_dir, start, step, report, preds)
        tracker.summary({"best_classwise_accuracy": best, "step": step} if evaluates
                        else {"step": step})
    finally:
        if stop is not None:
            stop.restore()
        if tracker is not None:
            tracker.close()
        if p is not None:
            p.train_src.close()
            if p.test_src is not None:
                p.test_src.close()
        if lock is not None:
            lock.release()
    return {"step": step, "best": best, "report": report, "stopped": stopping}


def finish(cfg: DictConfig, env: dist.DistEnv, p: Parts, run_dir: Path, start: int, step: int,
           report: dict, preds) -> None:
    if not dist.replicas_in_sync(dist.unwrap(p.model)):
        raise RuntimeError(f"DDP replicas diverged: parameters differ across ranks at step {step}")
    if not env.is_main:
        return
    if env.distributed:
        log.info(f"replicas in sync: parameters identical on all {env.world_size} ranks")
    if start >= cfg.train.max_iters:
        log.info(f"run {run_dir} already finished at step {start}; nothing to do "
                 f"(resume=never or a new name= starts over)")
        return
    if step >= cfg.train.max_iters and report:
        if p.complexity is not None:
            report = {**report, "complexity": p.complexity}
        write_report(run_dir, report, p.classes, step, preds,
                     split=Path(cfg.data.shards) / cfg.data.test_split)
        log.info(format_report(report, p.classes))
    curves = plots.plot_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / "curves.png",
                               title=f"{cfg.name} ({run_dir})")
    if curves is not None:
        log.info(f"training curves: {curves}")


USAGE = """usage: [torchrun --nproc_per_node=N] python -m asc_dist.train [conf/extra.yaml ...] [key=value ...]

Trains per conf/config.yaml (the paper) merged with the given YAML files and omegaconf dotlist
overrides, e.g.  python -m asc_dist.train conf/demo.yaml train.max_iters=100 wandb.mode=offline
Print the resolved config with: python -m asc_dist.config [same arguments]
"""


@command("asc_dist.train")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    cfg = config_lib.load(argv, world_size=dist.env_world_size())
    try:
        preflight(cfg)
        cfg = resolve_epochs(cfg, dist.env_world_size())
        check_schedule(cfg)
    except UserError:
        if dist.env_rank() != 0:  # every rank finds the same problem: rank 0 says it once
            return EXIT_ERROR
        raise
    env = dist.init(cfg.train.device)
    try:
        done = train(cfg, env)["step"] >= cfg.train.max_iters
        if not done:
            leave_together(env)
    except TrainingDiverged:
        leave_together(env)
        if not env.is_main:  # every rank stopped at the same step (mean_loss): rank 0 says it once
            return EXIT_ERROR
        raise
    finally:
        dist.teardown()
    # Stopped early by a signal with a checkpoint written: not done, rerun (or requeue) to resume.
    return 0 if done else EXIT_STOPPED


def resolve_epochs(cfg: DictConfig, world_size: int) -> DictConfig:
    """``train.epochs`` > 0: ``train.max_iters`` = epochs x the training split's steps per epoch
    (its size, the world size and train.global_batch fix it before anything starts)."""
    if cfg.train.epochs == 0:
        return cfg
    index = load_split(cfg.data.shards, cfg.data.train_split)
    ids = index.device_ids(cfg.data.devices)
    n = index.num_samples if ids is None else len(ids)
    chosen = f" of devices {list(cfg.data.devices)}" if ids is not None else ""
    steps = train_steps(n, cfg.train.global_batch // world_size, world_size, cfg.train.drop_last)
    if steps == 0:
        raise ConfigError(f"train.epochs={cfg.train.epochs}: split '{cfg.data.train_split}' has "
                          f"{n} clips{chosen}, fewer than one global batch ({cfg.train.global_batch})")
    iters = cfg.train.epochs * steps
    if dist.env_rank() == 0:
        r = n % cfg.train.global_batch
        last = f", the last one of {r} clips" if r and not cfg.train.drop_last else ""
        log.info(f"train.epochs={cfg.train.epochs} x {steps} steps per epoch ({n} clips{chosen}, "
                 f"global batch {cfg.train.global_batch}{last}) = {iters} iterations")
    resolved = OmegaConf.merge(cfg, {"train": {"max_iters": iters}})
    OmegaConf.set_readonly(resolved, True)
    return resolved


def check_schedule(cfg: DictConfig) -> None:
    """A cosine warm-up as long as the run would never decay (a training check only: a checkpoint
    trained so still evaluates)."""
    o, iters = cfg.optim, cfg.train.max_iters
    if o.schedule == "cosine" and o.warmup_iters >= iters:
        epochs = f" (train.epochs={cfg.train.epochs})" if cfg.train.epochs else ""
        raise ConfigError(f"optim.warmup_iters={o.warmup_iters} is not below the run's {iters} "
                          f"iterations{epochs}: the cosine schedule would never decay; lower "
                          f"optim.warmup_iters")


def leave_together(env: dist.DistEnv) -> None:
    """Every rank is leaving at the same agreed step (a stop signal or a non-finite loss).

    torchrun sends SIGTERM to the ranks still running once the first one exits non-zero, which
    turns a rank that was only finishing its exit into "exitcode: -15" in its report. Ignoring
    SIGTERM from here on lets each rank end with its own code; torchrun still sends SIGKILL 30 s
    later should an exit ever hang.
    """
    if env.distributed:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    raise SystemExit(main())
