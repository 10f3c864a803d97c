"""Score a model on a packed split: exact across ranks, with reports a person can read.

Used by the trainer for its periodic evaluation; ``python -m asc_dist.evaluate`` runs a saved
checkpoint the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from asc_dist import dist
from asc_dist.metrics import ClassificationMeter, format_report, plot_confusion, plot_per_class

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
def evaluate(model, source, standardize, groups, autocast) -> dict:
    """Score every sample of ``source`` exactly once across ranks; identical report on all ranks."""
    by_key, vocab = groups
    module = dist.unwrap(model)
    dist.broadcast_buffers(module)
    module.eval()
    meter = ClassificationMeter(source.classes, groups=vocab)
    for batch in source.epoch(0):
        with autocast:
            logits = module(standardize(batch.features))
        group_values = {g: [by_key.get(k, {}).get(g, "None") for k in batch.keys] for g in vocab}
        meter.update(logits.float(), batch.labels, batch.valid, group_values=group_values)
    module.train()
    return meter.compute(reduce=dist.all_reduce_sum)


def write_report(run_dir: Path, report: dict, classes: list[str], step: int) -> None:
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps({"step": step, **report}, indent=2))
    tmp.replace(out / "report.json")
    tmp = out / "report.md.tmp"
    tmp.write_text(f"# Evaluation at step {step}\n\n{format_report(report, classes)}\n")
    tmp.replace(out / "report.md")
    plot_confusion(report, classes, out / "confusion.png")
    plot_per_class(report, classes, out / "per_class.png")
