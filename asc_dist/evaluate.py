"""Score a model on a packed split: exact across ranks, with reports a person can read.

Used by the trainer for its periodic evaluation, and as a command for a saved checkpoint::

    [torchrun --nproc_per_node=N] python -m asc_dist.evaluate CHECKPOINT [--split test|DIR]
        [--out DIR] [--backend dali|torch|auto] [--device auto|cpu|cuda] [key=value ...]

CHECKPOINT is a ``.pt`` file or a run dir (its newest complete checkpoint). The model, front end
and class list come from the checkpoint; the feature statistics too (``feature_stats``), so only
the split being scored has to be on this machine. Every sample is scored exactly once across
ranks, so 1 and N processes give the same report. Writes report.json, report.md, confusion.png
and per_class.png to ``--out`` (default ``<run_dir>/eval/<split>-step<N>/``).

The helpers :func:`resolve_checkpoint`, :func:`checkpoint_config` and :func:`restore` are shared
by ``asc_dist.predict`` and ``asc_dist.export``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from asc_dist import atomic, dist
from asc_dist import config as config_lib
from asc_dist.checkpoint import Checkpointer, CheckpointError, check_compatible
from asc_dist.checkpoint import load as load_checkpoint
from asc_dist.metrics import ClassificationMeter, format_report, plot_confusion, plot_per_class

BREAKDOWNS = ("city", "device")
# What the weights were trained with: changing any of these makes the model see other inputs.
FROZEN_KEYS = ("features.", "num_classes", "model.name", "model.input_adapt", "model.resize",
               "data.standardize")


def sample_groups(cfg: DictConfig, split: str) -> tuple[dict[str, dict[str, str]], dict[str, list[str]]]:
    """Per-key city/device from the split's samples.jsonl, and each breakdown's full vocabulary."""
    path = Path(cfg.data.shards) / split / "samples.jsonl"
    by_key: dict[str, dict[str, str]] = {}
    with open(path) as f:
        for line in f:
            s = json.loads(line)
            by_key[s["key"]] = {g: str(s.get(g)) for g in BREAKDOWNS}
    vocab = {g: sorted({v[g] for v in by_key.values()}) for g in BREAKDOWNS}
    return by_key, vocab


@torch.no_grad()
def evaluate(model, source, standardize, groups, autocast, progress: bool = False) -> dict:
    """Score every sample of ``source`` exactly once across ranks; identical report on all ranks."""
    by_key, vocab = groups
    module = dist.unwrap(model)
    dist.broadcast_buffers(module)
    module.eval()
    meter = ClassificationMeter(source.classes, groups=vocab)
    batches = source.epoch(0)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=source.steps_per_epoch, desc=f"evaluate {source.split}",
                       unit="batch", file=sys.stderr)
    for batch in batches:
        with autocast:
            logits = module(standardize(batch.features))
        group_values = {g: [by_key.get(k, {}).get(g, "None") for k in batch.keys] for g in vocab}
        meter.update(logits.float(), batch.labels, batch.valid, group_values=group_values)
    module.train()
    return meter.compute(reduce=dist.all_reduce_sum)


def write_report(run_dir: Path, report: dict, classes: list[str], step: int) -> None:
    write_report_files(Path(run_dir) / "eval", {"step": step, **report}, classes,
                       title=f"Evaluation at step {step}")


def write_report_files(out: Path, report: dict, classes: list[str], title: str,
                       preamble: str = "") -> dict[str, Path]:
    """report.json, report.md, confusion.png, per_class.png in ``out``, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("report.json", "report.md", "confusion.png", "per_class.png")}
    atomic.write_text(paths["report.json"], json.dumps(report, indent=2))
    atomic.write_text(paths["report.md"],
                      f"# {title}\n\n{preamble + chr(10) if preamble else ''}{format_report(report, classes)}\n")
    plot_confusion(report, classes, paths["confusion.png"])
    plot_per_class(report, classes, paths["per_class.png"])
    return paths


# ---------------------------------------------------------------------------------------------
# restoring a trained model from a checkpoint (shared with predict and export)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run dir / its checkpoints dir -> its newest complete checkpoint."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        run_dir = path.parent if path.name == "checkpoints" else path
        latest = Checkpointer(run_dir).latest()
        if latest is None:
            raise CheckpointError(f"no usable checkpoint in {run_dir / 'checkpoints'} (from {path})")
        return latest
    raise CheckpointError(f"checkpoint {path} does not exist (give a .pt file or a run dir)")


