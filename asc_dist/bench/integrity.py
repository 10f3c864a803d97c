"""``bench integrity --shards DIR``: what the per-member digest check costs.

In one run, for each backend: the feature-cache build (the whole split through the streaming
source in stored order, as :func:`asc_dist.data.cache.build_table` does, kept in memory) and
training-mode streaming, each with ``data.verify=true`` and ``data.verify=false``; rounds
interleave the variants and the best round counts (other load on a shared machine only slows a
run). Besides clips/s (wall clock), the CPU time per clip of the whole variant (this process
and its DataLoader workers, from opening the source to closing it), which other load on a
shared machine hardly changes. Also the hash alone per clip on the split's own audio members: xxh3_64 (the one used),
zlib.crc32 and sha256. Results: BENCHMARKS.md ("Shard integrity").
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
import zlib

import torch

from asc_dist.bench import add_stream_args


def _source(cfg, split: str, train: bool, batch_size: int):
    from asc_dist.data import build_source

    return build_source(cfg, split, train=train, rank=0, world_size=1, device=torch.device("cpu"),
                        batch_size=batch_size, seed=0, cache="none")


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (closed DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_stream(cfg, split: str, batches: int, batch_size: int, warmup: int = 2) -> tuple[float, float]:
    """(clips/s, CPU ms per clip) of training-mode streaming (shuffled, epochs rolled over)."""
    cpu0 = _cpu()
    src = _source(cfg, split, True, batch_size)
    done, epoch, start = 0, 0, time.perf_counter()
    try:
        while done < warmup + batches:
            for _ in src.epoch(epoch):
                done += 1
                if done == warmup:
                    start = time.perf_counter()
                if done >= warmup + batches:
                    break
            epoch += 1
        wall = time.perf_counter() - start
    finally:
        src.close()
    return batches * batch_size / wall, (_cpu() - cpu0) / (done * batch_size) * 1e3


def time_cache_build(cfg, split: str, batch_size: int) -> tuple[float, float]:
    """(clips/s, CPU ms per clip) of building the split's feature table (opening included)."""
    from asc_dist.data.cache import build_table

    t0, cpu0 = time.perf_counter(), _cpu()
    src = _source(cfg, split, False, batch_size)
    try:
        n = build_table(src, progress=False).features.shape[0]
        wall = time.perf_counter() - t0
    finally:
        src.close()
    return n / wall, (_cpu() - cpu0) / n * 1e3


def time_hashes(cfg, split: str, clips: int = 64) -> dict[str, float]:
    """ms per clip of each hash over the split's first ``clips`` audio members."""
    from asc_dist.data.manifest import load_split, read_member
    from asc_dist.digest import digest

    index = load_split(cfg.data.shards, split)
    blobs = []
    for i in range(min(clips, index.num_samples)):
        fd = os.open(index.shards[index.samples[i].shard].path, os.O_RDONLY)
        try:
            blobs.append(read_member(fd, index, i, "audio"))
        finally:
            os.close(fd)
    out = {}
    for name, fn in (("xxh3_64", digest), ("crc32", zlib.crc32),
                     ("sha256", lambda b: hashlib.sha256(b).digest())):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for b in blobs:
                fn(b)
            best = min(best, time.perf_counter() - t0)
        out[name] = best / len(blobs) * 1e3
    out["mb_per_clip"] = sum(map(len, blobs)) / len(blobs) / 1e6
    return out


def time_dali_check(cfg, split: str, batch_size: int, repeat: int = 100) -> float:
    """CPU ms per clip of the DALI backend's check alone (row lookup, hashing in its thread pool,
    waiting), on one batch of real pipeline outputs."""
    import numpy as np

    from asc_dist.data.dali import _checked, _shutdown

    src = _source(cfg, split, False, batch_size)
    pipe = None
    try:
        pipe = src.build_pipeline(0)
        feats, labels, info, raw = pipe.outputs()
        labels32 = np.asarray(labels.as_tensor()).reshape(-1)
        info, valid = np.array(info.as_array()), np.ones(batch_size, dtype=bool)
        time.sleep(0.5)  # the pipeline's prefetch finishes: only the check is timed
        t0 = time.process_time()
        for _ in range(repeat):
            _checked(src._verify(raw, labels32, info, valid))
        return (time.process_time() - t0) / (repeat * batch_size) * 1e3
    finally:
        if pipe is not None:
            _shutdown(pipe)
        src.close()


def run(args) -> int:
    from asc_dist import config as config_lib
    from asc_dist.bench import machine, with_values
    from asc_dist.data import dali_available

    cfg = config_lib.load([f"data.shards={args.shards}", f"data.num_threads={args.threads}",
                           *args.config], world_size=1)
    torch.set_num_threads(args.threads)
    backends = [b for b in args.backends.split(",") if b != "dali" or dali_available()]
    print(f"machine: {machine()}")
    print(f"shards: {args.shards}/{args.split}  batch {args.batch_size}  threads {args.threads}  "
          f"streaming: {args.batches} timed batches (+2 warm-up); cache build: the whole split")
    h = time_hashes(cfg, args.split)
    print(f"hash per clip ({h['mb_per_clip']:.2f} MB): " + ", ".join(
        f"{k} {h[k]:.3f} ms ({h['mb_per_clip'] / h[k]:.1f} GB/s)" for k in ("xxh3_64", "crc32", "sha256")),
        flush=True)
    if "dali" in backends:
        c = with_values(cfg, {"data.backend": "dali", "data.verify": True})
        print(f"dali check alone: {time_dali_check(c, args.split, args.batch_size):.3f} CPU ms per clip",
              flush=True)
    best: dict[tuple[str, str, bool], list[tuple[float, float]]] = {}
    for rnd in range(args.repeat):
        for backend in backends:
            for what in ("cache build", "streaming"):
                for verify in (True, False):
                    c = with_values(cfg, {"data.backend": backend, "data.verify": verify})
                    r = (time_cache_build(c, args.split, args.batch_size) if what == "cache build"
                         else time_stream(c, args.split, args.batches, args.batch_size))
                    best.setdefault((backend, what, verify), []).append(r)
                    print(f"  [{rnd + 1}/{args.repeat}] {backend:5s} {what:11s} verify={str(verify).lower():5s} "
                          f"{r[0]:8.1f} clips/s {r[1]:7.2f} CPU ms/clip", flush=True)
    print("best of rounds, verify=true vs verify=false:")
    for backend in backends:
        for what in ("cache build", "streaming"):
            on, off = best[(backend, what, True)], best[(backend, what, False)]
            speed_on, speed_off = max(r[0] for r in on), max(r[0] for r in off)
            cpu_on, cpu_off = min(r[1] for r in on), min(r[1] for r in off)
            print(f"  {backend:5s} {what:11s} clips/s {speed_on:7.1f} vs {speed_off:7.1f} "
                  f"(ratio {speed_on / speed_off:.3f}); CPU ms/clip {cpu_on:6.2f} vs {cpu_off:6.2f} "
                  f"({(cpu_on / cpu_off - 1) * 100:+.1f} %)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("integrity", help="cost of the per-member digest check (data.verify)",
                       description=__doc__.split("\n\n")[0])
    add_stream_args(p, backends="dali,torch", repeat=3,
                    batches_help="timed streaming batches per variant")
    p.add_argument("config", nargs="*", help="config overrides (key=value) or YAML files")
    p.set_defaults(func=run)
