"""The waveform cache (``data.cache=waveform``): every training clip's waveform resident on the
training device, the front end run per batch there.

The feature cache (asc_dist.data.cache) computes each clip's log-mel once, which rules out what
acts on the waveform before the front end: device impulse responses, a roll by samples, a random
mel band (asc_dist.wave_augment). For 1-s clips the front end is cheap on a GPU, so the waveform
itself stays resident instead:

* building: the training clips (``data.devices``' subset, or the split) are decoded once, each
  rank its contiguous share in stored order through the torch backend's reader (every member
  checked against its digest under ``data.verify``; decoded, mixed down and resampled as that
  backend does, so a clip is exactly what the streaming sources feed the front end: at the
  features' rate, which is the shards' own when they were packed at it), then all-gathered
  chunk by chunk. Nothing is persisted: decoding is what every streaming epoch does anyway.
  **Memory first**: the bytes needed (clips x samples x 4, plus the impulse responses' spectra)
  are computed before anything is decoded and compared with the device's free memory (host
  memory available, shared by the node's ranks, on a CPU); a cache that does not fit is refused
  on every rank with both numbers and the alternatives.
* training: the feature cache's plan (one global permutation per epoch, a pure function of
  (seed, epoch), rank r's slice of every global batch; ``train.drop_last=false``'s weighted last
  batch): :class:`asc_dist.data.cache.ResidentSource`. Per step, on the device: the batch's
  waveforms -> impulse responses -> roll by samples -> the configured front end (frontend.LogMel,
  with a random mel band when on) -> the batch's log-mels, as every other source yields them
  (the masks, MixStyle and mixup follow in the trainer). The draws come from a generator seeded
  per step from (train.seed, rank, global step) on the device: a resumed run redraws exactly
  what the uninterrupted one drew, and nothing waits for the host.
* evaluation, statistics, ``distill logits`` and restore compute features as before
  (build_source gives evaluation sources ``data.cache=auto``'s).

With no waveform augmentation on, a batch's features are bit-identical on the CPU to the
feature cache's (tests/test_waveform.py): the same reader, the same front end module.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from asc_dist import dist
from asc_dist.data import Batch
from asc_dist.data.cache import ResidentSource, table_bytes
from asc_dist.data.manifest import DataError, SplitIndex
from asc_dist.data.sharding import derive_seed, shard_range
from asc_dist.frontend import LogMel, clip_samples
from asc_dist.wave_augment import ImpulseResponses, MelBand, load_irs, roll_samples, time_roll

log = logging.getLogger(__name__)

WAVE_STREAM = 0x3A7E  # the waveform augmentations' draws: a stream apart from the trainer's
CHUNK = 4096  # clips per all-gather round while building (bounds the transient memory)


def irs_for(cfg: Any, index: SplitIndex) -> tuple[list[str], list[np.ndarray]] | None:
    """``augment.dir``'s responses at the clips' rate (None when it is off); refused naming the
    folder or file when not usable (asc_dist.wave_augment.load_irs)."""
    d = cfg.augment.dir
    if not d.p > 0:
        return None
    return load_irs(d.path, int(cfg.features.sample_rate), index.resampler)


def preflight(cfg: Any, index: SplitIndex) -> None:
    """Before any process group starts: the impulse-response folder is usable (``index``: the
    training split's)."""
    if cfg.data.cache == "waveform":
        irs_for(cfg, index)


def free_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are) this rank may fill: the GPU's free memory, or on a CPU the host's
    available memory divided among the node's ranks (each holds a copy)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available = None
    try:
        for line in open("/proc/meminfo"):  # noqa: SIM115 - a short read
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    share = f" / {ranks} ranks on this node" if ranks > 1 else ""
    return available // ranks, f"host memory available{share}"


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_fits(cfg: Any, clips: int, ir_bytes: int, device: torch.device, chosen: str) -> int:
    """The bytes the cache needs; refused on every rank (naming both numbers and the
    alternatives) when any rank's device cannot hold them."""
    samples = clip_samples(cfg.features)
    need = clips * samples * 4 + ir_bytes
    free, what = free_memory(device)
    if dist.any_rank(need > free, device):
        irs = f" + {gib(ir_bytes)} of impulse responses" if ir_bytes else ""
        raise DataError(
            f"data.cache=waveform: the {clips:,} training clips{chosen} need {gib(need)} "
            f"({clips:,} x {samples:,} samples x 4 B{irs}), but {what} is {gib(free)} (on this or "
            f"another rank): use data.cache=device (their log-mels, "
            f"{gib(table_bytes(cfg, clips))}; without augment.dir / augment.mel_band, the roll by "
            f"frames), train on fewer clips (data.devices), or a device with more memory")
    return need


def decode(index: SplitIndex, cfg: Any, ids: np.ndarray, workers: int, progress: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(waveforms [n, L] float32, labels [n]) of the clips ``ids`` on the CPU, through the torch
    backend's reader (digests checked under data.verify)."""
    from asc_dist.data.pytorch import ShardSamples, _collate, _worker_init, worker_error

    dataset = ShardSamples(index, cfg.features, features_here=False, verify=bool(cfg.data.verify))
    batches = [ids[i:i + 64].tolist() for i in range(0, len(ids), 64)]
    workers = workers if len(batches) > 1 else 0  # one batch: a worker would only cost its start
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                        worker_init_fn=_worker_init if workers else None)
    waves = torch.empty((len(ids), clip_samples(cfg.features)), dtype=torch.float32)
    labels = torch.empty(len(ids), dtype=torch.int64)
    it = iter(loader)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(batches), unit="batch", file=sys.stderr,
                  desc=f"waveform cache '{index.split}'")
    pos = 0
    try:
        for x, y, _ in it:
            waves[pos:pos + len(y)], labels[pos:pos + len(y)] = x, y
            pos += len(y)
    except DataError as e:
        raise worker_error(e) from None
    finally:
        dataset.close()
    return waves, labels


