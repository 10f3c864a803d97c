"""Score a model on a batch source: every sample exactly once across ranks, and the report files.

Used by the trainer for its periodic evaluation and by ``python -m asc_dist.evaluate``. The
report (class-wise accuracy, accuracy, per-class, log-loss, confusion, city/device breakdowns) is
identical on every rank. Report files: report.json, report.md, confusion.png, per_class.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from asc_dist import atomic, dist
from asc_dist.metrics import ClassificationMeter, format_report
from asc_dist.plots import plot_confusion, plot_per_class

BREAKDOWNS = ("city", "device")


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
        x = standardize(batch.features)  # features stay float32: only the network runs in bf16
        with autocast:
            logits = module(x)
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