def checkpoint_config(state: dict, overrides: Sequence[str] = (), *, path: str | Path = "") -> DictConfig:
    """The run's resolved config from the checkpoint, with ``key=value`` overrides applied.

    Keys that define what the weights expect as input (features, model architecture, the
    standardisation switch) cannot be overridden: the answer would silently be wrong.
    """
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"checkpoint {path} has no 'config' (not written by asc_dist.train?)")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(config_lib.Config), state["config"])
    except OmegaConfBaseException as e:
        raise CheckpointError(f"checkpoint {path}: its config does not fit this version's schema: "
                              f"{str(e).splitlines()[0]}") from None
    for item in overrides:
        if "=" not in item:
            raise config_lib.ConfigError(f"override {item!r} is not key=value")
        key = item.split("=", 1)[0].lstrip("+")
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in FROZEN_KEYS):
            raise config_lib.ConfigError(
                f"override '{item}': {key} is fixed by the checkpoint (the weights were trained "
                f"with {key}={OmegaConf.select(cfg, key)!r})")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise config_lib.ConfigError(f"override '{item}': bad config key '{key}': "
                                         f"{str(e).splitlines()[0]}") from None
    # World size 1: evaluation does not need train.global_batch to divide the process count.
    config_lib.validate(cfg, world_size=1)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def feature_standardizer(state: dict, cfg: Any, *, path: str | Path = "") -> nn.Module:
    """Standardize from the checkpoint's ``feature_stats``; else from the training shards' cache."""
    from asc_dist.features import Standardize, load_or_compute_stats

    if not cfg.data.standardize:
        return nn.Identity()
    stats = state.get("feature_stats")
    if stats is not None:
        return Standardize(torch.as_tensor(stats["mean"]), torch.as_tensor(stats["std"]))
    train_manifest = Path(cfg.data.shards) / cfg.data.train_split / "manifest.json"
    if not train_manifest.is_file():
        raise CheckpointError(
            f"checkpoint {path} holds no 'feature_stats' (per-mel-bin mean/std of the training "
            f"split) and the training split is not here ({train_manifest} is missing): pass "
            f"data.shards=<the shards the model was trained on>, or use a checkpoint written by a "
            f"trainer that stores feature_stats")
    mean, std = load_or_compute_stats(cfg, progress=False)
    return Standardize(mean, std)


def build_trained_model(state: dict, cfg: Any, classes: list[str], device: torch.device,
                        *, path: str | Path = "") -> nn.Module:
    """The checkpoint's model in eval mode on ``device``; never touches pretrained weight files."""
    from asc_dist.model import build_model, prepare_model

    spec = OmegaConf.to_container(cfg.model, resolve=True)
    # The checkpoint holds every weight; ImageNet files need not exist on this machine.
    spec.update(pretrained="none", compile=False)
    spec = SimpleNamespace(**spec)
    model = build_model(spec, len(classes))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: model weights do not fit {cfg.model.name} with "
                              f"{len(classes)} classes: {str(e).splitlines()[0]}") from None
    return prepare_model(model, spec, device).eval()


@dataclass
class Restored:
    """A checkpoint made ready for inference."""

    path: Path
    cfg: DictConfig
    model: nn.Module
    standardize: nn.Module
    classes: list[str]
    step: int
    state: dict

    def autocast(self, device: torch.device):
        """bf16 autocast exactly when training used it on this device type (precision=auto|bf16)."""
        p = self.cfg.train.precision
        if p == "bf16" or (p == "auto" and device.type == "cuda"):
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()


def restore(checkpoint: str | Path, *, overrides: Sequence[str] = (),
            device: torch.device | str = "cpu", state: dict | None = None) -> Restored:
    """Load ``checkpoint`` (file or run dir): config (+ overrides), model, standardisation.

    ``state``: the already loaded contents of ``checkpoint``, to avoid reading it twice.
    """
    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path) if state is None else state
    cfg = checkpoint_config(state, overrides, path=path)
    classes = state.get("classes")
    if not classes:
        raise CheckpointError(f"checkpoint {path} has no 'classes' list")
    device = torch.device(device)
    model = build_trained_model(state, cfg, list(classes), device, path=path)
    standardize = feature_standardizer(state, cfg, path=path).to(device)
    return Restored(path=path, cfg=cfg, model=model, standardize=standardize, classes=list(classes),
                    step=int(state.get("step", 0)), state=state)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available on this machine")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# CLI


