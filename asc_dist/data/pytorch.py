"""Pure-PyTorch backend: WebDataset shards -> soundfile decode in DataLoader workers -> LogMel.

The fallback where DALI is missing and the oracle DALI is tested against. Shards are read by
random access through their DALI index (``os.pread`` of one member, its tar header checked),
so the per-epoch plan of :mod:`asc_dist.data.sharding` is followed exactly whatever the worker
count, and resuming at ``start_step`` reads nothing it skips. Workers decode (and on CPU also
compute the log-mel, so it overlaps the training step); with CUDA the log-mel runs on the GPU.
Errors name the shard and the sample key. (webdataset itself reads the same shards in the
benchmark baseline and the tests; this backend needs only the index to read them.)
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from asc_dist import audio
from asc_dist.data import Batch, BatchSource
from asc_dist.data.manifest import DataError, SplitIndex, read_member
from asc_dist.data.sharding import eval_plan, train_plan
from asc_dist.frontend import LogMel, clip_samples, fix_length


class ShardSamples(Dataset):
    """``ds[i]`` -> (waveform [L] or log-mel [1, M, T], label, key) for sample ``i`` (-1: padding)."""

    def __init__(self, index: SplitIndex, cfg_features: Any, features_here: bool):
        self.index = index
        self.cfg_features = cfg_features
        self.sample_rate = int(cfg_features.sample_rate)
        self.num_samples = clip_samples(cfg_features)
        self.features_here = features_here
        self._fds: dict[int, int] = {}
        self._logmel: LogMel | None = None
        self._pid = os.getpid()

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked into a worker: descriptors are shared, caches are not
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            path = self.index.shards[shard].path
            try:
                self._fds[shard] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise DataError(f"shard {path}: cannot open: {e}") from None
        return self._fds[shard]

    def __len__(self) -> int:
        return self.index.num_samples

    def __getitem__(self, i: int):
        if i < 0:
            wave = torch.zeros(self.num_samples)
            label, key = -1, ""
        else:
            s = self.index.samples[i]
            fd = self._fd(s.shard)
            label = int(np.frombuffer(read_member(fd, self.index, i, "label"), "<i4")[0])
            if not -1 <= label < len(self.index.classes):
                raise DataError(f"{self.index.where(i)}: label {label} outside the "
                                f"{len(self.index.classes)} classes of the manifest")
            raw = read_member(fd, self.index, i, "audio")
            try:
                wave = torch.from_numpy(audio.decode(raw, self.sample_rate, name=self.index.where(i)))
            except ValueError as e:
                raise DataError(str(e)) from None
            wave = fix_length(wave, self.num_samples)
            key = s.key
        if self.features_here:
            if self._logmel is None:
                self._logmel = LogMel(self.cfg_features)
            with torch.no_grad():
                return self._logmel(wave)[0], label, key
        return wave, label, key

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}


def _collate(items):
    xs, labels, keys = zip(*items)
    return torch.stack(xs), torch.tensor(labels, dtype=torch.int64), list(keys)


def _worker_init(_):
    torch.set_num_threads(1)  # one decode per worker process; threads would only contend
    # torchrun and SLURM signal the whole process group: a stop signal is the trainer's to
    # handle (checkpoint at the next step), and a worker killed by it would fail the run instead.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class TorchSource(BatchSource):
    backend = "torch"

    def __init__(self, cfg: Any, split: str, **kw):
        super().__init__(cfg, split, **kw)
        self.cuda = self.device.type == "cuda"
        self.dataset = ShardSamples(self.index, cfg.features, features_here=not self.cuda)
        self.logmel = LogMel(cfg.features).to(self.device) if self.cuda else None
        self.workers = self.num_threads
        self.prefetch = int(cfg.data.prefetch)
        self.buffer = int(cfg.data.shuffle_buffer)
        self._loaders: list[Any] = []

    def plan(self, epoch: int) -> list[list[int]]:
        """Sample ids per step of ``epoch`` for this rank (-1 = padding row)."""
        if self.train:
            return train_plan([sh.samples for sh in self.index.shards], seed=self.seed, epoch=epoch,
                              rank=self.rank, world_size=self.world_size,
                              batch_size=self.batch_size, buffer=self.buffer)
        return eval_plan(self.num_samples, rank=self.rank, world_size=self.world_size,
                         batch_size=self.batch_size)

    def _epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        steps = self.plan(epoch)[start_step:]
        if not steps:
            return
        # Its own generator: a DataLoader draws its workers' base seed from the global RNG, which
        # also drives dropout, so a loader started at a resume would shift the model's draws.
        loader = DataLoader(
            self.dataset, batch_sampler=steps, num_workers=self.workers, collate_fn=_collate,
            pin_memory=self.cuda, worker_init_fn=_worker_init if self.workers else None,
            prefetch_factor=self.prefetch if self.workers else None,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch),
        )
        it = iter(loader)
        self._loaders.append(it)
        try:
            while True:
                try:
                    x, labels, keys = next(it)
                except StopIteration:
                    break
                except DataError as e:  # re-raised from a worker: keep our message, drop its traceback
                    raise DataError(str(e).rsplit("DataError: ", 1)[-1].strip()) from None
                valid = labels.new_tensor([k != "" for k in keys], dtype=torch.bool)
                x = x.to(self.device, non_blocking=True)
                if self.logmel is not None:
                    with torch.no_grad():
                        x = self.logmel(x)
                yield Batch(features=x, labels=labels.to(self.device, non_blocking=True), keys=keys,
                            valid=valid.to(self.device, non_blocking=True))
        finally:
            # Shut workers down now rather than at garbage collection (an abandoned epoch).
            if it in self._loaders:
                self._loaders.remove(it)
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def close(self) -> None:
        for it in list(self._loaders):
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self._loaders.clear()
        self.dataset.close()
