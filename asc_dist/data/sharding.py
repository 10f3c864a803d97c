"""Who reads what, per rank and epoch: the arithmetic every batch source shares.

Training: every rank runs ``floor(N / (batch * world))`` steps of full batches from a disjoint
share; the few samples left over are dropped (a different few each epoch). With ``drop_last``
off the epoch has ``ceil(N / (batch * world))`` steps: the last one holds the ``r`` clips left
over, split over the ranks as evenly as possible (a rank may get none), and
:func:`loss_weight` makes the gradient the mean over those ``r`` clips. ``ids`` (a subset of
the split, e.g. one recording device's clips) restricts an epoch to those clips. Streaming sources
(:func:`train_plan`) mix within each rank's share, near-sequentially through the tars; the
feature cache (:func:`global_plan`) draws every epoch as one permutation of the whole split.
Evaluation: rank r reads the contiguous range ``[N*r//W, N*(r+1)//W)`` (DALI's own shard
split) in stored order, every rank runs ``ceil(ceil(N/W) / batch)`` steps, and rows past a
rank's range are padding.
"""

from __future__ import annotations

import math

import numpy as np


def train_steps(num_samples: int, batch_size: int, world_size: int, drop_last: bool = True) -> int:
    per_step = batch_size * world_size
    return num_samples // per_step if drop_last else -(-num_samples // per_step)


def remainder(num_samples: int, batch_size: int, world_size: int) -> int:
    """Clips in the final partial global batch (``drop_last`` off); 0 when there is none."""
    return num_samples % (batch_size * world_size)


def loss_weight(rows: int, remainder: int, world_size: int) -> float:
    """The factor on a rank's mean loss over its ``rows`` clips of the final partial batch, so
    that DDP's gradient average over ``world_size`` ranks is the mean over all ``remainder`` clips:
    ``world_size * rows / remainder`` (0 for a rank without clips; 1 when every rank is full)."""
    return world_size * rows / remainder


def eval_steps(num_samples: int, batch_size: int, world_size: int) -> int:
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def shard_range(num_samples: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """Sample range DALI's readers give shard ``shard_id`` of ``num_shards`` (same integer formula)."""
    return num_samples * shard_id // num_shards, num_samples * (shard_id + 1) // num_shards


def derive_seed(*parts: int) -> int:
    """A well-mixed 31-bit seed from (seed, epoch, rank, ...): nearby inputs give unrelated streams."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def buffer_shuffle(items: list[int], buffer: int, rng: np.random.Generator) -> list[int]:
    """webdataset's shuffle: a buffer of ``buffer`` items, each output drawn at random from it.

    Keeps reads near-sequential within a tar while mixing neighbouring samples.
    """
    if buffer <= 1:
        return list(items)
    out, buf = [], []
    for x in items:
        buf.append(x)
        if len(buf) >= buffer:
            k = int(rng.integers(len(buf)))
            buf[k], buf[-1] = buf[-1], buf[k]
            out.append(buf.pop())
    while buf:
        k = int(rng.integers(len(buf)))
        buf[k], buf[-1] = buf[-1], buf[k]
        out.append(buf.pop())
    return out


def train_plan(shard_sizes: list[int], *, seed: int, epoch: int, rank: int, world_size: int,
               batch_size: int, buffer: int, keep: np.ndarray | None = None,
               drop_last: bool = True) -> list[list[int]]:
    """Sample ids (stored order numbering) for each training step of ``rank`` in ``epoch``.

    The tar order is shuffled per epoch with a seed all ranks share; all ranks walk the same
    global stream (only the ids ``keep`` marks, a boolean mask over the split, when given) and
    each keeps one sample of every ``world_size`` consecutive ones, so shares are disjoint and
    their sizes differ by at most one; a per-rank shuffle buffer mixes within the share; exactly
    ``train_steps`` batches are taken: full ones, and with ``drop_last`` off a last one holding
    the rest of the share (the shares differ by at most one, so the rest is split as evenly as
    possible; it may be empty).
    """
    starts = np.concatenate([[0], np.cumsum(shard_sizes)]).astype(int)
    shared = np.random.default_rng(derive_seed(seed, epoch))
    order = shared.permutation(len(shard_sizes))
    stream = np.array([i for sh in order for i in range(starts[sh], starts[sh + 1])], dtype=np.int64)
    if keep is not None:
        stream = stream[np.asarray(keep, dtype=bool)[stream]]
    # Each run of `world` consecutive stream samples is dealt out one per rank in a random
    # order: disjoint, equal (+-1) and near-sequential shares that still differ every epoch
    # (a plain i % world split would pin each sample to one rank when tars hold multiples of world).
    chunks = -(-len(stream) // world_size)
    deal = shared.permuted(np.tile(np.arange(world_size), (chunks, 1)), axis=1)[:, rank]
    pos = np.arange(chunks) * world_size + deal
    mine = stream[pos[pos < len(stream)]].tolist()
    rng = np.random.default_rng(derive_seed(seed, epoch, rank + 1))
    mixed = buffer_shuffle(mine, buffer, rng)
    steps = train_steps(len(stream), batch_size, world_size, drop_last)
    return [mixed[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def eval_plan(num_samples: int, *, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """Per step, ``batch_size`` sample ids of this rank's range; -1 marks a padding row."""
    lo, hi = shard_range(num_samples, rank, world_size)
    ids = list(range(lo, hi))
    steps = eval_steps(num_samples, batch_size, world_size)
    ids += [-1] * (steps * batch_size - len(ids))
    return [ids[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def global_plan(num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int,
                batch_size: int, ids: np.ndarray | None = None, drop_last: bool = True) -> np.ndarray:
    """[steps, batch] sample ids of ``rank`` for ``epoch``: one permutation of the whole split (of
    ``ids`` alone when given), a pure function of (seed, epoch), cut into global batches of which
    rank r takes the r-th slice. Every sample is used at most once per epoch across ranks; the
    remainder is dropped, or with ``drop_last`` off forms a last step whose ``r`` clips go to the
    ranks in order, ``r // W`` each and one more to the first ``r % W``; -1 pads that row."""
    n = num_samples if ids is None else len(ids)
    perm = np.random.default_rng(derive_seed(seed, epoch, 0x61_0BA1)).permutation(n)
    if ids is not None:
        perm = np.asarray(ids, dtype=np.int64)[perm]
    per_step = batch_size * world_size
    full = n // per_step
    plan = perm[: full * per_step].reshape(full, world_size, batch_size)[:, rank]
    rest = perm[full * per_step:]
    if drop_last or len(rest) == 0:
        return plan
    sizes = [len(rest) // world_size + (k < len(rest) % world_size) for k in range(world_size)]
    start = sum(sizes[:rank])
    last = np.full((1, batch_size), -1, dtype=plan.dtype)
    last[0, : sizes[rank]] = rest[start:start + sizes[rank]]
    return np.concatenate([plan, last])