def _split_location(arg: str | None, cfg: DictConfig) -> tuple[str, str]:
    """(shards root, split name) for ``--split``: a split name under data.shards, or a split dir."""
    if arg is None:
        return str(cfg.data.shards), str(cfg.data.test_split)
    p = Path(arg)
    if (p / "manifest.json").is_file():
        p = p.resolve()
        return str(p.parent), p.name
    if p.is_dir() or "/" in arg or "\\" in arg:
        raise FileNotFoundError(f"--split {arg}: no manifest.json there (expected a packed split "
                                f"directory such as shards/tut2018/test)")
    return str(cfg.data.shards), arg


def default_out_dir(checkpoint: Path, split: str, step: int) -> Path:
    ckpt_dir = checkpoint.resolve().parent
    if ckpt_dir.name == "checkpoints":  # inside a run dir: keep reports with the run
        return ckpt_dir.parent / "eval" / f"{split}-step{step}"
    return ckpt_dir / f"eval-{checkpoint.stem}-{split}"


def run(args: argparse.Namespace, env: dist.DistEnv, state: dict | None = None) -> dict:
    restored = restore(args.checkpoint, overrides=args.overrides, device=env.device, state=state)
    cfg, classes = restored.cfg, restored.classes
    shards, split = _split_location(args.split, cfg)
    eval_cfg = OmegaConf.merge(cfg, {"data": {"shards": shards}})
    from asc_dist.data import build_source

    batch = args.batch_size or max(1, cfg.train.global_batch // env.world_size)
    source = build_source(eval_cfg, split, train=False, rank=env.rank, world_size=env.world_size,
                          device=env.device, batch_size=batch)
    try:
        check_compatible(restored.state, model_name=cfg.model.name, classes=source.classes,
                         path=restored.path)
        if not source.index.labelled:
            raise ValueError(f"split {Path(shards) / split} is unlabelled: nothing to score against; "
                             f"use python -m asc_dist.predict for its predictions")
        try:
            groups = sample_groups(eval_cfg, split)
        except FileNotFoundError:  # breakdowns are a bonus; a split without metadata still scores
            groups = ({}, {})
        report = evaluate(restored.model, source, restored.standardize, groups,
                          restored.autocast(env.device), progress=env.is_main and not args.quiet)
    finally:
        source.close()
    report = {
        "step": restored.step, **report, "checkpoint": str(restored.path),
        "split": str(Path(shards) / split), "processes": env.world_size, "backend": source.backend,
        "device": env.device.type, "model": cfg.model.name,
    }
    if env.is_main:
        out = Path(args.out) if args.out else default_out_dir(restored.path, split, restored.step)
        preamble = (f"checkpoint `{restored.path}` (step {restored.step}, {cfg.model.name}) on "
                    f"`{Path(shards) / split}`; {env.world_size} process(es), {source.backend} "
                    f"backend, {env.device.type}\n")
        write_report_files(out, report, classes, title=f"Evaluation of {cfg.name} at step "
                           f"{restored.step}", preamble=preamble)
        print(format_report(report, classes), flush=True)
        print(f"wrote {out}/report.json, report.md, confusion.png, per_class.png", flush=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m asc_dist.evaluate",
        description="Score a checkpoint on a packed split (1 process or under torchrun; every "
                    "clip is counted once) and write report.json/report.md/confusion.png/"
                    "per_class.png.")
    p.add_argument("checkpoint", help="checkpoint .pt file, or a run dir (its newest checkpoint)")
    p.add_argument("--split", default=None,
                   help="split name under data.shards (default: the run's data.test_split) or a "
                        "packed split directory (one with manifest.json)")
    p.add_argument("--out", default=None,
                   help="report directory (default: <run_dir>/eval/<split>-step<N>)")
    p.add_argument("--backend", choices=["dali", "torch", "auto"], default=None,
                   help="data backend (default: the run's data.backend)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="default: the run's train.device")
    p.add_argument("--batch-size", type=int, default=None,
                   help="clips per process and batch (default: train.global_batch / processes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. data.shards=/data/shards data.num_threads=4")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    extra = [f"data.backend={args.backend}"] if args.backend else []
    extra += [f"train.device={args.device}"] if args.device else []
    args.overrides = list(args.overrides) + extra
    if args.batch_size is not None and args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:  # checkpoint and config problems surface before any process group starts
        path = resolve_checkpoint(args.checkpoint)
        state = load_checkpoint(path)
        cfg = checkpoint_config(state, args.overrides, path=path)
    except (CheckpointError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.checkpoint = path
    env = dist.init(cfg.train.device)
    try:
        run(args, env, state)
    except (CheckpointError, config_lib.ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        dist.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
