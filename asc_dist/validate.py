"""Score a model on a batch source: every sample exactly once across ranks, and the report files.

Used by the trainer for its periodic evaluation and by ``python -m asc_dist.evaluate``. The
report (class-wise accuracy, accuracy, per-class, log-loss, confusion, city/device breakdowns) is
identical on every rank. Report files: report.json, report.md, confusion.png, per_class.png, and
``predictions.tsv`` (per clip: key, true and predicted class, class probabilities), from which
statistics over runs (asc_dist.table1) need no re-inference.
"""

from __future__ import annotations

import copy
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from asc_dist import atomic, dist
from asc_dist.metrics import ClassificationMeter, device_groups, format_report
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


@dataclass
class Predictions:
    """Per-clip results of one evaluation, in the split's stored order."""

    keys: list[str]
    labels: list[int]
    probs: np.ndarray  # [n, num_classes] softmax


@torch.no_grad()
def evaluate(model, source, standardize, groups, autocast, progress: bool = False,
             keep: bool = False, half: bool = False, known: list[str] | None = None
             ) -> tuple[dict, Predictions | None]:
    """Score every sample of ``source`` exactly once across ranks; identical report on all ranks.

    ``keep``: also return every clip's prediction, gathered from all ranks. ``half``: a float16
    copy of the model scores float16 inputs (the standardised features are cast), as the DCASE
    2024/2025 baselines report their test numbers; the model itself is left as it is. A model
    that routes by device (asc_dist.devices.RoutedModel: standardises itself) gets each row's
    device from ``groups``. ``known``: the devices the model knows (asc_dist.metrics.device_groups).
    """
    by_key, vocab = groups
    module = dist.unwrap(model)
    dist.broadcast_buffers(module)
    trained = module
    routed = getattr(module, "routes_by_device", False)
    if half and not routed:  # a router holds float16 members already if asked to
        module = copy.deepcopy(module).half()
    module.eval()
    meter = ClassificationMeter(source.classes, groups=vocab)
    batches = source.epoch(0)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=source.steps_per_epoch, desc=f"evaluate {source.split}",
                       unit="batch", file=sys.stderr)
    kept: list[tuple[list[str], list[int], np.ndarray]] = []
    for batch in batches:
        x = standardize(batch.features)  # features stay float32: only the network runs in bf16
        if half and not routed:
            x = x.half()
        group_values = {g: [by_key.get(k, {}).get(g, "None") for k in batch.keys] for g in vocab}
        with autocast:
            if routed:
                logits = module(x, [by_key.get(k, {}).get("device") for k in batch.keys])
            else:
                logits = module(x)
        meter.update(logits.float(), batch.labels, batch.valid, group_values=group_values)
        if keep:
            valid = batch.valid.cpu().numpy()
            kept.append(([k for k, ok in zip(batch.keys, valid) if ok],
                         batch.labels.cpu().numpy()[valid].tolist(),
                         logits.float().softmax(dim=1).cpu().numpy()[valid]))
    trained.train()
    report = meter.compute(reduce=dist.all_reduce_sum)
    groups_of_devices = device_groups(report, known)
    if groups_of_devices:
        report["device_groups"] = groups_of_devices
    if not keep:
        return report, None
    # Ranks hold contiguous shares of the split: rank order is the stored order.
    shares = dist.all_gather_objects(kept)
    parts = [part for share in shares for part in share]
    probs = np.concatenate([p for _, _, p in parts]) if parts else np.zeros((0, len(source.classes)))
    return report, Predictions([k for ks, _, _ in parts for k in ks],
                               [lab for _, ls, _ in parts for lab in ls], probs)


def write_predictions(path: Path, preds: Predictions, classes: list[str]) -> Path:
    """predictions.tsv: key, label, predicted, one probability column per class (atomic)."""
    with atomic.writing(path, "w", what="predictions") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["key", "label", "predicted", *classes])
        for key, label, p in zip(preds.keys, preds.labels, preds.probs):
            w.writerow([key, classes[label], classes[int(p.argmax())], *(f"{v:.6f}" for v in p)])
    return Path(path)


def read_predictions(path: str | Path) -> tuple[list[str], dict[str, tuple[int, np.ndarray]]]:
    """(classes, {key: (true class index, probabilities)}) from a predictions.tsv."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    classes = rows[0][3:]
    index = {c: i for i, c in enumerate(classes)}
    return classes, {r[0]: (index[r[1]], np.asarray(r[3:], dtype=np.float64)) for r in rows[1:]}


def split_summary(split_dir: str | Path) -> str:
    """Which split a report scored, as its manifest tells: the path, the clips, how it was packed
    (a fold-1 number and one on another protocol are not comparable: docs/table1.md)."""
    split_dir = Path(split_dir)
    try:
        m = json.loads((split_dir / "manifest.json").read_text())
        s = m.get("settings") or {}
        chosen = (s.get("split_list") or {}).get("name")
        how = [f"{m['num_samples']} clips", f"packed from `{s.get('source')}`",
               f"layout {s.get('layout')}"]
        how += [f"fold {s['fold']}"] if s.get("layout") != "csv" and "fold" in s else []
        how += [f"selected by {chosen}"] if chosen else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"`{split_dir}`"  # no readable manifest: the path is all there is to say
    return f"`{split_dir}` ({', '.join(how)})"


def write_report(run_dir: Path, report: dict, classes: list[str], step: int,
                 preds: Predictions | None = None, split: str | Path | None = None) -> None:
    """The trainer's final report, in ``run_dir/eval``; ``split``: the split it scored."""
    where = {"split": str(split)} if split is not None else {}
    write_report_files(Path(run_dir) / "eval", {"step": step, **where, **report}, classes,
                       title=f"Evaluation at step {step}", preds=preds,
                       preamble=f"Measured on {split_summary(split)}.\n" if split else "")


def write_report_files(out: Path, report: dict, classes: list[str], title: str,
                       preamble: str = "", preds: Predictions | None = None) -> dict[str, Path]:
    """report.json, report.md, confusion.png, per_class.png (+ predictions.tsv) in ``out``, each
    written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("report.json", "report.md", "confusion.png", "per_class.png")}
    if preds is not None:
        paths["predictions.tsv"] = write_predictions(out / "predictions.tsv", preds, classes)
    atomic.write_text(paths["report.json"], json.dumps(report, indent=2))
    atomic.write_text(paths["report.md"],
                      f"# {title}\n\n{preamble + chr(10) if preamble else ''}{format_report(report, classes)}\n")
    plot_confusion(report, classes, paths["confusion.png"])
    plot_per_class(report, classes, paths["per_class.png"])
    return paths
