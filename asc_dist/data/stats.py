"""Per-mel-bin standardisation statistics of the training split, cached beside its shards.

``<shards>/<train_split>/stats-<settings hash>.json`` holds mean and std over every frame of
every training clip (float64 accumulation), keyed by the feature settings and the split's
manifest digest, so a changed setting or a re-pack computes them again. Only the training split
is ever read: test statistics would leak into the model's input.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from asc_dist import atomic
from asc_dist.atomic import NoSpaceError
from asc_dist.data import build_source
from asc_dist.data.manifest import manifest_digest, require_split
from asc_dist.frontend import settings, settings_hash

log = logging.getLogger(__name__)

STATS_VERSION = 1


def stats_path(cfg: Any) -> Path:
    return Path(cfg.data.shards) / cfg.data.train_split / f"stats-{settings_hash(cfg.features)}.json"


def _read(path: Path, cfg: Any, digest: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if d.get("version") != STATS_VERSION or d.get("manifest") != digest:
        return None
    if d.get("features") != settings(cfg.features):
        return None
    mean, std = torch.tensor(d["mean"]), torch.tensor(d["std"])
    if mean.numel() != cfg.features.n_mels or std.numel() != cfg.features.n_mels:
        return None
    return mean, std


def moments(batches, n_mels: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-mel-bin mean/std [n_mels] (float64 accumulation) over every frame of feature batches
    [n, 1, n_mels, T]."""
    total = total_sq = None
    count = 0
    for x in batches:
        x = x.double()
        if total is None:
            total = torch.zeros(n_mels, dtype=torch.float64, device=x.device)
            total_sq = torch.zeros_like(total)
        total += x.sum(dim=(0, 1, 3))
        total_sq += (x * x).sum(dim=(0, 1, 3))
        count += x.shape[0] * x.shape[-1]
    if count == 0:
        raise ValueError("no clips for the feature statistics")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp(min=0).sqrt()
    return mean.float().cpu(), std.float().cpu(), count


def _streamed(cfg: Any, device: torch.device | None, progress: bool):
    """The training split's valid feature batches, streamed once in stored order."""
    with build_source(cfg, cfg.data.train_split, train=False, rank=0, world_size=1,
                      device=device or torch.device("cpu"), batch_size=32, seed=0,
                      cache="none") as src:
        it = src.epoch(0)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=src.steps_per_epoch, desc=f"feature stats ({src.backend})",
                      unit="batch", file=sys.stderr)
        for batch in it:
            yield batch.features[batch.valid]


def load_or_compute_stats(cfg: Any, *, device: torch.device | None = None, progress: bool = True,
                          features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [n_mels] of the training split: from its cache file, else computed and cached.

    ``features``: the split's resident feature tensor (asc_dist.data.cache), read instead of
    streaming the split again. Deterministic and written atomically, so concurrent callers at
    worst compute the same numbers twice; the trainer computes on rank 0, barriers, then all
    ranks load.
    """
    split_dir = require_split(cfg.data.shards, cfg.data.train_split)
    path = stats_path(cfg)
    digest = manifest_digest(split_dir)
    cached = _read(path, cfg, digest)
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    batches = features.split(256) if features is not None else _streamed(cfg, device, progress)
    mean, std, count = moments(batches, int(cfg.features.n_mels))
    record = {
        "version": STATS_VERSION, "split": cfg.data.train_split, "manifest": digest,
        "features": settings(cfg.features),
        "frames_counted": count, "mean": mean.tolist(), "std": std.tolist(),
    }
    try:
        atomic.write_text(path, json.dumps(record, indent=1))
    except (OSError, NoSpaceError) as e:  # read-only or full dataset storage: the run still has
        # them (and its checkpoints keep them)
        log.warning("cannot cache feature statistics at %s (%s); computed again next run", path, e)
        return mean, std
    if progress:
        log.info(f"feature statistics: {path} ({count} frames, {time.perf_counter() - t0:.1f} s)")
    return mean, std
