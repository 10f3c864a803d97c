"""The feature cache: each clip's log-mel computed once, the whole split kept on the training device.

The paper's front end is deterministic (mixup acts on features inside the batch), so streaming
recomputes identical log-mels every epoch. With ``data.cache=device`` (or ``auto`` when the
split fits in ``data.cache_max_gb``) the first use of a split runs it once through the
configured streaming backend (DALI builds the log-mel on the GPU when there is one) and every
rank then holds all of its features and labels as one tensor on its device:

* building: each rank computes its contiguous share in stored order (the evaluation plan) and
  the shares are all-gathered: W ranks build W times faster than one, and the result is the
  same tensor on every rank. Rank 0 persists it beside the shards as
  ``<split>/features-<settings hash>-<backend>-<device type>.pt``, keyed by the feature settings
  and the split's manifest digest and checked by a checksum, written atomically; a later run
  (every Table I row and seed) loads it in seconds. A stale or corrupt file is rebuilt. New
  feature keys change the settings hash, so a cache made before they existed is built once more
  under the new name, and the log says so.
  The build reads through the streaming source, so every member is checked against its digest
  (``data.verify``) before its features enter the table; a table built with ``data.verify=false``
  is marked so and rebuilt (checked) by the next run that verifies.
* training: every epoch is one permutation of the whole split, a pure function of (seed,
  epoch) (:func:`asc_dist.data.sharding.global_plan`); rank r takes its slice of each global
  batch, so resuming at any step is arithmetic. A step is an index_select on the device.
* evaluation: the evaluation plan of the streaming sources, each clip once across ranks.

Features are bit-identical to the streamed ones of the same backend and device (each clip is
computed by the same code, alone or in the same batch layout).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asc_dist import atomic, dist
from asc_dist.atomic import NoSpaceError
from asc_dist.data import Batch, BatchSource
from asc_dist.data.manifest import manifest_digest
from asc_dist.data.sharding import eval_plan, global_plan
from asc_dist.frontend import settings, settings_hash

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class FeatureTable:
    """A whole split: features [N, 1, n_mels, frames] float32, labels [N] int64, keys, on a device."""

    features: torch.Tensor
    labels: torch.Tensor
    keys: list[str]

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


def table_bytes(cfg: Any, num_samples: int) -> int:
    return num_samples * int(cfg.features.n_mels) * int(cfg.features.frames) * 4


def cache_path(cfg: Any, split: str, backend: str, device: torch.device) -> Path:
    name = f"features-{settings_hash(cfg.features)}-{backend}-{device.type}.pt"
    return Path(cfg.data.shards) / split / name


def tensor_checksum(features: torch.Tensor) -> str:
    """blake2b-128 of a CPU tensor's bytes: what a persisted table (or logits file) is checked by."""
    return hashlib.blake2b(features.contiguous().view(torch.uint8).numpy().data, digest_size=16).hexdigest()


def load_table(path: Path, cfg: Any, digest: str, device: torch.device) -> FeatureTable | None:
    """The persisted table, or None when it is missing, stale (other settings or shards) or
    corrupt (unreadable, wrong shape, checksum mismatch)."""
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        ok = (d["version"] == CACHE_VERSION and d["manifest"] == digest
              and d["features_settings"] == settings(cfg.features)
              and tuple(d["features"].shape[1:]) == (1, int(cfg.features.n_mels), int(cfg.features.frames))
              and len(d["keys"]) == d["features"].shape[0] == d["labels"].shape[0]
              and d["checksum"] == tensor_checksum(d["features"]))
    except Exception as e:  # noqa: BLE001 - any damage means: rebuild
        log.warning("feature cache %s is unreadable (%s); rebuilding it", path, type(e).__name__)
        return None
    if not ok:
        log.warning("feature cache %s is stale or damaged; rebuilding it", path)
        return None
    if cfg.data.verify and d.get("verified") is False:
        log.info("feature cache %s was built with data.verify=false; rebuilding it from checked "
                 "shards", path)
        return None
    return FeatureTable(d["features"].to(device), d["labels"].to(device), list(d["keys"]))


def save_table(path: Path, table: FeatureTable, cfg: Any, digest: str, backend: str,
               verified: bool) -> None:
    features = table.features.cpu()
    state = {"version": CACHE_VERSION, "manifest": digest, "features_settings": settings(cfg.features),
             "backend": backend, "features": features, "labels": table.labels.cpu(),
             "keys": list(table.keys), "checksum": tensor_checksum(features),
             "verified": verified}  # members checked against their digests
    try:
        with atomic.writing(path, what="feature cache", need_bytes=table.nbytes) as f:
            torch.save(state, f)
    except (OSError, NoSpaceError) as e:  # read-only or full dataset storage: this run still has it
        log.warning("cannot persist the feature cache at %s (%s); it is rebuilt next run", path, e)


def older_version(path: Path, cfg: Any) -> tuple[Path, list[str]] | None:
    """A cache beside ``path`` (same split, backend, device) whose settings are this run's but for
    feature keys a later version added, and those keys: it is rebuilt once under the new
    settings hash. Read lazily (mmap): only its settings are looked at."""
    ours = settings(cfg.features)
    for other in sorted(path.parent.glob("features-*-" + path.name.split("-", 2)[2])):
        if other == path:
            continue
        try:
            theirs = torch.load(other, map_location="cpu", weights_only=True, mmap=True)[
                "features_settings"]
        except Exception as e:  # noqa: BLE001 - damaged or foreign: not an older version of ours
            log.debug("feature cache %s: unreadable settings (%s)", other, type(e).__name__)
            continue
        added = sorted(set(ours) - set(theirs))
        if added and set(theirs) <= set(ours) and all(ours[k] == v for k, v in theirs.items()):
            return other, added
    return None


