"""One batch-source interface over the packed shards, with a DALI and a pure-PyTorch backend.

    src = build_source(cfg, "train", train=True, rank=r, world_size=w, device=dev, batch_size=b)
    for batch in src.epoch(e, start_step=k): ...   # Batch(features, labels, keys, valid)

Training epochs are a pure function of (seed, epoch): each rank reads a disjoint share and runs
exactly ``steps_per_epoch`` batches, so DDP ranks never wait on each other at an epoch's end,
and ``epoch(e, start_step=k)`` resumes at global step ``e * steps_per_epoch + k``. Batches are
full, except with ``train.drop_last`` off the final one of an epoch, which carries the
``weight`` its rank's loss is scaled by (asc_dist.data.sharding.loss_weight); a rank with no
clip left gets one padding row (``valid=False``) of weight 0, so DDP still sees its backward.
``data.devices`` keeps the training epochs to the clips of those recording devices. Streaming
backends decode and compute features as they go; the feature cache (``data.cache``,
asc_dist.data.cache) computes them once and serves every epoch from the device; the waveform
cache (``data.cache=waveform``, asc_dist.data.waveform) keeps the training clips' waveforms
there and runs the front end (and the waveform augmentations) per batch. Evaluation
visits each sample once across ranks; every rank runs the same number of batches, with padding
rows marked ``valid=False`` (label -1, key ""). Features are raw log-mel dB (not standardised).

``data.backend``: ``dali`` (asc_dist.data.dali, the only module importing DALI), ``torch``
(asc_dist.data.pytorch) or ``auto`` (DALI when importable, else torch, said once on stderr).
``data.num_threads`` (DALI threads / DataLoader workers per rank) 0 means the CPUs this process
may use (its affinity, which SLURM and taskset set) shared among the node's ranks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from asc_dist.data.manifest import DataError, SplitIndex, load_split
from asc_dist.data.sharding import eval_steps, loss_weight, remainder, train_steps

log = logging.getLogger(__name__)

__all__ = ["Batch", "BatchSource", "DataError", "build_source", "dali_available", "resolve_backend"]


@dataclass
class Batch:
    features: torch.Tensor  # [B, 1, n_mels, frames] float32 dB on the training device
    labels: torch.Tensor  # [B] int64 on device; -1 = unlabelled / padding
    keys: Sequence[str]  # sample keys; "" for padding rows
    valid: torch.Tensor  # [B] bool on device; False = padding
    weight: float = 1.0  # the factor on this rank's mean loss (a partial last batch: see above)


class BatchSource:
    """Shared bookkeeping; backends implement :meth:`_epoch` (and :meth:`close`)."""

    backend = "?"
    cached = False  # True: the whole split is resident on the device (asc_dist.data.cache)

    def __init__(self, cfg: Any, split: str, *, train: bool, rank: int, world_size: int,
                 device: torch.device, batch_size: int, seed: int, index: SplitIndex | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.cfg, self.split, self.train = cfg, split, train
        self.rank, self.world_size, self.batch_size, self.seed = rank, world_size, batch_size, seed
        self.device = torch.device(device)
        self.num_threads = threads_per_process(int(cfg.data.num_threads))
        self.index: SplitIndex = index or load_split(cfg.data.shards, split)
        self.classes = list(self.index.classes)
        self.num_samples = self.index.num_samples
        if train and not self.index.labelled:
            raise DataError(f"split '{split}' in {cfg.data.shards} is unlabelled: cannot train on it")
        # Training only: the clips of data.devices (None: all), and whether to keep a last
        # partial batch per epoch.
        self.ids = self.index.device_ids(cfg.data.devices) if train else None
        self.drop_last = bool(cfg.train.drop_last) if train else True
        if train:
            n = self.num_train
            self.steps_per_epoch = train_steps(n, batch_size, world_size, self.drop_last)
            if self.steps_per_epoch == 0:
                chosen = f" of devices {list(cfg.data.devices)}" if self.ids is not None else ""
                raise DataError(
                    f"split '{split}' has {n} samples{chosen}, fewer than one global batch "
                    f"({batch_size} per rank x {world_size} ranks)"
                )
            self.remainder = 0 if self.drop_last else remainder(n, batch_size, world_size)
        else:
            self.steps_per_epoch = eval_steps(self.num_samples, batch_size, world_size)
            self.remainder = 0

    @property
    def num_train(self) -> int:
        """Clips an epoch draws from: the split, or the data.devices subset of it."""
        return self.num_samples if self.ids is None else len(self.ids)

    def step_weight(self, step: int, rows: int) -> float:
        """The loss factor of this rank's batch at ``step`` (of an epoch) holding ``rows`` clips."""
        if not self.remainder or step != self.steps_per_epoch - 1:
            return 1.0
        return loss_weight(rows, self.remainder, self.world_size)

    def epoch(self, epoch: int = 0, start_step: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from ``start_step`` on (eval ignores ``epoch``: fixed order)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, not {epoch}")
        return self._epoch(epoch, start_step)

    def _epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (f"{type(self).__name__}({self.split!r}, {mode}, rank {self.rank}/{self.world_size}, "
                f"batch {self.batch_size}, {self.steps_per_epoch} steps/epoch, {self.device})")


def threads_per_process(configured: int) -> int:
    """``data.num_threads``, or for 0 this process's CPUs divided among the node's ranks."""
    if configured > 0:
        return configured
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


_dali_state: dict[str, Any] = {}


def dali_available() -> bool:
    """True when DALI imports here; the reason it does not is kept for error messages."""
    if "ok" not in _dali_state:
        try:
            import asc_dist.data.dali  # noqa: F401 - the one module that imports DALI

            _dali_state.update(ok=True, why="")
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken install's OSError etc.
            _dali_state.update(ok=False, why=f"{type(e).__name__}: {e}")
    return _dali_state["ok"]


def resolve_backend(name: str, *, announce: bool = True) -> str:
    """``auto`` -> ``dali`` if importable else ``torch`` (one stderr line); ``dali`` must import."""
    if name == "torch":
        return "torch"
    if name == "dali":
        if not dali_available():
            raise DataError(
                "data.backend=dali but NVIDIA DALI cannot be imported "
                f"({_dali_state['why']}); install nvidia-dali-cuda130 (or -cuda120) or set "
                "data.backend=torch (or auto)"
            )
        return "dali"
    if name == "auto":
        if dali_available():
            return "dali"
        if announce and not _dali_state.get("announced"):
            _dali_state["announced"] = True
            log.info(f"data.backend=auto: DALI unavailable ({_dali_state['why']}); using the torch "
                     "backend (soundfile + torchaudio in DataLoader workers)")
        return "torch"
    raise ValueError(f"data.backend={name!r}: must be dali, torch or auto")


def build_source(cfg: Any, split: str, *, train: bool, rank: int, world_size: int,
                 device: torch.device, batch_size: int, seed: int | None = None,
                 cache: str | None = None) -> BatchSource:
    """The batch source for ``split`` of ``cfg.data.shards`` on this rank (see module doc).

    ``cache`` (default ``data.cache``): ``device`` keeps the split's features resident
    (asc_dist.data.cache; every rank must call this together while it is built), ``none``
    streams, ``auto`` caches when the features fit in ``data.cache_max_gb``, ``waveform`` keeps a
    training split's waveforms resident and runs the front end per batch
    (asc_dist.data.waveform; built collectively too), and is ``auto`` for evaluation sources.
    """
    seed = int(cfg.train.seed if seed is None else seed)
    backend = resolve_backend(cfg.data.backend, announce=rank == 0)
    kw = {"train": train, "rank": rank, "world_size": world_size,
          "device": torch.device(device), "batch_size": batch_size, "seed": seed}
    if backend == "dali":
        from asc_dist.data.dali import DaliSource as Stream
    else:
        from asc_dist.data.pytorch import TorchSource as Stream
    mode = cfg.data.cache if cache is None else cache
    if mode == "waveform":
        if train:
            from asc_dist.data.waveform import WaveformSource

            return WaveformSource(cfg, split, index=load_split(cfg.data.shards, split), **kw)
        mode = "auto"  # evaluation (and what else reads features) computes them as ever
    if mode != "none":
        from asc_dist.data.cache import CachedSource, table_bytes

        index = load_split(cfg.data.shards, split)  # read once, shared by both sources
        need = table_bytes(cfg, index.num_samples)
        if mode == "device" or need <= cfg.data.cache_max_gb * 2**30:
            stream = Stream(cfg, split, **{**kw, "train": False}, index=index)
            return CachedSource(cfg, split, stream=stream, **kw)
        if rank == 0:
            log.info(f"data.cache=auto: the features of split '{split}' take {need / 2**30:.2f} "
                     f"GiB, more than data.cache_max_gb={cfg.data.cache_max_gb:g}: streaming them")
        return Stream(cfg, split, **kw, index=index)
    return Stream(cfg, split, **kw)