def gather(share: torch.Tensor, counts: list[int], device: torch.device) -> torch.Tensor:
    """Every rank's ``share`` (``counts[r]`` rows) in rank order, on every rank's ``device``,
    ``CHUNK`` rows per round: the peak is the result plus one round, not twice the result."""
    if len(counts) == 1:
        return share.to(device)
    out = torch.empty((sum(counts), *share.shape[1:]), dtype=share.dtype, device=device)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for c0 in range(0, max(counts), CHUNK):
        got = dist.all_gather_rows(share[c0:c0 + CHUNK].to(device))
        pos = 0
        for r, n in enumerate(counts):
            k = min(CHUNK, max(0, n - c0))
            out[starts[r] + c0: starts[r] + c0 + k] = got[pos:pos + k]
            pos += k
    return out


class WaveformSource(ResidentSource):
    """Training batches from resident waveforms, the front end per batch (see the module doc)."""

    backend = "torch+waveform"

    def __init__(self, cfg: Any, split: str, *, index: SplitIndex, progress: bool = True, **kw):
        super().__init__(cfg, split, index=index, **kw)
        if not self.train:
            raise ValueError("the waveform cache serves training only (evaluation: "
                             "data.cache=auto)")
        ids = self.ids if self.ids is not None else np.arange(self.num_samples, dtype=np.int64)
        chosen = f" of devices {list(cfg.data.devices)}" if self.ids is not None else ""
        a = cfg.augment
        irs = irs_for(cfg, self.index)
        samples = clip_samples(cfg.features)
        ir_bytes = ImpulseResponses.nbytes(irs[1], samples) if irs else 0
        need = check_fits(cfg, len(ids), ir_bytes, self.device, chosen)
        t0 = time.perf_counter()
        lo, hi = shard_range(len(ids), self.rank, self.world_size)
        waves, labels = decode(self.index, cfg, ids[lo:hi], self.num_threads,
                               progress and self.rank == 0)
        counts = [int(np.diff(shard_range(len(ids), r, self.world_size))[0])
                  for r in range(self.world_size)]
        self.waves = gather(waves, counts, self.device)
        self.labels = gather(labels, counts, self.device)
        del waves, labels
        row_of = torch.full((self.num_samples,), -1, dtype=torch.int64)
        row_of[torch.from_numpy(ids)] = torch.arange(len(ids))
        self._row_of = row_of.to(self.device)
        self.logmel = LogMel(cfg.features).to(self.device)
        self.max_shift = roll_samples(a.roll_seconds, int(cfg.features.sample_rate))
        self.band = MelBand(a.mel_band, cfg.features) if MelBand.enabled(a.mel_band) else None
        self.irs = self.eligible = None
        if irs is not None:
            self.irs = ImpulseResponses(irs[1], samples, float(a.dir.p), self.device, irs[0])
            devices = {str(d) for d in a.dir.devices}
            of = self.index.samples
            self.eligible = torch.tensor([not devices or str(of[j].device) in devices
                                          for j in ids.tolist()], device=self.device)
        self._gen = torch.Generator(device=self.device)
        self.last: dict[str, torch.Tensor | None] = {}  # the last step's draws (tests, logging)
        if self.rank == 0:
            self._announce(len(ids), chosen, need, time.perf_counter() - t0, a)

    def _announce(self, clips: int, chosen: str, need: int, seconds: float, a: Any) -> None:
        f = self.cfg.features
        log.info(f"waveform cache '{self.split}': {clips:,} clips{chosen} x {f.clip_seconds:g} s "
                 f"at {f.sample_rate} Hz, {gib(need)} on {self.device} ({seconds:.1f} s); the "
                 f"front end runs per batch")
        if self.irs is not None:
            on = int(self.eligible.sum())
            which = f"devices {list(a.dir.devices)}" if a.dir.devices else "every device"
            log.info(f"augment.dir: {len(self.irs)} impulse responses from {a.dir.path} (longest "
                     f"{self.irs.longest:,} samples), p {a.dir.p:g} on {which}: {on:,} of "
                     f"{clips:,} training clips")
            if on == 0:
                log.warning(f"augment.dir: no training clip is of devices {list(a.dir.devices)}: "
                            f"no clip is convolved")

    def augment(self, x: torch.Tensor, rows: torch.Tensor, generator: torch.Generator
                ) -> torch.Tensor:
        """Waveforms [B, L] of table ``rows`` -> log-mels [B, 1, n_mels, frames]: impulse
        responses, roll by samples, the front end (a random band when on)."""
        self.last = {}
        if self.irs is not None:
            x, self.last["dir_applied"], self.last["dir_which"] = self.irs.apply(
                x, self.eligible.index_select(0, rows), generator)
        x, self.last["shifts"] = time_roll(x, self.max_shift, generator)
        banks = None
        if self.band is not None:
            self.last["f_min"], self.last["f_max"], banks = self.band.draw(generator, self.device)
        return self.logmel(x, banks)

    @torch.no_grad()
    def _epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        for step, (ids, ok, row, weight) in enumerate(self._steps(epoch, start_step), start_step):
            rows = self._row_of.index_select(0, ids)
            self._gen.manual_seed(derive_seed(self.seed, self.rank,
                                              epoch * self.steps_per_epoch + step, WAVE_STREAM))
            x = self.augment(self.waves.index_select(0, rows), rows, self._gen)
            keys = [self.index.samples[j].key if j >= 0 else "" for j in row.tolist()]
            yield Batch(features=x, labels=self.labels.index_select(0, rows), keys=keys,
                        valid=ok, weight=weight)
