"""Pure-PyTorch backend: WebDataset shards -> soundfile decode in DataLoader workers -> LogMel.

The fallback where DALI is missing and the oracle DALI is tested against. Shards are read by
random access through their DALI index (``os.pread`` of one member, its tar header checked, its
bytes checked against their digest from samples.jsonl unless ``data.verify=false``),
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

    def __init__(self, index: SplitIndex, cfg_features: Any, features_here: bool, verify: bool = True):
        self.index = index
        self.verify = verify  # each member read is checked against its digest (data.verify)
        self.cfg_features = cfg_features
        self.sample_rate = int(cfg_features.sample_rate)
        # shards stored at another rate than the features' go through the pack's own resampler
        self.resampler = index.resampler
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
            label = int(np.frombuffer(read_member(fd, self.index, i, "label", verify=self.verify), "<i4")[0])
            if not -1 <= label < len(self.index.classes):
                raise DataError(f"{self.index.where(i)}: label {label} outside the "
                                f"{len(self.index.classes)} classes of the manifest")
            raw = read_member(fd, self.index, i, "audio", verify=self.verify)
            try:
                wave = torch.from_numpy(audio.decode(raw, self.sample_rate, name=self.index.where(i),
                                                     resampler=self.resampler))
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
        self.dataset = ShardSamples(self.index, cfg.features, features_here=not self.cuda,
                                    verify=bool(cfg.data.verify))
        self.logmel = LogMel(cfg.features).to(self.device) if self.cuda else None
        self.workers = self.num_threads
        self.prefetch = int(cfg.data.prefetch)
        self.buffer = int(cfg.data.shuffle_buffer)
        self._loaders: list[Any] = []
        self._ahead: tuple[tuple[int, int], Iterator[Batch]] | None = None  # training's run-ahead
        self._keep = None
        if self.ids is not None:
            self._keep = np.zeros(self.num_samples, dtype=bool)
            self._keep[self.ids] = True
        self._last_rows: dict[int, int] = {}  # epoch -> clips in this rank's last batch

    def plan(self, epoch: int) -> list[list[int]]:
        """Sample ids per step of ``epoch`` for this rank (-1 = padding row)."""
        if not self.train:
            return eval_plan(self.num_samples, rank=self.rank, world_size=self.world_size,
                             batch_size=self.batch_size)
        plan = train_plan([sh.samples for sh in self.index.shards], seed=self.seed, epoch=epoch,
                          rank=self.rank, world_size=self.world_size, batch_size=self.batch_size,
                          buffer=self.buffer, keep=self._keep, drop_last=self.drop_last)
        if self.remainder:
            self._last_rows[epoch] = len(plan[-1])
            if not plan[-1]:  # no clip left for this rank: one real clip, read at weight 0
                plan[-1] = [int(self.ids[0]) if self.ids is not None else 0]
        return plan

    def _epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        steps = self.steps_per_epoch - start_step
        if steps <= 0:
            return
        # Training reads through one loader across epochs: its workers run ahead into the next
        # epoch's plan, so an epoch shorter than the prefetch never stalls at its boundary (each
        # epoch's batches are still exactly its own plan). It continues only where the last
        # epoch left off; anything else (a resume, an abandoned epoch) starts a new one.
        if self._ahead is None or self._ahead[0] != (epoch, start_step):
            self._stop_ahead()
            self._ahead = ((epoch, start_step), self._start(epoch, start_step))
        it, self._ahead = self._ahead[1], None
        finished = False
        try:
            for step in range(start_step, self.steps_per_epoch):
                batch = next(it)
                if self.remainder and step == self.steps_per_epoch - 1:
                    rows = self._last_rows.pop(epoch)  # planned when the sampler reached it
                    batch.weight = self.step_weight(step, rows)
                    if rows == 0:
                        batch.valid = torch.zeros_like(batch.valid)
                yield batch
            finished = True
        finally:
            if finished and self.train:
                self._ahead = ((epoch + 1, 0), it)
            else:
                self._shutdown(it)

    def _start(self, epoch: int, start_step: int) -> Iterator[Batch]:
        """Batches from (epoch, start_step) on: through every later epoch when training."""
        sampler = _Plans(self, epoch, start_step)
        # Its own generator: a DataLoader draws its workers' base seed from the global RNG, which
        # also drives dropout, so a loader started at a resume would shift the model's draws.
        loader = DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.workers, collate_fn=_collate,
            pin_memory=self.cuda, worker_init_fn=_worker_init if self.workers else None,
            prefetch_factor=self.prefetch if self.workers else None,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch),
        )
        it = iter(loader)
        self._loaders.append(it)
        return _on_device(self, it) if self.cuda else _batches(self, it)

    def _stop_ahead(self) -> None:
        if self._ahead is not None:
            self._shutdown(self._ahead[1])
            self._ahead = None

    def _shutdown(self, batches: Iterator[Batch]) -> None:
        batches.close()  # its finally shuts the loader's workers down now, not at collection

    def close(self) -> None:
        self._stop_ahead()
        for it in list(self._loaders):
            _shutdown_workers(it)
        self._loaders.clear()
        self.dataset.close()


class _Plans:
    """A DataLoader batch sampler: the steps of ``epoch`` from ``start_step``, then (training)
    every following epoch's, in order."""

    def __init__(self, source: TorchSource, epoch: int, start_step: int):
        self.source, self.epoch, self.start_step = source, epoch, start_step

    def __iter__(self):
        yield from self.source.plan(self.epoch)[self.start_step:]
        epoch = self.epoch + 1
        while self.source.train:
            yield from self.source.plan(epoch)
            epoch += 1


def _shutdown_workers(it) -> None:
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def worker_error(e: DataError) -> DataError:
    """A DataError re-raised from a DataLoader worker: our message, without its traceback."""
    return DataError(str(e).rsplit("DataError: ", 1)[-1].strip())


def _unpack(source: TorchSource, it) -> Iterator[tuple]:
    try:
        for x, labels, keys in it:
            yield x, labels, keys, labels.new_tensor([k != "" for k in keys], dtype=torch.bool)
    except DataError as e:
        raise worker_error(e) from None
    finally:
        if it in source._loaders:
            source._loaders.remove(it)
        _shutdown_workers(it)


def _batches(source: TorchSource, it) -> Iterator[Batch]:
    for x, labels, keys, valid in _unpack(source, it):
        yield Batch(features=x, labels=labels, keys=keys, valid=valid)


def _on_device(source: TorchSource, it) -> Iterator[Batch]:
    """CUDA: the next batch's host-to-device copy on a side stream, issued before the current
    batch is handed over, so it overlaps the training step; the training stream waits on its
    event only when it takes that batch. ``record_stream`` keeps the allocator from reusing the
    copies' memory while the training stream may still read it."""
    copy_stream = torch.cuda.Stream(source.device)

    def issue(item):
        x, labels, keys, valid = item
        with torch.cuda.stream(copy_stream):
            moved = [t.to(source.device, non_blocking=True) for t in (x, labels, valid)]
            done = torch.cuda.Event()
            done.record(copy_stream)
        return moved, keys, done

    items = _unpack(source, it)
    ahead = next(items, None)
    ahead = issue(ahead) if ahead is not None else None
    while ahead is not None:
        (x, labels, valid), keys, done = ahead
        nxt = next(items, None)
        ahead = issue(nxt) if nxt is not None else None
        stream = torch.cuda.current_stream(source.device)
        stream.wait_event(done)
        for t in (x, labels, valid):
            t.record_stream(stream)
        with torch.no_grad():
            x = source.logmel(x)
        yield Batch(features=x, labels=labels, keys=keys, valid=valid)
