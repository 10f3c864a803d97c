"""Score a saved checkpoint or device set on a packed split and write reports a person can read::

    [torchrun --nproc_per_node=N] python -m asc_dist.evaluate CHECKPOINT|DEVSET [--split test|DIR]
        [--out DIR] [--backend dali|torch|auto] [--device auto|cpu|cuda]
        [--precision auto|bf16|fp32|fp16] [key=value ...]

CHECKPOINT is a ``.pt`` file or a run dir (its newest complete checkpoint). The model, front end
and class list come from the checkpoint (asc_dist.restore), so only the split being scored has to
be on this machine. Every sample is scored exactly once across ranks (asc_dist.validate), so 1
and N processes give the same report. Writes report.json, report.md, confusion.png,
per_class.png, predictions.tsv and, for a run's checkpoint, the run's training curves
(curves.png) to ``--out`` (default ``<run_dir>/eval/<split>-step<N>/``, for a set
``DEVSET/eval/<split>/``).

DEVSET (asc_dist.devices): each clip is scored by its recording device's model (the device
samples.jsonl names), every other device by the general model; the report adds the general
model's figures beside the set's and the gain per device. Reports of splits with several
devices add the device groups (real / seen / unseen, known / unknown: asc_dist.metrics).
``--precision fp16`` scores with the model and its inputs in float16, as the DCASE baselines
report their test numbers (default: the run's ``train.eval_precision``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from asc_dist import dist
from asc_dist.checkpoint import check_compatible
from asc_dist.checkpoint import load as load_checkpoint
from asc_dist.cli import command
from asc_dist.data import build_source
from asc_dist.devices import is_device_set, load_set, unknown_devices
from asc_dist.errors import ConfigError, DataError
from asc_dist.metrics import format_report
from asc_dist.plots import plot_curves
from asc_dist.restore import checkpoint_config, resolve_checkpoint, restore
from asc_dist.tracking import read_metrics
from asc_dist.validate import evaluate, sample_groups, split_summary, write_report_files

log = logging.getLogger(__name__)


def _split_location(arg: str | None, cfg: DictConfig) -> tuple[str, str]:
    """(shards root, split name) for ``--split``: a split name under data.shards, or a split dir."""
    if arg is None:
        if cfg.data.test_split is None:
            raise ConfigError("the run was trained without a test split (data.test_split=null, "
                              "e.g. the paper's protocol): pass --split with a labelled split")
        return str(cfg.data.shards), str(cfg.data.test_split)
    p = Path(arg)
    if (p / "manifest.json").is_file():
        p = p.resolve()
        return str(p.parent), p.name
    if p.is_dir() or "/" in arg or "\\" in arg:
        raise DataError(f"--split {arg}: no manifest.json there (expected a packed split "
                        f"directory such as shards/tut2018/test)")
    return str(cfg.data.shards), arg


def default_out_dir(checkpoint: Path, split: str, step: int) -> Path:
    ckpt_dir = checkpoint.resolve().parent
    if ckpt_dir.name == "checkpoints":  # inside a run dir: keep reports with the run
        return ckpt_dir.parent / "eval" / f"{split}-step{step}"
    return ckpt_dir / f"eval-{checkpoint.stem}-{split}"


def run(args: argparse.Namespace, env: dist.DistEnv, state: dict | None = None) -> dict:
    dset = None
    if is_device_set(args.checkpoint):
        dset = load_set(args.checkpoint, overrides=args.overrides, device=env.device)
        restored = dset.general
    else:
        restored = restore(args.checkpoint, overrides=args.overrides, device=env.device, state=state)
    cfg, classes = restored.cfg, restored.classes
    shards, split = _split_location(args.split, cfg)
    eval_cfg = OmegaConf.merge(cfg, {"data": {"shards": shards}})
    batch = args.batch_size or max(1, cfg.train.global_batch // env.world_size)
    source = build_source(eval_cfg, split, train=False, rank=env.rank, world_size=env.world_size,
                          device=env.device, batch_size=batch)
    general = None
    try:
        check_compatible(restored.state, model_name=cfg.model.name, classes=source.classes,
                         path=restored.path)
        if not source.index.labelled:
            raise DataError(f"split {Path(shards) / split} is unlabelled: nothing to score "
                            f"against; use python -m asc_dist.predict for its predictions")
        try:
            groups = sample_groups(eval_cfg, split)
        except FileNotFoundError:  # breakdowns are a bonus; a split without metadata still scores
            groups = ({}, {})
        progress = env.is_main and not args.quiet
        if dset is not None:
            if not groups[0]:
                log.warning(f"split {Path(shards) / split} names no devices (no samples.jsonl): "
                            f"every clip is scored by the general model")
            report, preds = evaluate(dset.router(), source, nn.Identity(), groups,
                                     dset.autocast(env.device), progress=progress, keep=True,
                                     known=dset.devices)
            general, _ = evaluate(restored.model, source, restored.standardize, groups,
                                  restored.autocast(env.device), progress=progress,
                                  half=restored.half, known=dset.devices)
        else:
            report, preds = evaluate(restored.model, source, restored.standardize, groups,
                                     restored.autocast(env.device), progress=progress, keep=True,
                                     half=restored.half, known=restored.train_devices or None)
    finally:
        source.close()
    where = dset.path if dset is not None else restored.path
    report = {
        "step": restored.step, **report, "checkpoint": str(where),
        "split": str(Path(shards) / split), "processes": env.world_size, "backend": source.backend,
        "device": env.device.type, "model": cfg.model.name,
        "precision": restored.cfg.train.eval_precision,
    }
    if dset is not None:
        report.update(members=dset.devices, general=general, gain=gains(report, general))
    if env.is_main:
        if dset is not None:
            counts = {d: r["count"] for d, r in report["breakdowns"].get("device", {}).items()}
            line = unknown_devices(counts, dset.devices)
            if line:
                log.info(line)
        out = (Path(args.out) if args.out else dset.path / "eval" / split if dset is not None
               else default_out_dir(restored.path, split, restored.step))
        what = (f"device set `{dset.path}` (general model step {restored.step} and "
                f"{', '.join(dset.devices)}, {cfg.model.name})" if dset is not None
                else f"checkpoint `{restored.path}` (step {restored.step}, {cfg.model.name})")
        preamble = (f"{what} measured on {split_summary(Path(shards) / split)}; "
                    f"{env.world_size} process(es), {source.backend} backend, {env.device.type}, "
                    f"{restored.cfg.train.eval_precision} precision\n")
        write_report_files(out, report, classes, title=f"Evaluation of {cfg.name} at step "
                           f"{restored.step}", preamble=preamble, preds=preds)
        metrics = restored.path.parent.parent / "metrics.jsonl"  # the run's, for a run's checkpoint
        curves = plot_curves(read_metrics(metrics), out / "curves.png",
                             title=f"{cfg.name} (training)") if metrics.is_file() else None
        print(format_report(report, classes), flush=True)
        log.info(f"wrote {out}/report.json, report.md, confusion.png, per_class.png, predictions.tsv"
                 + (", curves.png" if curves else ""))
    return report


def gains(report: dict, general: dict) -> dict[str, float | None]:
    """The set's class-wise accuracy minus the general model's: overall and per device."""
    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    out = {"all": diff(report["classwise_accuracy"], general["classwise_accuracy"])}
    for d, r in report.get("breakdowns", {}).get("device", {}).items():
        g = general["breakdowns"]["device"].get(d, {})
        out[d] = diff(r["classwise_accuracy"], g.get("classwise_accuracy"))
    return out


def precision_overrides(precision: str | None) -> list[str]:
    """``--precision`` as config overrides: fp16/fp32 set train.eval_precision; auto/bf16 the
    training autocast the evaluation follows."""
    if precision is None:
        return []
    if precision in ("fp16", "fp32"):
        return [f"train.eval_precision={precision}"]
    return [f"train.precision={precision}", "train.eval_precision=auto"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m asc_dist.evaluate",
        description="Score a checkpoint on a packed split (1 process or under torchrun; every "
                    "clip is counted once) and write report.json/report.md/confusion.png/"
                    "per_class.png.")
    p.add_argument("checkpoint", help="checkpoint .pt file, a run dir (its newest checkpoint), or "
                                      "a device set (asc_dist.devices)")
    p.add_argument("--split", default=None,
                   help="split name under data.shards (default: the run's data.test_split) or a "
                        "packed split directory (one with manifest.json)")
    p.add_argument("--out", default=None,
                   help="report directory (default: <run_dir>/eval/<split>-step<N>)")
    p.add_argument("--backend", choices=["dali", "torch", "auto"], default=None,
                   help="data backend (default: the run's data.backend)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="default: the run's train.device")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32", "fp16"], default=None,
                   help="fp16: model and inputs in float16 (the DCASE baselines' test); default: "
                        "the run's train.eval_precision")
    p.add_argument("--batch-size", type=int, default=None,
                   help="clips per process and batch (default: train.global_batch / processes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. data.shards=/data/shards data.num_threads=4")
    return p


@command("asc_dist.evaluate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    extra = [f"data.backend={args.backend}"] if args.backend else []
    extra += [f"train.device={args.device}"] if args.device else []
    args.overrides = list(args.overrides) + extra + precision_overrides(args.precision)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    # Checkpoint and config problems surface before any process group starts.
    state = None
    if is_device_set(args.checkpoint):
        cfg = load_set(args.checkpoint, overrides=args.overrides).cfg  # checks every member
    else:
        args.checkpoint = resolve_checkpoint(args.checkpoint)
        state = load_checkpoint(args.checkpoint)
        cfg = checkpoint_config(state, args.overrides, path=args.checkpoint)
    env = dist.init(cfg.train.device)
    try:
        run(args, env, state)
    finally:
        dist.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