def build_table(stream: BatchSource, progress: bool) -> FeatureTable:
    """Run this rank's evaluation share of ``stream`` once, then all-gather the shares."""
    feats, labels, keys = [], [], []
    batches = stream.epoch(0)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=stream.steps_per_epoch, unit="batch", file=sys.stderr,
                       desc=f"feature cache '{stream.split}' ({stream.backend}, {stream.device.type})")
    for b in batches:
        valid = b.valid.cpu()
        feats.append(b.features[valid.to(b.features.device)])
        labels.append(b.labels[valid.to(b.labels.device)])
        keys += [k for k, ok in zip(b.keys, valid.tolist()) if ok]
    # Shares are contiguous and in rank order, so concatenation restores the stored order.
    features = dist.all_gather_rows(torch.cat(feats))
    all_labels = dist.all_gather_rows(torch.cat(labels))
    all_keys = [k for share in dist.all_gather_objects(keys) for k in share]
    return FeatureTable(features, all_labels, all_keys)


def load_or_build(stream: BatchSource, progress: bool = True) -> FeatureTable:
    """The split's table on every rank: loaded if a valid file exists for all ranks, else built
    collectively from ``stream`` (an evaluation-mode source of this rank) and persisted."""
    cfg, device = stream.cfg, stream.device
    path = cache_path(cfg, stream.split, stream.backend, device)
    digest = manifest_digest(stream.index.dir)
    table = load_table(path, cfg, digest, device)
    if not dist.any_rank(table is None, device):
        return table
    older = older_version(path, cfg) if stream.rank == 0 and not path.is_file() else None
    if older is not None:
        log.info("feature cache %s was made before the feature keys %s existed (its settings are "
                 "otherwise these): building it once more as %s (the old file stays for older "
                 "versions; delete it once none reads these shards)", older[0],
                 ", ".join(older[1]), path.name)
    table = build_table(stream, progress)
    if stream.rank == 0:
        # an old pack (no digests) checks nothing: its table must not pass for a checked one
        save_table(path, table, cfg, digest, stream.backend,
                   verified=bool(cfg.data.verify) and stream.index.has_digests)
    return table


class ResidentSource(BatchSource):
    """Epochs over clips resident on the device: the feature cache's and the waveform cache's
    (asc_dist.data.waveform) shared plan. Training: :func:`global_plan` over the split (or
    ``data.devices``' ids), a partial last batch with its weight (``train.drop_last=false``);
    evaluation: the streaming sources' plan, padding rows marked invalid."""

    def _steps(self, epoch: int, start_step: int
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray, float]]:
        """Per step from ``start_step``: (stored-order ids [B] on the device, valid [B] on the
        device, the plan's row (-1 = padding), the loss weight)."""
        if self.train:
            plan = global_plan(self.num_samples, seed=self.seed, epoch=epoch, rank=self.rank,
                               world_size=self.world_size, batch_size=self.batch_size,
                               ids=self.ids, drop_last=self.drop_last)
            # a rank without clips in a partial last batch reads one real clip at weight 0
            pad = int(self.ids[0]) if self.ids is not None else 0
        else:
            plan = np.asarray(eval_plan(self.num_samples, rank=self.rank, world_size=self.world_size,
                                        batch_size=self.batch_size))
            pad = 0
        # One host-to-device copy per epoch; a step is then an index_select on the device.
        on_device = torch.from_numpy(np.where(plan >= 0, plan, pad)).to(self.device)
        valid = torch.from_numpy(plan >= 0).to(self.device)
        full = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        for step in range(start_step, len(plan)):
            ids = on_device[step]
            row = plan[step]
            weight = 1.0
            if self.train:
                ok = full
                if self.remainder and step == len(plan) - 1:  # the partial last batch
                    # (train.drop_last=false): this rank's share of it, weighted
                    rows = int((row >= 0).sum())
                    weight = self.step_weight(step, rows)
                    ids, ok = ids[:max(rows, 1)], valid[step, :max(rows, 1)]
            else:
                ok = valid[step]
            yield ids, ok, row[:len(ids)], weight


class CachedSource(ResidentSource):
    """Batches from a :class:`FeatureTable` on the device (see the module doc)."""

    cached = True

    def __init__(self, cfg: Any, split: str, *, stream: BatchSource, progress: bool = True, **kw):
        super().__init__(cfg, split, index=stream.index, **kw)
        self.backend = f"{stream.backend}+cache"
        try:
            self.table = load_or_build(stream, progress=progress and self.rank == 0)
        finally:
            stream.close()

    def _epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        for ids, ok, row, weight in self._steps(epoch, start_step):
            labels = self.table.labels.index_select(0, ids)
            if not self.train:
                labels = torch.where(ok, labels, -1)
            keys = [self.table.keys[j] if j >= 0 else "" for j in row.tolist()]
            yield Batch(features=self.table.features.index_select(0, ids), labels=labels,
                        keys=keys, valid=ok, weight=weight)
